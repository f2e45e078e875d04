# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
Convert Medical Segmentation Decathlon (MSD) style data sets into the medfm multi-region datalist.

An MSD data set is a directory with ``dataset.json`` (``labels``, ``training`` with ``./imagesTr/...`` paths),
``imagesTr/`` and ``labelsTr/``. Each converted data set becomes one region of the datalist (schema in
:py:mod:`medfm_ops.data.synthetic`); several data sets form one multi-region set by appending them one after
another (the next task id each time). Paths in the datalist are relative to the datalist's directory. Several data
sets that label different subsets of one region's classes (partial labels) go through a mapping file instead:
:py:func:`~medfm_ops.data.msd_mapping.convert_msd_mapping`.

Example::

    convert_msd("../shared/data/msd_hippocampus", "brain_hippocampus", "data/multi.json")
    convert_msd("/data/Task09_Spleen", "abdomen_spleen", "data/multi.json", append=True)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.data.task_table import TaskTable
from medfm_ops.utils.json_file import read_json_object

__all__ = ["case_groups", "convert_msd", "read_msd_dataset", "split_cases"]

_NII = re.compile(r"\.nii(\.gz)?$")


def _label_names(labels: Any, source: Path) -> dict[str, str]:
    """``dataset.json`` labels (``{"0": "background", "1": "Anterior"}`` or nnU-Net's ``{"background": 0}``)."""
    if not isinstance(labels, Mapping) or not labels:
        raise ValueError(f"{source}: 'labels' must be a non-empty object, got {labels!r}.")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        labels = {str(v): k for k, v in labels.items()}  # nnU-Net v2 style: name -> value
    try:
        keyed = {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise ValueError(f"{source}: label keys must be integers, got {sorted(labels)}.") from None
    keyed.pop(0, None)
    if sorted(keyed) != list(range(1, len(keyed) + 1)):
        raise ValueError(f"{source}: foreground label values must be 1..n without gaps, got {sorted(keyed)}.")
    return {str(k): re.sub(r"\s+", "_", keyed[k].strip().lower()) for k in range(1, len(keyed) + 1)}


def read_msd_dataset(dataset_dir: str | os.PathLike) -> tuple[dict[str, str], list[dict[str, str]], dict[str, Any]]:
    """
    Read an MSD-style data set.

    Cases come from ``dataset.json``'s ``training`` list (``./imagesTr/x.nii.gz`` paths are resolved against
    ``dataset_dir``); without that list, from ``imagesTr/*.nii[.gz]`` paired with the same name in ``labelsTr/``.
    macOS resource files (``._*``) are ignored. Cases are sorted by image path.

    Args:
        dataset_dir: directory holding ``dataset.json``, ``imagesTr/`` and ``labelsTr/``.

    Returns:
        ``(label_names, cases, info)``: ``{"1": "anterior", ...}`` (lower case, spaces as ``_``), a list of
        ``{"image": abs path, "label": abs path}`` and the remaining ``dataset.json`` fields (name, modality, ...).

    Raises:
        FileNotFoundError: when ``dataset.json``, an image or a label file is missing (the message names it).
        ValueError: on invalid JSON, invalid ``labels``, or no cases.
    """
    root = Path(dataset_dir).expanduser().resolve()
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"MSD data set {root}: no dataset.json (expected dataset.json, imagesTr/, labelsTr/).")
    meta = read_json_object(meta_path, "MSD dataset.json")
    label_names = _label_names(meta.get("labels"), meta_path)

    entries = meta.get("training")
    if entries is None:
        entries = [
            {"image": f"imagesTr/{p.name}", "label": f"labelsTr/{p.name}"}
            for p in sorted((root / "imagesTr").glob("*"))
            if _NII.search(p.name)
        ]
    if not isinstance(entries, list):
        raise ValueError(f"{meta_path}: 'training' must be a list of {{'image', 'label'}} objects.")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{meta_path}: training[{i}] must have 'image' and 'label', got {entry!r}.")
        if Path(entry["image"]).name.startswith("._"):
            continue
        image, label = (root / os.path.normpath(str(entry[k])) for k in ("image", "label"))
        for kind, path in (("image", image), ("label", label)):
            if not path.is_file():
                raise FileNotFoundError(f"{meta_path}: training[{i}] {kind} file not found: {path}.")
        cases.append({"image": str(image), "label": str(label)})
    if not cases:
        raise ValueError(f"MSD data set {root}: no training cases found in {meta_path} or imagesTr/.")
    cases.sort(key=lambda c: c["image"])
    info = {k: v for k, v in meta.items() if k not in ("training", "test", "labels")}
    return label_names, cases, info


