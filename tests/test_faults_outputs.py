# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Fault behaviour of whole outputs (issue 22): a bundle is written as a whole, one writer per output folder, a full
disk ends in one line naming the file, exported classification bundles guard their inputs, a run owns its outputs,
the data check decodes every file, a resumed run is bit-exact.

Each test asserts the exit code (where a command is run), the message naming the file, and that the previous
outputs are byte-identical afterwards. Disk-full cases use a file size limit (``ulimit -f``, RLIMIT_FSIZE) in a
subprocess: Python ignores SIGXFSZ, so the write fails with EFBIG as it would with ENOSPC on a full disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm_ops.bundle import BUNDLE_SCRIPTS, write_cls_expert_bundle
from medfm_ops.data import input_guard
from medfm_ops.utils import OutputLockedError, OutputWriteError, atomic_torch_save, lock_path, output_lock
from medfm_ops.utils.atomic_io import torch_write_failure

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY_CLS = {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
            "block_inplanes": [4, 4, 8, 8], "spatial_dims": 3, "n_input_channels": 1, "conv1_t_size": 3,
            "conv1_t_stride": 1, "num_classes": 2}  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _limited(size_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, size_bytes))

    return apply


def _nii(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def _break_image(image: Path, problem: str) -> Path:
    """``image`` cut to two thirds of its bytes (``"truncated"``, a gzip cut) or with 8 NaN voxels (``"nan"``)."""
    if problem == "truncated":
        raw = image.read_bytes()
        image.write_bytes(raw[: len(raw) * 2 // 3])
    else:
        arr = np.asarray(nib.load(image).dataobj).astype(np.float32)
        arr[2:4, 2:4, 2:4] = np.nan
        nib.save(nib.Nifti1Image(arr, nib.load(image).affine), image)
    return image


def _finetune_site(expert: Path, data: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``tools/finetune_site.py`` for one epoch (batch 1, CPU, no verification, no progress bar)."""
    return subprocess.run(
        [PY, str(REPO / "tools" / "finetune_site.py"), "--expert_bundle", str(expert), "--dataset_dir", str(data),
         "--output_dir", str(out), "--epochs", "1", "--batch_size", "1", "--val_split", "0.25", "--device", "cpu",
         "--verify", "false", "--progress", "false"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


class _FullDisk:
    """A file whose disk is full: the first write stores a few bytes, then fails with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        self.f.write(bytes(data)[:10])
        raise OSError(28, "No space left on device")

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


def _fill_disk(monkeypatch, name_part: str = "") -> None:
    """Files opened by ``os.fdopen`` (how atomic_io writes its temporary files) whose path contains ``name_part``
    are on a full disk (ENOSPC itself: no tmpfs can be mounted here)."""
    real_fdopen = os.fdopen

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return _FullDisk(f) if name_part in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(os, "fdopen", fdopen)


# ------------------------------------------------------------------------------- a bundle is written as a whole
def test_export_into_an_existing_bundle_on_a_full_disk_keeps_the_previous_bundle(site_files, tmp_path):
    """Row 1: a new expert (other classes, larger model) exported over an existing bundle with the disk filling up
    while model.pt is written: exit 1, one line naming model.pt, the old bundle byte-identical, nothing staged left."""
    bundle = site_files.write_expert(tmp_path / "expert")  # the "brain" bundle
    before = _snapshot(bundle)
    largest_config = max(p.stat().st_size for p in bundle.rglob("*") if p.is_file() and p.suffix != ".pt")
    script = textwrap.dedent(f"""
        import copy, torch
        from medfm_ops.bundle import write_expert_bundle
        from medfm_ops.networks import instantiate
        net_def = dict({site_files.unet!r}, channels=[16, 32, 64])
        torch.manual_seed(1)
        net = instantiate(copy.deepcopy(net_def))
        write_expert_bundle({str(bundle)!r}, net_def, net.state_dict(), "thorax", {{1: "lung", 2: "heart"}}, [1, 2],
                            (1, 1, 1), (16, 16, 16))
    """)
    res = subprocess.run([PY, "-c", script], cwd=REPO / "tests", env=_env(), capture_output=True, text=True,
                         timeout=300, preexec_fn=_limited(largest_config + 4096))  # fmt: skip
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1, res.stderr[-3000:]
    assert "OutputWriteError: file size limit exceeded (ulimit -f) while writing" in last, last
    assert f"{bundle}/models/model.pt" in last and f"the previous {bundle} is intact" in last, last
    assert _snapshot(bundle) == before
    assert _hidden(tmp_path) == []  # no staging folder, no lock file left


def test_killed_export_keeps_the_previous_bundle_and_the_next_writer_cleans_up(site_files, tmp_path):
    """A writer killed (SIGKILL) mid-way leaves the previous bundle intact; its staging folder and lock file are
    cleaned up by the next writer, which reports the stale lock and takes it over."""
    bundle = site_files.write_expert(tmp_path / "expert")
    before = _snapshot(bundle)
    script = textwrap.dedent(f"""
        import time, sys
        from medfm_ops.utils import staged_directory
        with staged_directory({str(bundle)!r}) as stage:
            (stage / "configs").mkdir()
            (stage / "configs" / "metadata.json").write_text("{{}}")  # half-new bundle
            print("staged", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([PY, "-c", script], env=_env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "staged"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert _snapshot(bundle) == before
    assert any(n.startswith(".expert.partial-") for n in _hidden(tmp_path)) and lock_path(bundle).is_file()
    rewrite = textwrap.dedent(f"""
        import torch
        from medfm_ops.bundle import write_expert_bundle
        from medfm_ops.networks import instantiate
        torch.manual_seed(0)
        net = instantiate({site_files.unet!r})
        write_expert_bundle({str(bundle)!r}, {site_files.unet!r}, net.state_dict(), "brain",
                            {{1: "ventricles", 2: "posterior", 3: "anterior"}}, [1, 2, 4], (1, 1, 1), (16, 16, 16),
                            modality="MR")
    """)
    res = subprocess.run([PY, "-c", rewrite], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"taking over the stale lock {lock_path(bundle)} of pid {proc.pid}" in res.stderr
    assert "that process is no longer running" in res.stderr
    assert _hidden(tmp_path) == [] and (bundle / "models" / "model.pt").is_file()


# ------------------------------------------------------------------------------------ one writer per output folder
def test_second_site_finetuning_into_the_same_folder_is_refused(site_files, tmp_path):
    """Row 7 (two processes): while one run holds the output folder, a second site fine-tuning exits 1 naming the
    holder's pid and the lock file, and the folder stays byte-identical."""
    expert = site_files.write_expert(tmp_path / "expert")
    data = site_files.write_msd(tmp_path / "site", n=4)
    out = site_files.write_expert(tmp_path / "site_bundle")  # an earlier result in the output folder
    before = _snapshot(out)
    holder = subprocess.Popen(
        [PY, "-c", f"import time; from medfm_ops.utils import output_lock\nwith output_lock({str(out)!r}):\n"
                   "    print('locked', flush=True); time.sleep(120)"],
        env=_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        res = _finetune_site(expert, data, out, _env())
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert f"{out} is being written by another run (pid {holder.pid} on" in last, last
    assert "Traceback" not in res.stderr, res.stderr[-3000:]  # one line, no traceback
    assert str(lock_path(out)) in last
    assert _snapshot(out) == before


def test_output_lock_in_process():
    """The lock names its owner; a second lock of the same folder in a live process is refused."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        target = Path(d) / "out"
        with output_lock(target) as lock:
            owner = json.loads(lock.read_text())
            assert owner["pid"] == os.getpid() and owner["process_start"] and owner["target"] == str(target)
            with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
                with output_lock(target):
                    pass
        assert not lock.exists()


# ------------------------------------------------------------------------------ a full disk in training: one line
def test_full_disk_during_training_is_one_line_naming_the_file(tmp_path):
    """Row 8: the checkpoint saver of every training (AtomicCheckpointSaver) on a full disk: exit 1, the last line
    says what happened and where, the previous model.pt is byte-identical."""
    script = textwrap.dedent(f"""
        import resource, shutil, torch
        from ignite.engine import Engine, Events
        from medfm_ops.engines import AtomicCheckpointSaver
        net = torch.nn.Linear(64, 64)
        engine = Engine(lambda e, b: None)
        @engine.on(Events.EPOCH_COMPLETED)
        def score(e):
            e.state.metrics = {{"acc": float(e.state.epoch)}}
        saver = AtomicCheckpointSaver(save_dir={str(tmp_path)!r}, save_dict={{"model": net}}, save_key_metric=True,
                                      key_metric_name="acc", key_metric_filename="model.pt")
        saver.attach(engine)
        engine.run([0], max_epochs=1)
        shutil.copyfile({str(tmp_path / "model.pt")!r}, {str(tmp_path / "first.bin")!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # the disk fills up
        with torch.no_grad():
            net.weight.add_(1.0)
        engine.run([0], max_epochs=2)
    """)
    res = subprocess.run([PY, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 1, res.stderr[-3000:]
    assert last.endswith(f"file size limit exceeded (ulimit -f) while writing {tmp_path / 'model.pt'}; the previous "
                         "model.pt is intact"), last  # fmt: skip
    assert "unexpected pos" not in res.stderr
    assert (tmp_path / "model.pt").read_bytes() == (tmp_path / "first.bin").read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["first.bin", "model.pt"]


def test_no_space_left_message(tmp_path, monkeypatch):
    """ENOSPC itself (a real full disk; no tmpfs can be mounted here): the words the issue asks for."""
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.ones(2)}, target)
    before = target.read_bytes()
    _fill_disk(monkeypatch)
    with pytest.raises(OutputWriteError) as info:
        atomic_torch_save({"w": torch.zeros(2)}, target)
    assert str(info.value) == f"no space left on device while writing {target}; the previous model.pt is intact"
    assert info.value.errno == 28 and target.read_bytes() == before and _hidden(tmp_path) == []



def test_stock_checkpoint_saver_failure_names_the_file(tmp_path):
    """A bundle whose train.json still saves with MONAI's stock CheckpointSaver (exported before the bundle-local
    atomic saver): torch's "unexpected pos" becomes one line naming the file being written (the newest one)."""
    older = tmp_path / "configs.json"
    older.write_text("{}")
    os.utime(older, ns=(0, 0))
    partial = tmp_path / "models" / "model.pt"
    partial.parent.mkdir()
    partial.write_bytes(b"PK partial")
    error = torch_write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs 0"),
                                tmp_path)  # fmt: skip
    assert isinstance(error, OutputWriteError) and error.filename == str(partial)
    assert str(error).endswith(f"while writing {partial}; that file is incomplete"), str(error)
    assert torch_write_failure(RuntimeError("Failed to evaluate"), tmp_path) is None

# ----------------------------------------------------------------- exported classification bundles guard their input
def _run_cls_bundle(bundle: Path, images: Path, out: Path, blocker: Path) -> subprocess.CompletedProcess:
    """The exported bundle's inference.json with MONAI only: importing medfm_ops fails in this subprocess."""
    return subprocess.run(
        [PY, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
         "--dataset_dir", str(images), "--output_dir", str(out)],
        cwd=bundle, env=_env(PYTHONPATH=str(blocker)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_exported_classification_bundle_refuses_nan_2d_two_channel_and_truncated_volumes(
    tmp_path, without_medfm, bundle_infer_each
):
    """Rows 2 and 3: the exported classification bundle (the writer of the lorkd_cls experts and of the SH-PEFT
    export) runs without medfm, refuses NaN/inf, 2D, 2-channel, truncated volumes and an empty folder naming the file
    or folder, and leaves the previous predictions byte-identical; its scripts/ is the package's input guard byte for
    byte. The command line (`monai.bundle run`: exit code, last line) is checked on the good and the NaN volume; the
    other inputs run in one further process (MONAI's `run`, the error under MONAI's wrappers as the bundle's
    exception hook finds it)."""
    torch.manual_seed(0)
    from medfm_ops.networks import instantiate

    net = instantiate(dict(TINY_CLS))
    bundle = write_cls_expert_bundle(tmp_path / "cls", TINY_CLS, net.state_dict(), "shape_ct", ["round", "square"],
                                     [12, 12, 12])  # fmt: skip
    for name, source in BUNDLE_SCRIPTS.items():  # the bundle-local code is the package's, byte for byte
        assert (bundle / "scripts" / name).read_bytes() == source.read_bytes(), name
    assert BUNDLE_SCRIPTS["input_guard.py"] == Path(input_guard.__file__)
    config = (bundle / "configs" / "inference.json").read_text()
    assert "exec(" not in config and "sys.excepthook" not in config  # configs are data; the logic is in scripts/
    rng = np.random.default_rng(0)
    cases = {"good": rng.normal(size=(10, 10, 10)).astype(np.float32)}
    cases["nan"] = cases["good"].copy()
    cases["nan"][3, 3, 3] = np.nan
    cases["inf"] = cases["good"].copy()
    cases["inf"][1, 1, 1] = np.inf
    cases["flat"] = cases["good"][:, :, 0].copy()  # a 2D slice
    cases["two_channel"] = np.stack([cases["good"], cases["good"]], axis=-1)  # (10, 10, 10, 2)
    out = tmp_path / "predictions"
    folders = {}
    for name, arr in cases.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        _nii(folders[name] / f"{name}.nii.gz", arr)
    res = _run_cls_bundle(bundle, folders["good"], out, without_medfm)
    assert res.returncode == 0, res.stderr[-3000:]
    csv = (out / "predictions.csv").read_text()
    assert "good.nii.gz" in csv and "nan" not in csv.lower()
    before = _snapshot(out)
    expected = {"nan": "NaN/inf voxel(s)", "inf": "NaN/inf voxel(s)", "flat": "has shape (1, 10, 10)",
                "two_channel": "has shape (2, 10, 10, 10)"}  # fmt: skip
    res = _run_cls_bundle(bundle, folders["nan"], out, without_medfm)
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR (cause of the failure above): ValueError: image"), last
    assert str(folders["nan"] / "nan.nii.gz") in last and expected["nan"] in last, last
    assert _snapshot(out) == before

    truncated, empty = tmp_path / "truncated", tmp_path / "empty"
    truncated.mkdir()
    empty.mkdir()
    raw = (folders["good"] / "good.nii.gz").read_bytes()
    (truncated / "cut.nii.gz").write_bytes(raw[: len(raw) * 2 // 3])
    runs = {name: (folders[name], out) for name in ("inf", "flat", "two_channel")}
    last = bundle_infer_each(bundle, {**runs, "truncated": (truncated, out), "empty": (empty, out)}, without_medfm)
    for name in ("inf", "flat", "two_channel"):
        assert last[name].startswith("ValueError: image"), (name, last[name])
        assert str(folders[name] / f"{name}.nii.gz") in last[name] and expected[name] in last[name], (name, last[name])
    assert f"cannot read image file {truncated / 'cut.nii.gz'}" in last["truncated"], last["truncated"]
    assert f"no NIfTI image (*.nii, *.nii.gz) in dataset_dir '{empty}'" in last["empty"], last["empty"]
    assert _snapshot(out) == before


# ------------------------------------------------------------------- site fine-tuning: data check decodes every file
def test_truncated_and_nan_images_at_site_finetuning_exit_1_naming_the_file(site_files, tmp_path):
    """Rows 5 and 6: a truncated image (gzip cut) and a NaN image are found by the data check, before any scoring or
    training: exit 1 (no abort), the file named, the previous output bundle byte-identical, nothing staged left."""
    expert = site_files.write_expert(tmp_path / "expert")
    out = site_files.write_expert(tmp_path / "site_bundle")
    before = _snapshot(out)
    for problem in ("truncated", "nan"):
        data = site_files.write_msd(tmp_path / problem, n=4)
        image = _break_image(data / "imagesTr" / "case_002.nii.gz", problem)
        res = _finetune_site(expert, data, out, _env(MEDFM_CACHE=str(tmp_path / "cache")))
        assert res.returncode == 1, (problem, res.returncode, res.stderr[-3000:])
        text = res.stderr
        assert f"{image}: " in text, (problem, text[-2000:])
        assert ("cannot read" if problem == "truncated" else "image has NaN/inf voxels (8 of") in text, text[-2000:]
        assert "EOFError" not in text.split(str(image))[0]  # named with the file, not a bare reader error
        assert _snapshot(out) == before and _hidden(tmp_path) == []


def test_exported_expert_trained_directly_on_a_truncated_or_nan_image_exits_1_naming_the_file(
    site_files, tmp_path, without_medfm
):
    """Row 5 (last part) and row 6 for the stock route: the exported segmentation expert's own train.json, run by
    `monai.bundle run` with MONAI only (importing medfm_ops fails), stops on a truncated (gzip cut) or NaN image
    with exit 1 (no abort) and a last line naming the file; its model.pt is untouched. Its configs carry no code
    strings: the checks are the bundle-local scripts/, byte for byte the package's modules."""
    bundle = site_files.write_expert(tmp_path / "expert")
    for name, source in BUNDLE_SCRIPTS.items():
        assert (bundle / "scripts" / name).read_bytes() == source.read_bytes(), name
    for config in (bundle / "configs").glob("*.json"):
        text = config.read_text()
        assert "exec(" not in text and "excepthook" not in text, config.name
    model = _snapshot(bundle / "models")
    for problem in ("truncated", "nan"):
        data = site_files.write_msd(tmp_path / problem, n=4)
        image = _break_image(data / "imagesTr" / "case_002.nii.gz", problem)
        res = subprocess.run(
            [PY, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", "--dataset_dir", str(data),
             "--epochs", "1", "--batch_size", "1", "--val_split", "0.25", "--device", "$torch.device('cpu')"],
            cwd=bundle, env=_env(PYTHONPATH=str(without_medfm)), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert res.returncode == 1, (problem, res.returncode, res.stderr[-3000:])
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith("ERROR (cause of the failure above): "), (problem, last)
        assert str(image) in last, (problem, last)
        words = "cannot read image file" if problem == "truncated" else "NaN/inf voxel(s)"
        assert words in last, (problem, last)
        assert "terminate called" not in res.stderr, problem
        assert _snapshot(bundle / "models") == model, problem


def test_data_check_reads_each_file_once(site_files, tmp_path, monkeypatch):
    """The verdict of a file is cached by path, size and mtime: a second check decodes nothing; a changed file is
    decoded again."""
    from medfm_ops.data import check_segmentation_cases, integrity

    monkeypatch.setenv("MEDFM_CACHE", str(tmp_path / "cache"))
    data = site_files.write_msd(tmp_path / "site", n=2)
    cases = [{"image": str(p), "label": str(data / "labelsTr" / p.name)} for p in sorted((data / "imagesTr").iterdir())]
    loads = []
    real_load = integrity.nib.load
    monkeypatch.setattr(integrity.nib, "load", lambda p, *a, **k: loads.append(p) or real_load(p, *a, **k))
    check_segmentation_cases(cases, {"1": "a", "2": "b"})
    assert len(loads) == 4
    check_segmentation_cases(cases, {"1": "a", "2": "b"})
    assert len(loads) == 4  # all from the cache
    time.sleep(0.01)
    arr = np.asarray(real_load(cases[0]["label"]).dataobj).copy()
    arr[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(arr, real_load(cases[0]["label"]).affine), cases[0]["label"])
    with pytest.raises(ValueError, match=r"label value\(s\) \[7\]"):
        check_segmentation_cases(cases, {"1": "a", "2": "b"})
    assert len(loads) == 5


def test_full_disk_in_a_bundle_training_during_site_finetuning(site_files, tmp_path, monkeypatch):
    """Row 8 for the fine-tuning path: the site bundle's own train.json saves with its bundle-local saver
    (scripts/atomic_checkpoint.py, which raises its own copy of OutputWriteError); a disk that fills up while it
    writes ends the run with the package's OutputWriteError naming the file in the output folder, the previous output
    bundle byte-identical and nothing staged left."""
    from medfm_ops.finetune import SiteFinetuneSettings, finetune_expert

    expert = site_files.write_expert(tmp_path / "expert")
    data = site_files.write_msd(tmp_path / "site", n=4)
    out = site_files.write_expert(tmp_path / "site_bundle")
    before = _snapshot(out)
    _fill_disk(monkeypatch, ".finetune_best.pt.")  # the temporary file of the best checkpoint
    monkeypatch.setenv("MEDFM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(OutputWriteError) as info:
        finetune_expert(expert, data, out, SiteFinetuneSettings(
            epochs=1, batch_size=1, val_split=0.25, device="cpu", verify=False, progress=False, score_before=False))
    text = str(info.value)
    assert text.startswith(f"no space left on device while writing {out}/models/finetune_best.pt"), text
    assert f"the previous {out} is intact" in text, text
    assert _snapshot(out) == before and _hidden(tmp_path) == []
