# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Run a standalone classification bundle's own ``configs/inference.json`` on datalist items, and score it."""

from __future__ import annotations

import csv
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["cls_bundle_outputs", "score_cls_bundle"]


def _read_csv(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        return {os.path.basename(row[0]): [float(v) for v in row[1:]] for row in csv.reader(f)}


@contextmanager
def bundle_scripts_of(bundle_dir: str | os.PathLike) -> Iterator[None]:
    """
    Run a bundle in this process with its own ``scripts`` package: MONAI puts each bundle root on ``sys.path`` and
    Python caches the first ``scripts`` it imported, so a second bundle of another version would get the first
    one's. The cached ``scripts`` modules are dropped before and after, and the bundle root leaves ``sys.path``.
    """

    def forget() -> None:
        for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[name]

    root = str(Path(bundle_dir))
    forget()
    try:
        yield
    finally:
        forget()
        if root in sys.path:
            sys.path.remove(root)


def cls_bundle_outputs(
    bundle_dir: str | os.PathLike, items: Sequence[Mapping[str, Any]]
) -> tuple[np.ndarray, np.ndarray | None]:
    """
    What a classification bundle written by :func:`~medfm_ops.bundle.write_cls_expert_bundle` outputs for ``items``,
    as a user of the bundle gets it: the items' volumes (NIfTI or npz entries) are written as NIfTI files to a
    temporary folder and the bundle's ``configs/inference.json`` runs on that folder (in this process, its own
    preprocessing, network and decision). Nothing is written into the bundle; the temporary files are removed.

    Args:
        bundle_dir: the bundle (``configs/inference.json``, ``models/model.pt``).
        items: datalist items (``image`` [+ ``array``, ``index``]).

    Returns:
        ``(probs, decisions)``: ``(N, C)`` class probabilities (``predictions.csv``) and ``(N,)`` predicted classes
        (``decisions.csv``; None for a bundle written before decisions were part of its output).

    Raises:
        ValueError: for no items, or when the outputs do not cover every item (naming the first missing one).
    """
    import nibabel as nib
    from monai.bundle import run

    from medfm_ops.data import LoadClsImaged

    if not items:
        raise ValueError("a classification bundle's outputs need at least one item.")
    bundle = Path(bundle_dir)
    load = LoadClsImaged(keys="image")
    with tempfile.TemporaryDirectory(prefix="medfm_cls_score_") as tmp:
        images, out = Path(tmp) / "images", Path(tmp) / "out"
        images.mkdir()
        names = []
        for i, item in enumerate(items):
            vol = load(dict(item))["image"]
            name = f"case{i:05d}.nii.gz"
            nib.save(nib.Nifti1Image(np.asarray(vol[0], dtype=np.float32), np.eye(4)), str(images / name))
            names.append(name)
        with bundle_scripts_of(bundle):
            run(
                config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
                dataset_dir=str(images), output_dir=str(out), logging_file=str(bundle / "configs" / "logging.conf"),
            )  # fmt: skip
        probs = _read_csv(out / "predictions.csv")
        decisions = _read_csv(out / "decisions.csv") if (out / "decisions.csv").is_file() else None
    missing = [(n, it) for n, it in zip(names, items)
               if n not in probs or (decisions is not None and n not in decisions)]  # fmt: skip
    if missing:
        raise ValueError(f"{bundle}: no prediction for {len(missing)} item(s), e.g. {missing[0][1].get('image')}.")
    classes = None if decisions is None else np.array([int(decisions[n][0]) for n in names])
    return np.array([probs[n] for n in names]), classes


def score_cls_bundle(
    bundle_dir: str | os.PathLike, items: Sequence[Mapping[str, Any]], majority_class: int | None = None
) -> dict[str, Any]:
    """
    Accuracy, balanced accuracy, AUC, F1 and majority-class accuracy of a bundle written by
    :func:`~medfm_ops.bundle.write_cls_expert_bundle`, as a user of the bundle gets them
    (:func:`cls_bundle_outputs`): the AUC of its probabilities, the other scores of its decisions (its decision
    threshold when it has one, else the argmax).

    Args:
        bundle_dir: the bundle (``configs/inference.json``, ``models/model.pt``).
        items: checked datalist items of one task (``image`` [+ ``array``, ``index``], task-local ``label``).
        majority_class: the class of the majority-class accuracy (e.g. the training split's most frequent).
            Defaults to the most frequent label of ``items``.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "auc", "f1", "majority_accuracy", "majority_balanced_accuracy"}``
        (see :func:`~medfm_ops.metrics.classification_scores`).

    Raises:
        ValueError: for no items, or when the predictions do not cover every item (naming the first missing one).
    """
    from medfm_ops.metrics import classification_scores

    probs, decisions = cls_bundle_outputs(bundle_dir, items)
    labels = np.array([int(it["label"]) for it in items])
    return {"n": len(items), **classification_scores(probs, labels, majority_class, predictions=decisions)}
