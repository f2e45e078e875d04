# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""bundles/shpeft_cls end to end on a tiny synthetic task from a tiny pretrained checkpoint (copies under tmp_path):
train -> frozen weights unchanged bit for bit, merged model == start + delta -> exported bundle verified and run by its
own inference.json; the bundle's evaluate/inference; a ViT start; the baselines' trainable sets; bad inputs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_metadata, verify_net_in_out
from monai.bundle import run as bundle_run

from medfm_ops.bundle import write_metadata_schema
from medfm_ops.data import SYNTHETIC_CLS_TASKS
from medfm_ops.networks import instantiate, load_pretrained_classifier, retarget_classifier
from medfm_ops.peft import LoRALinear, TensorSubset, add_linear_lora, apply_sparse_delta, budget_count, fuse_linear_lora

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TASK, CLASSES = "blobs_mr", ["none", "one", "two", "three"]
TINY = {"synthetic#size": 16, "synthetic#train_cases": 8, "synthetic#val_cases": 4, "spatial_size": [16, 16, 16],
        "batch_size": 8, "verify_export": False}  # fmt: skip
RESNET = {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
          "block_inplanes": [8, 16, 32, 64], "spatial_dims": 3, "n_input_channels": 1, "conv1_t_size": 3,
          "conv1_t_stride": 1, "num_classes": 11}  # fmt: skip
VIT = {"_target_": "medfm_ops.networks.ViTClassifier", "in_channels": 1, "img_size": [16, 16, 16], "patch_size": 8,
       "hidden_size": 32, "mlp_dim": 64, "num_layers": 1, "num_heads": 2, "spatial_dims": 3, "num_classes": 11}  # fmt: skip


def _pretrained(folder: Path, network_def: dict) -> Path:
    """A foundation-like checkpoint: models/model.pt + models/network_def.json over the four synthetic tasks, in
    the format written before the class layout was saved under "tasks" (its old key "regions" must still load)."""
    torch.manual_seed(0)
    (folder / "models").mkdir(parents=True)
    torch.save(instantiate(network_def).state_dict(), folder / "models" / "model.pt")
    regions = [{"name": n, "task_id": i, "labels": s["labels"]} for i, (n, s) in enumerate(SYNTHETIC_CLS_TASKS.items())]
    (folder / "models" / "network_def.json").write_text(json.dumps({"network_def": network_def, "regions": regions}))
    return folder


def _run(bundle: Path, *names: str, **overrides) -> None:
    files = [str(bundle / "configs" / n) for n in names]
    bundle_run(config_file=files[0] if len(files) == 1 else files, bundle_root=str(bundle), **{**TINY, **overrides})


