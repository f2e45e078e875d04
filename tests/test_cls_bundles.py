# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""End to end through the classification bundles on a tiny synthetic multi-task set (copies under tmp_path):
foundation_cls -> lorkd_cls (LoRKD*) -> evaluate -> export a fused expert as a verified standalone bundle; rd_cls;
every baseline override; rd_cls's on-disk teacher feature cache; standalone inference.json of each bundle; metadata
and verify_net_in_out before training."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run

from medfm_ops.bundle import export_lorkd_cls_expert, write_metadata_schema

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
NAMES = ("foundation_cls", "lorkd_cls", "rd_cls")
TINY = {"synthetic#size": 16, "synthetic#train_cases": 8, "synthetic#val_cases": 4, "spatial_size": [16, 16, 16], "batch_size": 8,
        "verify_export": False}  # fmt: skip
ADRENAL = REPO.parent / "shared" / "data" / "adrenalmnist3d" / "adrenalmnist3d.npz"
VESSEL = REPO.parent / "shared" / "data" / "vesselmnist3d" / "vesselmnist3d.npz"


def _run(bundle: Path, *names: str, **overrides) -> None:
    files = [str(bundle / "configs" / n) for n in names]
    bundle_run(config_file=files[0] if len(files) == 1 else files, bundle_root=str(bundle), **{**TINY, **overrides})


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls_bundles")
    for name in NAMES:
        shutil.copytree(REPO / "bundles" / name, root / name, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    with pytest.MonkeyPatch.context() as mp:  # the module's data cache, restored afterwards
        mp.setenv("MEDFM_CACHE", str(root / "cache"))
        # early_stop_patience 3 cannot stop a 2-epoch run: it checks that the handler reads the real validator's key
        # metric (test_early_stop.py checks the stopping itself)
        _run(root / "foundation_cls", "train.json", epochs=2, val_interval=1, early_stop_patience=3)
        # expert_alpha 8 (not the default 16): inference and export must rebuild the experts from what training
        # recorded; lorkd_star_max_rank: with 1 warm-up epoch on 8 cases the mean loss drop can be near 0 and the
        # unclipped formula gives ranks in the tens of thousands (tens of GB)
        _run(root / "lorkd_cls", "train.json", epochs=2, warmup_epochs=1, lorkd_star=True, val_interval=1,
             expert_alpha=8, lorkd_star_max_rank=16)  # fmt: skip
        yield root


def _images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        nib.save(nib.Nifti1Image(rng.random((20, 18, 16)).astype(np.float32), np.eye(4)), str(folder / f"c{i}.nii.gz"))


def test_metadata_and_net_in_out_before_training(tmp_path, monkeypatch):
    """MONAI's verify_metadata and verify_net_in_out on the shipped configs (the functions `python -m monai.bundle
    verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json` calls,
    here in this process, from the bundle folder)."""
    from monai.bundle import verify_metadata, verify_net_in_out

    schema = write_metadata_schema(tmp_path / "schema.json")
    for name in NAMES:
        bundle = REPO / "bundles" / name
        verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(schema))
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        assert meta["version"] in meta["changelog"]
        monkeypatch.chdir(bundle)
        verify_net_in_out("network_def", meta_file="configs/metadata.json", config_file="configs/inference.json",
                          device="cpu")  # fmt: skip


def test_one_preprocessing_definition():
    for name in NAMES:
        train = json.loads((REPO / "bundles" / name / "configs" / "train.json").read_text())
        infer = json.loads((REPO / "bundles" / name / "configs" / "inference.json").read_text())
        assert train["validate"]["preprocessing"]["transforms"] == "%deterministic_transforms"
        assert infer["deterministic_transforms"] == train["deterministic_transforms"], name


