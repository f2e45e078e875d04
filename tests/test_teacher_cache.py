# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The on-disk teacher feature cache: cached features equal recomputed ones; refused (and recomputed) when the
teacher, the settings or the entries change, or the file cannot be read."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfm_ops.engines import TeacherFeatureCache
from medfm_ops.networks import TeacherFeatures, build_cls_network, freeze

SETTINGS = {"spatial_size": [12, 12, 12]}
NAMES = [f"x.npz[train_images][{i}]" for i in range(4)]


class _Counting(nn.Module):
    """The teacher, counting its calls."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inner = TeacherFeatures(freeze(build_cls_network("resnet_tiny", 3)))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture()
def saved(tmp_path):
    x = torch.randn(4, 1, 12, 12, 12, generator=torch.Generator().manual_seed(0))
    cache = TeacherFeatureCache(tmp_path / "tf.pt", settings=SETTINGS)
    cache(NAMES, x, _Counting(0))
    cache.save()
    return tmp_path / "tf.pt", x


def _same(a, b):
    return all(torch.allclose(u, v, atol=1e-6) for u, v in zip(a, b))


def test_cached_features_equal_recomputed_and_teacher_runs_once(saved):
    path, x = saved
    teacher = _Counting(0)
    cache = TeacherFeatureCache(path, settings=SETTINGS)
    first = cache(NAMES, x, teacher)  # the first fully cached batch is checked against the teacher once
    again = cache(NAMES[::-1], x.flip(0), teacher)
    assert cache.refused is None and teacher.calls == 1
    assert _same(first, teacher.inner(x)) and _same(again, teacher.inner(x.flip(0)))
    assert not any(isinstance(t, torch.Tensor) and type(t) is not torch.Tensor for e in cache.entries.values() for t in e)


@pytest.mark.parametrize(
    "change,reason",
    [("settings", "another settings ({'spatial_size': [12, 12, 12]} -> {'spatial_size': [16, 16, 16]})"),
     ("teacher", "another teacher"), ("entries", "differ from the teacher's outputs"), ("file", "cannot be read")],
)  # fmt: skip
def test_cache_refused_when_something_changed(saved, change, reason):
    path, x = saved
    settings, teacher = SETTINGS, _Counting(0)
    if change == "settings":
        settings = {"spatial_size": [16, 16, 16]}
    elif change == "teacher":
        teacher = _Counting(1)
    elif change == "entries":
        raw = torch.load(path, weights_only=True)
        raw["entries"][NAMES[2]][1].add_(1.0)
        torch.save(raw, path)
    else:
        path.write_bytes(b"truncated")
    cache = TeacherFeatureCache(path, settings=settings)
    out = cache(NAMES, x, teacher)
    assert cache.refused is not None and reason in cache.refused, cache.refused
    assert _same(out, teacher.inner(x))  # recomputed, not the stale entries
    cache.save()  # the file is replaced by one for the current teacher and settings
    fresh = TeacherFeatureCache(path, settings=settings)
    assert _same(fresh(NAMES, x, teacher), teacher.inner(x)) and fresh.refused is None


def test_cache_settings_name_the_teacher_inputs_only_when_it_reads_its_own():
    """The settings a cache checks: the students' size, plus the teacher's files and size when it reads its own files
    (a cache written for another teacher input is then refused by the fingerprint)."""
    from medfm_ops.engines import teacher_cache_settings

    assert teacher_cache_settings([28] * 3, {}, [64] * 3) == {"spatial_size": [28] * 3}
    assert teacher_cache_settings([28] * 3, {"a": "a64.npz"}, [64] * 3) == {
        "spatial_size": [28] * 3, "teacher_images": {"a": "a64.npz"}, "teacher_spatial_size": [64] * 3}  # fmt: skip