def _count(split: float | int, n: int, what: str) -> int:
    if isinstance(split, bool) or not isinstance(split, (int, float)):
        raise ValueError(f"{what} must be a fraction in (0, 1) or a case count, got {split!r}.")
    if isinstance(split, float) and not split.is_integer():
        if not 0.0 < split < 1.0:
            raise ValueError(f"{what} must be a fraction in (0, 1) or a case count, got {split}.")
        return max(1, round(split * n))
    return int(split)


def case_groups(cases: list[dict[str, Any]], group_pattern: str | None, key: str = "image") -> list[str] | None:
    """
    The group (e.g. patient) of every case: the first capture group of ``group_pattern`` searched in the file name of
    ``case[key]``; ``None`` when ``group_pattern`` is None (every case its own group).

    Raises:
        ValueError: when ``group_pattern`` is not a valid regular expression with one group, or does not match a
            case (the message names the file and the pattern).
    """
    if group_pattern is None:
        return None
    try:
        rx = re.compile(group_pattern)
    except re.error as e:
        raise ValueError(f"group_pattern {group_pattern!r} is not a regular expression: {e}.") from None
    if rx.groups < 1:
        raise ValueError(f"group_pattern {group_pattern!r} needs one capture group (the patient id), e.g. "
                         "'(patient\\d+)_frame'.")
    groups = []
    for case in cases:
        name = Path(str(case[key])).name
        m = rx.search(name)
        if m is None:
            raise ValueError(f"group_pattern {group_pattern!r} does not match case file {name!r}.")
        groups.append(m.group(1))
    return groups