def test_lorkd_evaluation_foundation_unfused_and_fused(workspace):
    bundle = workspace / "lorkd_cls"
    summary = json.loads((bundle / "models" / "training_summary.json").read_text())
    assert len(summary["expert_ranks"]) == 4
    _run(bundle, "train.json", "evaluate.json")
    rows = list(csv.DictReader((bundle / "eval" / "tasks.csv").open()))
    models = {r["model"] for r in rows}
    assert {"foundation (unified head)", "LoRKD (unfused, routed)", "LoRKD experts (fused, one per task)"} <= models
    by = {(r["model"], r["task"]): r for r in rows}
    for task in ("lesion_ct", "shape_ct", "blobs_mr", "vessel_mra"):
        unfused, fused = by[("LoRKD (unfused, routed)", task)], by[("LoRKD experts (fused, one per task)", task)]
        assert float(unfused["auc"]) == pytest.approx(float(fused["auc"]), abs=1e-6), task
        assert 0 <= float(unfused["majority_accuracy"]) <= 1
    fused = by[("LoRKD experts (fused, one per task)", "mean")]
    assert float(fused["deploy params (M)"]) < float(fused["train params (M)"])


def test_exported_expert_is_a_verified_standalone_bundle(workspace, tmp_path):
    out = export_lorkd_cls_expert(workspace / "lorkd_cls", "shape_ct", tmp_path / "shape_expert", verify=True)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert "medfm_ops" not in meta["required_packages_version"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    cfg = json.loads((out / "configs" / "inference.json").read_text())
    assert not any("medfm_ops" in json.dumps(v) for v in cfg.values())
    _images(tmp_path / "in")
    bundle_run(config_file=str(out / "configs" / "inference.json"), bundle_root=str(out), dataset_dir=str(tmp_path / "in"), spatial_size=[16, 16, 16])
    rows = list(csv.reader((out / "eval" / "predictions.csv").open()))
    assert len(rows) == 2 and all(abs(sum(map(float, r[1:])) - 1) < 1e-5 for r in rows)


def test_inference_and_export_use_the_recorded_expert_settings(workspace, tmp_path):
    """The fused network of lorkd_cls's inference.json and of the exported bundle equal the trained routed model on
    its task, although training used a non-default expert_alpha that neither inference.json nor export is given."""
    from monai.bundle import ConfigParser

    from medfm_ops.networks import load_expert_state_dict, load_network_spec

    bundle = workspace / "lorkd_cls"
    spec = load_network_spec(bundle / "models")
    assert spec["experts"] == {"ranks": 8, "alpha": 8, "scaling": "constant", "convert_transposed": True}  # complete
    train = ConfigParser()
    train.read_config(str(bundle / "configs" / "train.json"))
    train.update({"bundle_root": str(bundle), "expert_alpha": 8, "device": "$torch.device('cpu')", **TINY})
    routed = load_expert_state_dict(train.get_parsed_content("network"), bundle / "models" / "model.pt").eval()
    task = 1  # shape_ct (3 classes)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = routed(x, torch.full((2,), task))[:, :3]
        infer = ConfigParser()
        infer.read_config(str(bundle / "configs" / "inference.json"))
        infer.update({"bundle_root": str(bundle), "task": "shape_ct", "device": "$torch.device('cpu')"})
        assert torch.allclose(infer.get_parsed_content("network")(x), want, atol=1e-5)
        out = export_lorkd_cls_expert(bundle, "shape_ct", tmp_path / "shape_expert")
        exported = ConfigParser()
        exported.read_config(str(out / "configs" / "inference.json"))
        exported.update({"bundle_root": str(out), "device": "$torch.device('cpu')"})
        net = exported.get_parsed_content("network")
        net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True))
        assert torch.allclose(net.eval()(x), want, atol=1e-5)


@pytest.mark.parametrize("name,task", [("foundation_cls", "blobs_mr"), ("lorkd_cls", "shape_ct")])
def test_standalone_inference(workspace, name, task):
    bundle = workspace / name
    _images(bundle / "eval" / "input")
    bundle_run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), spatial_size=[16, 16, 16], task=task)
    rows = list(csv.reader((bundle / "eval" / "predictions" / task / "predictions.csv").open()))
    n = {"blobs_mr": 4, "shape_ct": 3}[task]
    assert len(rows) == 2 and all(len(r) == n + 1 and abs(sum(map(float, r[1:])) - 1) < 1e-5 for r in rows)


