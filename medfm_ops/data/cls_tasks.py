# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The class layout of a multi-task classification data set: task ids, task-local classes, unified-head offsets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ClsTaskTable"]


@dataclass
class ClsTaskTable:
    """
    Tasks of a multi-task classification set. Task ``t`` has ``num_classes_of(t)`` task-local labels ``0..n_t-1``;
    the unified head of a foundation classifier has one logit per class of every task, task by task in task-id order
    (``offset_of(t) + label`` is the unified class).

    Args:
        task_names: task id -> task name (unique); ids must be ``0..T-1``.
        class_names: task id -> class names in label order (at least 2).
        modalities: task id -> modality string (``"CT"``, ``"MR"``...). Defaults to ``"unknown"``.
        source: where the table came from, for error messages. Defaults to None.

    Raises:
        ValueError: on ids that are not ``0..T-1``, duplicate names, or a task with fewer than 2 classes.

    Example::

        table = ClsTaskTable.from_tasks([{"name": "adrenal", "task_id": 0, "labels": {"0": "normal", "1": "mass"}}])
        table.offset_of(0), table.num_classes  # 0, 2
    """

    task_names: dict[int, str]
    class_names: dict[int, list[str]]
    modalities: dict[int, str] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        where = f" (in {self.source})" if self.source else ""
        self.task_names = {int(k): str(v) for k, v in self.task_names.items()}
        self.class_names = {int(k): [str(c) for c in v] for k, v in self.class_names.items()}
        ids = sorted(self.task_names)
        if not ids or ids != list(range(len(ids))):
            raise ValueError(f"task ids must be 0..T-1 without gaps, got {ids}{where}.")
        if sorted(self.class_names) != ids:
            raise ValueError(f"tasks {ids} and class lists {sorted(self.class_names)} differ{where}.")
        names = list(self.task_names.values())
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}{where}.")
        for t in ids:
            if len(self.class_names[t]) < 2:
                raise ValueError(f"task '{self.task_names[t]}' needs at least 2 classes, got {self.class_names[t]}{where}.")
        self.modalities = {t: str(self.modalities.get(t, "unknown")) for t in ids}

    @classmethod
    def from_tasks(cls, tasks: Sequence[Mapping[str, Any]], source: str | None = None) -> ClsTaskTable:
        """From ``[{"name", "task_id", "labels": {"0": name, ...}, "modality"?}]`` (a datalist's ``tasks``)."""
        where = f" (in {source})" if source else ""
        if not isinstance(tasks, Sequence) or isinstance(tasks, str) or not tasks:
            raise ValueError(f"'tasks' must be a non-empty list of task entries{where}.")
        names, classes, mods = {}, {}, {}
        for i, t in enumerate(tasks):
            missing = [k for k in ("name", "task_id", "labels") if not isinstance(t, Mapping) or k not in t]
            if missing:
                raise ValueError(f"tasks[{i}] lacks {missing}; expected {{'name', 'task_id', 'labels'}}{where}.")
            labels = t["labels"]
            keys = sorted(int(k) for k in labels) if isinstance(labels, Mapping) else None
            if keys != list(range(len(keys or []))) or not keys:
                raise ValueError(f"tasks[{i}] ('{t['name']}'): labels must be a dict with keys 0..n-1, got {labels}{where}.")
            tid = int(t["task_id"])
            if tid in names:
                raise ValueError(f"tasks[{i}] ('{t['name']}'): task_id {tid} used twice{where}.")
            names[tid] = t["name"]
            classes[tid] = [str(labels[str(k)] if str(k) in labels else labels[k]) for k in keys]
            mods[tid] = t.get("modality", "unknown")
        return cls(names, classes, mods, source)

    def to_tasks(self) -> list[dict[str, Any]]:
        """The ``tasks`` entry of a datalist (inverse of :meth:`from_tasks`)."""
        return [
            {"name": self.task_names[t], "task_id": t, "labels": {str(i): c for i, c in enumerate(self.class_names[t])},
             "modality": self.modalities[t]}
            for t in self.task_ids
        ]  # fmt: skip

    def to_regions(self) -> list[dict[str, Any]]:
        """Layout in the form saved by :func:`~medfm_ops.networks.save_network_spec` (``name/task_id/labels``)."""
        return [{"name": r["name"], "task_id": r["task_id"], "labels": r["labels"]} for r in self.to_tasks()]

    @property
    def task_ids(self) -> list[int]:
        return sorted(self.task_names)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def task_num_classes(self) -> list[int]:
        """Class count of every task, in task-id order (the heads of a multi-head network)."""
        return [len(self.class_names[t]) for t in self.task_ids]

    @property
    def num_classes(self) -> int:
        """Classes of the unified head (all tasks)."""
        return sum(self.task_num_classes)

    def num_classes_of(self, task_id: int) -> int:
        return len(self.class_names[self._check(task_id)])

    def offset_of(self, task_id: int) -> int:
        """First unified-head class of task ``task_id``."""
        return sum(self.task_num_classes[: self._check(task_id)])

    def unified_classes_of(self, task_id: int) -> list[int]:
        o = self.offset_of(task_id)
        return list(range(o, o + self.num_classes_of(task_id)))

    def task_id_of(self, name: str | int) -> int:
        """Task id of a task name (an int id is checked and returned)."""
        if isinstance(name, int) and not isinstance(name, bool):
            return self._check(name)
        for t, n in self.task_names.items():
            if n == name:
                return t
        raise ValueError(f"unknown task '{name}': the tasks are {list(self.task_names.values())}.")

    def _check(self, task_id: int) -> int:
        if int(task_id) not in self.task_names:
            raise ValueError(f"task id {task_id} is not one of {self.task_ids} ({list(self.task_names.values())}).")
        return int(task_id)
