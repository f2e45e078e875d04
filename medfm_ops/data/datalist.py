# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Load and validate a multi-region datalist (schema in :py:mod:`medfm_ops.data.synthetic`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medfm_ops.data.task_table import TaskTable
from medfm_ops.utils.json_file import read_json_object

__all__ = ["load_datalist", "require_files", "SECTIONS"]

#: Item sections of a datalist; ``test`` is optional.
SECTIONS = ("training", "validation", "test")
_REQUIRED_TOP = ("regions", "training", "validation")
_REQUIRED_ITEM = ("image", "label", "region")


def _resolve(path: Any, base: Path) -> str:
    p = Path(os.path.expanduser(str(path)))
    return str(p if p.is_absolute() else (base / p).resolve())


def load_datalist(
    path: str | os.PathLike, check_files: bool = True
) -> tuple[TaskTable, dict[str, list[dict[str, Any]]]]:
    """
    Read a datalist JSON, validate it and resolve its paths.

    Args:
        path: the datalist file.
        check_files: check that every image and label file exists. Defaults to True.

    Returns:
        ``(region_table, sections)``: the :py:class:`TaskTable` of the ``regions`` entry and
        ``{"training": [...], "validation": [...], "test": [...]}`` (``test`` only when present) with copies of the
        items whose ``image``/``label`` are absolute paths (relative ones are taken relative to the datalist's
        directory), whose ``region`` is an int, ``region_name``/``label_names`` those of the region, ``dataset`` the
        data set the case comes from (default: the region name) and ``annotated`` the region's classes the case's
        label annotates, in the region's order (partial labels; default: all of them).

    Raises:
        FileNotFoundError: when the datalist or (with ``check_files``) a referenced file does not exist.
        ValueError: on invalid JSON, missing top-level keys, an empty ``training``/``validation`` section, an item
            without ``image``/``label``/``region``, a region id not in the table, an item whose ``region_name``
            disagrees with the table, an empty ``dataset``, or an ``annotated`` that is not a non-empty list of
            distinct class names of the item's region. Messages name the datalist, the item (``section[index]``
            and image path) and
            what was expected.
    """
    src = Path(path).expanduser().absolute()
    data = read_json_object(src, "datalist")
    missing = [k for k in _REQUIRED_TOP if k not in data]
    if missing:
        raise ValueError(
            f"datalist {src}: missing top-level key(s) {missing}; expected 'name', 'regions', 'training', "
            f"'validation' and optionally 'test'."
        )
    table = TaskTable.from_regions(data["regions"], source=f"datalist {src}")
    base = src.parent
    out: dict[str, list[dict[str, Any]]] = {}
    for section in SECTIONS:
        if section not in data:
            continue
        items = data[section]
        if not isinstance(items, list):
            raise ValueError(f"datalist {src}: '{section}' must be a list of items, got {type(items).__name__}.")
        if not items and section != "test":
            raise ValueError(f"datalist {src}: '{section}' is empty; expected at least one item.")
        out[section] = [
            _check_item(item, f"{section}[{i}]", src, base, table, check_files) for i, item in enumerate(items)
        ]
    return table, out


def _check_item(item: Any, where: str, src: Path, base: Path, table: TaskTable, check_files: bool) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ValueError(f"datalist {src}: item {where} must be an object with {list(_REQUIRED_ITEM)}, got {item!r}.")
    case = f"item {where} (image {item.get('image', '<none>')!r})"
    missing = [k for k in _REQUIRED_ITEM if k not in item]
    if missing:
        raise ValueError(f"datalist {src}: {case} misses {missing}; each item needs {list(_REQUIRED_ITEM)}.")
    region = item["region"]
    if isinstance(region, bool) or not isinstance(region, int) or region not in table.task_names:
        raise ValueError(
            f"datalist {src}: {case} has region {region!r}; expected one of the task ids {table.task_ids} "
            f"({table.task_names})."
        )
    name = item.get("region_name")
    if name is not None and name != table.task_names[region]:
        raise ValueError(
            f"datalist {src}: {case} has region_name '{name}' but task id {region} is "
            f"'{table.task_names[region]}' in 'regions'."
        )
    resolved = dict(item)
    resolved["dataset"], resolved["annotated"] = _check_partial_labels(item, case, src, table, region)
    for key in ("image", "label"):
        resolved[key] = _resolve(item[key], base)
        if check_files and not os.path.isfile(resolved[key]):
            raise FileNotFoundError(f"datalist {src}: {case}: {key} file not found: {resolved[key]}.")
    resolved["region_name"] = table.task_names[region]
    resolved["label_names"] = table.labels_of(region)
    return resolved


def _check_partial_labels(
    item: dict[str, Any], case: str, src: Path, table: TaskTable, region: int
) -> tuple[str, list[str]]:
    """The item's ``dataset`` (default: the region name) and ``annotated`` classes (default: all, region order)."""
    dataset = item.get("dataset", table.task_names[region])
    if not isinstance(dataset, str) or not dataset.strip():
        raise ValueError(f"datalist {src}: {case} has dataset {dataset!r}; expected a non-empty string (the name of "
                         "the data set the case comes from) or no 'dataset' key.")
    annotated = item.get("annotated")
    if annotated is not None:
        if not isinstance(annotated, list) or not all(isinstance(a, str) for a in annotated):
            raise ValueError(f"datalist {src}: {case} has annotated {annotated!r}; expected a list of class names of "
                             f"region '{table.task_names[region]}' {table.class_names[region]}.")
        if len(set(annotated)) != len(annotated):
            raise ValueError(f"datalist {src}: {case} lists a class twice in annotated {annotated}.")
    try:
        labels = table.annotated_labels(region, annotated)
    except ValueError as e:
        raise ValueError(f"datalist {src}: {case}: {e}") from None
    return dataset, [table.class_names[region][k - 1] for k in labels]


def require_files(
    files: Sequence[dict[str, Any]], dataset_dir: str | os.PathLike, keys: Sequence[str] = ("image",)
) -> list[dict[str, Any]]:
    """
    Check an inference file list before a run: non-empty and every ``keys`` path exists.

    Args:
        files: items such as ``[{"image": path}, ...]``.
        dataset_dir: where they were looked for (named in the error).
        keys: item keys holding paths. Defaults to ``("image",)``.

    Returns:
        ``files`` as a list.

    Raises:
        FileNotFoundError: when ``files`` is empty or a file is missing.
    """
    files = list(files)
    if not files:
        raise FileNotFoundError(f"no input images found in {dataset_dir} (expected *.nii or *.nii.gz files).")
    for i, item in enumerate(files):
        for key in keys:
            path = item.get(key) if isinstance(item, dict) else None
            if path is None or not os.path.exists(str(path)):
                raise FileNotFoundError(
                    f"input {i} of {dataset_dir}: '{key}' file not found: {path!r} (item {item!r})."
                )
    return files
