# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Fault behaviour: every bad input gets one clear error naming it, and no failure corrupts an earlier result.

The cases that need whole training runs live next to their pipelines and are listed here so that the set is
complete: a huge learning rate and a NaN training image during site fine-tuning, a refused re-run (different seed
against the saved split, unknown mode, bad schedule) and a run killed during training
(``tests/test_finetune.py``: ``test_diverging_run_*``, ``test_refused_run_*``, ``test_interrupted_run_*``); a stale
model at export and a resumed run's validation record (``tests/test_lorkd_bundle.py``); an empty input folder at
inference (``tests/test_lorkd_bundle.py``, and below for the exported bundle). The second round (issue 22) has one
test per case in ``tests/test_faults_outputs.py`` (whole-bundle writes on a full disk or a kill, one writer per
folder, one-line disk-full errors in training, the exported classification bundle's input guard, truncated and NaN
images at site fine-tuning, the cached data check), ``tests/test_faults_training.py`` (bit-exact resume, the export
refusal after a resumed run, every bad classification item at once, a budget that selects no weight) and
``tests/test_shpeft_cls.py`` (an SH-PEFT re-run leaves no stale delta or TorchScript).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.networks.nets import UNet
from monai.transforms import Compose


from medfm_ops.bundle_paths import check_writable
from medfm_ops.data import (
    CheckFinited,
    CheckInputShaped,
    DatasetIntegrityError,
    ImageLoadError,
    SafeLoadImaged,
    check_segmentation_cases,
)
from medfm_ops.engines import AtomicCheckpointSaver
from medfm_ops.networks import load_teacher
from medfm_ops.utils import NonFiniteWeightsError, atomic_torch_save, atomic_write_text, report_cause_last, root_cause


def _nii(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------- nothing lost on a write
def test_failed_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    """A write that dies half-way (exception: a kill or a full disk) leaves the earlier file as it was."""
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_torch_save({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before and _leftovers(tmp_path) == []

    (tmp_path / "table.md").write_text("old")
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "table.md", "new \ud800")  # fails while writing
    assert (tmp_path / "table.md").read_text() == "old" and _leftovers(tmp_path) == []


def test_non_finite_weights_are_never_written(tmp_path):
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)
    with pytest.raises(NonFiniteWeightsError, match="NaN/inf.*w"):
        atomic_torch_save({"w": torch.tensor([1.0, float("nan")])}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(2))

    net = torch.nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(save_dir=str(tmp_path / "ckpt"), save_dict={"model": net}, save_interval=1,
                          n_saved=1).attach(engine)  # fmt: skip
    engine.run([0], max_epochs=1)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match="refusing to write checkpoint"):
        engine.run([0], max_epochs=2)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["model_epoch=1.pt"]


# ----------------------------------------------------------------------------------------- errors that name the case
def test_label_values_outside_the_data_set_are_all_listed(tmp_path):
    cases = []
    for i, (values, shape) in enumerate([((0, 1, 2), (8, 8, 8)), ((0, 7), (8, 8, 8)), ((0, 1), (8, 8, 6)),
                                         ((0, 1), (8, 8))]):  # fmt: skip
        lab = np.zeros(shape, np.uint8)
        lab.flat[: len(values)] = values
        img = np.zeros((8, 8, 8) if len(shape) == 3 else shape, np.float32)
        cases.append({"image": str(_nii(tmp_path / f"img{i}.nii.gz", img)),
                      "label": str(_nii(tmp_path / f"lab{i}.nii.gz", lab))})  # fmt: skip
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    cases.append({"image": str(tmp_path / "broken.nii.gz"), "label": cases[0]["label"]})
    with pytest.raises(DatasetIntegrityError) as info:
        check_segmentation_cases(cases, {"1": "anterior", "2": "posterior"}, "site data")
    text = str(info.value)
    assert len(info.value.problems) == 4, text  # every bad case at once, the good one not listed
    assert "lab1.nii.gz: label value(s) [7] outside the data set's labels 0..2 (0=background, 1=anterior" in text
    assert "lab2.nii.gz: label shape (8, 8, 6) differs" in text and "img3.nii.gz: image shape (8, 8)" in text
    assert "broken.nii.gz" in text and "cannot read" in text


