# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The union class layout of a multi-region data set: task ids, class names and global sigmoid channels."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["RegionTable"]


@dataclass
class RegionTable:
    """
    Regions of a multi-region segmentation data set and their classes in the union channel layout.

    Every region (task) has an integer task id and its own region-local labels ``1..n`` (0 is background). The
    union layout has one channel per class of every region, ordered region by region in task-id order, with no
    background channel: with a brain region (2 classes, task 0) and a thorax region (3 classes, task 1), the brain
    classes are channels 0-1 and the thorax classes channels 2-4, ``num_classes`` is 5.

    Task ids must be ``0..num_regions-1`` (they index the experts of a routed network).

    Args:
        region_names: task id -> region name (unique).
        class_names: task id -> class names, in region-local label order (label 1 first).
        source: where the table came from (e.g. a datalist path), used in error messages. Defaults to None.

    Raises:
        ValueError: on task ids that are not ``0..R-1``, duplicate or empty region names, a region without classes,
            or ``region_names``/``class_names`` with different task ids.

    Example::

        table = RegionTable.from_regions([
            {"name": "brain_mri", "task_id": 0, "labels": {"1": "ventricles", "2": "hippocampus"}},
            {"name": "thorax_ct", "task_id": 1, "labels": {"1": "lung_left", "2": "lung_right", "3": "heart"}},
        ])
        table.channels_of(1)  # [2, 3, 4]
        table.channel_mask(torch.tensor([0, 1]))  # (2, 5) bool
    """

    region_names: dict[int, str]
    class_names: dict[int, list[str]]
    source: str | None = None
    region_channels: dict[int, list[int]] = field(init=False)
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        where = self._where()
        region_names = {int(t): str(n) for t, n in self.region_names.items()}
        class_names = {int(t): [str(c) for c in v] for t, v in self.class_names.items()}
        ids = sorted(region_names)
        if not ids:
            raise ValueError(f"a region table needs at least one region{where}.")
        if ids != list(range(len(ids))):
            raise ValueError(f"region task ids{where} must be 0..{len(ids) - 1} without gaps, got {ids}.")
        if sorted(class_names) != ids:
            raise ValueError(f"class_names{where} has task ids {sorted(class_names)}, region_names has {ids}.")
        self.region_names = {t: region_names[t] for t in ids}
        self.class_names = {t: class_names[t] for t in ids}
        names = list(self.region_names.values())
        for t, name in self.region_names.items():
            if not name.strip():
                raise ValueError(f"region with task id {t}{where} has an empty name.")
            if names.count(name) > 1:
                raise ValueError(f"region name '{name}'{where} is used by more than one task id.")
            if not self.class_names[t]:
                raise ValueError(f"region '{name}' (task id {t}){where} has no classes.")
        self.region_channels = {}
        start = 0
        for t in ids:
            n = len(self.class_names[t])
            self.region_channels[t] = list(range(start, start + n))
            start += n
        self.num_classes = start
        mask = torch.zeros(len(ids), start, dtype=torch.bool)
        for t, channels in self.region_channels.items():
            mask[t, channels] = True
        self._mask = mask

    @classmethod
    def from_regions(cls, regions: Sequence[Mapping[str, Any]], source: str | None = None) -> RegionTable:
        """
        Build the table from a datalist's ``regions`` list.

        Args:
            regions: entries ``{"name": str, "task_id": int, "labels": {"1": name, ..., "n": name}}``; other keys
                are ignored. Label keys must be ``"1".."n"`` (a ``"0"`` background entry is ignored).
            source: where ``regions`` came from (e.g. the datalist path), named in errors. Defaults to None.

        Raises:
            ValueError: when ``regions`` is not a non-empty list, an entry misses ``name``/``task_id``/``labels``,
                a task id is not an integer, label keys are not ``1..n``, or the table is invalid (see the class).
        """
        where = f" in {source}" if source else ""
        if not isinstance(regions, Sequence) or isinstance(regions, (str, bytes)) or not regions:
            raise ValueError(f"'regions'{where} must be a non-empty list of region entries, got {regions!r}.")
        region_names: dict[int, str] = {}
        class_names: dict[int, list[str]] = {}
        for i, entry in enumerate(regions):
            if not isinstance(entry, Mapping):
                raise ValueError(f"regions[{i}]{where} must be an object, got {entry!r}.")
            missing = [k for k in ("name", "task_id", "labels") if k not in entry]
            if missing:
                raise ValueError(f"regions[{i}]{where} misses {missing} (expected name, task_id, labels).")
            task_id = entry["task_id"]
            if isinstance(task_id, bool) or not isinstance(task_id, int):
                raise ValueError(
                    f"regions[{i}] ('{entry['name']}'){where}: task_id must be an integer, got {task_id!r}."
                )
            if task_id in region_names:
                raise ValueError(
                    f"regions[{i}] ('{entry['name']}'){where}: task_id {task_id} is already used by "
                    f"'{region_names[task_id]}'."
                )
            region_names[task_id] = entry["name"]
            class_names[task_id] = cls._label_list(entry["labels"], f"regions[{i}] ('{entry['name']}'){where}")
        return cls(region_names, class_names, source=source)

    @staticmethod
    def _label_list(labels: Any, what: str) -> list[str]:
        if not isinstance(labels, Mapping):
            raise ValueError(f"{what}: labels must be an object {{'1': name, ...}}, got {labels!r}.")
        try:
            keyed = {int(k): v for k, v in labels.items() if int(k) != 0}
        except (TypeError, ValueError):
            raise ValueError(f"{what}: label keys must be integers 1..n, got {sorted(labels)}.") from None
        if sorted(keyed) != list(range(1, len(keyed) + 1)):
            raise ValueError(f"{what}: label keys must be 1..n without gaps, got {sorted(keyed)}.")
        return [str(keyed[k]) for k in range(1, len(keyed) + 1)]

    @property
    def num_regions(self) -> int:
        """Number of regions (tasks)."""
        return len(self.region_names)

    @property
    def task_ids(self) -> list[int]:
        """Task ids in order, ``0..num_regions-1``."""
        return list(self.region_names)

    @property
    def channel_names(self) -> list[str]:
        """``"region/class"`` name of every union channel, length ``num_classes``."""
        return [f"{self.region_names[t]}/{c}" for t in self.task_ids for c in self.class_names[t]]

    def labels_of(self, task_id: int) -> dict[str, str]:
        """Region-local label names ``{"1": name, ...}`` of ``task_id`` (the datalist's ``labels`` form)."""
        return {str(i): c for i, c in enumerate(self.class_names[self._check_id(task_id)], start=1)}

    def num_classes_of(self, task_id: int) -> int:
        """Number of classes (foreground labels) of ``task_id``."""
        return len(self.class_names[self._check_id(task_id)])

    def channels_of(self, task_id: int) -> list[int]:
        """
        Global channel indices of the classes of ``task_id`` (region-local label ``k`` is channel ``[k - 1]``).

        Raises:
            ValueError: when ``task_id`` is not a known task id.
        """
        return list(self.region_channels[self._check_id(task_id)])

    def annotated_labels(self, task_id: int, annotated: Sequence[str] | None = None) -> list[int]:
        """
        Region-local labels (``1..n``) of the classes a case annotates, in label order.

        Args:
            task_id: the case's region.
            annotated: class names of ``task_id`` the case annotates (partial labels); ``None`` means all of them.
                Defaults to None.

        Raises:
            ValueError: on an unknown task id, an empty ``annotated``, or a name that is not a class of the region
                (the message lists the region's classes).
        """
        classes = self.class_names[self._check_id(task_id)]
        if annotated is None:
            return list(range(1, len(classes) + 1))
        if isinstance(annotated, (str, bytes)) or not isinstance(annotated, Sequence) or not annotated:
            raise ValueError(f"'annotated' must be a non-empty list of class names of region "
                             f"'{self.region_names[int(task_id)]}' {classes}, got {annotated!r}.")
        unknown = [str(a) for a in annotated if str(a) not in classes]
        if unknown:
            raise ValueError(
                f"'annotated' names {unknown}, which are not classes of region '{self.region_names[int(task_id)]}' "
                f"(task id {int(task_id)}){self._where()}; its classes are {classes}."
            )
        names = {str(a) for a in annotated}
        return [k for k, c in enumerate(classes, start=1) if c in names]

    def annotated_channel_mask(self, task_id: int, annotated: Sequence[str] | None = None) -> torch.Tensor:
        """
        (num_classes,) bool mask of the union channels a case annotates: its region's channels, restricted to
        ``annotated`` (all of them when ``None``). Raises as :py:meth:`annotated_labels`.
        """
        channels = self.channels_of(task_id)
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[[channels[k - 1] for k in self.annotated_labels(task_id, annotated)]] = True
        return mask

    def task_id_of(self, name: str) -> int:
        """
        Task id of the region called ``name``.

        Raises:
            ValueError: when no region has that name (the message lists the known regions).
        """
        for t, n in self.region_names.items():
            if n == name:
                return t
        raise ValueError(f"unknown region '{name}'{self._where()}; known regions: {list(self.region_names.values())}.")

    def cases_of(self, files: Sequence[Mapping[str, Any]], regions: str | Sequence[str] | None) -> list[Any]:
        """
        The datalist items of ``files`` that belong to ``regions`` (single-task baselines, region subsets).

        Args:
            files: datalist items with an integer ``region`` (task id).
            regions: region name(s); ``None`` keeps every item.

        Returns:
            the selected items, in their order (``files`` itself as a list when ``regions`` is None).

        Raises:
            ValueError: on an unknown region name (the message lists the known ones), an empty ``regions``, or when
                ``files`` is not empty but holds no case of ``regions``.

        Example::

            table.cases_of(datalist["training"], ["brain_mri"])  # the brain cases only
        """
        if regions is None:
            return list(files)
        names = [regions] if isinstance(regions, str) else list(regions)
        if not names:
            raise ValueError(f"regions must name at least one region (None keeps all){self._where()}; known regions: "
                             f"{list(self.region_names.values())}.")
        ids = {self.task_id_of(str(n)) for n in names}
        selected = [f for f in files if int(f["region"]) in ids]
        if files and not selected:
            raise ValueError(f"no case of regions {names} among the {len(files)} items{self._where()}.")
        return selected

    def channel_mask(self, task_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """
        Boolean mask of every sample's own channels.

        Args:
            task_ids: (B,) integer task ids.

        Returns:
            (B, num_classes) bool tensor on the device of ``task_ids``, True at the channels of the sample's region.

        Raises:
            ValueError: when a task id is outside ``0..num_regions-1``.
        """
        ids = torch.as_tensor(task_ids).reshape(-1).long()
        bad = ids[(ids < 0) | (ids >= self.num_regions)]
        if bad.numel():
            raise ValueError(f"unknown task id(s) {sorted(set(bad.tolist()))}{self._where()}; known: {self.task_ids}.")
        return self._mask.to(ids.device)[ids]

    def to_regions(self) -> list[dict[str, Any]]:
        """The datalist ``regions`` list for this table."""
        return [{"name": self.region_names[t], "task_id": t, "labels": self.labels_of(t)} for t in self.task_ids]

    def _check_id(self, task_id: int) -> int:
        t = int(task_id)
        if t not in self.region_names:
            raise ValueError(f"unknown task id {task_id}{self._where()}; known: {self.task_ids}.")
        return t

    def _where(self) -> str:
        return f" in {self.source}" if self.source else ""
