# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Read MedMNIST-style ``.npz`` files (``{split}_images`` (N, D, H, W) and ``{split}_labels`` (N,) or (N, 1))."""

from __future__ import annotations

import functools
import os
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["NpzReadError", "read_npz_array", "read_medmnist_split", "medmnist_items", "MEDMNIST_TASKS"]

#: the real 3D tasks of ``../shared/data`` (MedMNIST v2): class names and modality
MEDMNIST_TASKS = {
    "adrenalmnist3d": {"labels": {"0": "normal", "1": "adrenal_mass"}, "modality": "CT"},
    "vesselmnist3d": {"labels": {"0": "vessel", "1": "aneurysm"}, "modality": "MRA"},
}


class NpzReadError(ValueError):
    """An ``.npz`` file is missing, corrupt, or lacks the expected array; the message names file and key."""


@functools.lru_cache(maxsize=16)
def _cached_array(path: str, key: str, mtime_ns: int) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise NpzReadError(f"{path}: no array '{key}' (arrays: {sorted(z.files)}).")
            arr = z[key]
    except NpzReadError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise NpzReadError(f"{path}: cannot read array '{key}' ({type(e).__name__}: {e}); the file is corrupt or not an npz.") from e
    arr.setflags(write=False)
    return arr


def read_npz_array(path: str | os.PathLike, key: str) -> np.ndarray:
    """
    Array ``key`` of the npz file ``path`` (read-only; cached per file version, so a data set of items pointing into
    one npz decompresses it once).

    Raises:
        NpzReadError: when the file is missing or corrupt, or has no array ``key``.
    """
    p = Path(path)
    if not p.is_file():
        raise NpzReadError(f"npz file not found: {p}.")
    return _cached_array(str(p.resolve()), str(key), p.stat().st_mtime_ns)


def read_medmnist_split(path: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """
    ``(images (N, D, H, W), labels (N,) int64)`` of ``split`` (``train``, ``val``, ``test``) of a MedMNIST 3D npz.

    Raises:
        NpzReadError: for a missing/corrupt file or array, images that are not (N, D, H, W), labels that are not one
            integer per image.
    """
    images = read_npz_array(path, f"{split}_images")
    labels = read_npz_array(path, f"{split}_labels")
    if images.ndim != 4:
        raise NpzReadError(f"{path}: '{split}_images' must be (N, D, H, W) volumes, got shape {images.shape}.")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise NpzReadError(
            f"{path}: '{split}_labels' must hold one label per image ({images.shape[0]}), got shape {labels.shape} "
            "(multi-label MedMNIST sets are not supported)."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise NpzReadError(f"{path}: '{split}_labels' must be integers, got {labels.dtype}.")
    return images, labels.astype(np.int64)


def medmnist_items(path: str | os.PathLike, task: str, split: str, limit: int | None = None) -> list[dict]:
    """
    Datalist items ``{"image": path, "array": "{split}_images", "index": i, "task": task, "label": y}`` of one split.

    Args:
        path: the npz file.
        task: task name written into every item.
        split: ``train``/``val``/``test``.
        limit: keep only the first ``limit`` items. Defaults to None (all).
    """
    _, labels = read_medmnist_split(path, split)
    n = len(labels) if limit is None else min(int(limit), len(labels))
    p = str(Path(path).resolve())
    return [{"image": p, "array": f"{split}_images", "index": i, "task": task, "label": int(labels[i])} for i in range(n)]
