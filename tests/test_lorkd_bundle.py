# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""End to end through the bundles on a tiny synthetic set: foundation -> LoRKD* -> evaluate -> export -> inference,
plus resume, bundle metadata and bad-input behaviour. Runs in a copy of the bundles under tmp_path."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run

from medfm_ops.bundle import export_lorkd_expert
from medfm_ops.data import load_datalist

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "synthetic#size": 16,
    "synthetic#cases_per_region": 4,
    "synthetic#test_cases_per_region": 1,
    "roi_size": [16, 16, 16],
    "batch_size": 4,
    "num_workers": 0,
}


def _cfg(bundle: Path, *names: str) -> str | list[str]:
    files = [str(bundle / "configs" / n) for n in names]
    return files[0] if len(files) == 1 else files


def _run(bundle: Path, *names: str, **overrides) -> None:
    bundle_run(config_file=_cfg(bundle, *names), bundle_root=str(bundle), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Copies of both bundles, a private data cache, a trained teacher and a trained LoRKD* student."""
    root = tmp_path_factory.mktemp("bundles")
    for name in ("foundation_seg", "lorkd_seg"):
        shutil.copytree(REPO / "bundles" / name, root / name, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    os.environ["MEDFM_CACHE"] = str(root / "cache")
    _run(root / "foundation_seg", "train.json", epochs=2, val_interval=1)
    _run(root / "lorkd_seg", "train.json", epochs=3, warmup_epochs=1, lorkd_star=True, val_interval=1)
    yield root
    os.environ.pop("MEDFM_CACHE", None)


def test_metadata_of_both_bundles_is_complete(tmp_path):
    from monai.bundle import verify_metadata

    from medfm_ops.bundle import write_metadata_schema

    schema = write_metadata_schema(tmp_path / "schema.json")  # offline: MONAI skips the download when it exists
    for name in ("foundation_seg", "lorkd_seg"):
        verify_metadata(meta_file=str(REPO / "bundles" / name / "configs" / "metadata.json"), filepath=str(schema))
        meta = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
        assert meta["name"] == name and meta["version"] in meta["changelog"]
        for key in ("monai_version", "pytorch_version", "numpy_version", "task", "description", "authors"):
            assert meta[key], key
        assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
        for f in ("train.json", "logging.conf"):
            assert (REPO / "bundles" / name / "configs" / f).is_file()
        assert (REPO / "bundles" / name / "LICENSE").is_file() and (REPO / "bundles" / name / "docs" / "README.md").is_file()
    for f in ("evaluate.json", "inference.json", "multi_gpu_train.json"):
        assert (REPO / "bundles" / "lorkd_seg" / "configs" / f).is_file()


def test_training_outputs_and_lorkd_star_ranks(workspace):
    models = workspace / "lorkd_seg" / "models"
    summary = json.loads((models / "training_summary.json").read_text())
    ranks = summary["expert_ranks"]
    assert len(ranks) == 4 and all(r % 2 == 0 and 2 <= r <= 32 for r in ranks)
    assert len(summary["warmup_loss_drops"]) == 4
    state = torch.load(models / "model.pt", weights_only=True)
    a_keys = sorted(k for k in state if k.endswith("lora_A.0"))
    assert a_keys, "the best checkpoint holds the expert factors"
    spec = json.loads((models / "network_def.json").read_text())
    assert [r["name"] for r in spec["regions"]] == ["brain_mri", "thorax_ct", "abdomen_ct", "pelvis_mr"]
    assert not list(models.glob(".tmp*")) and not list(models.glob("tmp*")), "no temporary checkpoint files left"


def test_evaluate_table_fused_equals_unfused(workspace):
    _run(workspace / "lorkd_seg", "train.json", "evaluate.json")
    rows = list(csv.DictReader(open(workspace / "lorkd_seg" / "eval" / "regions.csv")))
    models = [r["model"] for r in rows]
    assert models == ["Foundation (teacher)", "LoRKD (unfused, routed)", "LoRKD experts (fused, one per region)"]
    unfused, fused = rows[1], rows[2]
    for region in ("brain_mri", "thorax_ct", "abdomen_ct", "pelvis_mr"):
        for m in ("DSC", "NSD"):
            a, b = float(unfused[f"{region} {m}"]), float(fused[f"{region} {m}"])
            assert 0.0 <= a <= 1.0 and abs(a - b) < 1e-3, (region, m, a, b)
    assert float(fused["deploy params (M)"]) < float(fused["train params (M)"])
    assert float(rows[0]["deploy params (M)"]) > float(fused["deploy params (M)"]), "teacher is the larger model"
    assert (workspace / "lorkd_seg" / "eval" / "classes.md").is_file()


def test_export_and_inference(workspace, tmp_path):
    bundle = workspace / "lorkd_seg"
    out = export_lorkd_expert(bundle, tmp_path / "expert_thorax", region="thorax_ct", verify=True)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "lung_left", "2": "lung_right", "3": "heart"}
    # the deployed expert is a stock MONAI UNet of the backbone's size
    from monai.bundle import ConfigParser

    net = ConfigParser.load_config_file(str(out / "configs" / "inference.json"))["network_def"]
    assert net["_target_"] == "monai.networks.nets.UNet"
    # inference.json of lorkd_seg on two thorax NIfTI files, with the fused expert in the stock network
    datalist = next((workspace / "cache").rglob("datalist.json"))
    _, sections = load_datalist(datalist)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    cases = [f for f in sections["test"] + sections["validation"] if f["region_name"] == "thorax_ct"][:2]
    for f in cases:
        shutil.copy(f["image"], inputs)
    _run(bundle, "train.json", "inference.json", region="thorax_ct", dataset_dir=str(inputs),
         output_dir=str(tmp_path / "pred"))
    preds = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert len(preds) == len(cases)
    for f, p in zip(sorted(cases, key=lambda c: Path(c["image"]).name), preds):
        src, pred = nib.load(f["image"]), nib.load(p)
        assert pred.shape[:3] == src.shape[:3]
        assert np.allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}


def _messages(exc: BaseException) -> list[str]:
    chain = []
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def test_inference_bad_inputs_are_clear_errors(workspace, tmp_path):
    with pytest.raises(Exception) as info:  # an empty input folder
        _run(workspace / "lorkd_seg", "train.json", "inference.json", dataset_dir=str(tmp_path))
    assert any("no input images found" in m and str(tmp_path) in m for m in _messages(info.value))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(tmp_path / "case.nii.gz"))
    with pytest.raises(Exception) as info:  # an unknown region name
        _run(workspace / "lorkd_seg", "train.json", "inference.json", region="spleen_xyz", dataset_dir=str(tmp_path))
    assert any("spleen_xyz" in m and "brain_mri" in m for m in _messages(info.value)), _messages(info.value)[-1]


def test_missing_teacher_says_how_to_produce_one(tmp_path):
    bundle = tmp_path / "lorkd_seg"
    shutil.copytree(REPO / "bundles" / "lorkd_seg", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    os.environ["MEDFM_CACHE"] = str(tmp_path / "cache")
    try:
        with pytest.raises(Exception) as info:
            _run(bundle, "train.json", epochs=1)
    finally:
        os.environ.pop("MEDFM_CACHE", None)
    assert any("teacher not found" in m and "foundation_seg/configs/train.json" in m for m in _messages(info.value))


def _final_weights(models: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted(models.glob("train_state_checkpoint_epoch=*.pt"))[-1]
    return torch.load(ckpt, weights_only=True)


def test_resumed_run_continues_from_the_same_state(workspace, tmp_path):
    """An interrupted LoRKD* run resumed from its epoch-1 checkpoint ends exactly where an uninterrupted run ends."""
    det = {
        "train#preprocessing": "$@validate#preprocessing",  # no random augmentation: bitwise reproducible
        "train#dataloader#shuffle": False,
        "epochs": 2,
        "warmup_epochs": 1,
        "lorkd_star": True,
        "val_interval": 2,
    }
    runs = {}
    for name in ("straight", "interrupted"):
        b = tmp_path / name / "lorkd_seg"
        shutil.copytree(workspace / "lorkd_seg", b, ignore=shutil.ignore_patterns("models", "eval", "runs"))
        shutil.copytree(workspace / "foundation_seg", tmp_path / name / "foundation_seg")
        runs[name] = b
    _run(runs["straight"], "train.json", **det)
    stop_after_epoch_1 = [
        "$@train#checkpointer.attach(@train#trainer)",
        "$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_COMPLETED(once=1), lambda e: e.terminate())",
        "$@train#trainer.run()",
    ]
    _run(runs["interrupted"], "train.json", run=stop_after_epoch_1, **det)
    ckpt1 = runs["interrupted"] / "models" / "train_state_checkpoint_epoch=1.pt"
    assert ckpt1.is_file()
    _run(runs["interrupted"], "train.json", resume_from=str(ckpt1), **det)
    a, b = _final_weights(runs["straight"] / "models"), _final_weights(runs["interrupted"] / "models")
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] > 0
    assert torch.equal(a["warmup"]["ranks"], b["warmup"]["ranks"])
    for k, v in a["network"].items():
        assert torch.allclose(v, b["network"][k], atol=1e-6, rtol=0), k


def test_multi_gpu_config_with_two_cpu_processes(workspace, tmp_path):
    """multi_gpu_train.json under torchrun with 2 processes, gloo on CPU, a few iterations."""
    bundle = tmp_path / "lorkd_seg"
    shutil.copytree(workspace / "lorkd_seg", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    shutil.copytree(workspace / "foundation_seg", tmp_path / "foundation_seg")
    cpu_patch = tmp_path / "cpu_patch.json"
    cpu_patch.write_text(json.dumps({
        "device": "$torch.device('cpu')",
        "network#device_ids": None,
        "initialize": [
            "$import torch.distributed as dist",
            "$dist.is_initialized() or dist.init_process_group(backend='gloo')",
            "$monai.utils.set_determinism(seed=123)",
        ],
    }))
    configs = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json"), str(cpu_patch)]
    args = [f"--{k}" if not k.startswith("--") else k for k in []]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(bundle),
           "--epochs", "2", "--warmup_epochs", "1", "--val_interval", "1"]
    for k, v in TINY.items():
        cmd += [f"--{k}", json.dumps(v)]
    env = {**os.environ, "MEDFM_CACHE": str(workspace / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file()
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state), "the DDP wrapper is not saved"
