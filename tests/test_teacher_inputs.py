# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""medfm_ops.data.with_teacher_images: the teacher's own file per task, checked to hold the same cases; and
TaskPrepareBatch feeding it to the teacher (teacher_image_key)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm_ops.data import with_teacher_images
from medfm_ops.engines import TaskPrepareBatch


def _npz(path, n: int, size: int, labels) -> str:
    rng = np.random.default_rng(size)
    np.savez(path, train_images=rng.integers(0, 255, (n, size, size, size), dtype=np.uint8), train_labels=np.asarray(labels))
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {"small": _npz(tmp_path / "a28.npz", 3, 4, [0, 1, 0]), "large": _npz(tmp_path / "a64.npz", 3, 8, [0, 1, 0]),
            "shuffled": _npz(tmp_path / "other.npz", 3, 8, [1, 0, 0]), "short": _npz(tmp_path / "short.npz", 2, 8, [0, 1])}  # fmt: skip


def _items(files, task="a"):
    return [{"image": files["small"], "array": "train_images", "index": i, "task": task, "label": 0} for i in range(3)]


def test_items_of_a_task_with_a_source_read_it_the_others_their_own_image(files):
    items = _items(files) + [{"image": "b.nii.gz", "task": "b", "label": 1}]
    out = with_teacher_images(items, {"a": files["large"]})
    assert [i["teacher_image"] for i in out] == [files["large"]] * 3 + ["b.nii.gz"]
    assert all(o.get("index") == i.get("index") for o, i in zip(out, items)) and "teacher_image" not in items[0]
    assert with_teacher_images(items, {}) == items and with_teacher_images(items, None) == items


@pytest.mark.parametrize(
    "source, kwargs, message",
    [("shuffled", {}, "labels 'train_labels'"), ("short", {}, "holds 2 volumes"), ("large", {"augmented": True}, "augmented"),
     ("missing", {}, "file not found")],
)  # fmt: skip
def test_other_cases_or_augmentation_refused(files, tmp_path, source, kwargs, message):
    path = files.get(source, str(tmp_path / "missing.npz"))
    with pytest.raises(ValueError, match=message):
        with_teacher_images(_items(files), {"a": path}, **kwargs)


def test_teacher_reads_the_teacher_image_key():
    seen = []

    def teacher(x):
        seen.append(tuple(x.shape))
        return torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 3)

    batch = {"image": torch.zeros(2, 1, 4, 4, 4), "teacher_image": torch.zeros(2, 1, 8, 8, 8), "label": torch.tensor([0, 1]),
             "task_id": torch.tensor([0, 0])}  # fmt: skip
    TaskPrepareBatch(teacher=teacher, route=False, targets_as_dict=True, teacher_image_key="teacher_image")(batch)
    TaskPrepareBatch(teacher=teacher, route=False, targets_as_dict=True)(batch)
    assert seen == [(2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
    del batch["teacher_image"]
    with pytest.raises(KeyError, match="no 'teacher_image' entry"):
        TaskPrepareBatch(teacher=teacher, route=False, targets_as_dict=True, teacher_image_key="teacher_image")(batch)
