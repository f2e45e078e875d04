# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A site's train/validation split of an MSD-style data set, saved once and reused: a seeded split made here
(:py:func:`load_or_create_split`) or explicit case lists chosen elsewhere (:py:func:`write_split`, e.g. the N-case
draws of a data-efficiency study)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medfm_ops.data import read_msd_dataset, split_cases
from medfm_ops.utils.atomic_io import atomic_write_text

__all__ = ["load_or_create_split", "write_split", "write_unseen_split", "SPLIT_FILENAME", "SPLIT_ORIGINS"]

#: default name of the split file, written next to the fine-tuning outputs
SPLIT_FILENAME = "split.json"
#: how a split file was made: ``"seeded"`` (a seeded permutation, :py:func:`load_or_create_split`; files without an
#: ``origin`` key are seeded) or ``"explicit"`` (case lists given to :py:func:`write_split`)
SPLIT_ORIGINS = ("seeded", "explicit")


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
    its split. An explicit split file (:py:func:`write_split`) is read as it is: ``seed`` and ``val_split`` do not
    apply to it and are not checked.

    Args:
        dataset_dir: MSD-style directory (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        split_file: JSON file of the split (created with its parents when missing, reused when present).
        val_split: validation fraction in (0, 1) or number of cases. Defaults to 0.2.
        seed: permutation seed. Defaults to 0.
        num_train_cases: use only the first N training cases of the split (a shortened run; the saved split is the
            full one). Defaults to None (all).
        num_val_cases: likewise for the validation cases. Defaults to None (all).

    Returns:
        ``{"dataset_dir", "split_file", "origin", "seed", "val_split", "label_names", "training", "validation",
        "reused", ...}`` with ``training``/``validation`` lists of ``{"image", "label", "region": 0}`` (absolute
        paths), ``label_names`` the site's ``{"1": name, ...}`` from ``dataset.json``, ``origin`` one of
        :py:data:`SPLIT_ORIGINS` (``seed``/``val_split`` are None for an explicit split).

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
        origin, info = saved.get("origin", "seeded"), saved.get("info") or {}
        if origin not in SPLIT_ORIGINS:
            raise ValueError(f"split file {path}: unknown origin {origin!r}; expected one of {SPLIT_ORIGINS}.")
        if origin == "seeded" and (saved.get("seed") != int(seed) or saved.get("val_split") != val_split):
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
        origin, info = "seeded", {}
        parts = split_cases(cases, val_split=val_split, test_split=0, seed=seed)
        content = {
            "dataset_dir": str(root),
            "origin": origin,
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
        "origin": origin,
        "seed": int(seed) if origin == "seeded" else None,
        "val_split": val_split if origin == "seeded" else None,
        "info": info,
        "label_names": label_names,
        "num_training_total": len(parts["training"]),
        "num_validation_total": len(parts["validation"]),
        "training": [{**c, "region": 0} for c in train],
        "validation": [{**c, "region": 0} for c in val],
        "reused": reused,
    }


def _case_key(case: Any, root: Path, known: dict[str, str], what: str) -> dict[str, str]:
    """A case given to :py:func:`write_split` as ``{"image", "label"}`` paths (absolute or relative to the data set)
    checked against the data set's own cases; returned relative to the data set."""
    if not isinstance(case, dict) or "image" not in case or "label" not in case:
        raise ValueError(f"{what}: every case must be {{'image', 'label'}}, got {case!r}.")
    image, label = (str((root / os.path.normpath(str(case[k]))).resolve()) for k in ("image", "label"))
    if known.get(image) != label:
        raise ValueError(
            f"{what}: case {case['image']} is not a case of {root / 'dataset.json'} (or its label is not "
            f"{case['label']}): an explicit split names cases of the data set it splits."
        )
    return {"image": _rel(image, root), "label": _rel(label, root)}


def write_split(
    dataset_dir: str | os.PathLike,
    split_file: str | os.PathLike,
    training: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """
    Save an explicit split (case lists chosen elsewhere) in the format :py:func:`load_or_create_split` reads, and
    read it back. ``finetune_expert(split_file=...)`` then trains on exactly ``training`` and validates on exactly
    ``validation``, in the given order.

    A split is never silently replaced: an existing file with the same data set and case lists is reused (its
    ``info`` included), a different one is an error.

    Args:
        dataset_dir: MSD-style directory the cases belong to.
        split_file: JSON file to write (parents created; atomic).
        training: ``[{"image", "label"}, ...]`` paths, absolute or relative to ``dataset_dir``; at least one.
        validation: likewise; at least one, disjoint from ``training``.
        info: JSON-serialisable description of how the lists were chosen (e.g. ``{"num_cases": 5, "seed": 1}``),
            stored as ``info``. Defaults to None.

    Returns:
        :py:func:`load_or_create_split`'s dict (``origin`` ``"explicit"``, ``reused`` True when the file existed).

    Raises:
        ValueError: on an empty part, a case that is not one of the data set's (image and label as in its
            ``dataset.json``), a case listed twice or in both parts, or an existing ``split_file`` with other cases.
        FileNotFoundError: when the data set or one of its files is missing.

    Example::

        write_split("../shared/data/msd_hippocampus", "runs/n5_seed0.json", pool[:5], validation, {"num_cases": 5})
        finetune_expert(expert, "../shared/data/msd_hippocampus", "runs/site_n5", split_file="runs/n5_seed0.json")
    """
    root = Path(dataset_dir).expanduser().resolve()
    label_names, cases, _ = read_msd_dataset(root)
    known = {str(Path(c["image"]).resolve()): str(Path(c["label"]).resolve()) for c in cases}
    parts = {}
    for section, items in (("training", training), ("validation", validation)):
        if not items:
            raise ValueError(f"write_split: '{section}' names no cases.")
        parts[section] = [_case_key(c, root, known, f"write_split {section}") for c in items]
    images = [c["image"] for s in parts.values() for c in s]
    repeated = sorted({i for i in images if images.count(i) > 1})
    if repeated:
        raise ValueError(f"write_split: case(s) {repeated} listed more than once (within or across training and "
                         "validation).")
    content = {
        "dataset_dir": str(root),
        "origin": "explicit",
        "label_names": label_names,
        "info": dict(info or {}),
        "num_training": len(parts["training"]),
        "num_validation": len(parts["validation"]),
        **parts,
    }
    path = Path(split_file)
    existed = path.is_file()
    if existed:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"split file {path}: invalid JSON ({e}); delete it to write the split again.") from e
        same = all(saved.get(k) == content[k] for k in ("origin", "training", "validation", "info"))
        if not same:
            raise ValueError(
                f"split file {path} exists with other cases or another description ({saved.get('info')}); a split is "
                "never replaced silently: delete it (and the runs made with it) or write to another file."
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(content, indent=2) + "\n")
    return {**load_or_create_split(root, path), "reused": existed}


def write_unseen_split(
    dataset_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    split_file: str | os.PathLike,
    num_validation: int | None = None,
    num_training: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """
    An explicit site split of the cases of ``dataset_dir`` that a pre-training ``datalist`` neither trains nor
    validates on: the cases an expert trained with that datalist never saw (its ``test`` part may be among them).
    It lets a data set that also fed the pre-training stand in for a site's own folder without a leak.

    Args:
        dataset_dir: the MSD-style data set to split (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        datalist: the pre-training datalist (``training`` / ``validation`` items with ``image`` paths).
        split_file: JSON file to write (:py:func:`write_split`; reused when identical, an error when different).
        num_validation: validation cases; None: 20% of the unseen cases (at least one).
        num_training: training cases after those; None: all the remaining ones.
        seed: seed of the permutation of the unseen cases (validation first, then training).

    Returns:
        :py:func:`write_split`'s dict; its ``info`` records the datalist, the number of excluded cases and the seed.

    Raises:
        ValueError: when the datalist cannot be read, or fewer unseen cases remain than asked for.
    """
    import numpy as np

    path = Path(datalist).expanduser()
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"datalist {path}: cannot be read as JSON ({e}).") from e
    seen = {
        str(Path(item["image"]).expanduser().resolve())
        for part in ("training", "validation")
        for item in content.get(part) or []
    }
    root = Path(dataset_dir).expanduser().resolve()
    _, cases, _ = read_msd_dataset(root)
    unseen = [c for c in cases if str(Path(c["image"]).resolve()) not in seen]
    n_val = max(1, round(0.2 * len(unseen))) if num_validation is None else int(num_validation)
    n_train = len(unseen) - n_val if num_training is None else int(num_training)
    if n_val < 1 or n_train < 1 or n_val + n_train > len(unseen):
        raise ValueError(
            f"{root}: {len(unseen)} of its {len(cases)} cases are not in the training/validation parts of {path}; "
            f"cannot take {n_val} validation + {n_train} training case(s) from them."
        )
    order = np.random.default_rng(int(seed)).permutation(len(unseen)).tolist()
    picked = [{k: unseen[i][k] for k in ("image", "label")} for i in order[: n_val + n_train]]
    info = {"unseen_by": str(path.resolve()), "excluded_cases": len(cases) - len(unseen), "seed": int(seed)}
    return write_split(root, split_file, picked[n_val:], picked[:n_val], info=info)