def test_rd_train_evaluate_and_deploy_student(workspace):
    bundle = workspace / "rd_cls"
    _run(bundle, "train.json", epochs=2, val_interval=1, task="shape_ct")
    _run(bundle, "train.json", "evaluate.json", task="shape_ct")
    rows = {r["model"]: r for r in csv.DictReader((bundle / "eval" / "tasks.csv").open()) if r["task"] == "mean"}
    assert {"RD student (deployed)", "reprogrammed teacher g(phi(F_t))", "foundation (unified head)"} <= set(rows)
    assert float(rows["RD student (deployed)"]["deploy params (M)"]) < float(rows["foundation (unified head)"]["deploy params (M)"])
    assert all(r["verdict"] in ("working", "not working on 1 of 1 tasks") for r in rows.values())
    # the run's product: the trained task and stock student recorded, and a standalone bundle of its own
    spec = json.loads((bundle / "models" / "network_def.json").read_text())
    assert [r["name"] for r in spec["tasks"]] == ["shape_ct"] and spec["network_def"]["num_classes"] == 3
    assert spec["spatial_size"] == TINY["spatial_size"]
    export = bundle / "export" / "shape_ct"
    meta = json.loads((export / "configs" / "metadata.json").read_text())
    assert meta["medfm_rd"]["task"] == "shape_ct" and "Reprogramming Distillation" in meta["description"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "sphere", "1": "ellipsoid", "2": "box"}
    from monai.bundle import ConfigParser

    from medfm_ops.networks import ReprogrammedStudent

    parser = ConfigParser()
    parser.read_config(str(export / "configs" / "inference.json"))
    parser.update({"bundle_root": str(export)})
    stock = parser.get_parsed_content("network_def")
    stock.load_state_dict(torch.load(export / "models" / "model.pt", weights_only=True))
    trained = torch.load(bundle / "models" / "model.pt", weights_only=True)
    rd = ReprogrammedStudent(instantiate_stock(spec["network_def"]), teacher_dim=trained["phi.proj.weight"].shape[1])
    rd.load_state_dict(trained)
    x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(stock.eval()(x), rd.eval()(x), atol=1e-5)  # the exported model IS the trained student
    _images(bundle / "eval" / "input")
    bundle_run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), spatial_size=[16, 16, 16])
    rows = list(csv.reader((bundle / "eval" / "predictions" / "shape_ct" / "predictions.csv").open()))  # trained task by default
    assert len(rows) == 2 and all(len(r) == 4 for r in rows)


def instantiate_stock(network_def: dict) -> torch.nn.Module:
    from medfm_ops.networks import instantiate

    return instantiate(network_def)


