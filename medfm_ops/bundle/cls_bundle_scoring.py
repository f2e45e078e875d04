# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Score a standalone classification bundle through its own ``configs/inference.json`` on labelled items."""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["score_cls_bundle"]


def score_cls_bundle(
    bundle_dir: str | os.PathLike, items: Sequence[Mapping[str, Any]], majority_class: int | None = None
) -> dict[str, Any]:
    """
    Accuracy, balanced accuracy, AUC, F1 and majority-class accuracy of a bundle written by
    :func:`~medfm_ops.bundle.write_cls_expert_bundle`, as a user of the bundle gets them: the items' volumes (NIfTI or
    npz entries) are written as NIfTI files to a temporary folder, the bundle's ``configs/inference.json`` runs on that
    folder (in this process, its own preprocessing and network), and its ``predictions.csv`` is scored against the
    items' labels. Nothing is written into the bundle; the temporary files are removed.

    Args:
        bundle_dir: the bundle (``configs/inference.json``, ``models/model.pt``).
        items: checked datalist items of one task (``image`` [+ ``array``, ``index``], task-local ``label``).
        majority_class: the class of the majority-class accuracy (e.g. the training split's most frequent).
            Defaults to the most frequent label of ``items``.

    Returns:
        ``{"n", "accuracy", "balanced_accuracy", "auc", "f1", "majority_accuracy"}`` (see
        :func:`~medfm_ops.metrics.classification_scores`).

    Raises:
        ValueError: for no items, or when the predictions do not cover every item (naming the first missing one).
    """
    import nibabel as nib
    from monai.bundle import run

    from medfm_ops.data import LoadClsImaged
    from medfm_ops.metrics import classification_scores

    if not items:
        raise ValueError("score_cls_bundle needs at least one labelled item.")
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
        run(
            config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), dataset_dir=str(images),
            output_dir=str(out), logging_file=str(bundle / "configs" / "logging.conf"),
        )  # fmt: skip
        probs = {}
        with open(out / "predictions.csv", newline="") as f:
            for row in csv.reader(f):
                probs[os.path.basename(row[0])] = [float(v) for v in row[1:]]
    missing = [(n, it) for n, it in zip(names, items) if n not in probs]
    if missing:
        raise ValueError(f"{bundle}: no prediction for {len(missing)} item(s), e.g. {missing[0][1].get('image')}.")
    labels = np.array([int(it["label"]) for it in items])
    scores = classification_scores(np.array([probs[n] for n in names]), labels, majority_class)
    return {"n": len(items), **scores}