def test_nan_image_and_wrong_dimensions_name_the_file(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    vol[1, 1, 1] = np.nan
    path = _nii(tmp_path / "nan.nii.gz", vol)
    chain = Compose([SafeLoadImaged("image", ensure_channel_first=True), CheckFinited("image")])
    with pytest.raises(Exception) as info:
        chain({"image": str(path)})
    cause = root_cause(info.value)
    assert isinstance(cause, ValueError) and str(path) in str(cause) and "1 NaN/inf voxel" in str(cause)

    flat = _nii(tmp_path / "slice.nii.gz", np.zeros((8, 8), np.float32))
    chain = Compose([SafeLoadImaged("image", ensure_channel_first=True), CheckInputShaped("image")])
    with pytest.raises(Exception) as info:
        chain({"image": str(flat)})
    assert str(flat) in str(root_cause(info.value)) and "expected (1, *, *, *)" in str(root_cause(info.value))
    multi = {"image": torch.zeros(4, 8, 8, 8)}
    with pytest.raises(ValueError, match=r"shape \(4, 8, 8, 8\).*1 channel"):
        CheckInputShaped("image")(multi)


def test_truncated_image_is_the_last_line_a_user_reads(tmp_path):
    """MONAI wraps the loader's error; the excepthook the bundles install prints the cause (the file) last."""
    good = _nii(tmp_path / "case.nii.gz", np.zeros((8, 8, 8), np.float32))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(good.read_bytes()[:60])
    chain = Compose([SafeLoadImaged("image")])
    with pytest.raises(RuntimeError) as info:
        try:
            chain({"image": str(truncated)})
        except Exception as e:
            raise RuntimeError("Failed to instantiate component CacheDataset") from e
    assert isinstance(root_cause(info.value), ImageLoadError)

    saved_hook, saved_err = sys.excepthook, sys.stderr
    try:
        sys.excepthook = lambda *a: None  # the usual traceback printer, silenced here
        report_cause_last()
        sys.stderr = captured = io.StringIO()
        sys.excepthook(type(info.value), info.value, info.value.__traceback__)
    finally:
        sys.excepthook, sys.stderr = saved_hook, saved_err
    last = captured.getvalue().strip().splitlines()[-1]
    assert "ImageLoadError" in last and str(truncated) in last


def test_wrong_teacher_checkpoint_is_summarised(tmp_path):
    torch.save(UNet(3, 1, 3, (8, 16), (2,)).state_dict(), tmp_path / "teacher.pt")
    teacher_def = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 5,
                   "channels": [8, 16, 32], "strides": [2, 2]}  # fmt: skip
    with pytest.raises(ValueError) as info:
        load_teacher(tmp_path / "teacher.pt", teacher_def=teacher_def)
    text = str(info.value)
    assert str(tmp_path / "teacher.pt") in text and "9 missing, 3 unexpected" in text
    assert "first shape mismatch: model.2.conv.weight" in text and len(text) < 800  # a summary, not every key


def test_unwritable_output_folder_fails_before_computing(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="a_file/out is not writable"):
        check_writable(blocker / "out")
    assert check_writable(tmp_path / "new" / "out") == str(tmp_path / "new" / "out")


# ----------------------------------------------------------------------------- the exported (stock MONAI) bundle
def _infer(bundle: Path, images: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir",
         str(images), "--output_dir", str(out)],
        cwd=bundle, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_exported_bundle_refuses_bad_inputs_by_name(site_files, tmp_path, bundle_infer_each):
    """The exported segmentation bundle's inference.json: an image with an inf voxel (the command line: exit code
    and the last line), an empty input folder and an output path under a file (one further process) are refused by
    name; nothing is written."""
    bundle = site_files.write_expert(tmp_path / "expert")
    bad = tmp_path / "bad"
    bad.mkdir()
    vol = np.zeros((12, 12, 12), np.float32)
    vol[2, 2, 2] = np.inf
    _nii(bad / "inf.nii.gz", vol)
    res = _infer(bundle, bad, tmp_path / "out")
    assert res.returncode != 0 and f"image {bad / 'inf.nii.gz'}: 'image' has 1 NaN/inf voxel(s)" in res.stderr
    last = res.stderr.strip().splitlines()[-1]  # the bundle-local excepthook (scripts/errors.py): the cause is last
    assert last.startswith("ERROR (cause of the failure above): ValueError: image") and "NaN/inf voxel(s)" in last

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "blocker").write_text("x")
    runs = {"empty": (empty, tmp_path / "out_empty"), "blocker": (bad, tmp_path / "blocker" / "out")}
    last = bundle_infer_each(bundle, runs)
    assert f"no NIfTI image (*.nii, *.nii.gz) in dataset_dir '{empty}'" in last["empty"], last["empty"]
    assert not (tmp_path / "out_empty").exists() or not any((tmp_path / "out_empty").iterdir())
    assert "blocker/out" in last["blocker"] and "Not a directory" in last["blocker"], last["blocker"]
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["version"]  # the bundle is untouched


