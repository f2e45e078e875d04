# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""TaskTable union channel layout and datalist loading/validation errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import nibabel as nib
import numpy as np

from medfm_ops.data import (
    DatasetIntegrityError,
    TaskTable,
    check_datalist_cases,
    ensure_synthetic_dataset,
    load_datalist,
    require_files,
)

REGIONS = [
    {"name": "brain_mri", "task_id": 0, "labels": {"1": "ventricles", "2": "hippocampus"}},
    {"name": "thorax_ct", "task_id": 1, "labels": {"1": "lung_left", "2": "lung_right", "3": "heart"}},
    {"name": "abdomen_ct", "task_id": 2, "labels": {"1": "liver", "2": "spleen", "3": "kidney_l", "4": "kidney_r"}},
]


@pytest.fixture(scope="module")
def synthetic_datalist(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("syn"), size=16, cases_per_region=2)


def test_union_channel_layout():
    table = TaskTable.from_regions(list(reversed(REGIONS)))  # order in the JSON does not matter
    assert table.num_regions == 3 and table.num_classes == 9
    assert table.region_channels == {0: [0, 1], 1: [2, 3, 4], 2: [5, 6, 7, 8]}
    assert table.region_names == {0: "brain_mri", 1: "thorax_ct", 2: "abdomen_ct"}
    assert table.class_names[1] == ["lung_left", "lung_right", "heart"]
    assert table.channels_of(2) == [5, 6, 7, 8] and table.task_id_of("thorax_ct") == 1
    assert table.channel_names[2] == "thorax_ct/lung_left" and len(table.channel_names) == 9
    assert table.to_regions() == REGIONS
    mask = table.channel_mask(torch.tensor([1, 0, 2, 1]))
    assert mask.dtype == torch.bool and mask.shape == (4, 9)
    expected = torch.zeros(4, 9, dtype=torch.bool)
    for row, task in enumerate([1, 0, 2, 1]):
        expected[row, table.channels_of(task)] = True
    assert torch.equal(mask, expected)
    assert torch.equal(mask.sum(1), torch.tensor([3, 2, 4, 3]))
    assert table.annotated_labels(2, ["kidney_r", "liver"]) == [1, 4] and table.annotated_labels(1) == [1, 2, 3]
    assert table.annotated_channel_mask(2, ["kidney_r", "liver"]).nonzero().flatten().tolist() == [5, 8]
    assert torch.equal(table.annotated_channel_mask(0), mask[1])


def test_synthetic_table(synthetic_datalist):
    table, _ = load_datalist(synthetic_datalist)
    assert table.region_channels == {0: [0, 1, 2], 1: [3, 4, 5], 2: [6, 7, 8, 9], 3: [10, 11]}
    assert table.num_classes == 12


def test_unknown_region_and_task_id():
    table = TaskTable.from_regions(REGIONS, source="my.json")
    with pytest.raises(ValueError, match=r"unknown region 'pelvis'.*my\.json.*brain_mri.*thorax_ct.*abdomen_ct"):
        table.task_id_of("pelvis")
    with pytest.raises(ValueError, match=r"unknown task id\(s\) \[3\]"):
        table.channel_mask(torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="unknown task id 5"):
        table.channels_of(5)


def _regions(**change):
    regions = copy.deepcopy(REGIONS)
    for key, value in change.items():
        regions[1][key] = value
    return regions


@pytest.mark.parametrize(
    "regions, message",
    [
        ([], "non-empty list"),
        (_regions(task_id=4), r"task ids.*0\.\.2 without gaps.*\[0, 2, 4\]"),
        (_regions(task_id=0), "task_id 0 is already used by 'brain_mri'"),
        (_regions(task_id="1"), "task_id must be an integer"),
        (_regions(name="brain_mri"), "'brain_mri'.*more than one task id"),
        (_regions(labels={"1": "a", "3": "b"}), r"regions\[1\] \('thorax_ct'\).*1\.\.n without gaps.*\[1, 3\]"),
        (_regions(labels={}), "has no classes"),
        ([{"name": "x", "labels": {"1": "a"}}], r"regions\[0\].*misses \['task_id'\]"),
    ],
)
def test_invalid_regions(regions, message):
    with pytest.raises(ValueError, match=message):
        TaskTable.from_regions(regions, source="data.json")


