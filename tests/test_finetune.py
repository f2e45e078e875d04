# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Site fine-tuning: saved split, head-resize rule, LoRA merge, and the finetune.json config end to end (tiny data)."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm_ops.bundle import write_expert_bundle
from medfm_ops.finetune import (
    add_lora,
    build_site_model,
    check_mode,
    load_or_create_split,
    load_source,
    match_classes,
    merge_lora,
    out_channel_dims,
    plan_head,
    resize_head,
    trainable_parameters,
)
from medfm_ops.networks import instantiate

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "bundles" / "lorkd_seg" / "configs" / "finetune.json"

UNET = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 5,
        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "INSTANCE"}  # fmt: skip


def write_msd(root: Path, n: int = 6, labels=("Anterior", "Posterior"), spacing=(1.0, 1.0, 1.5)) -> Path:
    """A tiny MSD-style data set: two blobs (labels 1, 2) brighter than the background, ~20x24x20 voxels."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        shape = (18 + i % 3, 24, 20)
        z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        c = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
        lab = np.zeros(shape, np.uint8)
        for k, dy in enumerate((-4, 4), start=1):
            lab[((z - c[0]) ** 2 + (y - c[1] - dy) ** 2 + (x - c[2]) ** 2) < 14] = k
        img = (lab.astype(np.float32) + rng.normal(0, 0.3, shape)).astype(np.float32)
        affine = np.diag([*spacing, 1.0])
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels_json = {"0": "background", **{str(i): n for i, n in enumerate(labels, start=1)}}
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": labels_json, "training": training}))
    return root


def write_expert(root: Path, names=("ventricles", "posterior", "anterior"), channels=(1, 2, 4)) -> Path:
    torch.manual_seed(0)
    net = instantiate(copy.deepcopy(UNET))
    label_names = {i: n for i, n in enumerate(names, start=1)}
    return write_expert_bundle(
        root, UNET, net.state_dict(), "brain", label_names, list(channels), (1, 1, 1), (16, 16, 16), modality="MR"
    )


# ----------------------------------------------------------------------------------------------------------- split
def test_split_is_deterministic_saved_and_reused(tmp_path):
    data = write_msd(tmp_path / "msd", n=10)
    a = load_or_create_split(data, tmp_path / "a" / "split.json", val_split=0.3, seed=3)
    b = load_or_create_split(data, tmp_path / "b" / "split.json", val_split=0.3, seed=3)
    assert not a["reused"] and (tmp_path / "a" / "split.json").is_file()
    assert a["training"] == b["training"] and a["validation"] == b["validation"]
    assert len(a["training"]) == 7 and len(a["validation"]) == 3
    assert not {c["image"] for c in a["training"]} & {c["image"] for c in a["validation"]}
    assert a["label_names"] == {"1": "anterior", "2": "posterior"}
    saved = json.loads((tmp_path / "a" / "split.json").read_text())
    assert saved["seed"] == 3 and saved["training"][0]["image"].startswith("imagesTr/")  # relative to the data set

    # the saved file wins over a fresh permutation: edit it and the edit is what comes back
    saved["training"], saved["validation"] = saved["training"][1:], saved["validation"] + saved["training"][:1]
    (tmp_path / "a" / "split.json").write_text(json.dumps(saved))
    again = load_or_create_split(data, tmp_path / "a" / "split.json", val_split=0.3, seed=3)
    assert again["reused"] and len(again["validation"]) == 4 and again["validation"][-1] == {**a["training"][0]}

    other = load_or_create_split(data, tmp_path / "c" / "split.json", val_split=0.3, seed=4)
    assert other["validation"] != a["validation"]
    with pytest.raises(ValueError, match="seed=3"):
        load_or_create_split(data, tmp_path / "a" / "split.json", val_split=0.3, seed=4)
    short = load_or_create_split(data, tmp_path / "a" / "split.json", val_split=0.3, seed=3, num_train_cases=2)
    assert short["training"] == again["training"][:2] and short["num_training_total"] == 6


# ------------------------------------------------------------------------------------------------------------ head
@pytest.mark.parametrize(
    "site, region, expected",
    [
        (["anterior", "posterior"], ["anterior", "posterior"], [0, 1]),
        (["Posterior", "ANTERIOR"], ["anterior", "posterior"], [1, 0]),  # by name, case-insensitive
        (["anterior", "posterior"], ["ventricles", "hippocampus_left", "hippocampus_right"], [0, 1]),  # in order
        (["tail", "anterior", "head"], ["body", "anterior"], [0, 1, None]),  # unmatched take free ones, then fresh
        (["left kidney", "x"], ["left_kidney"], [0, None]),
    ],
)
def test_match_classes(site, region, expected):
    assert match_classes(site, region) == expected


def test_plan_head_modes():
    keep = plan_head(["anterior", "posterior"], ["ventricles", "posterior", "anterior"], [1, 2, 4], 5)
    assert keep.mode == "keep" and keep.output_channels == [4, 2] and keep.out_channels == 5
    resized = plan_head(["anterior", "posterior"], ["ventricles", "posterior", "anterior"], [1, 2, 4], 5, head="resize")
    assert resized.mode == "resize" and resized.source_channels == [4, 2] and resized.output_channels == [0, 1]
    grow = plan_head(["a", "b", "c"], ["a", "b"], [3, 0], 5)  # auto: a fresh channel is needed -> resize
    assert grow.mode == "resize" and grow.source_channels == [3, 0, None] and grow.out_channels == 3
    with pytest.raises(ValueError, match="head='resize'"):
        plan_head(["a", "b", "c"], ["a", "b"], [3, 0], 5, head="keep")
    with pytest.raises(ValueError, match="head must be"):
        plan_head(["a"], ["a"], [0], 5, head="grow")


def test_resize_single_conv_head_is_exact():
    net_def = {**UNET, "num_res_units": 0}  # the top layer is a single transposed convolution
    torch.manual_seed(1)
    old = instantiate(copy.deepcopy(net_def)).double().eval()
    new_def, sd = resize_head(net_def, old.state_dict(), [3, None, 0])
    assert new_def["out_channels"] == 3 and net_def["out_channels"] == 5
    new = instantiate(copy.deepcopy(new_def)).double().eval()
    new.load_state_dict(sd)
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        a, b = old(x), new(x)
    # equal up to float64 rounding (the convolution backend may sum in another order for another channel count)
    assert torch.allclose(b[:, 0], a[:, 3], rtol=0, atol=1e-12) and torch.allclose(b[:, 2], a[:, 0], rtol=0, atol=1e-12)
    assert not torch.allclose(b[:, 1], a[:, 1])


def test_resize_residual_unet_slices_both_dims_of_top_unit():
    dims = out_channel_dims(UNET)
    square = [k for k, d in dims.items() if d == [0, 1]]
    assert square, f"expected a C x C kernel among {dims}"
    torch.manual_seed(0)
    sd = instantiate(copy.deepcopy(UNET)).state_dict()
    _, new = resize_head(UNET, sd, [4, 2])
    k = square[0]
    assert new[k].shape[:2] == (2, 2) and torch.equal(new[k], sd[k][[4, 2]][:, [4, 2]])


# ------------------------------------------------------------------------------------------------------------ LoRA
def test_lora_merge_is_exact_and_stock():
    torch.manual_seed(0)
    net = instantiate(copy.deepcopy(UNET)).double().eval()
    adapted = add_lora(net, rank=2, alpha=4).double().eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_()  # non-zero B, so the merge is tested
    merged = merge_lora(adapted)
    assert type(merged) is type(net) and merged.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ya, ym, y0 = adapted(x), merged.eval()(x), net(x)
    assert torch.allclose(ya, ym, rtol=0, atol=1e-10)
    assert not torch.allclose(ya, y0)


def test_lora_mode_trains_adapters_only():
    torch.manual_seed(0)
    adapted = add_lora(instantiate(copy.deepcopy(UNET)), rank=2)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    opt = torch.optim.SGD(trainable_parameters(adapted), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        adapted(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
        opt.step()
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert all(("lora_" in n) == p.requires_grad for n, p in adapted.named_parameters())


def test_modes_and_sparse_error(tmp_path):
    with pytest.raises(NotImplementedError, match="SH-PEFT"):
        check_mode("sparse")
    with pytest.raises(ValueError, match="mode must be"):
        check_mode("half")
    src = load_source(write_expert(tmp_path / "expert"))
    assert src.class_names == ["ventricles", "posterior", "anterior"] and src.output_channels == [1, 2, 4]
    full = build_site_model(src, {"1": "anterior", "2": "posterior"}, mode="full")
    assert full.output_channels == [4, 2] and full.plan.mode == "keep"
    scratch = build_site_model(load_source(tmp_path / "expert", init="scratch"), ["anterior", "posterior"])
    assert scratch.network_def["out_channels"] == 2 and scratch.output_channels == [0, 1]
    with pytest.raises(NotImplementedError):
        build_site_model(src, ["anterior"], mode="sparse")


# ---------------------------------------------------------------------------------------------------------- config
def _run_config(**overrides):
    from monai.bundle import run

    run(config_file=str(CONFIG), **overrides)


@pytest.mark.parametrize("mode, head", [("full", "auto"), ("lora", "resize")])
def test_finetune_config_one_epoch(tmp_path, mode, head):
    data = write_msd(tmp_path / "msd", n=5)
    expert = write_expert(tmp_path / "expert")
    out = tmp_path / "out"
    _run_config(
        expert_bundle=str(expert), dataset_dir=str(data), mode=mode, head=head, epochs=1, batch_size=2,
        patch_size=[16, 16, 16], output_dir=str(out),
    )  # fmt: skip
    for stage in ("before", "after"):
        rows = list(csv.DictReader(open(out / f"metrics_{stage}.csv")))
        assert [r["class"] for r in rows] == ["anterior", "posterior", "mean"]
        assert all(0.0 <= float(r["dsc"]) <= 1.0 and 0.0 <= float(r["nsd"]) <= 1.0 for r in rows)
        assert (out / f"metrics_{stage}.md").read_text().startswith("| stage")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == mode and summary["epochs_run"] == 1
    assert summary["head"]["mode"] == ("keep" if head == "auto" else "resize")
    assert summary["split"]["num_training_total"] == 4 and (out / "split.json").is_file()
    assert summary["best_checkpoint"] and (out / "checkpoints" / "best_model.pt").is_file()
    # the deployed network is the stock class with the planned head and loads strictly
    spec = json.loads((out / "network_def.json").read_text())
    net = instantiate(spec["network_def"])
    net.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    assert spec["network_def"]["out_channels"] == (5 if head == "auto" else 2)
    if mode == "lora":
        assert summary["lora_merge_max_abs_diff"] < 1e-4
        assert summary["parameters"]["trainable"] < summary["parameters"]["total"]
    # a second run reuses the saved split
    _run_config(expert_bundle=str(expert), dataset_dir=str(data), mode="full", epochs=0, patch_size=[16, 16, 16],
                output_dir=str(out))  # fmt: skip
    assert json.loads((out / "summary.json").read_text())["split"]["reused"] is True
