# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Site fine-tuning: saved split, head rule, LoRA merge, and the whole run writing a complete bundle (tiny data).

The acceptance test of the one-pipeline rule: the validation DSC/NSD reported at the end of fine-tuning equal (to
1e-6) what the written bundle's own ``configs/inference.json`` gives under ``python -m monai.bundle run``, scored
independently here with MONAI's metrics.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_surface_dice


from medfm_ops.finetune import (
    SUMMARY_RELPATH,
    SiteFinetuneSettings,
    add_lora,
    check_mode,
    finetune_expert,
    load_or_create_split,
    load_source,
    match_classes,
    fuse_lora,
    out_channel_dims,
    plan_head,
    prepare_start,
    resize_head,
    trainable_parameters,
)
from medfm_ops.networks import instantiate
from medfm_ops.utils import file_sha256


# ----------------------------------------------------------------------------------------------------------- split
def test_split_is_deterministic_saved_and_reused(site_files, tmp_path):
    data = site_files.write_msd(tmp_path / "msd", n=10)
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


def test_resize_single_conv_head_is_exact(site_files):
    net_def = {**site_files.unet, "num_res_units": 0}  # the top layer is a single transposed convolution
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


def test_resize_residual_unet_slices_both_dims_of_top_unit(site_files):
    dims = out_channel_dims(site_files.unet)
    square = [k for k, d in dims.items() if d == [0, 1]]
    assert square, f"expected a C x C kernel among {dims}"
    torch.manual_seed(0)
    sd = instantiate(copy.deepcopy(site_files.unet)).state_dict()
    _, new = resize_head(site_files.unet, sd, [4, 2])
    k = square[0]
    assert new[k].shape[:2] == (2, 2) and torch.equal(new[k], sd[k][[4, 2]][:, [4, 2]])


# ------------------------------------------------------------------------------------------------------------ LoRA
def test_lora_merge_is_exact_and_stock(site_files):
    torch.manual_seed(0)
    net = instantiate(copy.deepcopy(site_files.unet)).double().eval()
    adapted = add_lora(net, rank=2, alpha=4).double().eval()
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_()  # non-zero B, so the merge is tested
    merged = fuse_lora(adapted)
    assert type(merged) is type(net) and merged.state_dict().keys() == net.state_dict().keys()
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        ya, ym, y0 = adapted(x), merged.eval()(x), net(x)
    assert torch.allclose(ya, ym, rtol=0, atol=1e-10)
    assert not torch.allclose(ya, y0)


def test_lora_mode_trains_adapters_only(site_files):
    torch.manual_seed(0)
    adapted = add_lora(instantiate(copy.deepcopy(site_files.unet)), rank=2)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    opt = torch.optim.SGD(trainable_parameters(adapted), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        adapted(torch.randn(2, 1, 16, 16, 16)).square().mean().backward()
        opt.step()
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed)
    assert all(("lora_" in n) == p.requires_grad for n, p in adapted.named_parameters())


def test_modes_and_start(site_files, tmp_path):
    assert [check_mode(m) for m in ("full", "lora", "sparse")] == ["full", "lora", "sparse"]
    with pytest.raises(ValueError, match="mode must be"):
        check_mode("half")
    src = load_source(site_files.write_expert(tmp_path / "expert"))
    assert src.class_names == ["ventricles", "posterior", "anterior"] and src.output_channels == [1, 2, 4]
    keep = prepare_start(src, {"1": "anterior", "2": "posterior"})
    assert keep.output_channels == [4, 2] and keep.plan.mode == "keep" and keep.init == "pretrained"
    assert all(torch.equal(keep.state_dict[k], v) for k, v in src.state_dict.items())
    scratch = prepare_start(load_source(tmp_path / "expert", init="scratch"), ["anterior", "posterior"], seed=1)
    assert scratch.network_def["out_channels"] == 2 and scratch.output_channels == [0, 1] and scratch.init == "scratch"
    again = prepare_start(load_source(tmp_path / "expert", init="scratch"), ["anterior", "posterior"], seed=1)
    assert all(torch.equal(again.state_dict[k], v) for k, v in scratch.state_dict.items())  # seeded