def test_load_resolves_paths_and_accepts_absolute(synthetic_datalist, tmp_path):
    table, sections = load_datalist(synthetic_datalist)
    assert set(sections) == {"training", "validation"}
    for item in sections["training"] + sections["validation"]:
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()
        assert Path(item["label"]).is_absolute() and Path(item["label"]).is_file()
        assert item["region_name"] == table.region_names[item["region"]]
        assert item["label_names"] == table.labels_of(item["region"])
    raw = json.loads(synthetic_datalist.read_text())
    assert not Path(raw["training"][0]["image"]).is_absolute()
    for item in raw["training"] + raw["validation"]:  # absolute paths are kept as they are
        item["image"] = str(synthetic_datalist.parent / item["image"])
        item["label"] = str(synthetic_datalist.parent / item["label"])
    moved = tmp_path / "elsewhere" / "dl.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(raw))
    _, again = load_datalist(moved)
    assert again == sections


def _write_bad(synthetic_datalist: Path, tmp_path: Path, mutate) -> tuple[Path, dict]:
    raw = json.loads(synthetic_datalist.read_text())
    for section in ("training", "validation"):
        for item in raw[section]:
            item["image"] = str(synthetic_datalist.parent / item["image"])
            item["label"] = str(synthetic_datalist.parent / item["label"])
    mutate(raw)
    bad = tmp_path / "bad_datalist.json"
    bad.write_text(json.dumps(raw))
    return bad, raw


def _drop(key):
    def mutate(raw):
        del raw["validation"][1][key]

    return mutate


def _set(section, index, key, value):
    def mutate(raw):
        raw[section][index][key] = value

    return mutate


# cases_per_region=2: training[t] and validation[t] are case 000 and 001 of task t
BAD_CASES = [
    # mutate, exception, expected message parts (besides the datalist path)
    (lambda raw: raw.pop("validation"), ValueError, ["missing top-level key(s) ['validation']"]),
    (lambda raw: raw.pop("regions"), ValueError, ["missing top-level key(s) ['regions']"]),
    (_drop("image"), ValueError, ["item validation[1]", "image '<none>'", "misses ['image']"]),
    (_drop("label"), ValueError, ["item validation[1]", "thorax_ct_001", "misses ['label']"]),
    (_drop("region"), ValueError, ["item validation[1]", "thorax_ct_001", "misses ['region']"]),
    (_set("training", 2, "region", 7), ValueError, ["item training[2]", "abdomen_ct_000", "region 7", "[0, 1, 2, 3]"]),
    (_set("training", 2, "region", "1"), ValueError, ["item training[2]", "region '1'", "task ids"]),
    (_set("training", 0, "region_name", "liver"), ValueError, ["item training[0]", "region_name 'liver'", "brain_mri"]),
    (
        _set("training", 3, "label", "/nonexistent/lab.nii.gz"),
        FileNotFoundError,
        ["item training[3]", "pelvis_mr_000", "label file not found: /nonexistent/lab.nii.gz"],
    ),
    (
        _set("validation", 0, "image", "missing/img.nii.gz"),
        FileNotFoundError,
        ["item validation[0]", "missing/img.nii.gz", "image file not found"],
    ),
    (_set("training", 2, "annotated", ["liver", "lung"]), ValueError,
     ["item training[2]", "abdomen_ct_000", "['lung']", "not classes of region 'abdomen_ct'", "'kidney_right'"]),
    (_set("training", 2, "annotated", []), ValueError, ["item training[2]", "non-empty list of class names"]),
    (_set("training", 2, "annotated", "liver"), ValueError, ["item training[2]", "annotated 'liver'", "list of class"]),
    (_set("training", 2, "annotated", ["liver", "liver"]), ValueError, ["item training[2]", "class twice"]),
    (_set("training", 1, "dataset", ""), ValueError, ["item training[1]", "dataset ''", "non-empty string"]),
    (lambda raw: raw.update(training=[]), ValueError, ["'training' is empty"]),
    (lambda raw: raw.update(test={"a": 1}), ValueError, ["'test' must be a list"]),
]