def split_cases(
    cases: list[dict[str, Any]],
    val_split: float | int = 0.2,
    test_split: float | int = 0,
    seed: int = 0,
    groups: list[str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """
    Deterministic seeded split into training / validation / test, optionally by group (e.g. by patient: every
    case of one group lands in the same section).

    Args:
        cases: the cases, in a stable order (e.g. sorted by path).
        val_split: validation fraction in (0, 1) or number of cases (of groups when ``groups`` is given).
            Defaults to 0.2.
        test_split: test fraction in (0, 1) or number of cases / groups (0: no test section). Defaults to 0.
        seed: permutation seed (numpy ``default_rng``). Defaults to 0.
        groups: one group name per case (see :func:`case_groups`); fractions and counts then apply to the groups
            in order of first appearance. Defaults to None (each case its own group: the same split as before).

    Returns:
        ``{"training", "validation", "test"}`` lists, each in the input order.

    Raises:
        ValueError: on an invalid fraction/count, ``groups`` of another length than ``cases``, or when fewer than one
            training and one validation case (group) remain.
    """
    if groups is not None:
        if len(groups) != len(cases):
            raise ValueError(f"groups has {len(groups)} entries for {len(cases)} cases.")
        names = list(dict.fromkeys(groups))
        parts = split_cases([{"group": g} for g in names], val_split, test_split, seed)
        where = {p["group"]: section for section, items in parts.items() for p in items}
        out_g: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
        for case, g in zip(cases, groups):
            out_g[where[g]].append(case)
        return out_g
    n = len(cases)
    n_test = 0 if test_split == 0 else _count(test_split, n, "test_split")
    n_val = _count(val_split, n, "val_split")
    if n_val < 1 or n_test < 0 or n - n_val - n_test < 1:
        raise ValueError(
            f"cannot split {n} cases into {n_val} validation and {n_test} test cases with at least one training case "
            "and one validation case."
        )
    order = np.random.default_rng(int(seed)).permutation(n)
    val_idx, test_idx = set(order[:n_val].tolist()), set(order[n_val : n_val + n_test].tolist())
    out: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    for i, case in enumerate(cases):
        out["validation" if i in val_idx else "test" if i in test_idx else "training"].append(case)
    return out


def _relative(path: str, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive (Windows): keep it absolute
        return Path(path).as_posix()


def convert_msd(
    dataset_dir: str | os.PathLike,
    region_name: str,
    out_datalist: str | os.PathLike,
    val_split: float | int = 0.2,
    test_split: float | int = 0,
    seed: int = 0,
    append: bool = False,
    overwrite: bool = False,
    name: str | None = None,
) -> dict[str, Any]:
    """
    Convert an MSD-style data set into a one-region datalist, or append it as a new region to an existing one.

    The region gets ``labels`` from ``dataset.json`` (lower case), the next free task id (0 for a new datalist),
    and records its source and split (``{"source", "seed", "val_split", "test_split", "num_training", ...}``).
    The datalist is written atomically (temporary file + rename).

    Args:
        dataset_dir: MSD-style directory (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        region_name: name of the new region (unique within the datalist).
        out_datalist: datalist JSON to write (its directory is created).
        val_split: validation fraction in (0, 1) or number of cases. Defaults to 0.2.
        test_split: test fraction or number of cases; 0 writes no test cases. Defaults to 0.
        seed: split seed. Defaults to 0.
        append: add the region to the existing ``out_datalist``. Defaults to False.
        overwrite: replace an existing ``out_datalist`` (without ``append``). Defaults to False.
        name: datalist name for a new datalist. Defaults to ``region_name``.

    Returns:
        the written datalist (as a dict).

    Raises:
        FileExistsError: when ``out_datalist`` exists and neither ``append`` nor ``overwrite`` is set.
        FileNotFoundError: when ``append`` is set and ``out_datalist`` does not exist, or MSD files are missing.
        ValueError: on a duplicate region name, an invalid existing datalist, or an impossible split.
    """
    out = Path(out_datalist).expanduser().absolute()
    if not str(region_name).strip():
        raise ValueError("region_name must be a non-empty string.")
    if append:
        if not out.is_file():
            raise FileNotFoundError(f"cannot append region '{region_name}': datalist {out} does not exist.")
        try:
            datalist = json.loads(out.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"cannot append region '{region_name}': {out} is not valid JSON ({e}).") from e
        if not isinstance(datalist, dict) or not isinstance(datalist.get("regions"), list):
            raise ValueError(f"cannot append region '{region_name}': {out} has no 'regions' list.")
        table = TaskTable.from_regions(datalist["regions"], source=str(out))
        if region_name in table.task_names.values():
            raise ValueError(
                f"{out} already has a region named '{region_name}' (regions: {list(table.task_names.values())}); "
                "choose another --region_name."
            )
        task_id = table.num_tasks
    else:
        if out.exists() and not overwrite:
            raise FileExistsError(f"{out} exists: pass append=True to add a region or overwrite=True to replace it.")
        datalist = {"name": name or str(region_name), "regions": [], "training": [], "validation": []}
        task_id = 0

    label_names, cases, info = read_msd_dataset(dataset_dir)
    parts = split_cases(cases, val_split=val_split, test_split=test_split, seed=seed)
    datalist["regions"].append(
        {
            "name": str(region_name),
            "task_id": task_id,
            "labels": label_names,
            "modality": info.get("modality"),
            "source": str(Path(dataset_dir).expanduser().resolve()),
            "split": {
                "seed": int(seed),
                "val_split": val_split,
                "test_split": test_split,
                **{f"num_{k}": len(v) for k, v in parts.items()},
            },
        }
    )
    for section, items in parts.items():
        if not items:
            continue
        datalist.setdefault(section, [])
        for case in items:
            datalist[section].append(
                {
                    "image": _relative(case["image"], out.parent),
                    "label": _relative(case["label"], out.parent),
                    "region": task_id,
                    "region_name": str(region_name),
                    "label_names": dict(label_names),
                    "dataset": Path(dataset_dir).expanduser().resolve().name,
                    "annotated": list(label_names.values()),
                }
            )
    atomic_write_json(out, datalist)
    return datalist