# ------------------------------------------------------------------------------------------------- site bundle run
def test_site_bundle_is_complete_and_versioned(site_run):
    out, summary = site_run["out"], site_run["summary"]
    for rel in ("configs/inference.json", "configs/train.json", "configs/evaluate.json", "configs/train_lora.json",
                "configs/train_sparse.json",
                "configs/metadata.json", "configs/logging.conf", "models/model.pt", "models/model.ts",
                "docs/README.md", "docs/split.json", "docs/metrics.csv", SUMMARY_RELPATH, "LICENSE"):  # fmt: skip
        assert (out / rel).is_file(), rel
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.pt", "model.ts"]  # no training leftovers
    assert not list(out.parent.glob(f".{out.name}.partial-*"))
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    src_meta = json.loads((site_run["expert"] / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.2.0" and src_meta["version"] in meta["changelog"]
    entry = meta["changelog"]["0.2.0"]
    for word in (src_meta["name"], src_meta["version"], "'tiny'", "full", f"{summary['after']['mean_dsc']:.4f}"):
        assert word in entry, (word, entry)
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {
        "0": "background", "1": "anterior", "2": "posterior"}  # the site's label names  # fmt: skip
    readme = (out / "docs" / "README.md").read_text()
    assert "## Site fine-tuning" in readme and "docs/split.json" in readme and "| after" in readme
    assert summary["status"] == "complete" and json.loads((out / SUMMARY_RELPATH).read_text())["status"] == "complete"
    # the inference window, spacing and orientation are those the bundle was trained and validated with
    infer = json.loads((out / "configs" / "inference.json").read_text())
    train = json.loads((out / "configs" / "train.json").read_text())
    for key in ("roi_size", "spacing", "axcodes", "output_channels", "network_def"):
        assert infer[key] == train[key], key
    assert infer["preprocessing"]["transforms"] == train["deterministic_transforms"]  # one preprocessing definition
    assert train["epochs"] == site_run["settings"]["epochs"] and train["learning_rate"] == 0.01
    assert train["early_stop_patience"] == 20 and summary["epochs_trained"] == summary["epochs"]  # 12 < patience
    # the deployed network is the stock class and loads strictly
    net = instantiate(infer["network_def"])
    net.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True), strict=True)


def test_site_bundle_learned(site_run):
    """Fails when training does nothing: the tiny blobs are easy, an untrained head scores near 0."""
    before, after = site_run["summary"]["before"], site_run["summary"]["after"]
    assert before["mean_dsc"] < 0.3
    assert after["mean_dsc"] > 0.7 and after["mean_nsd"] > 0.7, after
    assert [r["class"] for r in after["table"]] == ["anterior", "posterior"]
    assert site_run["summary"]["lowered_score"] is None


def test_lowered_score_is_reported():
    """A fine-tuning that ends below its starting point says so (README warning, summary), naming both scores."""
    from medfm_ops.finetune.report import comparison_rows, readme_section, regression_note

    def score(dsc, nsd):
        return {"mean_dsc": dsc, "mean_nsd": nsd,
                "table": [{"class": "a", "n": 3, "dsc_mean": dsc, "dsc_std": 0.0, "nsd_mean": nsd, "nsd_std": 0.0}]}

    summary = {"source": {"name": "brain expert", "version": "0.1.0", "path": "/x"}, "mode": "full", "init": "pretrained",
               "epochs": 10, "train_settings": {"batch_size": 2, "learning_rate": 0.002}, "device": "cpu",
               "train_seconds": 1.0, "dataset": {"dir": "/d"}, "nsd_tolerance_mm": 1.0,
               "split": {"origin": "explicit", "num_training_used": 5, "num_training_total": 5,
                         "num_validation_used": 3, "num_validation_total": 3},
               "head": {"mode": "keep", "classes": []}, "before": score(0.87, 0.92), "after": score(0.85, 0.91)}
    note = regression_note(summary)
    assert note is not None and "0.8700 to 0.8500" in note and "'brain expert' 0.1.0" in note
    readme = readme_section(summary, comparison_rows({"before": summary["before"], "after": summary["after"]}))
    assert "**Warning.** Fine-tuning LOWERED" in readme
    assert regression_note({**summary, "after": score(0.87, 0.90)}) is None  # equal DSC is not lower
    assert regression_note({**summary, "before": None}) is None and "Warning" not in readme_section(
        {**summary, "before": None}, comparison_rows({"after": summary["after"]}))


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")  # MONAI's own call, in the oracle
def test_reported_scores_equal_the_bundles_own_inference(site_run, tmp_path):
    """The acceptance test: scores at the end of fine-tuning == monai.bundle run inference.json, scored here."""
    out, summary = site_run["out"], site_run["summary"]
    split = json.loads((out / "docs" / "split.json").read_text())
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    cases = [{k: site_run["data"] / c[k] for k in ("image", "label")} for c in split["validation"]]
    for c in cases:
        shutil.copy(c["image"], images_dir / c["image"].name)
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json",
         "--dataset_dir", str(images_dir), "--output_dir", str(tmp_path / "pred"), "--device", "$torch.device('cpu')"],
        cwd=out, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    dsc, nsd = [], []
    for c in cases:
        ref = nib.load(c["label"])
        pred = nib.load(tmp_path / "pred" / c["image"].name.replace(".nii.gz", "_seg.nii.gz"))
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
        p, y = (torch.as_tensor(np.asarray(x.dataobj).astype(np.int64)) for x in (pred, ref))
        p1 = torch.stack([p == k for k in (1, 2)])[None].float()
        y1 = torch.stack([y == k for k in (1, 2)])[None].float()
        dsc.append(compute_dice(p1, y1, include_background=True)[0])
        nsd.append(compute_surface_dice(p1, y1, [1.0, 1.0], include_background=True,
                                        spacing=[float(z) for z in ref.header.get_zooms()[:3]])[0])  # fmt: skip
    dsc, nsd = torch.stack(dsc).double(), torch.stack(nsd).double()
    after = summary["after"]
    assert abs(float(dsc.mean()) - after["mean_dsc"]) < 1e-6 and abs(float(nsd.mean()) - after["mean_nsd"]) < 1e-6
    for i, row in enumerate(after["table"]):
        assert abs(float(dsc[:, i].mean()) - row["dsc_mean"]) < 1e-6
        assert abs(float(nsd[:, i].mean()) - row["nsd_mean"]) < 1e-6


