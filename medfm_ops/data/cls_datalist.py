# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Multi-task classification datalists: validation, loading, and the default set (synthetic tasks + real npz tasks).

Schema::

    {"tasks": [{"name": "adrenalmnist3d", "task_id": 0, "labels": {"0": "normal", "1": "adrenal_mass"},
                "modality": "CT"}, ...],
     "training":   [{"image": "a.nii.gz", "task": "adrenalmnist3d", "label": 1},
                    {"image": "x.npz", "array": "train_images", "index": 7, "task": "vessel_mra", "label": 0}, ...],
     "validation": [...], "test": [...]}

``image`` is a NIfTI file or an npz (then ``array`` and ``index`` select one volume); relative paths are relative
to the datalist. ``task`` is a task name (or id); ``label`` is the task-local class ``0..n_t-1``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medfm_ops.data.medmnist import MEDMNIST_TASKS, medmnist_items
from medfm_ops.data.cls_synthetic import SYNTHETIC_CLS_TASKS, write_synthetic_cls_tasks
from medfm_ops.data.task_table import TaskTable
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.json_file import read_json_object

__all__ = ["ClsItemError", "check_cls_item", "load_cls_datalist", "ensure_cls_dataset", "cls_item_name"]

_SECTIONS = ("training", "validation", "test")


class ClsItemError(ValueError):
    """A datalist item is invalid (unknown task, label outside the task's classes, bad image reference)."""


def cls_item_name(item: Mapping[str, Any]) -> str:
    """Short name of an item for messages: ``file.npz[train_images][7]`` or the NIfTI path."""
    img = str(item.get("image", "?"))
    if "array" in item or "index" in item:
        return f"{img}[{item.get('array')}][{item.get('index')}]"
    return img


def check_cls_item(item: Mapping[str, Any], table: TaskTable, where: str = "item") -> dict[str, Any]:
    """
    A checked copy of ``item`` with ``task`` as the task NAME, ``task_id`` and ``label`` as ints, and
    ``global_label`` (the unified-head class).

    Raises:
        ClsItemError: naming ``where`` and the item's image for a missing key, an unknown task, a label outside the
            task's classes, or an npz reference without ``array``/``index``.
    """
    name = cls_item_name(item)
    missing = [k for k in ("image", "task", "label") if k not in item]
    if missing:
        raise ClsItemError(f"{where} ({name}): missing {missing}; expected 'image', 'task', 'label'.")
    try:
        tid = table.task_id_of(item["task"])
    except ValueError as e:
        raise ClsItemError(f"{where} ({name}): {e}") from None
    try:
        label = int(item["label"])
    except (TypeError, ValueError):
        raise ClsItemError(f"{where} ({name}): label {item['label']!r} is not an integer.") from None
    n = table.num_classes_of(tid)
    if not 0 <= label < n or isinstance(item["label"], bool):
        raise ClsItemError(
            f"{where} ({name}): label {item['label']!r} is outside task '{table.task_names[tid]}''s classes "
            f"0..{n - 1} ({table.class_names[tid]})."
        )
    is_npz = str(item["image"]).endswith(".npz")
    if is_npz and ("array" not in item or "index" not in item):
        raise ClsItemError(f"{where} ({name}): an npz image needs 'array' (e.g. 'train_images') and 'index'.")
    out = dict(item)
    out.update(task=table.task_names[tid], task_id=tid, label=label, global_label=table.offset_of(tid) + label)
    if is_npz:
        out["index"] = int(item["index"])
    return out


def load_cls_datalist(
    path: str | os.PathLike, check_files: bool = True
) -> tuple[TaskTable, dict[str, list[dict[str, Any]]]]:
    """
    Read, validate and resolve a classification datalist.

    Returns:
        ``(task_table, {"training": [...], "validation": [...], "test"?: [...]})``, items checked by
        :func:`check_cls_item`, image paths absolute.

    Raises:
        FileNotFoundError: for a missing datalist, or (with ``check_files``) when the only bad items are missing
            image files; every one is listed.
        ValueError / ClsItemError: for a malformed datalist or items: one error lists every bad item (section,
            index, image and what is wrong).
    """
    path = Path(path)
    content = read_json_object(path, "classification datalist")
    for key in ("tasks", "training", "validation"):
        if key not in content:
            raise ValueError(f"{path}: missing '{key}' (expected 'tasks', 'training', 'validation').")
    table = TaskTable.from_tasks(content["tasks"], source=str(path))
    base = path.parent
    sections: dict[str, list[dict[str, Any]]] = {}
    problems: list[str] = []
    missing_files = 0
    for sec in _SECTIONS:
        if sec not in content:
            continue
        items = content[sec]
        if not isinstance(items, list) or (sec != "test" and not items):
            raise ValueError(f"{path}: '{sec}' must be a non-empty list of items.")
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                problems.append(f"{path} {sec}[{i}]: an item must be a dict, got {item!r}.")
                continue
            item = dict(item)
            if "image" in item:
                p = Path(os.path.expanduser(str(item["image"])))
                item["image"] = str(p if p.is_absolute() else (base / p).resolve())
            try:
                checked = check_cls_item(item, table, f"{path} {sec}[{i}]")
            except ClsItemError as e:
                problems.append(str(e))
                continue
            if check_files and not Path(checked["image"]).is_file():
                problems.append(f"{path} {sec}[{i}]: image file not found: {checked['image']}.")
                missing_files += 1
                continue
            out.append(checked)
        sections[sec] = out
    if problems:  # every bad item at once, not only the first
        error = FileNotFoundError if missing_files == len(problems) else ClsItemError
        if len(problems) == 1:
            raise error(problems[0])
        shown = "\n".join(f"  - {m}" for m in problems[:30])
        more = f"\n  ... and {len(problems) - 30} more" if len(problems) > 30 else ""
        raise error(f"{path}: {len(problems)} bad item(s):\n{shown}{more}")
    return table, sections


