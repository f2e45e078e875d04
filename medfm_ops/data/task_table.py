# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The task table of a multi-task data set (segmentation regions or classification tasks): task ids, class names,
modalities and the unified class layout (one channel / logit per class of every task)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["TaskKind", "TaskTable", "TASK_KINDS", "RegionTable", "ClsTaskTable"]


@dataclass(frozen=True)
class TaskKind:
    """
    The label convention of one kind of task table.

    Args:
        name: ``"segmentation"`` or ``"classification"``.
        first_label: the task-local label of a task's first class (1 for segmentation: label 0 is background and
            has no channel; 0 for classification).
        min_classes: the fewest classes a task may have.
        word: what one task is called in messages and datalists (``"region"``, ``"task"``).
        entries_key: the datalist key of the task entries (``"regions"``, ``"tasks"``).
        item_key: the datalist items' key holding the integer task id (``"region"``, ``"task_id"``).
    """

    name: str
    first_label: int
    min_classes: int
    word: str
    entries_key: str
    item_key: str


#: the two kinds of task table, by name
TASK_KINDS: dict[str, TaskKind] = {
    "segmentation": TaskKind("segmentation", 1, 1, "region", "regions", "region"),
    "classification": TaskKind("classification", 0, 2, "task", "tasks", "task_id"),
}

