# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Synthetic multi-region data set: determinism, headers, labels, intensities, caching and atomic layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medfm_ops.data.synthetic as synthetic
from medfm_ops.data import (
    SYNTHETIC_REGIONS,
    DatasetSpec,
    RegionSpec,
    check_datalist_cases,
    ensure_synthetic_dataset,
    generate_case,
    load_datalist,
    partial_label,
)

REGIONS = list(SYNTHETIC_REGIONS)
CASES = 3


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return ensure_synthetic_dataset(tmp_path_factory.mktemp("syn"), size=32, cases_per_region=CASES, seed=0)


def test_at_least_four_regions_with_distinct_spacing_and_classes():
    assert len(REGIONS) >= 4
    assert len({SYNTHETIC_REGIONS[r].spacing for r in REGIONS}) == len(REGIONS)
    for r in REGIONS:
        assert 2 <= len(SYNTHETIC_REGIONS[r].class_names) <= 4, r


@pytest.mark.parametrize("region", REGIONS)
def test_same_seed_identical_other_seed_different(region):
    a_img, a_lab, a_aff = generate_case(region, 32, seed=3, case_index=1)
    b_img, b_lab, b_aff = generate_case(region, 32, seed=3, case_index=1)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    np.testing.assert_array_equal(a_aff, b_aff)
    c_img, c_lab, _ = generate_case(region, 32, seed=4, case_index=1)
    assert not np.array_equal(a_img, c_img) and not np.array_equal(a_lab, c_lab)
    d_img, _, _ = generate_case(region, 32, seed=3, case_index=2)
    assert not np.array_equal(a_img, d_img)


def test_files_match_generator_and_headers_carry_spacing(dataset):
    _, sections = load_datalist(dataset)
    for item in sections["training"] + sections["validation"]:
        spec = SYNTHETIC_REGIONS[item["region_name"]]
        case = int(Path(item["image"]).name.split("_")[-1].split(".")[0])
        img_nii, lab_nii = nib.load(item["image"]), nib.load(item["label"])
        assert img_nii.get_data_dtype() == np.float32 and lab_nii.get_data_dtype() == np.uint8
        for nii in (img_nii, lab_nii):
            np.testing.assert_allclose(nii.header.get_zooms()[:3], spec.spacing)
            np.testing.assert_allclose(np.diag(nii.affine)[:3], spec.spacing)  # RAS, no rotation
            assert nib.aff2axcodes(nii.affine) == ("R", "A", "S")
        img, lab, _ = generate_case(spec, 32, seed=0, case_index=case)
        np.testing.assert_array_equal(np.asarray(img_nii.dataobj), img)
        np.testing.assert_array_equal(np.asarray(lab_nii.dataobj), partial_label(lab, spec, item["annotated"]))


@pytest.mark.parametrize("region", REGIONS)
def test_every_structure_present_with_reasonable_size(region):
    n = len(SYNTHETIC_REGIONS[region].class_names)
    for case in range(6):
        _, lab, _ = generate_case(region, 32, seed=0, case_index=case)
        counts = np.bincount(lab.ravel(), minlength=n + 1)
        assert len(counts) == n + 1, f"{region} case {case}: labels beyond {n}"
        assert counts[1:].min() >= 20, f"{region} case {case}: voxel counts {counts[1:].tolist()}"
        assert counts[1:].sum() < 0.5 * lab.size


def test_intensity_statistics_differ_between_regions():
    stats = {}
    for region in REGIONS:
        img, _, _ = generate_case(region, 32, seed=0, case_index=0)
        stats[region] = (float(img.min()), float(img.mean()), *np.percentile(img, [25, 50, 75, 99]).tolist())
    for region, (vmin, *_) in stats.items():
        if SYNTHETIC_REGIONS[region].modality == "CT":
            assert vmin < -900, (region, stats[region])  # air in HU
        else:
            assert vmin >= 0, (region, stats[region])  # MR magnitude
    for i, a in enumerate(REGIONS):
        for b in REGIONS[i + 1 :]:
            gap = max(abs(x - y) for x, y in zip(stats[a], stats[b]))
            assert gap > 100, f"{a} and {b} have similar intensity statistics: {stats[a]} vs {stats[b]}"
    assert stats["pelvis_mr"][-1] > stats["brain_mri"][-1] + 150  # bright bladder vs T1 brain


def test_datalist_schema(dataset):
    raw = json.loads(dataset.read_text())
    assert set(raw) >= {"name", "regions", "training", "validation"} and "test" not in raw
    assert [r["name"] for r in raw["regions"]] == REGIONS
    assert [r["task_id"] for r in raw["regions"]] == list(range(len(REGIONS)))
    for section in ("training", "validation"):
        for item in raw[section]:
            assert set(item) == {"image", "label", "region", "region_name", "label_names", "dataset", "annotated"}
            assert not Path(item["image"]).is_absolute() and (dataset.parent / item["image"]).is_file()
            region = raw["regions"][item["region"]]
            assert item["region_name"] == region["name"] and item["label_names"] == region["labels"]
    for t in range(len(REGIONS)):
        assert sum(i["region"] == t for i in raw["training"]) == CASES - 1
        assert sum(i["region"] == t for i in raw["validation"]) == 1