def test_refused_run_keeps_the_previous_bundle(site_run):
    out = site_run["out"]
    model_sha, summary_text = file_sha256(out / "models" / "model.pt"), (out / SUMMARY_RELPATH).read_text()
    with pytest.raises(ValueError, match="seed=0"):  # a different seed against the saved split
        finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
            seed=1, epochs=1, val_split=0.25, progress=False))  # fmt: skip
    with pytest.raises(ValueError, match="val_interval"):
        finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
            epochs=3, val_interval=2, progress=False))  # fmt: skip
    with pytest.raises(ValueError, match="budget"):
        finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
            mode="sparse", sparse_budget=2.0, progress=False))  # fmt: skip
    with pytest.raises(ValueError, match="variant"):
        finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
            mode="sparse", sparse_variant="l3", progress=False))  # fmt: skip
    assert file_sha256(out / "models" / "model.pt") == model_sha and (out / SUMMARY_RELPATH).read_text() == summary_text
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_interrupted_run_keeps_the_previous_bundle(site_run, monkeypatch):
    import medfm_ops.finetune.pipeline as pipeline

    out = site_run["out"]
    model_sha = file_sha256(out / "models" / "model.pt")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("simulated kill during training")

    monkeypatch.setattr(pipeline, "run_bundle_configs", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
            epochs=1, val_split=0.25, progress=False))  # fmt: skip
    assert file_sha256(out / "models" / "model.pt") == model_sha
    assert json.loads((out / SUMMARY_RELPATH).read_text())["status"] == "complete"
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_diverging_run_names_the_batch_and_keeps_the_previous_bundle(site_run, tmp_path):
    """A huge learning rate stops the run at the first non-finite loss (naming the batch), a training image with NaN
    voxels is refused by name; no bundle with NaN weights, earlier results intact."""
    out = site_run["out"]
    model_sha = file_sha256(out / "models" / "model.pt")
    with pytest.raises(FloatingPointError, match=r"training loss is (nan|inf).*on the batch of \[.*\.nii"):
        finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
            epochs=1, batch_size=2, learning_rate=1e12, val_split=0.25, progress=False, verify=False))  # fmt: skip
    assert file_sha256(out / "models" / "model.pt") == model_sha

    data = tmp_path / "msd"
    shutil.copytree(site_run["data"], data)
    split = json.loads((out / "docs" / "split.json").read_text())
    bad = data / split["training"][0]["image"]
    img = nib.load(bad)
    arr = np.asarray(img.dataobj).astype(np.float32)
    arr[2:4, 2:4, 2:4] = np.nan
    nib.save(nib.Nifti1Image(arr, img.affine), bad)
    with pytest.raises(ValueError, match="NaN/inf voxels") as info:  # refused by name before any training step
        finetune_expert(site_run["expert"], data, tmp_path / "nan_bundle", SiteFinetuneSettings(
            epochs=1, batch_size=1, val_split=0.25, progress=False, verify=False))  # fmt: skip
    assert str(bad) in str(info.value)
    assert not (tmp_path / "nan_bundle").exists() and not list(tmp_path.glob(".nan_bundle.partial-*"))


