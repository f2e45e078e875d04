# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""End to end through the bundles on a tiny synthetic set: foundation -> LoRKD* -> evaluate -> export -> inference,
plus resume, bundle metadata, standalone inference configs, renamed keys and bad-input behaviour. Runs in a copy of
the bundles under tmp_path."""

from __future__ import annotations

import csv
import json
import os
import re
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
#: the tiny synthetic set (also what the session teacher of conftest.py trains on)
TINY = json.loads((REPO / "tests" / "configs" / "tiny_seg.json").read_text())


def _cfg(bundle: Path, *names: str) -> str | list[str]:
    files = [str(bundle / "configs" / n) for n in names]
    return files[0] if len(files) == 1 else files


def _run(bundle: Path, *names: str, **overrides) -> None:
    bundle_run(config_file=_cfg(bundle, *names), bundle_root=str(bundle), **{**TINY, **overrides})


def _infer(bundle: Path, **overrides) -> None:
    """configs/inference.json ON ITS OWN (no train.json), with the tiny set's window."""
    bundle_run(config_file=_cfg(bundle, "inference.json"), bundle_root=str(bundle),
               **{"roi_size": TINY["roi_size"], **overrides})


def _raw(bundle: str, name: str) -> dict:
    return json.loads((REPO / "bundles" / bundle / "configs" / name).read_text())


@pytest.fixture(scope="module")
def workspace(seg_bundles):
    """Copies of both bundles, a private data cache, a trained teacher (session fixture ``seg_bundles``) and a trained
    LoRKD* student."""
    root = seg_bundles
    with pytest.MonkeyPatch.context() as mp:  # the module's data cache, restored afterwards
        mp.setenv("MEDFM_CACHE", str(root / "cache"))
        _run(root / "lorkd_seg", "train.json", epochs=3, warmup_epochs=1, lorkd_star=True, val_interval=1)
        yield root


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
        for f in ("train.json", "inference.json", "logging.conf"):
            assert (REPO / "bundles" / name / "configs" / f).is_file()
        assert (REPO / "bundles" / name / "LICENSE").is_file() and (REPO / "bundles" / name / "docs" / "README.md").is_file()
    for f in ("evaluate.json", "multi_gpu_train.json"):
        assert (REPO / "bundles" / "lorkd_seg" / "configs" / f).is_file()


def _no_dict_calls(item, where="") -> None:
    if isinstance(item, dict):
        for k, v in item.items():
            _no_dict_calls(v, f"{where}#{k}")
    elif isinstance(item, list):
        for i, v in enumerate(item):
            _no_dict_calls(v, f"{where}#{i}")
    else:
        built_in_python = isinstance(item, str) and re.search(r"(?<![\w.])dict\(", item)
        assert not built_in_python, f"{where}: a dict built in Python: {item!r}"


@pytest.mark.parametrize("bundle", ["foundation_seg", "lorkd_seg"])
def test_inference_json_is_one_definition_with_train_json(bundle):
    """inference.json cannot include train.json (MONAI Label loads it alone): its copies must equal train.json's."""
    train, infer = _raw(bundle, "train.json"), _raw(bundle, "inference.json")
    assert infer["deterministic_transforms"] == train["deterministic_transforms"]
    assert train["validate"]["preprocessing"]["transforms"] == "%deterministic_transforms"
    assert train["train"]["preprocessing"]["transforms"] == "$@deterministic_transforms + @train#random_transforms"
    assert infer["preprocessing"]["transforms"] == "%deterministic_transforms"
    for key in ("roi_size", "spacing", "region_preprocessing", "preprocessing_table"):
        assert infer[key] == train[key], key
    # train.json records its network as data (network_config -> models/network_def.json): the same stock network
    config = {k: v for k, v in train["network_config"].items() if k not in ("_target_", "target")}
    assert train["network_config"]["_target_"] == "medfm_ops.networks.network_config"
    assert infer["network_def"] == {"_target_": train["network_config"]["target"], **config}
    assert train["network_def"] == {"_target_": "medfm_ops.networks.instantiate", "network_def": "@network_config"}
    if bundle == "lorkd_seg":  # the expert layout is read from the trained model's spec, not repeated
        assert "expert_rank" not in infer and "expert_model_from_spec(@ckpt_dir)" in infer["expert_model"]
        assert any(isinstance(x, dict) and x.get("experts") == "@experts" for x in train["initialize"])
    # one window per region, from the same per-region table as the training patches
    assert infer["inferer"]["preprocessing"] == train["validate"]["inferer"]["preprocessing"] == "@preprocessing_table"
    assert train["train"]["random_transforms"][0]["preprocessing"] == "@preprocessing_table"
    assert infer["network_def"]["_target_"] == "monai.networks.nets.UNet", "a stock network a site can serve"
    assert [r["name"] for r in infer["regions"]] == ["brain_mri", "thorax_ct", "abdomen_ct", "pelvis_mr"]
    overrides = ("evaluate.json", "multi_gpu_train.json") if bundle == "lorkd_seg" else ()
    for name in ("train.json", "inference.json", *overrides):
        _no_dict_calls(_raw(bundle, name), name)