def _causes(excinfo) -> str:
    chain, e = [], excinfo.value
    while e is not None:  # the config parser wraps the cause
        chain.append(str(e))
        e = e.__cause__
    return "\n".join(chain)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _images(folder: Path, n: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        nib.save(nib.Nifti1Image(rng.random((18, 16, 17)).astype(np.float32), np.eye(4)), str(folder / f"c{i}.nii.gz"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("shpeft")
    shutil.copytree(REPO / "bundles" / "shpeft_cls", root / "shpeft_cls", ignore=shutil.ignore_patterns("models", "eval", "runs", "export"))
    with pytest.MonkeyPatch.context() as mp:  # the module's data cache, restored afterwards
        mp.setenv("MEDFM_CACHE", str(root / "cache"))
        pre = _pretrained(root / "pretrained", RESNET)
        _run(root / "shpeft_cls", "train.json", pretrained=str(pre), epochs=2, head_init="fresh")
        yield root


def _check_sparse_result(ckpt: Path, pre: Path, head: str, budget: float = 0.01) -> dict:
    """Frozen entries are the pretrained ones bit for bit; exactly the budget trained; model.pt == start + delta."""
    summary = json.loads((ckpt / "training_summary.json").read_text())
    start = retarget_classifier(load_pretrained_classifier(pre), TASK, CLASSES, head_init=summary["settings"]["head_init"],
                                seed=summary["settings"]["seed"])  # fmt: skip
    pretrained = torch.load(pre / "models" / "model.pt", weights_only=True)
    model = torch.load(ckpt / "model.pt", weights_only=True)
    delta = torch.load(ckpt / "sparse_delta.pt", weights_only=True)
    merged = apply_sparse_delta(start.state, delta)
    assert set(merged) == set(model) and all(torch.equal(_bits(merged[k]), _bits(model[k])) for k in model)
    params = dict(start.network.named_parameters())
    selected = moved = 0
    for name in params:
        trainable = torch.zeros(params[name].numel(), dtype=torch.bool)
        trainable[delta["trainable_indices"].get(name, torch.zeros(0, dtype=torch.long))] = True
        if name.startswith(head + "."):
            assert bool(trainable.all()), name  # the new head trains entirely
            continue
        frozen = ~trainable
        assert torch.equal(_bits(model[name].reshape(-1)[frozen]), _bits(pretrained[name].reshape(-1)[frozen])), name
        selected += int(trainable.sum())
        moved += int((model[name].reshape(-1)[trainable] != pretrained[name].reshape(-1)[trainable]).sum())
    buffers = [k for k in model if k not in params and not k.startswith(head + ".")]
    for k in buffers:  # update_norm_stats false (the default): BatchNorm statistics are the pretrained ones
        assert torch.equal(_bits(model[k]), _bits(pretrained[k])), k
    assert not set(buffers) & set(delta["tensors"])
    body = sum(p.numel() for n, p in params.items() if not n.startswith(head + "."))
    assert selected == budget_count(budget, body)
    assert moved >= 0.5 * selected, f"only {moved} of the {selected} selected weights changed: they did not train"
    assert summary["trainable"]["count"] == selected + sum(p.numel() for n, p in params.items() if n.startswith(head + "."))
    return summary


def test_metadata_and_one_preprocessing_definition(tmp_path):
    bundle = REPO / "bundles" / "shpeft_cls"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    verify_metadata(meta_file=str(bundle / "configs" / "metadata.json"), filepath=str(write_metadata_schema(tmp_path / "s.json")))
    train = json.loads((bundle / "configs" / "train.json").read_text())
    infer = json.loads((bundle / "configs" / "inference.json").read_text())
    assert train["validate"]["preprocessing"]["transforms"] == "%deterministic_transforms"
    assert infer["deterministic_transforms"] == train["deterministic_transforms"]
    for f in (bundle / "configs" / "baselines").glob("*.json"):  # overrides carry differences only
        assert set(json.loads(f.read_text())) - set(train) <= {"+imports", "lora_rank", "lora_alpha"}, f.name


def test_inference_verifies_before_training(tmp_path):
    """verify_net_in_out on the shipped configs alone (no models/): the default recipe's network (foundation_cls's
    ResNet re-headed for the default task), whose classes match the metadata and the default task."""
    bundle = tmp_path / "shpeft_cls"
    shutil.copytree(REPO / "bundles" / "shpeft_cls" / "configs", bundle / "configs")
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu", bundle_root=str(bundle))  # fmt: skip
    infer = json.loads((bundle / "configs" / "inference.json").read_text())
    train = json.loads((bundle / "configs" / "train.json").read_text())
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    foundation = json.loads((REPO / "bundles" / "foundation_cls" / "configs" / "inference.json").read_text())
    (task,) = infer["untrained_tasks"]
    assert task["name"] == train["task"] and task["labels"] == SYNTHETIC_CLS_TASKS[train["task"]]["labels"]
    net = infer["untrained_network_def"]
    assert net["num_classes"] == len(task["labels"]) == meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    assert {**net, "num_classes": None} == {**foundation["network_def"], "num_classes": None}


def test_train_frozen_bits_delta_and_exported_bundle(workspace, tmp_path):
    bundle = workspace / "shpeft_cls"
    summary = _check_sparse_result(bundle / "models", workspace / "pretrained", "fc")
    assert any("running_mean" in k for k in torch.load(bundle / "models" / "model.pt", weights_only=True))  # checked there
    assert summary["settings"]["update_norm_stats"] is False
    assert summary["importance_estimation"]["seconds"] > 0 and summary["train_seconds"] > 0
    assert summary["importance_estimation"]["batches"] == 1 and summary["epochs"] == 2
    assert summary["start"]["head_init"] == "fresh (seed 0)"
    assert {"f1", "accuracy", "majority_accuracy", "balanced_accuracy", "auc"} <= set(summary["scores"])
    # the kept epoch is the best validation AUC (threshold-free: it moves before a sparse update moves the argmax)
    assert summary["final_model"] == "best" and summary["best_metric"] == pytest.approx(summary["scores"]["auc"], abs=1e-6)
    export = bundle / "export" / TASK
    assert (export / "models" / "sparse_delta.pt").is_file()
    meta = json.loads((export / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 4
    assert meta["medfm_finetuning"]["settings"]["method"] == "shpeft"
    assert meta["medfm"]["decision"] == {"rule": "argmax"} and summary["decision"] is None  # four classes: no threshold
    verify_metadata(meta_file=str(export / "configs" / "metadata.json"), filepath=str(export / "docs" / "metadata_schema.json"))
    verify_net_in_out(net_id="network_def", meta_file=str(export / "configs" / "metadata.json"),
                      config_file=str(export / "configs" / "inference.json"), device="cpu")  # fmt: skip
    _images(tmp_path / "in")
    bundle_run(config_file=str(export / "configs" / "inference.json"), bundle_root=str(export), dataset_dir=str(tmp_path / "in"))
    rows = list(csv.reader((export / "eval" / "predictions.csv").open()))
    assert len(rows) == 2 and all(len(r) == 5 and abs(sum(map(float, r[1:])) - 1) < 1e-5 for r in rows)


def test_head_warmup_fits_the_head_the_importance_sees(workspace, monkeypatch):
    """--head_warmup_epochs N: the network the importance and the trainer get has the new head fitted (the body is the
    pretrained one bit for bit); 0 (default) leaves the freshly drawn head as it was built."""
    monkeypatch.setenv("MEDFM_CACHE", str(workspace / "cache"))
    for epochs in (0, 2):
        parser = ConfigParser()
        parser.read_config(str(workspace / "shpeft_cls" / "configs" / "train.json"))
        parser.update({**TINY, "bundle_root": str(workspace / "shpeft_cls"), "pretrained": str(workspace / "pretrained"),
                       "head_init": "fresh", "head_warmup_epochs": epochs})  # fmt: skip
        start = parser.get_parsed_content("start")
        fitted = parser.get_parsed_content("importance#network").state_dict()
        assert parser.get_parsed_content("settings")["head_warmup_epochs"] == epochs
        changed = {k for k, v in start.state.items() if not torch.equal(v, fitted[k])}
        assert changed == ({"fc.weight", "fc.bias"} if epochs else set()), epochs


def test_bundle_evaluate_and_own_inference(workspace):
    bundle = workspace / "shpeft_cls"
    _run(bundle, "train.json", "evaluate.json")
    rows = list(csv.DictReader((bundle / "eval" / "tasks.csv").open()))
    assert rows[0]["task"] == TASK and 0 <= float(rows[0]["f1"]) <= 1 and "majority_accuracy" in rows[0]
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu", bundle_root=str(bundle))  # fmt: skip
    _images(bundle / "eval" / "input", 1)
    bundle_run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), spatial_size=[16, 16, 16])
    rows = list(csv.reader((bundle / "eval" / "predictions" / TASK / "predictions.csv").open()))
    assert len(rows) == 1 and len(rows[0]) == 5


def test_vit_start_matched_head(workspace, tmp_path):
    pre = _pretrained(tmp_path / "vit", VIT)
    out = tmp_path / "run"
    _run(workspace / "shpeft_cls", "train.json", pretrained=str(pre), epochs=1, ckpt_dir=str(out / "models"),
         export_dir=str(out / "export"), output_dir=str(out / "runs"), sparse_budget=0.05)  # fmt: skip
    summary = _check_sparse_result(out / "models", pre, "vit.classification_head.0", budget=0.05)
    assert summary["start"]["head_init"].startswith("matched rows 5..8")  # blobs_mr is the checkpoint's third task


def test_lora_baseline_fuses_into_the_stock_vit(workspace, tmp_path):
    pre = _pretrained(tmp_path / "vit", VIT)
    out = tmp_path / "run"
    _run(workspace / "shpeft_cls", "train.json", "baselines/lora.json", pretrained=str(pre), epochs=1, lora_rank=2,
         ckpt_dir=str(out / "models"), export_dir=str(out / "export"), output_dir=str(out / "runs"))  # fmt: skip
    summary = json.loads((out / "models" / "training_summary.json").read_text())
    stock = instantiate({**VIT, "num_classes": 4})
    stock.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True), strict=True)  # no adapter left
    assert summary["settings"]["method"] == "lora" and summary["importance_estimation"] is None
    pretrained = torch.load(pre / "models" / "model.pt", weights_only=True)
    qkv = "vit.blocks.0.attn.qkv.weight"  # an adapted linear layer: W0 + (alpha / r) B A was fused into it
    assert not torch.equal(stock.state_dict()[qkv], pretrained[qkv]) and not (out / "models" / "sparse_delta.pt").exists()


def test_baselines_select_their_tensors(workspace):
    bundle = workspace / "shpeft_cls"
    pre = workspace / "pretrained"
    expected = {"full": lambda n: True, "linear_probe": lambda n: n.startswith("fc."),
                "bitfit": lambda n: n.endswith(".bias") or n.startswith("fc.")}  # fmt: skip
    for name in ("full", "linear_probe", "bitfit", "lora", "lora_r1"):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "baselines" / f"{name}.json")])
        parser.update({"bundle_root": str(bundle), "pretrained": str(pre), **TINY})
        trainable = parser.get_parsed_content("trainable")
        assert isinstance(trainable, TensorSubset) and parser.get_parsed_content("importance") is None
        assert trainable.update_norm_stats == (name == "full"), name  # a subset row leaves BatchNorm statistics alone
        names = set(trainable.names)
        if name.startswith("lora"):
            assert names and all(".lora_" in n or n.startswith("model.net.fc.") for n in names)
        else:
            assert names == {n for n, _ in trainable.network.named_parameters() if expected[name](n)}, name
    for name in ("random_mask", "magnitude", "gradient_l1", "gradient_l2"):
        override = json.loads((bundle / "configs" / "baselines" / f"{name}.json").read_text())
        assert override["sparse_method"] in ("random", "magnitude", "gradient") and "trainable" not in override