@pytest.mark.parametrize("mutate, exc, parts", BAD_CASES)
def test_invalid_datalist_names_file_and_item(synthetic_datalist, tmp_path, mutate, exc, parts):
    bad, _ = _write_bad(synthetic_datalist, tmp_path, mutate)
    with pytest.raises(exc) as info:
        load_datalist(bad)
    message = str(info.value)
    for part in [str(bad), *parts]:
        assert part in message, f"'{part}' not in: {message}"


def test_dataset_and_annotated_default_for_old_datalists(synthetic_datalist, tmp_path):
    """Items without 'dataset'/'annotated' (datalists written before partial labels) still load: one data set per
    region that annotates all of its classes. Given ones are kept (annotated in the region's class order)."""
    def strip(raw):
        for section in ("training", "validation"):
            for item in raw[section]:
                item.pop("dataset"), item.pop("annotated")
        raw["training"][2]["annotated"] = ["kidney_right", "liver"]
        raw["training"][2]["dataset"] = "site_x"

    old, _ = _write_bad(synthetic_datalist, tmp_path, strip)
    table, sections = load_datalist(old)
    for item in sections["training"] + sections["validation"]:
        if item["image"].endswith("abdomen_ct_000.nii.gz"):
            assert item["dataset"] == "site_x" and item["annotated"] == ["liver", "kidney_right"]
        else:
            assert item["dataset"] == item["region_name"]
            assert item["annotated"] == table.class_names[item["region"]]


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist not found: .*nope.json"):
        load_datalist(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"regions": [,]}')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 1 column 14"):
        load_datalist(broken)


def test_require_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no input images found in {tmp_path}"):
        require_files([], tmp_path)
    with pytest.raises(FileNotFoundError, match="input 0 .*'image' file not found.*gone.nii.gz"):
        require_files([{"image": str(tmp_path / "gone.nii.gz")}], tmp_path)
    f = tmp_path / "a.nii.gz"
    f.write_bytes(b"")
    assert require_files(({"image": str(f)},), tmp_path) == [{"image": str(f)}]


def test_integrity_check_lists_every_bad_case_of_a_datalist(synthetic_datalist, tmp_path):
    """Before training, every case is checked once and ONE error lists every bad case: a value of a class the case's
    data set does not annotate, an image/label shape mismatch, a 2-channel image; good cases are not listed."""
    _, sections = load_datalist(synthetic_datalist)
    check_datalist_cases(sections, source=str(synthetic_datalist))  # the synthetic set is clean
    items = [dict(i) for i in sections["training"] + sections["validation"]]
    abd = next(i for i in items if i["dataset"] == "abdomen_ct_a")
    lab = nib.load(abd["label"])
    data = np.asarray(lab.dataobj).copy()
    data[0, 0, 0] = 4  # kidney_right: not labelled by abdomen_ct_a
    abd["label"] = str(tmp_path / "abd_bad.nii.gz")
    nib.save(nib.Nifti1Image(data, lab.affine), abd["label"])
    brain = next(i for i in items if i["region_name"] == "brain_mri")
    brain["label"] = str(tmp_path / "brain_small.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.uint8), np.eye(4)), brain["label"])
    pelvis = next(i for i in items if i["region_name"] == "pelvis_mr")
    pelvis["image"] = str(tmp_path / "pelvis_2ch.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), np.eye(4)), pelvis["image"])
    with pytest.raises(DatasetIntegrityError) as info:
        check_datalist_cases({"training": items}, source="my_datalist.json")
    text = str(info.value)
    assert text.startswith("my_datalist.json: 3 problem(s) found before training") and len(info.value.problems) == 3
    assert (f"{abd['label']}: label value(s) [4] not among the labels this case annotates: 0=background, 1=liver, "
            "2=spleen, 3=kidney_left (data set 'abdomen_ct_a' annotates 3 of the 4 classes of region 'abdomen_ct')"
            ) in text
    assert f"{brain['label']}: label shape (16, 16, 8) differs from its image's (16, 16, 16)" in text
    assert f"{pelvis['image']}: image shape (16, 16, 16, 2), expected a 3D single-channel volume" in text
