# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The teacher's own input: the same case at another resolution (e.g. MedMNIST's 64^3 release of a 28^3 set).

A teacher trained on 64^3 volumes distils into a 28^3 student only when it sees each training case as it was trained
to see it: :func:`with_teacher_images` adds that file to the items (``teacher_image``), the bundle's transforms load
and resize it to the teacher's spatial size, and :class:`~medfm_ops.engines.TaskPrepareBatch` (``teacher_image_key``)
feeds it to the teacher while the student gets ``image``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm_ops.data.cls_datalist import cls_item_name
from medfm_ops.data.medmnist import read_npz_array

__all__ = ["TEACHER_IMAGE_KEY", "teacher_input_transforms", "with_teacher_images"]

#: the item (and batch) key of the teacher's own input
TEACHER_IMAGE_KEY = "teacher_image"


def _labels_array(array: str) -> str | None:
    """The labels array that belongs to an images array of a MedMNIST-style npz (``train_images`` -> ``train_labels``)."""
    return array[: -len("_images")] + "_labels" if array.endswith("_images") else None


def _check_same_cases(item_file: str, source: str, array: str) -> None:
    """``source`` holds the cases of ``item_file``'s ``array`` in the same order: as many volumes and, where both
    files have the matching labels array, the same labels."""
    ours, theirs = read_npz_array(item_file, array), read_npz_array(source, array)
    if ours.shape[0] != theirs.shape[0]:
        raise ValueError(f"teacher_images: '{source}' [{array}] holds {theirs.shape[0]} volumes, the student's "
                         f"'{item_file}' {ours.shape[0]}: the two files must hold the same cases in the same order.")  # fmt: skip
    labels = _labels_array(array)
    if labels is None:
        return
    try:
        a, b = read_npz_array(item_file, labels), read_npz_array(source, labels)
    except Exception:  # no labels array in one of the files: only the count can be checked
        return
    if a.shape != b.shape or not np.array_equal(a, b):
        raise ValueError(f"teacher_images: the labels '{labels}' of '{source}' differ from those of '{item_file}': "
                         "the two files must hold the same cases in the same order.")  # fmt: skip


def with_teacher_images(
    items: Sequence[Mapping[str, Any]],
    sources: Mapping[str, str | os.PathLike] | None,
    augmented: bool = False,
    key: str = TEACHER_IMAGE_KEY,
) -> list[dict[str, Any]]:
    """
    The classification ``items`` with ``key``: the file the teacher reads for the item, ``sources[task]`` where the
    item's task has a source (an npz holding the item's ``array`` with the same cases in the same order, e.g.
    ``adrenalmnist3d_64.npz`` for ``adrenalmnist3d.npz``; the item's ``array``/``index`` select the volume in both),
    else the item's own image. With no ``sources`` the items are returned unchanged (the teacher reads ``image``).

    Args:
        items: datalist items (``image``, ``task`` and, for npz images, ``array``/``index``).
        sources: task name -> the teacher's file of that task. Defaults to None.
        augmented: whether the student's input is randomly augmented; the teacher's own input is not, so its targets
            would describe another view of the case: refused. Defaults to False.
        key: the item key of the teacher's file. Defaults to ``"teacher_image"``.

    Raises:
        ValueError: with ``augmented``; for a source file that does not exist, a non-npz source or item of a task with
            a source, a source without the item's array or holding other cases (count, or labels where both files
            have them).
    """
    sources = {str(t): str(p) for t, p in (sources or {}).items()}
    if not sources:
        return [dict(i) for i in items]
    if augmented:
        raise ValueError("teacher_images: the teacher's own input is not randomly augmented like the student's, so its "
                         "targets would describe another view of the case; train with cache_teacher_features true "
                         "(no random augmentation).")  # fmt: skip
    for task, path in sources.items():
        if not Path(path).is_file():
            raise ValueError(f"teacher_images['{task}']: file not found: {path}.")
        if not path.endswith(".npz"):
            raise ValueError(f"teacher_images['{task}']: expected an npz holding the same arrays as the task's own "
                             f"file, got {path}.")  # fmt: skip
    checked: set[tuple[str, str, str]] = set()
    out = []
    for item in items:
        d = dict(item)
        source = sources.get(str(d.get("task")))
        if source is None:
            d[key] = d["image"]
        else:
            if not str(d["image"]).endswith(".npz") or "array" not in d or "index" not in d:
                raise ValueError(f"teacher_images['{d['task']}']: item {cls_item_name(d)} is not a volume of an npz "
                                 "file (array + index), so its case cannot be found in the teacher's file.")  # fmt: skip
            pair = (str(d["image"]), source, str(d["array"]))
            if pair not in checked:
                _check_same_cases(*pair)
                checked.add(pair)
            d[key] = source
        out.append(d)
    return out


def teacher_input_transforms(spatial_size: Sequence[int], key: str = TEACHER_IMAGE_KEY) -> list[Any]:
    """
    The deterministic preprocessing of the teacher's own input after it is loaded: finite check, trilinear resize to
    the teacher's ``spatial_size``, channel-wise z-score, float32: the same steps as the classification bundles'
    ``image`` preprocessing, at the teacher's size (one definition for every bundle that distils from a teacher).

    Args:
        spatial_size: the teacher's input size ``(H, W, D)`` (e.g. :func:`~medfm_ops.networks.teacher_input_size`).
        key: the item key of the teacher's input. Defaults to ``"teacher_image"``.

    Returns:
        the MONAI dictionary transforms, in order, applied to ``key`` only (``(C, *spatial)`` in, ``(C, *spatial_size)``
        float32 out).
    """
    from monai.transforms import EnsureTyped, NormalizeIntensityd, Resized

    from medfm_ops.data.transforms import CheckFinited

    return [
        CheckFinited(keys=key),
        Resized(keys=key, spatial_size=[int(v) for v in spatial_size], mode="trilinear"),
        NormalizeIntensityd(keys=key, nonzero=False, channel_wise=True),
        EnsureTyped(keys=key, dtype=torch.float32),
    ]