def test_leave_one_task_out_teacher_and_rd_on_a_real_task(workspace, tmp_path):
    """foundation_cls pre-trained WITHOUT adrenalmnist3d (a synthetic task + vessel), rd_cls distils it to adrenal
    (leave_task_out): the student is exported as a verified bundle of adrenalmnist3d, inference.json serves it under
    that task's name; a teacher that saw the task is refused in this setting."""
    missing = [str(p) for p in (ADRENAL, VESSEL) if not p.is_file()]
    assert not missing, f"real MedMNIST files missing: {missing} (expected ../shared/data, see its README.md)"
    real = {"adrenalmnist3d": str(ADRENAL), "vesselmnist3d": str(VESSEL)}
    small = {"synthetic#tasks": ["lesion_ct"], "real_limit": 6, "epochs": 1, "val_interval": 1}
    teacher = tmp_path / "foundation_loto"
    shutil.copytree(REPO / "bundles" / "foundation_cls", teacher, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    _run(teacher, "train.json", real_tasks=real, exclude_tasks=["adrenalmnist3d"], **small)
    seen = [r["name"] for r in json.loads((teacher / "models" / "network_def.json").read_text())["tasks"]]
    assert seen == ["lesion_ct", "vesselmnist3d"]
    rd = tmp_path / "rd_cls"
    shutil.copytree(REPO / "bundles" / "rd_cls", rd, ignore=shutil.ignore_patterns("models", "eval", "runs", "export"))
    kw = dict(real_tasks={"adrenalmnist3d": str(ADRENAL)}, task="adrenalmnist3d", teacher_path=str(teacher),
              leave_task_out=True, **small)  # fmt: skip
    _run(rd, "train.json", **kw, verify_export=True)
    spec = json.loads((rd / "models" / "network_def.json").read_text())
    assert spec["tasks"] == [{"name": "adrenalmnist3d", "task_id": 0, "labels": {"0": "normal", "1": "adrenal_mass"}}]
    meta = json.loads((rd / "export" / "adrenalmnist3d" / "configs" / "metadata.json").read_text())
    assert meta["medfm_rd"]["settings"]["leave_task_out"] is True and meta["medfm_rd"]["task"] == "adrenalmnist3d"
    decision = meta["medfm"]["decision"]  # chosen on the run's validation split when it holds both classes
    assert decision["rule"] in ("threshold", "argmax")
    assert (decision["rule"] == "threshold") == (meta["version"] == "0.1.1" and "0.1.1" in meta["changelog"])
    _run(rd, "train.json", "evaluate.json", **kw)
    rows = {r["model"]: r for r in csv.DictReader((rd / "eval" / "tasks.csv").open()) if r["task"] == "adrenalmnist3d"}
    exported = {m for m in rows if m.startswith("RD student (exported bundle, decision threshold")}
    assert set(rows) - exported == {"RD student (deployed)", "reprogrammed teacher g(phi(F_t))"}  # no adrenal head
    assert len(exported) == (decision["rule"] == "threshold")  # the student as its bundle decides, when it has one
    for m in exported:  # the same probabilities, other decisions
        assert rows[m]["auc"] == rows["RD student (deployed)"]["auc"] and f"{decision['threshold']:.3g}" in m
    _images(rd / "eval" / "input")
    bundle_run(config_file=str(rd / "configs" / "inference.json"), bundle_root=str(rd), spatial_size=[16, 16, 16])
    rows = list(csv.reader((rd / "eval" / "predictions" / "adrenalmnist3d" / "predictions.csv").open()))
    assert len(rows) == 2 and all(len(r) == 3 for r in rows)
    with pytest.raises(Exception) as info:  # the synthetic foundation of the workspace saw no adrenal, but this one did
        _run(rd, "train.json", **{**kw, "teacher_path": str(workspace / "foundation_cls"), "task": "lesion_ct"},
             ckpt_dir=str(tmp_path / "m2"), output_dir=str(tmp_path / "r2"))  # fmt: skip
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("trained on the target task 'lesion_ct'" in m for m in chain), chain
    with pytest.raises(Exception) as info:  # logit KD: the leave-one-task-out teacher has no logits of adrenal
        _run(rd, "train.json", "baselines/logit_kd.json", **kw, ckpt_dir=str(tmp_path / "m3"), output_dir=str(tmp_path / "r3"))
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__
    assert any("never trained on 'adrenalmnist3d'" in m for m in chain), chain


@pytest.mark.parametrize(
    "name,override",
    [("lorkd_cls", "stl.json"), ("lorkd_cls", "stl_kd.json"), ("rd_cls", "scratch.json"), ("rd_cls", "logit_kd.json"),
     ("rd_cls", "reprogram.json"), ("rd_cls", "finetune.json")],
)  # fmt: skip
def test_baseline_overrides_train_on_their_task(workspace, tmp_path, name, override):
    _run(workspace / name, "train.json", f"baselines/{override}", epochs=1, val_interval=1, task="shape_ct",
         ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))  # fmt: skip
    metrics = json.loads((tmp_path / "models" / "training_summary.json").read_text())["last_metrics"]
    assert {k.split("/")[1] for k in metrics if "/" in k} == {"shape_ct"}, metrics  # one task (STL: one network per task)
    assert (tmp_path / "models" / "model.pt").is_file()


def test_rd_teacher_feature_cache_reused_then_refused_when_settings_change(workspace, tmp_path):
    cache = tmp_path / "teacher_features.pt"
    kw = dict(epochs=1, val_interval=1, task="shape_ct", cache_teacher_features=True, teacher_feature_cache=str(cache),
              ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))  # fmt: skip
    _run(workspace / "rd_cls", "train.json", **kw)
    raw = torch.load(cache, weights_only=True)
    assert raw["fingerprint"]["settings"] == {"spatial_size": [16, 16, 16]} and len(raw["entries"]) == 8
    before = raw["entries"]
    stamp = cache.stat().st_mtime_ns
    _run(workspace / "rd_cls", "train.json", **kw)  # every item cached and the first batch checks out: not rewritten
    assert cache.stat().st_mtime_ns == stamp
    _run(workspace / "rd_cls", "train.json", **{**kw, "spatial_size": [12, 12, 12]})  # refused, recomputed
    raw = torch.load(cache, weights_only=True)
    assert raw["fingerprint"]["settings"] == {"spatial_size": [12, 12, 12]} and raw["entries"].keys() == before.keys()
    assert not any(torch.allclose(raw["entries"][k][1], before[k][1]) for k in before)  # features of the 12^3 inputs