def test_partial_labels_two_overlapping_data_sets_in_abdomen(dataset):
    """abdomen_ct alternates between two source data sets with different, overlapping label subsets; a case's label
    file holds exactly its data set's classes (the images still show every structure); the others annotate all."""
    spec = SYNTHETIC_REGIONS["abdomen_ct"]
    subsets = {d.name: set(d.annotated) for d in spec.datasets}
    assert len(subsets) >= 2 and set.intersection(*subsets.values()) and len(set(map(frozenset, subsets.values()))) > 1
    assert set.union(*subsets.values()) == set(spec.class_names), "together they label every class"
    _, sections = load_datalist(dataset)
    seen = set()
    for item in sections["training"] + sections["validation"]:
        labels = set(np.unique(np.asarray(nib.load(item["label"]).dataobj)).tolist()) - {0}
        present = {item["label_names"][str(v)] for v in labels}
        assert present == set(item["annotated"]), (item["image"], present, item["annotated"])
        if item["region_name"] == "abdomen_ct":
            seen.add(item["dataset"])
            assert set(item["annotated"]) == subsets[item["dataset"]]
        else:
            assert item["dataset"] == item["region_name"]
    assert seen == set(subsets)
    check_datalist_cases(load_datalist(dataset)[1], source=str(dataset))  # the written set passes its own check


def test_region_spec_rejects_a_data_set_with_unknown_classes():
    structures = SYNTHETIC_REGIONS["pelvis_mr"].structures
    with pytest.raises(ValueError, match=r"data set 'x' annotates \['kidney'\].*\['bladder', 'prostate'\]"):
        RegionSpec("p", "MR", (1.0, 1.0, 1.0), 0.0, structures, 1.0, 1.0, datasets=(DatasetSpec("x", ("kidney",)),))
    with pytest.raises(ValueError, match="not classes of region 'pelvis_mr'"):
        partial_label(np.zeros((2, 2, 2), np.uint8), "pelvis_mr", ["kidney"])


def test_test_section_and_region_subset(tmp_path):
    dl = ensure_synthetic_dataset(
        tmp_path, size=16, cases_per_region=4, test_cases_per_region=1, regions=["pelvis_mr", "brain_mri"]
    )
    table, sections = load_datalist(dl)
    assert table.region_names == {0: "pelvis_mr", 1: "brain_mri"}
    assert {k: len(v) for k, v in sections.items()} == {"training": 4, "validation": 2, "test": 2}
    # a case does not depend on which other regions are generated
    img, _, _ = generate_case("brain_mri", 16, seed=0, case_index=0)
    brain0 = next(i for i in sections["training"] if i["region_name"] == "brain_mri")
    np.testing.assert_array_equal(np.asarray(nib.load(brain0["image"]).dataobj), img)


def test_cache_reuse_does_not_rewrite(tmp_path, monkeypatch):
    first = ensure_synthetic_dataset(tmp_path, size=16, cases_per_region=2, seed=1, regions=["thorax_ct"])
    stamps = {p: p.stat().st_mtime_ns for p in first.parent.rglob("*")}

    def _fail(*args, **kwargs):
        raise AssertionError("cached data set was regenerated")

    monkeypatch.setattr(synthetic, "write_synthetic_dataset", _fail)
    second = ensure_synthetic_dataset(tmp_path, size=16, cases_per_region=2, seed=1, regions=["thorax_ct"])
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in first.parent.rglob("*")} == stamps
    monkeypatch.undo()
    other = ensure_synthetic_dataset(tmp_path, size=16, cases_per_region=2, seed=2, regions=["thorax_ct"])
    assert other.parent != first.parent and other.parent.parent == first.parent.parent
    assert json.loads(other.read_text())["params"]["seed"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.parent.name, other.parent.name])


def test_crash_leaves_no_complete_looking_dataset(tmp_path, monkeypatch):
    calls = []
    real = synthetic.generate_case

    def _crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_case", _crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_dataset(tmp_path, size=16, cases_per_region=4, regions=["brain_mri"])
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary build directory
    monkeypatch.undo()
    dl = ensure_synthetic_dataset(tmp_path, size=16, cases_per_region=4, regions=["brain_mri"])
    assert [p.name for p in tmp_path.iterdir()] == [dl.parent.name] and dl.is_file()


def test_tampered_cache_is_reported(tmp_path):
    dl = ensure_synthetic_dataset(tmp_path, size=16, cases_per_region=2, regions=["brain_mri"])
    dl.unlink()
    with pytest.raises(ValueError, match=f"{dl.parent.name}.*delete it"):
        ensure_synthetic_dataset(tmp_path, size=16, cases_per_region=2, regions=["brain_mri"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"regions": ["brain_mri", "knee_mr"]}, "unknown synthetic region 'knee_mr'.*brain_mri"),
        ({"size": 8}, "size must be .* >= 16"),
        ({"cases_per_region": 1}, "at least 2"),
        ({"val_fraction": 1.5}, "val_fraction"),
    ],
)
def test_invalid_parameters(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ensure_synthetic_dataset(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []
