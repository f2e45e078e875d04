# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A site's deterministic train/validation split of an MSD-style data set, saved once and reused."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medfm_ops.data import read_msd_dataset, split_cases
from medfm_ops.utils.atomic_io import atomic_write_text

__all__ = ["load_or_create_split", "SPLIT_FILENAME"]

#: default name of the split file, written next to the fine-tuning outputs
SPLIT_FILENAME = "split.json"


def _rel(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _subset(items: list[dict[str, Any]], limit: int | None, what: str) -> list[dict[str, Any]]:
    if limit is None:
        return items
    if int(limit) < 1:
        raise ValueError(f"{what} must be a positive number of cases or None, got {limit}.")
    return items[: int(limit)]


def load_or_create_split(
    dataset_dir: str | os.PathLike,
    split_file: str | os.PathLike,
    val_split: float | int = 0.2,
    seed: int = 0,
    num_train_cases: int | None = None,
    num_val_cases: int | None = None,
) -> dict[str, Any]:
    """
    The train/validation split of an MSD-style data set: read from ``split_file`` when it exists, otherwise made
    with :py:func:`medfm_ops.data.split_cases` (seeded permutation of the cases sorted by image path) and written
    there atomically. The file stores case paths relative to ``dataset_dir``, so a site can move its data and keep
    its split.

    Args:
        dataset_dir: MSD-style directory (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        split_file: JSON file of the split (created with its parents when missing, reused when present).
        val_split: validation fraction in (0, 1) or number of cases. Defaults to 0.2.
        seed: permutation seed. Defaults to 0.
        num_train_cases: use only the first N training cases of the split (a shortened run; the saved split is the
            full one). Defaults to None (all).
        num_val_cases: likewise for the validation cases. Defaults to None (all).

    Returns:
        ``{"dataset_dir", "split_file", "seed", "val_split", "label_names", "training", "validation", "reused"}``
        with ``training``/``validation`` lists of ``{"image", "label", "region": 0}`` (absolute paths) and
        ``label_names`` the site's ``{"1": name, ...}`` from ``dataset.json``.

    Raises:
        ValueError: when an existing split file was made with another ``seed``/``val_split`` (delete it or pass the
            same values), is not valid JSON, or names no cases.
        FileNotFoundError: when the data set or a case named by the split file is missing.

    Example::

        split = load_or_create_split("../shared/data/msd_hippocampus", "runs/site/split.json", seed=0)
        len(split["training"]), len(split["validation"])  # (160, 40)
    """
    if dataset_dir is None:
        raise ValueError("no data set given: pass --dataset_dir <MSD-style directory>.")
    root = Path(dataset_dir).expanduser().resolve()
    label_names, cases, _ = read_msd_dataset(root)
    path = Path(split_file)
    reused = path.is_file()
    if reused:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"split file {path}: invalid JSON ({e}); delete it to make a new split.") from e
        if saved.get("seed") != int(seed) or saved.get("val_split") != val_split:
            raise ValueError(
                f"split file {path} was made with seed={saved.get('seed')}, val_split={saved.get('val_split')} but "
                f"seed={seed}, val_split={val_split} were asked: pass the saved values or delete the file."
            )
        parts = {}
        for section in ("training", "validation"):
            entries = saved.get(section) or []
            if not entries:
                raise ValueError(f"split file {path}: no '{section}' cases.")
            parts[section] = []
            for entry in entries:
                item = {k: str(root / entry[k]) for k in ("image", "label")}
                for k, p in item.items():
                    if not os.path.isfile(p):
                        raise FileNotFoundError(f"split file {path}: {k} of a {section} case not found: {p}.")
                parts[section].append(item)
    else:
        parts = split_cases(cases, val_split=val_split, test_split=0, seed=seed)
        content = {
            "dataset_dir": str(root),
            "seed": int(seed),
            "val_split": val_split,
            "label_names": label_names,
            "num_training": len(parts["training"]),
            "num_validation": len(parts["validation"]),
            **{
                s: [{k: _rel(c[k], root) for k in ("image", "label")} for c in parts[s]]
                for s in ("training", "validation")
            },
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(content, indent=2) + "\n")
    train = _subset(parts["training"], num_train_cases, "num_train_cases")
    val = _subset(parts["validation"], num_val_cases, "num_val_cases")
    return {
        "dataset_dir": str(root),
        "split_file": str(path.resolve()),
        "seed": int(seed),
        "val_split": val_split,
        "label_names": label_names,
        "num_training_total": len(parts["training"]),
        "num_validation_total": len(parts["validation"]),
        "training": [{**c, "region": 0} for c in train],
        "validation": [{**c, "region": 0} for c in val],
        "reused": reused,
    }