def test_lora_r1_baseline_trains_about_one_percent_of_the_foundation():
    """baselines/lora_r1.json on the shipped foundation_cls network: adapters + head about 1% of the weights (SH-PEFT's
    budget), while baselines/lora.json (rank 8) trains several times more."""
    from medfm_ops.finetune import add_lora

    config = json.loads((REPO / "bundles" / "foundation_cls" / "configs" / "train.json").read_text())["network_config"]
    net_def = {"_target_": config["target"], **{k: v for k, v in config.items() if k not in ("_target_", "target")}, "num_classes": 2}
    fractions = {}
    for name in ("lora", "lora_r1"):
        cfg = json.loads((REPO / "bundles" / "shpeft_cls" / "configs" / "baselines" / f"{name}.json").read_text())
        stock = instantiate(net_def)
        total = sum(p.numel() for p in stock.parameters())
        adapted = add_lora(add_linear_lora(stock, rank=cfg["lora_rank"], alpha=cfg["lora_alpha"], exclude=["fc"], allow_none=True),
                           rank=cfg["lora_rank"], alpha=cfg["lora_alpha"])  # fmt: skip
        trainable = TensorSubset(adapted, ["*.lora_A*", "*.lora_B*", "model.net.fc.*"])
        fractions[name] = trainable.num_selected / total
    assert 0.005 <= fractions["lora_r1"] <= 0.015 and fractions["lora"] > 4 * fractions["lora_r1"], fractions


