# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Deterministic synthetic multi-task 3D classification set (the bundles' embedded default).

Four tasks with different class counts and modality-like intensity statistics, each written as a MedMNIST-style
npz (``train_images/train_labels/val_images/val_labels``, float32 volumes):

- ``lesion_ct`` (2 classes, CT-like HU): soft-tissue body in air; class 1 adds a hypo-dense lesion.
- ``shape_ct`` (3 classes, CT-like binary organ masks as in AdrenalMNIST3D): sphere / elongated ellipsoid / box.
- ``blobs_mr`` (4 classes, MR-like, Rician-like noise): 0, 1, 2 or 3 bright blobs.
- ``vessel_mra`` (2 classes, MRA-like tube masks as in VesselMNIST3D, ~25% positive): straight tube / tube with a
  bulge (aneurysm-like).

The same ``(size, cases_per_class, seed)`` always gives the same arrays (one ``numpy`` generator per task and split).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from medfm_ops.utils.atomic_io import atomic_write

__all__ = ["SYNTHETIC_CLS_TASKS", "CLS_GENERATOR_VERSION", "generate_cls_task", "write_synthetic_cls_tasks"]

CLS_GENERATOR_VERSION = 1

SYNTHETIC_CLS_TASKS = {
    "lesion_ct": {"labels": {"0": "normal", "1": "lesion"}, "modality": "CT", "class_weights": [1, 1]},
    "shape_ct": {"labels": {"0": "sphere", "1": "ellipsoid", "2": "box"}, "modality": "CT", "class_weights": [1, 1, 1]},
    "blobs_mr": {"labels": {"0": "none", "1": "one", "2": "two", "3": "three"}, "modality": "MR",
                 "class_weights": [1, 1, 1, 1]},
    "vessel_mra": {"labels": {"0": "vessel", "1": "aneurysm"}, "modality": "MRA", "class_weights": [3, 1]},
}  # fmt: skip


def _grid(size: int) -> np.ndarray:
    g = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return np.stack(np.meshgrid(g, g, g, indexing="ij"))  # (3, S, S, S) in [-0.5, 0.5]


def _ball(grid: np.ndarray, centre, radii) -> np.ndarray:
    d = sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3))
    return d <= 1.0


def _case(task: str, label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    grid = _grid(size)
    jitter = lambda s: rng.uniform(-s, s, 3)  # noqa: E731
    if task == "lesion_ct":
        img = np.full(grid.shape[1:], -1000.0, np.float32)
        img[_ball(grid, jitter(0.03), rng.uniform(0.3, 0.42, 3))] = 40.0
        if label == 1:
            img[_ball(grid, jitter(0.12), np.full(3, rng.uniform(0.08, 0.14)))] = -20.0
        return img + rng.normal(0, 15, img.shape).astype(np.float32)
    if task == "shape_ct":
        r = rng.uniform(0.18, 0.26)
        c = jitter(0.08)
        if label == 0:
            m = _ball(grid, c, np.full(3, r))
        elif label == 1:
            m = _ball(grid, c, [r * 1.7, r * 0.7, r * 0.7][:: 1 if rng.random() < 0.5 else -1])
        else:
            m = np.all(np.abs(grid - np.asarray(c)[:, None, None, None]) <= r * 0.85, axis=0)
        return m.astype(np.float32) * 255.0
    if task == "blobs_mr":
        img = np.full(grid.shape[1:], 100.0, np.float32)
        for _ in range(label):
            img[_ball(grid, rng.uniform(-0.3, 0.3, 3), np.full(3, rng.uniform(0.07, 0.1)))] = 400.0
        noise = rng.normal(0, 30, (2, *img.shape)).astype(np.float32)
        return np.sqrt((img + noise[0]) ** 2 + noise[1] ** 2)  # Rician-like magnitude
    if task == "vessel_mra":
        axis = rng.integers(3)
        others = [a for a in range(3) if a != axis]
        off = jitter(0.1)
        radius = rng.uniform(0.06, 0.09)
        d = np.sqrt(sum((grid[a] - off[a]) ** 2 for a in others))
        m = d <= radius
        if label == 1:
            c = off.copy()
            c[axis] = rng.uniform(-0.2, 0.2)
            c[others[0]] += radius
            m |= _ball(grid, c, np.full(3, rng.uniform(0.11, 0.15)))
        return m.astype(np.float32) * 255.0
    raise ValueError(f"unknown synthetic task '{task}': known {list(SYNTHETIC_CLS_TASKS)}.")


def generate_cls_task(task: str, n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images (n, S, S, S) float32, labels (n,) int64)`` of one synthetic task (deterministic in ``seed``)."""
    spec = SYNTHETIC_CLS_TASKS.get(task)
    if spec is None:
        raise ValueError(f"unknown synthetic task '{task}': known {list(SYNTHETIC_CLS_TASKS)}.")
    rng = np.random.default_rng([seed, list(SYNTHETIC_CLS_TASKS).index(task), CLS_GENERATOR_VERSION])
    w = np.asarray(spec["class_weights"], float)
    counts = np.maximum(1, np.round(n * w / w.sum()).astype(int))
    labels = np.repeat(np.arange(len(w)), counts)[:n]
    labels = np.concatenate([labels, np.zeros(max(0, n - len(labels)), int)])
    rng.shuffle(labels)
    images = np.stack([_case(task, int(y), size, rng) for y in labels]).astype(np.float32)
    return images, labels.astype(np.int64)


def write_synthetic_cls_tasks(
    out_dir: str | os.PathLike, size: int = 28, train_cases: int = 48, val_cases: int = 16, seed: int = 0,
    tasks: list[str] | None = None,
) -> dict[str, Path]:
    """
    Write one MedMNIST-style npz per synthetic task into ``out_dir`` (atomically; an existing file with the same
    name, which encodes all parameters, is reused). Returns ``{task: npz path}``.
    """
    out = Path(out_dir)
    paths = {}
    for i, task in enumerate(tasks or list(SYNTHETIC_CLS_TASKS)):
        path = out / f"{task}_s{size}_n{train_cases}-{val_cases}_seed{seed}_v{CLS_GENERATOR_VERSION}.npz"
        if not path.is_file():
            tr = generate_cls_task(task, train_cases, size, seed)
            va = generate_cls_task(task, val_cases, size, seed + 10_000)
            buf = io.BytesIO()
            np.savez_compressed(buf, train_images=tr[0], train_labels=tr[1], val_images=va[0], val_labels=va[1])
            with atomic_write(path, "wb") as f:
                f.write(buf.getvalue())
        paths[task] = path
    return paths
