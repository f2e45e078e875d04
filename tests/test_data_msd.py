# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""MSD converter on the real MSD Task04 Hippocampus data in ../shared/data, and on small MSD-style fakes."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfm_ops.data import convert_msd, load_datalist, read_msd_dataset, split_cases

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDFM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="module")
def hippocampus() -> Path:
    path = SHARED_DATA / "msd_hippocampus"
    if not (path / "dataset.json").is_file():
        pytest.fail(
            f"real MSD hippocampus data not found at {path} (expected dataset.json, imagesTr/, labelsTr/): the shared "
            "data folder must sit beside the repository as ../shared/data, or set MEDFM_SHARED_DATA to its location."
        )
    return path


def _fake_msd(root: Path, n: int = 4, labels: dict | None = None, training: bool = True) -> Path:
    """A tiny MSD-style data set with macOS ``._`` files beside the real ones."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    entries = []
    for i in range(n):
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((4, 4, 4), i, np.float32), np.eye(4)), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), str(root / "labelsTr" / name))
        (root / "imagesTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        (root / "labelsTr" / f"._{name}").write_bytes(b"\x00\x05\x16\x07")
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    entries.append({"image": "./imagesTr/._case_000.nii.gz", "label": "./labelsTr/._case_000.nii.gz"})
    meta = {"name": "Fake", "labels": labels or {"0": "background", "1": "Left Kidney"}, "numTraining": n}
    if training:
        meta["training"] = entries
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_hippocampus_cases_and_labels(hippocampus):
    labels, cases, info = read_msd_dataset(hippocampus)
    assert labels == {"1": "anterior", "2": "posterior"}
    assert len(cases) == 200
    assert all(Path(c["image"]).is_file() and Path(c["label"]).is_file() for c in cases)
    assert all(Path(c["image"]).name == Path(c["label"]).name for c in cases)
    assert info["modality"] == {"0": "MRI"}


def test_hippocampus_datalist_split_is_deterministic(hippocampus, tmp_path):
    a = convert_msd(hippocampus, "brain_hippocampus", tmp_path / "a.json", seed=0)
    b = convert_msd(hippocampus, "brain_hippocampus", tmp_path / "b.json", seed=0)
    c = convert_msd(hippocampus, "brain_hippocampus", tmp_path / "c.json", seed=1)
    assert a["training"] == b["training"] and a["validation"] == b["validation"]
    assert {i["image"] for i in a["validation"]} != {i["image"] for i in c["validation"]}
    assert (len(a["training"]), len(a["validation"])) == (160, 40) and "test" not in a
    assert a["regions"][0]["split"] == {
        "seed": 0,
        "val_split": 0.2,
        "test_split": 0,
        "num_training": 160,
        "num_validation": 40,
        "num_test": 0,
    }
    train, val = {i["image"] for i in a["training"]}, {i["image"] for i in a["validation"]}
    assert not train & val and len(train | val) == 200

    table, sections = load_datalist(tmp_path / "a.json")  # checks every file exists
    assert table.region_names == {0: "brain_hippocampus"} and table.class_names == {0: ["anterior", "posterior"]}
    assert all(not Path(i["image"]).is_absolute() for i in a["training"])  # relative to the datalist's directory
    assert Path(sections["training"][0]["image"]).is_file()
    assert Path(sections["training"][0]["image"]).resolve().parent == (hippocampus / "imagesTr").resolve()


def test_hippocampus_count_split_and_test_section(hippocampus, tmp_path):
    d = convert_msd(hippocampus, "brain_hippocampus", tmp_path / "dl.json", val_split=30, test_split=0.1, seed=3)
    assert (len(d["training"]), len(d["validation"]), len(d["test"])) == (150, 30, 20)
    _, sections = load_datalist(tmp_path / "dl.json")
    assert len(sections["test"]) == 20


def test_append_second_region(hippocampus, tmp_path):
    out = tmp_path / "multi" / "datalist.json"
    convert_msd(hippocampus, "brain_hippocampus", out)
    fake = _fake_msd(tmp_path / "Task_Fake", n=5)
    merged = convert_msd(fake, "abdomen_kidney", out, append=True, val_split=1)
    assert [r["name"] for r in merged["regions"]] == ["brain_hippocampus", "abdomen_kidney"]
    assert merged["name"] == "brain_hippocampus"
    table, sections = load_datalist(out)
    assert table.channels_of(1) == [2] and table.class_names[1] == ["left_kidney"] and table.num_classes == 3
    assert sum(i["region"] == 1 for i in sections["training"]) == 4
    assert sum(i["region"] == 1 for i in sections["validation"]) == 1
    assert sum(i["region"] == 0 for i in sections["training"]) == 160  # the first region is untouched

    with pytest.raises(ValueError, match=r"already has a region named 'abdomen_kidney'.*brain_hippocampus"):
        convert_msd(fake, "abdomen_kidney", out, append=True)
    with pytest.raises(FileExistsError, match="append=True"):
        convert_msd(fake, "other", out)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_msd(fake, "other", tmp_path / "missing.json", append=True)
    assert load_datalist(out)[0].num_regions == 2  # failed calls left the datalist as it was
    assert [p.name for p in out.parent.iterdir()] == ["datalist.json"]  # no temporary files left


def test_macos_files_and_missing_training_list(tmp_path):
    _, cases, _ = read_msd_dataset(_fake_msd(tmp_path / "with_list", n=3))
    assert [Path(c["image"]).name for c in cases] == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]
    _, cases, _ = read_msd_dataset(_fake_msd(tmp_path / "no_list", n=3, training=False))
    assert [Path(c["image"]).name for c in cases] == ["case_000.nii.gz", "case_001.nii.gz", "case_002.nii.gz"]


def test_nnunet_style_labels(tmp_path):
    labels, _, _ = read_msd_dataset(_fake_msd(tmp_path / "v2", labels={"background": 0, "Liver": 1, "Tumour": 2}))
    assert labels == {"1": "liver", "2": "tumour"}


@pytest.mark.parametrize(
    "setup, exc, message",
    [
        (lambda p: (p / "dataset.json").unlink(), FileNotFoundError, "no dataset.json"),
        (lambda p: (p / "dataset.json").write_text("{oops"), ValueError, r"dataset\.json: invalid JSON"),
        (lambda p: (p / "labelsTr" / "case_001.nii.gz").unlink(), FileNotFoundError, r"training\[1\] label file"),
        (
            lambda p: (p / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "2": "x"}, "training": []})),
            ValueError,
            r"1\.\.n without gaps",
        ),
    ],
)
def test_broken_msd_errors(tmp_path, setup, exc, message):
    root = _fake_msd(tmp_path / "broken")
    setup(root)
    with pytest.raises(exc, match=message):
        convert_msd(root, "r", tmp_path / "dl.json")
    assert not (tmp_path / "dl.json").exists()


@pytest.mark.parametrize(
    "val, test, message",
    [(0, 0, "cannot split"), (1.5, 0, r"fraction in \(0, 1\)"), (10, 0, "cannot split"), (5, 5, "cannot split")],
)
def test_split_errors(val, test, message):
    with pytest.raises(ValueError, match=message):
        split_cases([{"i": i} for i in range(10)], val_split=val, test_split=test)


def test_cli(hippocampus, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "cli.json"
    cli.msd(str(hippocampus), "brain_hippocampus", str(out), val_split=0.25)
    cli.msd(str(_fake_msd(tmp_path / "fake")), "kidney", str(out), append=True)
    cli.synthetic(str(tmp_path / "syn"), size=16, cases_per_region=2, regions=["thorax_ct"])
    printed = capsys.readouterr().out
    assert f"datalist: {out}" in printed and "task 1 kidney" in printed
    assert "brain_hippocampus: classes ['anterior', 'posterior'] -> channels [0, 1]; training 150, validation 50" in (
        printed
    )
    assert "task 0 thorax_ct" in printed and "synthetic_" in printed


# ------------------------------------------------------------------ several data sets by a mapping file (partial labels)


def _msd_set(root: Path, labels: dict, values: list[int], n: int = 3) -> Path:
    """An MSD-style set whose case i label holds ``values`` (one per slab along x) and image value i."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        name = f"case_{i:03d}.nii.gz"
        label = np.zeros((len(values), 4, 4), np.uint8)
        for x, v in enumerate(values):
            label[x] = v
        affine = np.diag([1.5, 1.5, 2.0, 1.0])
        nib.save(nib.Nifti1Image(np.full(label.shape, i, np.float32), affine), str(root / "imagesTr" / name))
        nib.save(nib.Nifti1Image(label, affine), str(root / "labelsTr" / name))
    meta = {"name": root.name, "labels": {"0": "background", **labels}, "modality": {"0": "CT"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def mapped_sets(tmp_path) -> tuple[Path, dict]:
    """Two abdomen sets with different, overlapping label subsets and label numbering, plus a brain set."""
    _msd_set(tmp_path / "sets" / "Task03_Liver", {"1": "Liver", "2": "Tumour"}, [0, 1, 2])
    _msd_set(tmp_path / "sets" / "organs", {"1": "spleen", "2": "liver"}, [0, 1, 2, 2])
    _msd_set(tmp_path / "sets" / "brain", {"1": "ventricles"}, [0, 1])
    mapping = {
        "name": "two_abdomen_sources",
        "regions": {"abdomen_ct": ["liver", "spleen"]},
        "datasets": {
            "sets/Task03_Liver": {"region": "abdomen_ct", "labels": {"1": "liver", "tumour": "liver"}},
            "sets/organs": {"region": "abdomen_ct", "labels": {"spleen": "spleen", "2": "liver"}, "name": "organs_ct"},
            "sets/brain": {"region": "brain_mri", "labels": {"1": "ventricles"}},
        },
    }
    return tmp_path, mapping


def _write_mapping(root: Path, mapping: dict) -> Path:
    path = root / "mapping.json"
    path.write_text(json.dumps(mapping))
    return path


def test_mapping_file_merges_data_sets_into_regions_with_partial_labels(mapped_sets):
    from medfm_ops.data import check_datalist_cases, convert_msd_mapping

    root, mapping = mapped_sets
    out = root / "out" / "datalist.json"
    written = convert_msd_mapping(_write_mapping(root, mapping), out, val_split=1, seed=0)
    table, sections = load_datalist(out)
    assert table.region_names == {0: "abdomen_ct", 1: "brain_mri"}
    assert table.class_names == {0: ["liver", "spleen"], 1: ["ventricles"]}
    items = sections["training"] + sections["validation"]
    by_set = {i["dataset"]: i for i in items}
    assert set(by_set) == {"Task03_Liver", "organs_ct", "brain"} and len(items) == 9
    assert by_set["Task03_Liver"]["annotated"] == ["liver"] and by_set["organs_ct"]["annotated"] == ["liver", "spleen"]
    assert {k: sum(i["dataset"] == k for i in sections["validation"]) for k in by_set} == dict.fromkeys(by_set, 1)
    # labels rewritten to region-local values (tumour -> liver; spleen 1 -> 2, liver 2 -> 1); identity ones kept
    liver = np.asarray(nib.load(by_set["Task03_Liver"]["label"]).dataobj)
    assert liver[:, 0, 0].tolist() == [0, 1, 1] and liver.dtype == np.uint8
    organs = nib.load(by_set["organs_ct"]["label"])
    assert np.asarray(organs.dataobj)[:, 0, 0].tolist() == [0, 2, 1, 1]
    np.testing.assert_allclose(organs.affine, np.diag([1.5, 1.5, 2.0, 1.0]))
    assert Path(by_set["organs_ct"]["label"]).parent == out.parent / "labels" / "organs_ct"
    assert Path(by_set["brain"]["label"]).parent == root / "sets" / "brain" / "labelsTr"
    assert [d["remapped_labels"] for d in written["datasets"]] == ["labels/Task03_Liver", "labels/organs_ct", None]
    assert written["datasets"][0]["msd_labels"] == {"1": "liver", "2": "liver"}
    check_datalist_cases(sections, source=str(out))  # every written case passes the pre-training check
    with pytest.raises(FileExistsError, match="overwrite=True"):
        convert_msd_mapping(root / "mapping.json", out)


def _mutate(path: str, value):
    def apply(mapping):
        *parents, last = path.split("#")
        node = mapping
        for p in parents:
            node = node[p]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value

    return apply


BAD_MAPPINGS = [
    (_mutate("dataset", {}), ValueError, ["unknown top-level key(s) ['dataset']"]),
    (_mutate("datasets#sets/organs#labels", KeyError), ValueError, ["datasets['sets/organs']", "misses ['labels']"]),
    (_mutate("datasets#sets/organs#label", {}), ValueError, ["datasets['sets/organs']", "unknown key(s) ['label']"]),
    (_mutate("datasets#sets/brain#labels", {"3": "x"}), ValueError,
     ["datasets['sets/brain'].labels['3'] is not a label of", "1=ventricles"]),
    (_mutate("datasets#sets/Task03_Liver#labels", {"1": "liver"}), ValueError,
     ["datasets['sets/Task03_Liver'].labels does not map MSD label(s) ['2=tumour']"]),
    (_mutate("datasets#sets/organs#labels#spleen", "kidney"), ValueError,
     ["datasets['sets/organs'].labels['spleen'] maps to 'kidney'", "region 'abdomen_ct' ['liver', 'spleen']"]),
    (_mutate("datasets#sets/organs#labels#1", "liver"), ValueError, ["maps MSD label 1 (spleen) twice"]),
    (_mutate("datasets#sets/brain#labels#1", None), ValueError, ["datasets['sets/brain'].labels maps every label to null"]),
    (_mutate("datasets#sets/brain#region", ""), ValueError, ["datasets['sets/brain'].region must be a non-empty"]),
    (_mutate("datasets#sets/brain#name", "organs_ct"), ValueError, ["name(s) ['organs_ct'] used more than once"]),
    (_mutate("regions#pelvis_mr", ["bladder"]), ValueError, ["regions ['pelvis_mr'] are declared", "no data set"]),
    (_mutate("regions#abdomen_ct", []), ValueError, ["regions['abdomen_ct'] must be a non-empty list"]),
    (_mutate("datasets#sets/nope", {"region": "a", "labels": {"1": "b"}}), FileNotFoundError,
     ["datasets['sets/nope']", "no dataset.json"]),
    (_mutate("datasets", {}), ValueError, ["'datasets' must be a non-empty object"]),
]


@pytest.mark.parametrize("mutate, exc, parts", BAD_MAPPINGS)
def test_bad_mapping_names_file_and_field(mapped_sets, mutate, exc, parts):
    from medfm_ops.data import convert_msd_mapping

    root, mapping = mapped_sets
    mutate(mapping)
    path = _write_mapping(root, mapping)
    with pytest.raises(exc) as info:
        convert_msd_mapping(path, root / "out.json")
    message = str(info.value)
    for part in [f"mapping file {path}", *parts]:
        assert part in message, f"'{part}' not in: {message}"
    assert not (root / "out.json").exists()


def test_mapping_reports_every_bad_label_file_at_once(mapped_sets):
    from medfm_ops.data import DatasetIntegrityError, convert_msd_mapping

    root, mapping = mapped_sets
    for i in (0, 2):
        bad = root / "sets" / "Task03_Liver" / "labelsTr" / f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((3, 4, 4), 5, np.uint8), np.eye(4)), str(bad))
    with pytest.raises(DatasetIntegrityError) as info:
        convert_msd_mapping(_write_mapping(root, mapping), root / "out.json")
    assert len(info.value.problems) == 2
    assert "case_002.nii.gz: label value(s) [5] outside the data set's labels 0..2 (1=liver, 2=tumour)" in str(info.value)
    assert not (root / "out.json").exists()


def test_cli_msd_map(mapped_sets, capsys):
    root, mapping = mapped_sets
    spec = importlib.util.spec_from_file_location("prepare_data", REPO / "tools" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cli.msd_map(str(_write_mapping(root, mapping)), str(root / "cli.json"), val_split=1)
    printed = capsys.readouterr().out
    assert "task 0 abdomen_ct: classes ['liver', 'spleen']" in printed
    assert "data set Task03_Liver annotates ['liver']" in printed and "data set organs_ct annotates" in printed