def ensure_cls_dataset(
    cache_dir: str | os.PathLike,
    synthetic: Mapping[str, Any] | None = None,
    real_tasks: Mapping[str, str | os.PathLike] | None = None,
    real_limit: int | None = None,
    exclude_tasks: Sequence[str] = (),
) -> str:
    """
    Write (once) the datalist of the default multi-task set and return its path.

    Leave-one-task-out: ``exclude_tasks=["adrenalmnist3d"]`` with both real tasks in ``real_tasks`` gives the
    datalist of a foundation pre-trained WITHOUT its target task (the synthetic tasks + the other real task), the
    setting in which Reprogramming Distillation's teacher meets a task it has never seen.

    Args:
        cache_dir: where the synthetic npz files and the datalist go.
        synthetic: ``{"size", "train_cases", "val_cases", "seed", "tasks"?}`` of the synthetic tasks (see
            :func:`~medfm_ops.data.write_synthetic_cls_tasks`); None or ``{"tasks": []}`` for none.
        real_tasks: ``{medmnist name: npz path}`` of real MedMNIST 3D tasks to add (e.g. ``{"adrenalmnist3d":
            "../shared/data/adrenalmnist3d/adrenalmnist3d.npz"}``), their ``train``/``val`` splits. Defaults to none.
        real_limit: keep the first ``real_limit`` cases of each real split (quick runs). Defaults to None (all).
        exclude_tasks: names of tasks left out of the datalist (synthetic or real); each must be one of the tasks
            selected by ``synthetic`` / ``real_tasks`` (a typo would otherwise leave the target task in).
            Defaults to none.

    Raises:
        ValueError: for an unknown real task name, an ``exclude_tasks`` entry that names no selected task, or when
            no task is left.
        NpzReadError / FileNotFoundError: for a missing or corrupt real npz (naming it).
    """
    cache = Path(cache_dir)
    tasks, training, validation = [], [], []
    synthetic = dict(synthetic or {})
    syn_tasks = synthetic.pop("tasks", None)
    syn_tasks = list(SYNTHETIC_CLS_TASKS) if syn_tasks is None else list(syn_tasks)
    excluded = [exclude_tasks] if isinstance(exclude_tasks, str) else list(exclude_tasks or [])
    unknown = [t for t in excluded if t not in syn_tasks and t not in (real_tasks or {})]
    if unknown:
        raise ValueError(
            f"exclude_tasks: {unknown} are not among the selected tasks {syn_tasks + list(real_tasks or {})}; "
            "name a synthetic task or a key of real_tasks."
        )
    syn_tasks = [t for t in syn_tasks if t not in excluded]
    real_tasks = {n: p for n, p in (real_tasks or {}).items() if n not in excluded}
    if syn_tasks:
        paths = write_synthetic_cls_tasks(cache, tasks=syn_tasks, **synthetic)
        for name, p in paths.items():
            spec = SYNTHETIC_CLS_TASKS[name]
            tasks.append({"name": name, "labels": spec["labels"], "modality": spec["modality"]})
            training += medmnist_items(p, name, "train")
            validation += medmnist_items(p, name, "val")
    for name, p in (real_tasks or {}).items():
        if name not in MEDMNIST_TASKS:
            raise ValueError(f"real_tasks: unknown MedMNIST task '{name}'; known: {list(MEDMNIST_TASKS)}.")
        if not Path(p).is_file():
            raise FileNotFoundError(f"real_tasks['{name}']: npz not found at {p} (see ../shared/data/README.md).")
        tasks.append({"name": name, **MEDMNIST_TASKS[name]})
        training += medmnist_items(p, name, "train", real_limit)
        validation += medmnist_items(p, name, "val", real_limit)
    if not tasks:
        raise ValueError(
            f"ensure_cls_dataset: no task selected (excluded: {excluded}) (no synthetic tasks and no real_tasks): name a synthetic task "
            f"({list(SYNTHETIC_CLS_TASKS)}) or add a real one, e.g. --real_tasks \"{{'adrenalmnist3d': "
            "'../shared/data/adrenalmnist3d/adrenalmnist3d.npz'}\"."
        )
    for i, t in enumerate(tasks):
        t["task_id"] = i
    content = {"tasks": tasks, "training": training, "validation": validation}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]
    path = cache / f"cls_datalist_{digest}.json"
    if not path.is_file():
        atomic_write_json(path, content)
    return str(path)