def test_linear_lora_fuses_exactly_and_fails_loudly():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)).double()
    adapted = add_linear_lora(net, rank=2, alpha=4.0, exclude=["2"])
    assert isinstance(adapted[0], LoRALinear) and isinstance(adapted[2], torch.nn.Linear)
    torch.nn.init.normal_(adapted[0].lora_B)  # non-zero B: the fusion has something to fuse
    x = torch.randn(4, 6, dtype=torch.float64)
    fused = fuse_linear_lora(adapted)
    assert set(fused.state_dict()) == set(net.state_dict())
    assert torch.allclose(fused(x), adapted(x), atol=1e-12) and not torch.allclose(fused(x), net(x))
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_linear_lora(net, include=["nothing*"])
    with pytest.raises(ValueError, match="matches no parameter"):
        TensorSubset(net, include=["*.lora_A"])


def test_retarget_errors(workspace):
    pre = load_pretrained_classifier(workspace / "pretrained")
    with pytest.raises(ValueError, match="head_init='matched'"):
        retarget_classifier(pre, "adrenalmnist3d", ["normal", "mass"], head_init="matched")
    with pytest.raises(ValueError, match="head_init must be one of"):
        retarget_classifier(pre, TASK, CLASSES, head_init="random")
    a = retarget_classifier(pre, "adrenalmnist3d", ["normal", "mass"], seed=3).state
    b = retarget_classifier(pre, "adrenalmnist3d", ["normal", "mass"], seed=3).state
    assert all(torch.equal(a[k], b[k]) for k in a)  # deterministic, fresh head included


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"pretrained": "/nonexistent/foundation_cls"}, "bundles/foundation_cls/configs/train.json"),
        ({"sparse_budget": 1.5}, "budget is a fraction of the weights in (0, 1]"),
        ({"sparse_budget": 0}, "budget is a fraction of the weights in (0, 1]"),
        ({"final_model": "first"}, "final_model must be one of"),
        ({"task": "adrenalmnist3d"}, "--real_tasks"),  # a real task named without its data
    ],
)
def test_bad_input_one_clear_error(workspace, overrides, message):
    with pytest.raises(Exception) as info:
        _run(workspace / "shpeft_cls", "train.json", **{"pretrained": str(workspace / "pretrained"), **overrides})
    assert message in _causes(info)


