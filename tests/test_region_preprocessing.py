# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Region-wise preprocessing table, transforms, batch sampler and sliding window (tiny synthetic tensors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from torch.utils.data import BatchSampler, RandomSampler

from medfm_ops.data import (
    RegionBatchSampler,
    RegionNormalizeIntensityd,
    RegionPreprocessingTable,
    RegionRandCropd,
    RegionSpacingd,
    TaskTable,
    RegionToMetad,
)
from medfm_ops.engines import RegionSlidingWindowInferer

REGIONS = TaskTable.from_regions([
    {"name": "brain_mri", "task_id": 0, "labels": {"1": "a", "2": "b"}},
    {"name": "heart_mri", "task_id": 1, "labels": {"1": "rv", "2": "myo", "3": "lv"}},
])
ROWS = {"default": {"patch_size": [8, 8, 8]},
        "heart_mri": {"spacing": [2.0, 2.0, 1.0], "patch_size": [8, 8, 4], "intensity": "zscore_nonzero"}}


def test_table_rows_and_errors():
    table = RegionPreprocessingTable(ROWS, REGIONS)
    assert table.of(0).spacing is None and table.of(0).window_size == (8, 8, 8)
    assert table.of_region("heart_mri").patch_size == (8, 8, 4) and table.of(1).intensity_nonzero
    assert not table.uniform_patch and table.largest_window == (8, 8, 8)
    assert table.to_json()["heart_mri"]["spacing"] == [2.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="heart_mr'.*does not have|does not have"):
        RegionPreprocessingTable({"default": {"patch_size": [8, 8, 8]}, "heart_mr": {"patch_size": [8, 8, 8]}}, REGIONS)
    with pytest.raises(ValueError, match="no row for region 'brain_mri'"):
        RegionPreprocessingTable({"heart_mri": {"patch_size": [8, 8, 8]}}, REGIONS)
    with pytest.raises(ValueError, match="patch_size"):
        RegionPreprocessingTable({"default": {"patch_size": [8, 0, 8]}}, REGIONS)
    with pytest.raises(ValueError, match="intensity"):
        RegionPreprocessingTable({"default": {"patch_size": [8, 8, 8], "intensity": "minmax"}}, REGIONS)
    with pytest.raises(ValueError, match="same number of spatial dimensions"):
        RegionPreprocessingTable({"default": {"patch_size": [8, 8, 8], "spacing": [1.0, 1.0]}}, REGIONS)


def _case(region: int, shape=(1, 12, 10, 6)) -> dict:
    torch.manual_seed(region)
    return {"image": MetaTensor(torch.rand(*shape) * 5 + 1), "label": MetaTensor((torch.rand(*shape) > 0.5).float()),
            "region": region}


def test_spacing_intensity_and_inverse_follow_the_region():
    table = RegionPreprocessingTable(ROWS, REGIONS)
    pre = Compose([RegionSpacingd(["image", "label"], table, allow_missing_keys=True),
                   RegionNormalizeIntensityd("image", table), RegionToMetad("image")])
    brain, heart = pre(_case(0)), pre(_case(1))
    assert brain["image"].shape == (1, 12, 10, 6) and heart["image"].shape == (1, 6, 6, 6)  # 2 x 2 x 1 mm (MONAI rounds 10 -> 6 voxels up)
    assert brain["image"].meta["region"] == 0 and heart["image"].meta["region"] == 1
    assert abs(float(brain["image"].mean())) < 1e-5 and abs(float(brain["image"].std(unbiased=False)) - 1) < 1e-3
    for d, shape in ((brain, (1, 12, 10, 6)), (heart, (1, 12, 10, 6))):
        d["pred"] = d["image"].clone()
        assert Invertd("pred", transform=pre, orig_keys="image")(d)["pred"].shape == shape


def test_random_crop_pads_to_the_region_patch():
    table = RegionPreprocessingTable(ROWS, REGIONS)
    crop = RegionRandCropd(["image", "label"], table)
    crop.set_random_state(0)
    thin = _case(1, shape=(1, 20, 20, 3))  # fewer slices than the heart patch: padded
    out = crop(thin)
    assert out["image"].shape == (1, 8, 8, 4) and out["label"].shape == (1, 8, 8, 4)
    assert float(out["image"].min()) >= 1.0  # image padded with its minimum, not 0
    assert crop(_case(0, shape=(1, 12, 10, 9)))["image"].shape == (1, 8, 8, 8)


def test_batch_sampler_keeps_patch_shapes_apart_and_equals_shuffle_when_uniform():
    items = [{"region": r} for r in (0, 1, 1, 0, 1, 0, 0)]
    table = RegionPreprocessingTable(ROWS, REGIONS)
    sampler = RegionBatchSampler(items, 2, table)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4  # 4 brain -> 2 batches, 3 heart -> 2 batches
    assert sorted(i for b in batches for i in b) == list(range(7))
    assert all(len({items[i]["region"] for i in b}) == 1 for b in batches)
    assert list(RegionBatchSampler(items, 2, table, shuffle=False)) == [[0, 3], [5, 6], [1, 2], [4]]
    uniform = RegionPreprocessingTable({"default": {"patch_size": [8, 8, 8]}}, REGIONS)
    torch.manual_seed(3)
    ours = list(RegionBatchSampler(items, 3, uniform))
    torch.manual_seed(3)
    assert ours == list(BatchSampler(RandomSampler(range(7)), 3, False))


def test_sliding_window_uses_each_region_window():
    table = RegionPreprocessingTable(ROWS, REGIONS)
    seen: list[tuple] = []

    def net(x, *args):
        seen.append(tuple(x.shape[2:]))
        return torch.zeros(x.shape[0], 5, *x.shape[2:])

    inferer = RegionSlidingWindowInferer(table, sw_batch_size=1, overlap=0.0)
    x = MetaTensor(torch.zeros(2, 1, 16, 16, 8))
    inferer(x, net, torch.tensor([0, 1]))  # routed: regions from the argument
    assert set(seen) == {(8, 8, 8), (8, 8, 4)}
    seen.clear()
    x.meta["region"] = torch.tensor([1, 1])  # unrouted: regions from the meta data (RegionToMetad)
    out = inferer(x, lambda w: net(w))
    assert set(seen) == {(8, 8, 4)} and out.shape == (2, 5, 16, 16, 8)
    with pytest.raises(ValueError, match="RegionToMetad"):
        inferer(torch.zeros(1, 1, 8, 8, 8), lambda w: net(w))
    np.testing.assert_equal(inferer.roi_size, (8, 8, 8))


def test_inference_refuses_other_preprocessing_than_trained(tmp_path):
    from medfm_ops.data import check_trained_preprocessing, save_region_preprocessing

    check_trained_preprocessing(tmp_path, RegionPreprocessingTable(ROWS, REGIONS))  # nothing recorded: nothing to check
    save_region_preprocessing(tmp_path, RegionPreprocessingTable(ROWS, REGIONS))
    check_trained_preprocessing(tmp_path, RegionPreprocessingTable(ROWS, REGIONS))
    other = RegionPreprocessingTable({"default": {"patch_size": [8, 8, 8]}}, REGIONS)  # heart row lost
    with pytest.raises(ValueError, match=r"heart_mri: trained .*--region_preprocessing \"%"):
        check_trained_preprocessing(tmp_path, other)