def test_exported_bundle_training_stops_at_a_non_finite_loss(site_files, tmp_path):
    """The stock train.json (as run by `monai.bundle run` or MONAI Label) stops at the first NaN/inf loss, naming the
    batch's files; the bundle's model.pt is untouched (no checkpoint is written from a diverged run)."""
    bundle = site_files.write_expert(tmp_path / "expert")
    data = site_files.write_msd(tmp_path / "site", n=4)
    model_bytes = (bundle / "models" / "model.pt").read_bytes()
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--dataset_dir", str(data),
         "--epochs", "2", "--batch_size", "2", "--learning_rate", "1e12", "--val_split", "0.25", "--device",
         "$torch.device('cpu')"],
        cwd=bundle, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode != 0, res.stdout[-2000:]
    assert last.startswith("ERROR (cause of the failure above): FloatingPointError: training loss is"), last
    assert "on the batch of [" in last and ".nii" in last and "lower the learning rate" in last
    assert (bundle / "models" / "model.pt").read_bytes() == model_bytes


def test_label_maps_are_written_atomically(tmp_path, monkeypatch):
    """SaveImaged with the medfm bundles' writer: a failed write (full disk) leaves no truncated label map."""
    from monai.data import MetaTensor
    from monai.transforms import SaveImaged

    save = SaveImaged("pred", output_dir=str(tmp_path), output_postfix="seg", separate_folder=False, resample=False,
                      writer="medfm_ops.data.AtomicNibabelWriter", print_log=False)  # fmt: skip
    pred = MetaTensor(torch.ones(1, 4, 4, 4), meta={"filename_or_obj": "case.nii.gz"})
    save({"pred": pred})
    out = tmp_path / "case_seg.nii.gz"
    assert np.asarray(nib.load(out).dataobj).sum() == 64
    before = out.read_bytes()

    def full_disk(img, filename):
        Path(filename).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", full_disk)
    with pytest.raises(Exception) as info:
        save({"pred": MetaTensor(torch.zeros(1, 4, 4, 4), meta={"filename_or_obj": "case.nii.gz"})})
    assert "No space" in str(root_cause(info.value)) or "No space" in repr(info.value)
    assert out.read_bytes() == before and _leftovers(tmp_path) == []


def test_exported_bundle_label_maps_are_complete_or_absent(site_files, tmp_path, monkeypatch):
    """The stock inference.json writes each label map in `<output_dir>/.partial` and renames it into `output_dir`
    once written: a full disk on the second case leaves the first case's map complete and no truncated map."""
    from monai.bundle import run as bundle_run

    bundle = site_files.write_expert(tmp_path / "expert")
    images = tmp_path / "in"
    images.mkdir()
    for name in ("a", "b"):
        _nii(images / f"{name}.nii.gz", np.random.default_rng(0).random((16, 16, 16), dtype=np.float32))
    out = tmp_path / "out"
    real_save = nib.save

    def full_disk_on_b(img, filename):
        if Path(filename).name.startswith("b"):
            Path(filename).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save(img, filename)

    monkeypatch.setattr(nib, "save", full_disk_on_b)
    with pytest.raises(Exception) as info:
        bundle_run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
                   dataset_dir=str(images), output_dir=str(out), logging_file=False)  # fmt: skip
    assert "No space" in repr(root_cause(info.value)) or "No space" in repr(info.value)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["a_seg.nii.gz"]  # complete, renamed into place
    assert nib.load(out / "a_seg.nii.gz").shape == (16, 16, 16)

    monkeypatch.setattr(nib, "save", real_save)  # the next run completes and leaves no staging folder
    bundle_run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
               dataset_dir=str(images), output_dir=str(out), logging_file=False)  # fmt: skip
    assert sorted(os.listdir(out)) == ["a_seg.nii.gz", "b_seg.nii.gz"]


def test_best_model_file_survives_improvements_and_a_refused_save(tmp_path):
    """The key-metric saver's fixed name (model.pt) is replaced in place by a better model, kept otherwise."""
    net = torch.nn.Linear(2, 2)
    scores = iter([0.5, 0.7, 0.9])
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def _score(e):
        e.state.metrics = {"acc": next(scores)}

    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": net}, save_key_metric=True,
                                  key_metric_name="acc", key_metric_filename="model.pt")  # fmt: skip
    saver.attach(engine)
    engine.run([0], max_epochs=2)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    kept = (tmp_path / "model.pt").read_bytes()
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteWeightsError):
        engine.run([0], max_epochs=3)  # a better score, but NaN weights: refused, the best file stays
    assert sorted(os.listdir(tmp_path)) == ["model.pt"] and (tmp_path / "model.pt").read_bytes() == kept
