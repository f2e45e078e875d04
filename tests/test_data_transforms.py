# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Region label -> union channels, shape check, safe loading and the bundles' segmentation preprocessing (read from
``bundles/lorkd_seg/configs/train.json``: the transform lists are defined there only)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.data.utils import affine_to_spacing

from medfm_ops.data import (
    SYNTHETIC_REGIONS,
    CheckImageLabelShaped,
    ImageLoadError,
    RegionLabelToChannelsd,
    TaskTable,
    SafeLoadImaged,
    ensure_synthetic_dataset,
    load_datalist,
)

BUNDLE_TRAIN = Path(__file__).resolve().parents[1] / "bundles" / "lorkd_seg" / "configs" / "train.json"


def bundle_transforms(table: TaskTable, roi_size=None, train: bool = False, spacing=None):
    """The lorkd_seg bundle's own preprocessing (its JSON lists, the one definition) for ``table``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_TRAIN))
    parser["region_table"] = table
    parser["spacing"] = None if spacing is None else list(spacing)
    if roi_size is not None:
        parser["roi_size"] = [int(roi_size)] * 3 if isinstance(roi_size, int) else list(roi_size)
    return parser.get_parsed_content("train#preprocessing" if train else "validate#preprocessing", lazy=False)

TABLE = TaskTable.from_regions(
    [
        {"name": "brain", "task_id": 0, "labels": {"1": "a", "2": "b"}},
        {"name": "thorax", "task_id": 1, "labels": {"1": "c", "2": "d", "3": "e"}},
        {"name": "pelvis", "task_id": 2, "labels": {"1": "f"}},
    ]
)
LABEL = torch.tensor([[[[0, 1], [2, 3]], [[1, 1], [0, 0]]]])  # (1, 2, 2, 2), values 0..3


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return load_datalist(ensure_synthetic_dataset(tmp_path_factory.mktemp("syn"), size=32, cases_per_region=2))


def _save(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> str:
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return str(path)


@pytest.mark.parametrize("task, label", [(1, LABEL), (0, LABEL.clamp(max=2)), (2, (LABEL == 1).float())])
def test_channel_placement(task, label):
    meta_label = MetaTensor(label.float(), affine=torch.diag(torch.tensor([1.5, 1.5, 2.5, 1.0])))
    out = RegionLabelToChannelsd("label", TABLE)({"label": meta_label, "region": torch.tensor(task)})["label"]
    assert out.shape == (TABLE.num_classes, 2, 2, 2) and out.dtype == torch.float32
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, meta_label.affine)
    for k, ch in enumerate(TABLE.channels_of(task), start=1):
        assert torch.equal(out[ch], (label[0] == k).float()), (task, k, ch)
    others = [c for c in range(TABLE.num_classes) if c not in TABLE.channels_of(task)]
    assert out[others].abs().sum() == 0
    assert torch.equal(out.sum(0) > 0, label[0] > 0)  # every foreground voxel lands in exactly one channel
    assert out.sum() == (label > 0).sum()


def test_label_value_beyond_region_classes_names_case():
    label = MetaTensor(LABEL.float(), meta={"filename_or_obj": "/data/lab_007.nii.gz"})
    image = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/data/img_007.nii.gz"})
    with pytest.raises(ValueError, match=r"case /data/img_007\.nii\.gz: 'label' has label value\(s\) \[3\] but region "
                                         r"'brain' \(task 0\) allows 0=background, 1=a, 2=b\."):
        RegionLabelToChannelsd("label", TABLE)({"image": image, "label": label, "region": 0})
    with pytest.raises(ValueError, match=r"case /data/img_007\.nii\.gz: invalid region 9.*unknown task id 9"):
        RegionLabelToChannelsd("label", TABLE)({"image": image, "label": label, "region": 9})
    with pytest.raises(KeyError, match="no 'region' entry"):
        RegionLabelToChannelsd("label", TABLE)({"image": image, "label": label})
    with pytest.raises(ValueError, match="non-integer values"):
        RegionLabelToChannelsd("label", TABLE)({"label": LABEL * 0.5, "region": 1, "image": "x.nii.gz"})
    out = RegionLabelToChannelsd(["label", "label2"], TABLE, allow_missing_keys=True)({"label": LABEL, "region": 1})
    assert out["label"].shape[0] == TABLE.num_classes and "label2" not in out


@pytest.mark.parametrize(
    "annotated, channels",
    [(None, [2, 3, 4]), (["c", "e"], [2, 4]), (["e", "c"], [2, 4]), (["d"], [3])],
)
def test_partial_labels_mask_only_the_annotated_channels(annotated, channels):
    """A case annotating a subset of its region's classes: its label holds only those values (others are background
    there); the channel mask is True at exactly their channels; the 'annotated' list leaves the item."""
    keep = TABLE.annotated_labels(1, annotated)
    label = torch.where(torch.isin(LABEL, torch.tensor(keep)), LABEL, torch.zeros_like(LABEL))
    item = {"label": label, "region": 1, **({} if annotated is None else {"annotated": annotated})}
    out = RegionLabelToChannelsd("label", TABLE)(item)
    assert "annotated" not in out and out["channel_mask"].dtype == torch.bool
    assert out["channel_mask"].nonzero().flatten().tolist() == channels
    assert torch.equal(out["channel_mask"], TABLE.annotated_channel_mask(1, annotated))
    for k in keep:
        assert torch.equal(out["label"][TABLE.channels_of(1)[k - 1]], (LABEL[0] == k).float())


def test_partial_label_value_of_an_unannotated_class_names_case():
    image = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/data/img_001.nii.gz"})
    with pytest.raises(ValueError, match=r"img_001\.nii\.gz: 'label' has label value\(s\) \[2\] but region 'thorax' "
                                         r"\(task 1\) allows 0=background, 1=c, 3=e \(the case annotates 2 of its 3"):
        RegionLabelToChannelsd("label", TABLE)({"image": image, "label": LABEL, "region": 1, "annotated": ["c", "e"]})
    with pytest.raises(ValueError, match=r"not classes of region 'thorax'.*\['c', 'd', 'e'\]"):
        RegionLabelToChannelsd("label", TABLE)({"label": LABEL, "region": 1, "annotated": ["lung"]})
    out = RegionLabelToChannelsd("label", TABLE, mask_key=None)({"label": LABEL, "region": 1})
    assert "channel_mask" not in out


def test_shape_mismatch_names_case_and_shapes():
    image = MetaTensor(torch.zeros(1, 8, 8, 6), meta={"filename_or_obj": "/data/case_3.nii.gz"})
    with pytest.raises(ValueError) as info:
        CheckImageLabelShaped()({"image": image, "label": torch.zeros(1, 8, 8, 5)})
    message = str(info.value)
    assert "/data/case_3.nii.gz" in message and "(8, 8, 6)" in message and "(8, 8, 5)" in message
    ok = {"image": image, "label": torch.zeros(1, 8, 8, 6)}
    assert CheckImageLabelShaped()(ok) is not ok
    assert CheckImageLabelShaped(allow_missing_keys=True)({"image": image})["image"] is image


def test_safe_load_corrupt_and_missing_files(tmp_path):
    good = _save(tmp_path / "good.nii.gz", np.random.default_rng(0).random((16, 16, 16), dtype=np.float32))
    raw = gzip.decompress(Path(good).read_bytes())
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not a nifti file at all")
    loader = SafeLoadImaged(keys=["image", "label"], image_only=True)
    for bad in (truncated, garbage):
        with pytest.raises(ImageLoadError, match=f"cannot read image file {bad}") as info:
            loader({"image": good, "label": str(bad)})
        assert isinstance(info.value, RuntimeError) and info.value.__cause__ is not None
    with pytest.raises(FileNotFoundError, match=f"image file not found: {tmp_path / 'gone.nii.gz'}"):
        loader({"image": good, "label": str(tmp_path / "gone.nii.gz")})
    out = loader({"image": good, "label": good})
    assert out["image"].shape == (16, 16, 16) and out["image"].meta["filename_or_obj"] == good


def test_pipeline_normalises_every_region_and_keeps_meta(synthetic):
    table, sections = synthetic
    xform = bundle_transforms(table, train=False)
    seen = set()
    for item in sections["validation"]:
        out = xform(item)
        spec = SYNTHETIC_REGIONS[item["region_name"]]
        image, label = out["image"], out["label"]
        assert image.shape == (1, 32, 32, 32) and label.shape == (table.num_classes, 32, 32, 32)
        assert image.dtype == torch.float32 and label.dtype == torch.float32
        assert abs(float(image.mean())) < 1e-3 and abs(float(image.std()) - 1.0) < 1e-2  # CT and MR alike
        for t in (image, label):
            np.testing.assert_allclose(affine_to_spacing(t.affine, 3).numpy(), spec.spacing)
            assert t.meta["filename_or_obj"] == item["image" if t is image else "label"]
        own = table.channels_of(item["region"])
        annotated = out["channel_mask"].nonzero().flatten().tolist()  # partial labels: the data set's classes
        assert set(annotated) <= set(own) and torch.equal(
            out["channel_mask"], table.annotated_channel_mask(item["region"], item["annotated"]))
        assert all(label[c].sum() > 0 for c in annotated)
        assert label[[c for c in range(table.num_classes) if c not in annotated]].sum() == 0
        assert out["region"].dtype == torch.long and out["region"].ndim == 0
        assert "label_names" not in out and "annotated" not in out and out["region_name"] == item["region_name"]
        seen.add(item["region"])
    assert seen == set(table.task_ids)


def test_training_batches_mixed_regions_and_sizes(synthetic, tmp_path):
    table, sections = synthetic
    items = list(sections["training"])
    # a smaller and a larger case (padded / cropped to roi_size), CT-like values padded with the border minimum
    for name, shape in (("small", (20, 24, 28)), ("large", (40, 36, 33))):
        img = np.full(shape, -1000.0, np.float32)
        img[4:-4, 4:-4, 4:-4] = 40.0
        lab = np.zeros(shape, np.uint8)
        lab[6:12, 6:12, 6:12] = 1
        lab[12:16, 12:16, 12:16] = 3
        image, label = _save(tmp_path / f"{name}_img.nii.gz", img), _save(tmp_path / f"{name}_lab.nii.gz", lab)
        items.append({"image": image, "label": label, "region": 1, "region_name": "thorax_ct", "label_names": {},
                      "dataset": "thorax_ct"})  # no 'annotated': every class of the region
    loader = DataLoader(Dataset(items, bundle_transforms(table, roi_size=32, train=True)), batch_size=len(items))
    batch = next(iter(loader))
    assert batch["image"].shape == (len(items), 1, 32, 32, 32)
    assert batch["label"].shape == (len(items), table.num_classes, 32, 32, 32)
    assert batch["region"].tolist() == [i["region"] for i in items]
    mask = table.channel_mask(batch["region"])
    assert batch["label"].amax(dim=(2, 3, 4))[~mask].sum() == 0  # nothing outside each sample's own channels
    assert batch["channel_mask"].shape == mask.shape and not (batch["channel_mask"] & ~mask).any()
    assert batch["channel_mask"][-1].tolist() == mask[-1].tolist() and batch["dataset"][-1] == "thorax_ct"
    small = batch["image"][-2, 0]
    assert float(small.min()) == pytest.approx(float(small[0, 0, 0]))  # padding = background, not 0


def test_pipeline_resamples_and_reports_mismatched_case(synthetic, tmp_path):
    table, sections = synthetic
    item = dict(sections["validation"][1])
    out = bundle_transforms(table, spacing=(3.0, 3.0, 5.0))(item)
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [3.0, 3.0, 5.0])
    assert out["image"].shape[1:] == out["label"].shape[1:]
    item["label"] = _save(tmp_path / "wrong.nii.gz", np.zeros((32, 32, 30), np.uint8))
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose chains the transform's own error as the cause
        bundle_transforms(table)(item)
    root = _root_cause(info.value)
    assert isinstance(root, ValueError) and f"case {item['image']}" in str(root)
    assert "(32, 32, 32)" in str(root) and "(32, 32, 30)" in str(root)
    item = dict(sections["validation"][1], image=str(tmp_path / "missing.nii.gz"))
    with pytest.raises(RuntimeError) as info:
        bundle_transforms(table)(item)
    root = _root_cause(info.value)
    assert isinstance(root, FileNotFoundError) and str(tmp_path / "missing.nii.gz") in str(root)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error