@pytest.mark.parametrize("bundle", ["foundation_seg", "lorkd_seg"])
def test_inference_network_verifies_before_training(bundle):
    """verify_net_in_out reads network_def from inference.json alone: no datalist, no weights needed."""
    from monai.bundle import verify_net_in_out

    root = REPO / "bundles" / bundle
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=str(root / "configs" / "inference.json"), device="cpu", bundle_root=str(root))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    assert parser.get_parsed_content("num_classes") == meta["network_data_format"]["outputs"]["pred"]["num_channels"]


@pytest.mark.parametrize("name", ["train.json", "inference.json"])
def test_renamed_keys_fail_with_the_new_name(name, tmp_path):
    bundle = tmp_path / "lorkd_seg"
    shutil.copytree(REPO / "bundles" / "lorkd_seg", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    with pytest.raises(Exception) as info:
        bundle_run(config_file=_cfg(bundle, name), bundle_root=str(bundle), alpha=32)
    assert any("'alpha' is now 'expert_alpha'" in m and "--expert_alpha 32" in m for m in _messages(info.value))
    if name == "train.json":  # the command line exits non-zero and says what to use
        proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", _cfg(bundle, name),
                               "--bundle_root", str(bundle), "--rank", "4"], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "MEDFM_CACHE": str(tmp_path / "cache")})
        assert proc.returncode != 0
        assert "--expert_rank 4" in proc.stdout + proc.stderr
        assert not (tmp_path / "cache").exists(), "the check runs before any data is generated"


def test_training_outputs_and_lorkd_star_ranks(workspace):
    models = workspace / "lorkd_seg" / "models"
    summary = json.loads((models / "training_summary.json").read_text())
    ranks = summary["expert_ranks"]
    assert len(ranks) == 4 and all(r % 2 == 0 and r >= 0 for r in ranks)
    assert summary["lorkd_star_formula_ranks"] == ranks, "no clip unless lorkd_star_min_rank/max_rank ask for one"
    assert len(summary["warmup_loss_drops"]) == 4
    state = torch.load(models / "model.pt", weights_only=True)
    a_keys = sorted(k for k in state if k.endswith("lora_A.0"))
    assert a_keys, "the best checkpoint holds the expert factors"
    spec = json.loads((models / "network_def.json").read_text())
    assert [r["name"] for r in spec["tasks"]] == ["brain_mri", "thorax_ct", "abdomen_ct", "pelvis_mr"]
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


def _thorax_inputs(workspace: Path, folder: Path) -> list[dict]:
    _, sections = load_datalist(next((workspace / "cache").rglob("datalist.json")))
    folder.mkdir()
    cases = [f for f in sections["test"] + sections["validation"] if f["region_name"] == "thorax_ct"][:2]
    for f in cases:
        shutil.copy(f["image"], folder)
    return sorted(cases, key=lambda c: Path(c["image"]).name)


@pytest.mark.parametrize("bundle", ["lorkd_seg", "foundation_seg"])
def test_standalone_inference_json(workspace, tmp_path, bundle):
    """inference.json alone on two thorax NIfTI files: lorkd_seg fuses the thorax expert into the stock network,
    foundation_seg keeps the thorax channels of the teacher; both write region-local label maps."""
    cases = _thorax_inputs(workspace, tmp_path / "inputs")
    _infer(workspace / bundle, region="thorax_ct", dataset_dir=str(tmp_path / "inputs"),
           output_dir=str(tmp_path / "pred"))
    preds = sorted((tmp_path / "pred").glob("*.nii.gz"))
    assert [p.name for p in preds] == [Path(c["image"]).name.replace(".nii.gz", "_seg.nii.gz") for c in cases]
    for f, p in zip(cases, preds):
        src, pred = nib.load(f["image"]), nib.load(p)
        assert pred.shape[:3] == src.shape[:3]
        assert np.allclose(pred.affine, src.affine, atol=1e-4)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}