@dataclass
class TaskTable:
    """
    Tasks of a multi-task data set and their classes in the unified layout. A task is a segmentation region
    (``kind="segmentation"``) or a classification task (``kind="classification"``); the kind only sets the label
    convention (:data:`TASK_KINDS`):

    - segmentation: task-local labels ``1..n`` (0 is background, no channel), at least 1 class;
    - classification: task-local labels ``0..n-1``, at least 2 classes.

    The unified layout has one channel (segmentation: sigmoid channel; classification: unified-head logit) per class
    of every task, task by task in task-id order: with a brain task (2 classes, id 0) and a thorax task (3 classes,
    id 1), the brain classes are channels 0-1 and the thorax classes channels 2-4, ``num_classes`` is 5 and
    ``offset_of(1)`` is 2. Task ids must be ``0..T-1`` (they index the experts / heads of a routed network).

    Args:
        task_names: task id -> task name (unique).
        class_names: task id -> class names, in task-local label order (label ``first_label`` first).
        modalities: task id -> modality string (``"CT"``, ``"MR"``...). Defaults to ``"unknown"`` for every task.
        source: where the table came from (e.g. a datalist path), named in error messages. Defaults to None.
        kind: ``"segmentation"`` or ``"classification"``. Defaults to ``"segmentation"``.

    Raises:
        ValueError: on an unknown kind, task ids that are not ``0..T-1``, duplicate or empty names, a task with
            fewer classes than its kind needs, or ``task_names``/``class_names`` with different task ids.

    Example::

        table = TaskTable.from_regions([
            {"name": "brain_mri", "task_id": 0, "labels": {"1": "ventricles", "2": "hippocampus"}},
            {"name": "thorax_ct", "task_id": 1, "labels": {"1": "lung_left", "2": "lung_right", "3": "heart"}},
        ])
        table.channels_of(1)  # [2, 3, 4]
        table.channel_mask(torch.tensor([0, 1]))  # (2, 5) bool
        cls = TaskTable.from_tasks([{"name": "adrenal", "task_id": 0, "labels": {"0": "normal", "1": "mass"}}])
        cls.num_classes, cls.offset_of(0)  # 2, 0
    """

    task_names: dict[int, str]
    class_names: dict[int, list[str]]
    modalities: dict[int, str] = field(default_factory=dict)
    source: str | None = None
    kind: str = "segmentation"
    task_channels: dict[int, list[int]] = field(init=False)
    num_classes: int = field(init=False)

    def __post_init__(self) -> None:
        where = self._where()
        if self.kind not in TASK_KINDS:
            raise ValueError(f"task table kind{where} must be one of {sorted(TASK_KINDS)}, got {self.kind!r}.")
        word = self.conventions.word
        names = {int(t): str(n) for t, n in self.task_names.items()}
        classes = {int(t): [str(c) for c in v] for t, v in self.class_names.items()}
        ids = sorted(names)
        if not ids:
            raise ValueError(f"a task table needs at least one {word}{where}.")
        if ids != list(range(len(ids))):
            raise ValueError(f"the task ids of the {word}s{where} must be 0..{len(ids) - 1} without gaps, got {ids}.")
        if sorted(classes) != ids:
            raise ValueError(f"class_names{where} has task ids {sorted(classes)}, the {word} names have {ids}.")
        self.task_names = {t: names[t] for t in ids}
        self.class_names = {t: classes[t] for t in ids}
        self.modalities = {t: str((self.modalities or {}).get(t, "unknown")) for t in ids}
        all_names = list(self.task_names.values())
        for t, name in self.task_names.items():
            if not name.strip():
                raise ValueError(f"{word} with task id {t}{where} has an empty name.")
            if all_names.count(name) > 1:
                raise ValueError(f"{word} name '{name}'{where} is used by more than one task id.")
            n = len(self.class_names[t])
            if not n:
                raise ValueError(f"{word} '{name}' (task id {t}){where} has no classes.")
            if n < self.conventions.min_classes:
                raise ValueError(f"{word} '{name}' (task id {t}){where} needs at least {self.conventions.min_classes} "
                                 f"classes, got {self.class_names[t]}.")  # fmt: skip
        self.task_channels = {}
        start = 0
        for t in ids:
            n = len(self.class_names[t])
            self.task_channels[t] = list(range(start, start + n))
            start += n
        self.num_classes = start
        mask = torch.zeros(len(ids), start, dtype=torch.bool)
        for t, channels in self.task_channels.items():
            mask[t, channels] = True
        self._mask = mask

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_entries(
        cls, entries: Sequence[Mapping[str, Any]], kind: str = "segmentation", source: str | None = None
    ) -> TaskTable:
        """
        Build the table from a datalist's task entries (its ``regions`` or ``tasks`` list, or a saved layout).

        Args:
            entries: ``{"name": str, "task_id": int, "labels": {label: class name}, "modality"?: str}``; other keys
                are ignored. Label keys are the kind's ``first_label..`` without gaps (segmentation: ``"1".."n"``,
                a ``"0"`` background entry is ignored; classification: ``"0".."n-1"``).
            kind: ``"segmentation"`` or ``"classification"``. Defaults to ``"segmentation"``.
            source: where ``entries`` came from (e.g. the datalist path), named in errors. Defaults to None.

        Raises:
            ValueError: when ``entries`` is not a non-empty list, an entry misses ``name``/``task_id``/``labels``,
                a task id is not an integer or is used twice, the label keys break the kind's convention, or the
                table is invalid (see the class).
        """
        if kind not in TASK_KINDS:
            raise ValueError(f"task table kind must be one of {sorted(TASK_KINDS)}, got {kind!r}.")
        conv = TASK_KINDS[kind]
        where, key = (f" in {source}" if source else ""), conv.entries_key
        if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)) or not entries:
            raise ValueError(f"'{key}'{where} must be a non-empty list of {conv.word} entries, got {entries!r}.")
        names: dict[int, str] = {}
        classes: dict[int, list[str]] = {}
        modalities: dict[int, str] = {}
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ValueError(f"{key}[{i}]{where} must be an object, got {entry!r}.")
            missing = [k for k in ("name", "task_id", "labels") if k not in entry]
            if missing:
                raise ValueError(f"{key}[{i}]{where} misses {missing} (expected name, task_id, labels).")
            what = f"{key}[{i}] ('{entry['name']}'){where}"
            task_id = entry["task_id"]
            if isinstance(task_id, bool) or not isinstance(task_id, int):
                raise ValueError(f"{what}: task_id must be an integer, got {task_id!r}.")
            if task_id in names:
                raise ValueError(f"{what}: task_id {task_id} is already used by '{names[task_id]}'.")
            names[task_id] = entry["name"]
            classes[task_id] = _label_list(entry["labels"], conv.first_label, what)
            modalities[task_id] = entry.get("modality", "unknown")
        return TaskTable(names, classes, modalities, source=source, kind=kind)

    @classmethod
    def from_regions(cls, regions: Sequence[Mapping[str, Any]], source: str | None = None) -> TaskTable:
        """A segmentation table from a datalist's ``regions`` (labels ``"1".."n"``); see :meth:`from_entries`."""
        return cls.from_entries(regions, "segmentation", source)

    @classmethod
    def from_tasks(cls, tasks: Sequence[Mapping[str, Any]], source: str | None = None) -> TaskTable:
        """A classification table from a datalist's ``tasks`` (labels ``"0".."n-1"``); see :meth:`from_entries`."""
        return cls.from_entries(tasks, "classification", source)

    def to_entries(self, with_modality: bool = False) -> list[dict[str, Any]]:
        """
        The task entries ``[{"name", "task_id", "labels"}]`` of this table (the datalist form, inverse of
        :meth:`from_entries`; the layout saved by :func:`~medfm_ops.networks.save_network_spec`), each with its
        ``"modality"`` when ``with_modality``.
        """
        out = []
        for t in self.task_ids:
            entry: dict[str, Any] = {"name": self.task_names[t], "task_id": t, "labels": self.labels_of(t)}
            if with_modality:
                entry["modality"] = self.modalities[t]
            out.append(entry)
        return out

    def to_regions(self) -> list[dict[str, Any]]:
        """Former name of :meth:`to_entries` (the datalist ``regions`` / saved layout)."""
        return self.to_entries()

    def to_tasks(self) -> list[dict[str, Any]]:
        """The classification datalist's ``tasks`` entry (with modalities)."""
        return self.to_entries(with_modality=True)

    def one_task_table(self, task: str | int) -> TaskTable:
        """
        The table of ``task`` alone, as task id 0 (its classes and modality, same kind): the layout of an expert or
        student trained on that one task.

        Raises:
            ValueError: on an unknown task (as :meth:`task_id_of`).
        """
        tid = self.task_id_of(task)
        return TaskTable({0: self.task_names[tid]}, {0: list(self.class_names[tid])}, {0: self.modalities[tid]},
                         source=f"{self.conventions.word} {self.task_names[tid]} of {self.source or 'the task table'}",
                         kind=self.kind)  # fmt: skip

    # -------------------------------------------------------------------------------------------------- layout
    @property
    def conventions(self) -> TaskKind:
        """The label convention of this table's kind."""
        return TASK_KINDS[self.kind]

    @property
    def first_label(self) -> int:
        """Task-local label of a task's first class (1 for segmentation, 0 for classification)."""
        return self.conventions.first_label

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self.task_names)

    @property
    def task_ids(self) -> list[int]:
        """Task ids in order, ``0..num_tasks-1``."""
        return list(self.task_names)

    @property
    def task_num_classes(self) -> list[int]:
        """Class count of every task, in task-id order (the heads of a multi-head network)."""
        return [len(self.class_names[t]) for t in self.task_ids]

    @property
    def channel_names(self) -> list[str]:
        """``"task/class"`` name of every unified channel, length ``num_classes``."""
        return [f"{self.task_names[t]}/{c}" for t in self.task_ids for c in self.class_names[t]]

    # segmentation words for the same things
    @property
    def region_names(self) -> dict[int, str]:
        """``task_names`` (a segmentation region is a task)."""
        return self.task_names

    @property
    def region_channels(self) -> dict[int, list[int]]:
        """``task_channels``."""
        return self.task_channels

    @property
    def num_regions(self) -> int:
        """``num_tasks``."""
        return self.num_tasks

    def labels_of(self, task_id: int) -> dict[str, str]:
        """Task-local label names ``{"<label>": name, ...}`` of ``task_id`` (the datalist's ``labels`` form)."""
        return {str(i): c for i, c in enumerate(self.class_names[self._check_id(task_id)], start=self.first_label)}

    def num_classes_of(self, task_id: int) -> int:
        """Number of classes (segmentation: foreground labels) of ``task_id``."""
        return len(self.class_names[self._check_id(task_id)])

    def channels_of(self, task_id: int) -> list[int]:
        """
        Unified channels of the classes of ``task_id`` (task-local label ``k`` is channel ``[k - first_label]``).

        Raises:
            ValueError: when ``task_id`` is not a known task id.
        """
        return list(self.task_channels[self._check_id(task_id)])

    def unified_classes_of(self, task_id: int) -> list[int]:
        """Unified-head classes of ``task_id`` (:meth:`channels_of`)."""
        return self.channels_of(task_id)

    def offset_of(self, task_id: int) -> int:
        """First unified channel of ``task_id`` (``offset_of(t) + label - first_label`` is the unified class)."""
        return self.task_channels[self._check_id(task_id)][0]

    def task_id_of(self, name: str | int) -> int:
        """
        Task id of the task called ``name`` (an integer id is checked and returned).

        Raises:
            ValueError: when no task has that name (the message lists the known ones).
        """
        if isinstance(name, int) and not isinstance(name, bool):
            return self._check_id(name)
        for t, n in self.task_names.items():
            if n == name:
                return t
        word = self.conventions.word
        raise ValueError(f"unknown {word} '{name}'{self._where()}; known {word}s: {list(self.task_names.values())}.")

    # ------------------------------------------------------------------------------------------ cases and masks
    def annotated_labels(self, task_id: int, annotated: Sequence[str] | None = None) -> list[int]:
        """
        Task-local labels of the classes a case annotates, in label order.

        Args:
            task_id: the case's task.
            annotated: class names of ``task_id`` the case annotates (partial labels); ``None`` means all of them.
                Defaults to None.

        Raises:
            ValueError: on an unknown task id, an empty ``annotated``, or a name that is not a class of the task
                (the message lists the task's classes).
        """
        classes = self.class_names[self._check_id(task_id)]
        word, name = self.conventions.word, self.task_names[int(task_id)]
        labels = range(self.first_label, self.first_label + len(classes))
        if annotated is None:
            return list(labels)
        if isinstance(annotated, (str, bytes)) or not isinstance(annotated, Sequence) or not annotated:
            raise ValueError(f"'annotated' must be a non-empty list of class names of {word} '{name}' {classes}, "
                             f"got {annotated!r}.")  # fmt: skip
        unknown = [str(a) for a in annotated if str(a) not in classes]
        if unknown:
            raise ValueError(f"'annotated' names {unknown}, which are not classes of {word} '{name}' "
                             f"(task id {int(task_id)}){self._where()}; its classes are {classes}.")  # fmt: skip
        names = {str(a) for a in annotated}
        return [k for k, c in zip(labels, classes) if c in names]

    def annotated_channel_mask(self, task_id: int, annotated: Sequence[str] | None = None) -> torch.Tensor:
        """
        (num_classes,) bool mask of the unified channels a case annotates: its task's channels, restricted to
        ``annotated`` (all of them when ``None``). Raises as :py:meth:`annotated_labels`.
        """
        channels = self.channels_of(task_id)
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[[channels[k - self.first_label] for k in self.annotated_labels(task_id, annotated)]] = True
        return mask

    def cases_of(self, files: Sequence[Mapping[str, Any]], tasks: str | Sequence[str] | None) -> list[Any]:
        """
        The datalist items of ``files`` that belong to ``tasks`` (single-task baselines, task subsets).

        Args:
            files: datalist items with the integer task id under the kind's item key (``region``, ``task_id``).
            tasks: task name(s); ``None`` keeps every item.

        Returns:
            the selected items, in their order (``files`` itself as a list when ``tasks`` is None).

        Raises:
            ValueError: on an unknown task name (the message lists the known ones), an empty ``tasks``, or when
                ``files`` is not empty but holds no case of ``tasks``.

        Example::

            table.cases_of(datalist["training"], ["brain_mri"])  # the brain cases only
        """
        if tasks is None:
            return list(files)
        conv = self.conventions
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        if not names:
            raise ValueError(f"{conv.entries_key} must name at least one {conv.word} (None keeps all){self._where()}; "
                             f"known {conv.entries_key}: {list(self.task_names.values())}.")  # fmt: skip
        ids = {self.task_id_of(str(n)) for n in names}
        selected = [f for f in files if int(f[conv.item_key]) in ids]
        if files and not selected:
            raise ValueError(f"no case of {conv.entries_key} {names} among the {len(files)} items{self._where()}.")
        return selected

    def channel_mask(self, task_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """
        Boolean mask of every sample's own channels.

        Args:
            task_ids: (B,) integer task ids.

        Returns:
            (B, num_classes) bool tensor on the device of ``task_ids``, True at the channels of the sample's task.

        Raises:
            ValueError: when a task id is outside ``0..num_tasks-1``.
        """
        ids = torch.as_tensor(task_ids).reshape(-1).long()
        bad = ids[(ids < 0) | (ids >= self.num_tasks)]
        if bad.numel():
            raise ValueError(f"unknown task id(s) {sorted(set(bad.tolist()))}{self._where()}; known: {self.task_ids}.")
        return self._mask.to(ids.device)[ids]

    def _check_id(self, task_id: int) -> int:
        t = int(task_id)
        if t not in self.task_names:
            raise ValueError(f"unknown task id {task_id}{self._where()}; known: {self.task_ids} "
                             f"({list(self.task_names.values())}).")  # fmt: skip
        return t

    def _where(self) -> str:
        return f" in {self.source}" if self.source else ""


def _label_list(labels: Any, first: int, what: str) -> list[str]:
    """Class names of a task's ``labels`` object, in label order from ``first`` (a background ``"0"`` is dropped
    when ``first`` is 1)."""
    span = f"{first}..n" if first else "0..n-1"
    if not isinstance(labels, Mapping):
        raise ValueError(f"{what}: labels must be an object {{'{first}': name, ...}}, got {labels!r}.")
    try:
        keyed = {int(k): v for k, v in labels.items() if not (first == 1 and int(k) == 0)}
    except (TypeError, ValueError):
        raise ValueError(f"{what}: label keys must be integers {span}, got {sorted(map(str, labels))}.") from None
    if sorted(keyed) != list(range(first, first + len(keyed))):
        raise ValueError(f"{what}: label keys must be {span} without gaps, got {sorted(keyed)}.")
    return [str(keyed[k]) for k in range(first, first + len(keyed))]


class RegionTable(TaskTable):
    """Former name of a segmentation :class:`TaskTable`: ``RegionTable(region_names, class_names, source)`` builds
    ``TaskTable(..., kind="segmentation")`` (and ``RegionTable.from_regions`` is ``TaskTable.from_regions``)."""

    def __new__(
        cls,
        region_names: Mapping[int, str],
        class_names: Mapping[int, Sequence[str]],
        source: str | None = None,
        modalities: Mapping[int, str] | None = None,
    ) -> TaskTable:
        return TaskTable(dict(region_names), dict(class_names), dict(modalities or {}), source, "segmentation")


class ClsTaskTable(TaskTable):
    """Former name of a classification :class:`TaskTable`: ``ClsTaskTable(task_names, class_names, modalities,
    source)`` builds ``TaskTable(..., kind="classification")`` (``ClsTaskTable.from_tasks`` is
    ``TaskTable.from_tasks``)."""

    def __new__(
        cls,
        task_names: Mapping[int, str],
        class_names: Mapping[int, Sequence[str]],
        modalities: Mapping[int, str] | None = None,
        source: str | None = None,
    ) -> TaskTable:
        return TaskTable(dict(task_names), dict(class_names), dict(modalities or {}), source, "classification")