def test_bad_datalist_item_stops_the_run_naming_it(workspace, tmp_path):
    content = {"tasks": [{"name": "a", "task_id": 0, "labels": {"0": "n", "1": "p"}}],
               "training": [{"image": "x.nii.gz", "task": "a", "label": 3}], "validation": [{"image": "x.nii.gz", "task": "a", "label": 0}]}  # fmt: skip
    (tmp_path / "x.nii.gz").write_bytes(b"")
    (tmp_path / "dl.json").write_text(json.dumps(content))
    with pytest.raises(Exception) as info:
        _run(workspace / "foundation_cls", "train.json", datalist=str(tmp_path / "dl.json"), epochs=1)
    chain, e = [], info.value
    while e is not None:  # the config parser wraps the cause
        chain.append(str(e))
        e = e.__cause__
    assert any("dl.json training[0] (" in m and "label 3 is outside task 'a'" in m for m in chain), chain


def test_resumed_classification_run_keeps_its_validation_record(workspace, tmp_path):
    """foundation_cls interrupted after epoch 1 and resumed ends as the uninterrupted run: the checkpoint holds the
    validation record (best score, best-model files, early-stopping count), so epoch 2 replaces model.pt only when
    it beats epoch 1, and the summaries and models agree."""
    runs = {}
    for name in ("straight", "interrupted"):
        runs[name] = tmp_path / name / "foundation_cls"
        shutil.copytree(workspace / "foundation_cls", runs[name], ignore=shutil.ignore_patterns("models", "eval", "runs"))
    settings = {"epochs": 2, "val_interval": 1, "early_stop_patience": 3, "ckpt_dir": None}
    for name, b in runs.items():
        settings["ckpt_dir"] = str(b / "models")
        if name == "straight":
            _run(b, "train.json", **settings)
            continue
        _run(b, "train.json", run=["$@train#checkpointer.attach(@train#trainer)",
                                   "$@train#trainer.add_event_handler(monai.engines.workflow.Events.EPOCH_COMPLETED(once=1), "
                                   "lambda e: e.terminate())", "$@train#trainer.run()"], **settings)  # fmt: skip
        ckpt1 = b / "models" / "train_state_checkpoint_epoch=1.pt"
        saved = torch.load(ckpt1, weights_only=True)["validation"]
        assert saved["best_metric_epoch"] == 1 and saved["early_stop"]["best_score"] == pytest.approx(saved["best_metric"])
        _run(b, "train.json", resume_from=str(ckpt1), **settings)
    summaries = [json.loads((b / "models" / "training_summary.json").read_text()) for b in runs.values()]
    for key in ("best_metric", "best_metric_epoch", "epochs"):
        assert summaries[0][key] == pytest.approx(summaries[1][key]), key
    models = [torch.load(b / "models" / "model.pt", weights_only=True) for b in runs.values()]
    for k, v in models[0].items():
        assert torch.allclose(v, models[1][k], atol=1e-6, rtol=0), k


def _shape_ct_file(workspace: Path) -> tuple:
    """``(task table, npz file of the synthetic task shape_ct)`` of the module's default data set (TINY)."""
    from medfm_ops.data import ensure_cls_dataset, load_cls_datalist

    synthetic = {"size": TINY["synthetic#size"], "train_cases": TINY["synthetic#train_cases"],
                 "val_cases": TINY["synthetic#val_cases"], "seed": 0, "tasks": None}  # fmt: skip
    table, sections = load_cls_datalist(ensure_cls_dataset(workspace / "cache" / "synthetic_cls", synthetic=synthetic))
    return table, next(i["image"] for i in sections["training"] if i["task"] == "shape_ct")