def test_inference_regions_must_match_the_trained_layout(workspace, tmp_path):
    _thorax_inputs(workspace, tmp_path / "inputs")
    other = [{"name": "knee_mr", "task_id": 0, "labels": {"1": "cartilage"}}]
    with pytest.raises(Exception) as info:
        _infer(workspace / "foundation_seg", regions=other, dataset_dir=str(tmp_path / "inputs"))
    assert any("knee_mr" in m and "brain_mri" in m and "--regions" in m for m in _messages(info.value))


def test_inference_default_layout_is_the_trained_one(workspace):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(workspace / "lorkd_seg" / "configs" / "train.json"))
    parser.update({**TINY, "bundle_root": str(workspace / "lorkd_seg")})
    table = parser.get_parsed_content("region_table")
    # inference.json's default class layout is the one the bundles were trained on (the synthetic default)
    infer = json.loads((workspace / "lorkd_seg" / "configs" / "inference.json").read_text())
    assert infer["regions"] == [{k: r[k] for k in ("name", "task_id", "labels")} for r in table.to_regions()]


def _messages(exc: BaseException) -> list[str]:
    chain = []
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


@pytest.mark.parametrize("bundle", ["lorkd_seg", "foundation_seg"])
def test_inference_bad_inputs_are_clear_errors(workspace, tmp_path, bundle):
    for folder in (tmp_path, tmp_path / "missing"):  # an empty and a missing input folder
        with pytest.raises(Exception) as info:
            _infer(workspace / bundle, dataset_dir=str(folder))
        assert any("no input images found" in m and str(folder) in m for m in _messages(info.value))
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), np.eye(4)), str(tmp_path / "case.nii.gz"))
    with pytest.raises(Exception) as info:  # an unknown region name
        _infer(workspace / bundle, region="spleen_xyz", dataset_dir=str(tmp_path))
    assert any("spleen_xyz" in m and "brain_mri" in m for m in _messages(info.value)), _messages(info.value)[-1]