def test_early_stopping_ends_the_run_after_patience_validations(site_run, tmp_path):
    """With a zero learning rate the validation Dice cannot improve after the first validation: patience 2 stops the
    run at epoch 3 of 12, the first epoch's model is the one kept, and the written bundle's train.json carries the
    patience (the bundle's own training, e.g. MONAI Label's /train, stops the same way)."""
    out = tmp_path / "early_stop"
    shutil.copytree(site_run["out"] / "docs", out / "docs")  # the same split
    summary = finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
        epochs=12, early_stop_patience=2, learning_rate=0.0, batch_size=2, val_split=0.25, score_before=False,
        verify=False, progress=False))  # fmt: skip
    assert summary["epochs"] == 12 and summary["epochs_trained"] == 3 and summary["best_validation"]["epoch"] == 1
    assert json.loads((out / "configs" / "train.json").read_text())["early_stop_patience"] == 2
    with pytest.raises(ValueError, match="early_stop_patience must be >= 0"):
        SiteFinetuneSettings(early_stop_patience=-1).check()


def test_learning_rate_grid_keeps_the_best_rate_on_validation(site_run, tmp_path):
    """``lr_grid``: every rate trains from the same start; the bundle written is the one whose own inference.json
    scores the best validation DSC (here the rate that learns, listed second), with that rate in its train.json."""
    out = tmp_path / "grid"
    shutil.copytree(site_run["out"] / "docs", out / "docs")  # the same split
    summary = finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
        epochs=6, lr_grid=[1e-9, 0.01], batch_size=2, val_split=0.25, verify=False, progress=False))  # fmt: skip
    grid = summary["learning_rate_grid"]
    assert list(grid) == ["1e-09", "0.01"] and grid["0.01"]["mean_dsc"] > grid["1e-09"]["mean_dsc"] + 0.05, grid
    assert grid["1e-09"]["mean_dsc"] == pytest.approx(summary["before"]["mean_dsc"], abs=0.02)  # did not learn
    assert summary["after"]["mean_dsc"] == grid["0.01"]["mean_dsc"]
    assert summary["train_settings"]["learning_rate"] == 0.01 == summary["settings"]["learning_rate"]
    assert json.loads((out / "configs" / "train.json").read_text())["learning_rate"] == 0.01
    assert not (out / "grid").exists() and "chosen on the validation cases from 2 rates" in (out / "docs" / "README.md").read_text()
    for bad in ([], [0.01, 0.01], [0.0]):
        with pytest.raises(ValueError, match="lr_grid must list distinct learning rates"):
            SiteFinetuneSettings(lr_grid=bad).check()


@pytest.mark.parametrize("head", ["resize"])
def test_lora_site_bundle_is_stock_and_reuses_split(site_run, tmp_path, head):
    out = tmp_path / "lora_bundle"
    shutil.copytree(site_run["out"] / "docs", out / "docs")  # the saved split of the first run is reused
    summary = finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
        mode="lora", head=head, epochs=2, batch_size=2, learning_rate=0.01, val_split=0.25, lora_rank=2,
        verify=False, progress=False))  # fmt: skip
    assert summary["split"]["reused"] and summary["head"]["mode"] == "resize" and summary["lora"]["rank"] == 2
    assert summary["parameters"]["trainable"] < summary["parameters"]["total"] / 2
    infer = json.loads((out / "configs" / "inference.json").read_text())
    assert infer["network_def"]["out_channels"] == 2 and infer["output_channels"] == [0, 1]
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    assert not any("lora" in k for k in state)
    instantiate(infer["network_def"]).load_state_dict(state, strict=True)
    assert json.loads((out / "configs" / "train_lora.json").read_text())["lora_rank"] == 2