# a run owns its outputs (issue 22, row 4)
def test_rerun_without_delta_and_verification_leaves_no_stale_file(tmp_path):
    bundle = tmp_path / "shpeft_cls"
    shutil.copytree(REPO / "bundles" / "shpeft_cls", bundle,
                    ignore=shutil.ignore_patterns("models", "eval", "runs", "export"))  # fmt: skip
    pre = _pretrained(tmp_path / "pretrained", RESNET)
    _run(bundle, "train.json", pretrained=str(pre), epochs=1, head_init="fresh", verify_export=True)
    models, export = bundle / "models", bundle / "export" / TASK
    assert (models / "sparse_delta.pt").is_file() and (export / "models" / "sparse_delta.pt").is_file()
    assert (export / "models" / "model.ts").is_file()
    (models / "model.ts").write_bytes(b"an older tool's TorchScript")  # a file no run of this bundle writes there
    first_model = (models / "model.pt").read_bytes()

    _run(bundle, "train.json", pretrained=str(pre), epochs=1, head_init="fresh", learning_rate=0.05, save_delta=False,
         verify_export=False)  # fmt: skip
    assert (models / "model.pt").read_bytes() != first_model  # a new model ...
    assert not (models / "sparse_delta.pt").exists() and not (models / "model.ts").exists()  # ... and nothing stale
    assert not (export / "models" / "sparse_delta.pt").exists() and not (export / "models" / "model.ts").exists()
    exported = torch.load(export / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(v, torch.load(models / "model.pt", weights_only=True)[k]) for k, v in exported.items())
    assert sorted(p.name for p in (bundle / "export").iterdir()) == [TASK]  # no staging folder or lock left

    ignored = subprocess.run(["git", "check-ignore", "-q", "bundles/shpeft_cls/export/blobs_mr/models/model.pt"],
                             cwd=REPO, capture_output=True)  # fmt: skip
    assert ignored.returncode == 0, "bundles/*/export/ must be ignored by git"