def test_missing_teacher_says_how_to_produce_one(tmp_path, monkeypatch):
    bundle = tmp_path / "lorkd_seg"
    shutil.copytree(REPO / "bundles" / "lorkd_seg", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    monkeypatch.setenv("MEDFM_CACHE", str(tmp_path / "cache"))
    with pytest.raises(Exception) as info:
        _run(bundle, "train.json", epochs=1)
    assert any("teacher not found" in m and "foundation_seg/configs/train.json" in m for m in _messages(info.value))


@pytest.mark.parametrize("bundle", ["foundation_seg", "lorkd_seg"])
def test_bad_cases_stop_training_before_it_starts_in_one_error(tmp_path, bundle):
    """initialize checks every case of the datalist once: one error lists every bad case (file, value, allowed labels)
    before any network, teacher or checkpoint exists."""
    from medfm_ops.data import ensure_synthetic_dataset

    root = tmp_path / bundle
    shutil.copytree(REPO / "bundles" / bundle, root, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    datalist = ensure_synthetic_dataset(tmp_path / "data", size=16, cases_per_region=2)
    raw = json.loads(datalist.read_text())
    bad = []
    for item in raw["training"][:2]:  # brain_mri (3 classes) and thorax_ct cases with a value of no class
        path = datalist.parent / item["label"]
        lab = nib.load(path)
        data = np.asarray(lab.dataobj).copy()
        data[0, 0, 0] = 9
        nib.save(nib.Nifti1Image(data, lab.affine), str(path))
        bad.append(str(path))
    with pytest.raises(Exception) as info:
        _run(root, "train.json", datalist=str(datalist), epochs=1)
    message = next((m for m in _messages(info.value) if "problem(s) found before training" in m), _messages(info.value))
    assert f"{datalist}: 2 problem(s) found before training" in message, message
    assert f"{bad[0]}: label value(s) [9] outside the data set's labels 0..3 (0=background, 1=ventricles" in message
    assert f"{bad[1]}: label value(s) [9]" in message and "1=lung_left" in message
    assert not (root / "models").exists() or not list((root / "models").glob("*.pt"))


def _final_weights(models: Path) -> dict[str, torch.Tensor]:
    ckpt = sorted(models.glob("train_state_checkpoint_epoch=*.pt"))[-1]
    return torch.load(ckpt, weights_only=True)


def test_resumed_run_continues_from_the_same_state(workspace, tmp_path):
    """An interrupted LoRKD* run resumed from its epoch-1 checkpoint ends exactly where an uninterrupted run ends:
    same weights, same best validation record (model.pt replaced only if epoch 2 beats epoch 1), and the superseded
    epoch-1 checkpoint removed."""
    det = {
        "train#preprocessing": "$@validate#preprocessing",  # no random augmentation: bitwise reproducible
        "train#dataloader#batch_sampler#shuffle": False,
        "epochs": 2,
        "warmup_epochs": 1,
        "lorkd_star": True,
        "val_interval": 1,
        "early_stop_patience": 5,  # counted across the resume
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
    assert torch.load(ckpt1, weights_only=True)["validation"]["early_stop"]["best_score"] is not None
    _run(runs["interrupted"], "train.json", resume_from=str(ckpt1), **det)
    a, b = _final_weights(runs["straight"] / "models"), _final_weights(runs["interrupted"] / "models")
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] > 0
    assert torch.equal(a["warmup"]["ranks"], b["warmup"]["ranks"])
    for k, v in a["network"].items():
        assert torch.allclose(v, b["network"][k], atol=1e-6, rtol=0), k
    summaries = [json.loads((runs[n] / "models" / "training_summary.json").read_text()) for n in runs]
    for key in ("best_metric", "best_metric_epoch", "model_written_by_this_run"):
        assert summaries[0][key] == summaries[1][key], key
    assert abs(a["validation"]["best_metric"] - b["validation"]["best_metric"]) < 1e-6
    assert a["validation"]["early_stop"]["counter"] == b["validation"]["early_stop"]["counter"]
    assert abs(a["validation"]["early_stop"]["best_score"] - b["validation"]["early_stop"]["best_score"]) < 1e-6
    best = [torch.load(runs[n] / "models" / "model.pt", weights_only=True) for n in runs]
    for k, v in best[0].items():
        assert torch.allclose(v, best[1][k], atol=1e-6, rtol=0), k
    left = sorted(p.name for p in (runs["interrupted"] / "models").glob("train_state_checkpoint_epoch=*.pt"))
    assert left == ["train_state_checkpoint_epoch=2.pt"], left


def test_export_refuses_a_model_the_last_run_did_not_write(workspace, tmp_path):
    """Every run ends with its own model (a run shorter than val_interval validates at its end), and export
    refuses a model.pt that the last finished run did not write or that changed after it."""
    bundle = tmp_path / "lorkd_seg"
    shutil.copytree(workspace / "lorkd_seg", bundle, ignore=shutil.ignore_patterns("eval", "runs"))
    shutil.copytree(workspace / "foundation_seg", tmp_path / "foundation_seg")
    old = (bundle / "models" / "model.pt").read_bytes()
    _run(bundle, "train.json", epochs=1, warmup_epochs=0, val_interval=2)  # 1 epoch < interval: validated at the end
    summary = json.loads((bundle / "models" / "training_summary.json").read_text())
    assert summary["model_written_by_this_run"] and summary["best_metric_epoch"] == 1
    assert (bundle / "models" / "model.pt").read_bytes() != old
    export_lorkd_expert(bundle, tmp_path / "fresh", region="thorax_ct")  # this run's model: exported

    summary["model_written_by_this_run"], summary["model_sha256"] = False, None  # a run that never validated
    (bundle / "models" / "training_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="not written by the last training run"):
        export_lorkd_expert(bundle, tmp_path / "stale", region="thorax_ct")
    assert not (tmp_path / "stale").exists()
    summary.update(model_written_by_this_run=True, model_sha256="0" * 64)  # model.pt replaced after the summary
    (bundle / "models" / "training_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="interrupted"):
        export_lorkd_expert(bundle, tmp_path / "stale", region="thorax_ct")
    export_lorkd_expert(bundle, tmp_path / "forced", region="thorax_ct", force=True)  # explicit override



#: the same global batch in both runs: 8 cases, two per region, ordered so that DistributedSampler (shuffle off)
#: gives each of 2 ranks one case of every region of a step (equal (case, class) pair counts per rank)
_DDP_FILES = ("$[x for r in sorted({c['region'] for c in @datalist_content[1]['training']})[:4] "
              "for x in [c for c in @datalist_content[1]['training'] if c['region'] == r][:2]]")
_NO_AUGMENTATION = [{"_target_": "SpatialPadd", "keys": "image", "spatial_size": "@roi_size", "mode": "minimum"},
                    {"_target_": "SpatialPadd", "keys": "label", "spatial_size": "@roi_size"}]
_LOAD_INIT = "$getattr(@network, 'module', @network).load_state_dict(torch.load(@init_path, weights_only=True))"


def _final_network(models: Path) -> dict[str, torch.Tensor]:
    state = torch.load(models / "train_state_checkpoint_epoch=2.pt", weights_only=False)["network"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def test_multi_gpu_config_equals_one_process_with_the_same_global_batch(workspace, tmp_path):
    """multi_gpu_train.json under torchrun (2 processes, gloo on CPU, 2 cases each) reaches the same weights as
    train.json in one process with batches of 4, from the same initial weights, without augmentation or shuffling:
    4 SGD steps (momentum 0.9) with experts and distillation, one thread per process in both runs. Tolerance per
    tensor: the difference is below 1e-3 of that tensor's own update, or below 1e-7 (measured: at most ~1e-5 of the
    update; float32 summation order). SGD, not AdamW, because Adam's first steps
    are ~lr * sign(gradient): for near-zero gradients (e.g. conv biases before an InstanceNorm) float noise flips
    the sign, and the runs drift apart although both compute the same mean gradient."""
    from monai.bundle import ConfigParser

    bundle = tmp_path / "lorkd_seg"
    shutil.copytree(workspace / "lorkd_seg", bundle, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    shutil.copytree(workspace / "foundation_seg", tmp_path / "foundation_seg")
    common = {**TINY, "epochs": 2, "warmup_epochs": 0, "val_interval": 2, "train_files": _DDP_FILES,
              "train#random_transforms": _NO_AUGMENTATION, "init_path": str(tmp_path / "init.pt"),
              "optimizer#_target_": "torch.optim.SGD", "optimizer#momentum": 0.9, "learning_rate": 0.05}  # fmt: skip
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser.update({**TINY, "bundle_root": str(bundle), "device": "$torch.device('cpu')"})
    torch.save(parser.get_parsed_content("network").state_dict(), tmp_path / "init.pt")

    single = {**common, "batch_size": 4, "train#dataloader#batch_sampler#shuffle": False, "ckpt_dir": str(tmp_path / "single"),
              "+initialize": [_LOAD_INIT]}  # fmt: skip
    (tmp_path / "single.json").write_text(json.dumps(single))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: the thread count alone moves the first conv by ~2e-3 of its update
    try:
        bundle_run(config_file=[str(bundle / "configs" / "train.json"), str(tmp_path / "single.json")],
                   bundle_root=str(bundle), device="$torch.device('cpu')")  # fmt: skip
    finally:
        torch.set_num_threads(threads)

    ddp = {**common, "batch_size": 2, "train#sampler#shuffle": False, "ckpt_dir": str(tmp_path / "ddp"),
           "device": "$torch.device('cpu')", "network#device_ids": None,
           "initialize": ["$import torch.distributed as dist",
                          "$dist.is_initialized() or dist.init_process_group(backend='gloo')",
                          "$monai.utils.set_determinism(seed=0)", _LOAD_INIT]}  # fmt: skip
    (tmp_path / "ddp.json").write_text(json.dumps(ddp))
    configs = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json"),
               str(tmp_path / "ddp.json")]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           "-m", "monai.bundle", "run", "--config_file", json.dumps(configs), "--bundle_root", str(bundle)]
    env = {**os.environ, "MEDFM_CACHE": str(workspace / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr  # one summary line per epoch (rank 0 only), no per-iteration lines by default
    summaries = [line for line in log.splitlines() if "medfm.train - INFO - epoch " in line]
    assert [s.split("INFO - ")[1].split(":")[0] for s in summaries] == ["epoch 1/2", "epoch 2/2"], log[-3000:]
    assert "Iter:" not in log, "no per-iteration StatsHandler lines unless --log_every_iteration true"
    state = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in state), "the DDP wrapper is not saved"

    a, b, init = _final_network(tmp_path / "single"), _final_network(tmp_path / "ddp"), torch.load(tmp_path / "init.pt")
    assert a.keys() == b.keys() == init.keys()
    moved = [k for k in a if "lora_B" in k and a[k].abs().max() > 0]
    assert moved, "the experts trained in the single-process run"
    for k in a:
        diff, update = (a[k] - b[k]).norm().item(), (a[k] - init[k]).norm().item()
        assert diff <= 1e-3 * update or diff <= 1e-7, (k, diff, update)