def test_sparse_site_bundle_trains_the_budget_and_keeps_frozen_bits(site_run, tmp_path):
    """mode="sparse": SH-PEFT through train.json + train_sparse.json. The trainable count is the budget, every other
    weight keeps its starting bits (AdamW with weight decay), model.pt is stock and the delta rebuilds it exactly."""
    from medfm_ops.peft import apply_sparse_delta, budget_count

    out = tmp_path / "sparse_bundle"
    shutil.copytree(site_run["out"] / "docs", out / "docs")  # the saved split of the first run is reused
    summary = finetune_expert(site_run["expert"], site_run["data"], out, SiteFinetuneSettings(
        mode="sparse", epochs=2, batch_size=2, learning_rate=0.01, weight_decay=0.05, val_split=0.25,
        sparse_budget=0.05, verify=False, progress=False))  # fmt: skip
    start = torch.load(site_run["expert"] / "models" / "model.pt", weights_only=True)  # head "keep": same tensors
    total = sum(v.numel() for k, v in start.items() if v.is_floating_point())
    assert summary["mode"] == "sparse" and summary["head"]["mode"] == "keep"
    assert summary["parameters"]["total"] == total
    assert summary["parameters"]["trainable"] == summary["sparse"]["selected"] == budget_count(0.05, total)
    assert summary["sparse"]["variant"] == "l2" and summary["sparse"]["estimation_seconds"] > 0
    assert summary["sparse"]["estimation_batches"] == -(-summary["split"]["num_training_used"] // 2)  # one epoch
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.pt", "model.ts", "sparse_delta.pt"]

    infer = json.loads((out / "configs" / "inference.json").read_text())
    model = torch.load(out / "models" / "model.pt", weights_only=True)
    instantiate(infer["network_def"]).load_state_dict(model, strict=True)  # the stock network
    changed = sum(int((model[k].view(-1).view(torch.int32) != start[k].view(-1).view(torch.int32)).sum())
                  for k in start)  # fmt: skip
    assert 0 < changed <= summary["parameters"]["trainable"]  # weight decay would move every frozen weight
    delta = torch.load(out / "models" / "sparse_delta.pt", weights_only=True)
    merged = apply_sparse_delta(start, delta)
    assert all(torch.equal(merged[k].view(torch.int32), model[k].view(torch.int32)) for k in model)
    train_sparse = json.loads((out / "configs" / "train_sparse.json").read_text())
    assert train_sparse["sparse_budget"] == 0.05 and train_sparse["sparse_lambda"] == 1.0


def test_site_bundle_keeps_the_source_intensity_rule(site_files, tmp_path):
    """A region trained with z-score over non-zero voxels stays so at the site: the source (an expert bundle, or a
    training run's recorded ``region_preprocessing.json``) names the rule and the written site bundle applies it."""
    from medfm_ops.bundle import write_expert_bundle
    from medfm_ops.data import recorded_preprocessing

    net = instantiate(copy.deepcopy(site_files.unet))
    expert = write_expert_bundle(tmp_path / "expert", site_files.unet, net.state_dict(), "brain",
                                 {1: "posterior", 2: "anterior"}, [2, 4], (1, 1, 1), (16, 16, 16), modality="MR",
                                 intensity_nonzero=True)  # fmt: skip
    assert load_source(expert).intensity == "zscore_nonzero"
    assert load_source(site_files.write_expert(tmp_path / "plain")).intensity == "zscore"
    out = tmp_path / "site"
    finetune_expert(expert, site_files.write_msd(tmp_path / "msd", n=4), out, SiteFinetuneSettings(
        mode="full", epochs=1, batch_size=2, val_split=0.25, device="cpu", progress=False, score_before=False,
        verify=False))  # fmt: skip
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["medfm"]["intensity"] == "zscore_nonzero"
    for name in ("train.json", "inference.json"):
        assert json.loads((out / "configs" / name).read_text())["intensity_nonzero"] is True, name
    # a training run's recorded row: read as recorded, a missing region or an unknown rule is one clear error
    models = tmp_path / "run" / "models"
    models.mkdir(parents=True)
    (models / "region_preprocessing.json").write_text(json.dumps(
        {"heart_mri": {"spacing": None, "window_size": [96, 96, 8], "intensity": "zscore_nonzero"}}))
    assert recorded_preprocessing(models, "heart_mri")["intensity"] == "zscore_nonzero"
    assert recorded_preprocessing(tmp_path / "plain" / "models", "heart_mri") == {}
    with pytest.raises(ValueError, match="no row for region 'brain_mri'"):
        recorded_preprocessing(models, "brain_mri")
    (models / "region_preprocessing.json").write_text(json.dumps({"heart_mri": {"intensity": "minmax"}}))
    with pytest.raises(ValueError, match="intensity 'minmax'"):
        recorded_preprocessing(models, "heart_mri")