@pytest.mark.parametrize("bundle", ["rd_cls", "lorkd_cls"])
def test_teacher_reads_its_own_input(workspace, tmp_path, bundle):
    """teacher_images (rd_cls, lorkd_cls): the teacher sees each training case of the task from its own file (here the
    same cases upsampled to 24^3, resized to its 16^3), the student its 12^3 image; the cached teacher outputs are those
    of the teacher's input, not of the student's (lorkd_cls: the other tasks' items give the teacher their own image)."""
    from monai.transforms import Compose, NormalizeIntensity, Resize

    from medfm_ops.networks import load_teacher_features

    table, student_file = _shape_ct_file(workspace)
    src = np.load(student_file)
    up = {k: (torch.nn.functional.interpolate(torch.as_tensor(src[k][:, None], dtype=torch.float32), size=(24, 24, 24),
                                              mode="trilinear")[:, 0].numpy() if k.endswith("_images") else src[k])
          for k in src.files}  # fmt: skip
    np.savez(tmp_path / "shape_24.npz", **up)
    cache = tmp_path / "teacher_features.pt"
    # the teacher's input size is the one its bundle recorded (the workspace foundation was trained at 16^3)
    assert json.loads((workspace / "foundation_cls" / "models" / "network_def.json").read_text())["spatial_size"] == [16] * 3
    kw = dict(epochs=1, val_interval=1, spatial_size=[12, 12, 12],
              teacher_images={"shape_ct": str(tmp_path / "shape_24.npz")}, cache_teacher_features=True,
              teacher_feature_cache=str(cache), ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"))  # fmt: skip
    kw.update(task="shape_ct") if bundle == "rd_cls" else kw.update(expert_rank=2, lorkd_star=False, warmup_epochs=0)
    _run(workspace / bundle, "train.json", **kw)
    # evaluate.json scores the student only: the teacher would be fed the student's 12^3 input there
    _run(workspace / bundle, "train.json", "evaluate.json", **kw, eval_dir=str(tmp_path / "eval"))
    models = {r["model"] for r in csv.DictReader((tmp_path / "eval" / "tasks.csv").open())}
    assert models and not any("teacher" in m.lower() or "foundation" in m for m in models), models
    raw = torch.load(cache, weights_only=True)
    ours = {n: v for n, v in raw["entries"].items() if n.startswith(str(student_file))}
    assert raw["fingerprint"]["settings"]["teacher_spatial_size"] == [16, 16, 16] and len(ours) == 8
    assert len(raw["entries"]) == (8 if bundle == "rd_cls" else 8 * len(table.task_names))
    teacher = load_teacher_features(workspace / "foundation_cls", table)
    prep = {n: Compose([Resize((16, 16, 16), mode="trilinear"), NormalizeIntensity(channel_wise=True)]) for n in ("t", "s")}
    for name, (logits, _) in ours.items():
        index = int(name.rsplit("[", 1)[1].rstrip("]"))
        with torch.no_grad():
            own = teacher(prep["t"](torch.as_tensor(up["train_images"][index][None]))[None])[0][0]
            student_view = Resize((12, 12, 12), mode="trilinear")(torch.as_tensor(src["train_images"][index][None], dtype=torch.float32))
            other = teacher(prep["s"](student_view)[None])[0][0]
        assert torch.allclose(logits, own, atol=1e-4), name
        assert not torch.allclose(logits, other, atol=1e-3), name


@pytest.mark.parametrize("bundle", ["rd_cls", "lorkd_cls"])
def test_teacher_images_refused_with_augmentation(workspace, tmp_path, bundle):
    """The teacher's own input is not augmented like the student's: teacher_images without the feature cache (the
    bundle's random transforms on) stops with one error naming the setting."""
    student_file = _shape_ct_file(workspace)[1]  # the student's own file as the teacher's: only augmentation is wrong
    task = {"task": "shape_ct"} if bundle == "rd_cls" else {}
    with pytest.raises(Exception) as info:
        _run(workspace / bundle, "train.json", epochs=1, teacher_images={"shape_ct": student_file},
             ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"), **task)  # fmt: skip
    chain, e = [], info.value
    while e is not None:  # the config parser wraps the cause
        chain.append(str(e))
        e = e.__cause__
    assert any("teacher_images" in m and "cache_teacher_features true" in m for m in chain), chain
