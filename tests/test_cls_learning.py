# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""lorkd_cls learns: a tiny run on two synthetic tasks (experts, no teacher) ends well above chance on the
validation cases of both tasks, and every task's experts moved from their zero initialisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import run as bundle_run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TASKS = ("shape_ct", "blobs_mr")


def test_lorkd_cls_experts_learn_beyond_chance(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_CACHE", str(tmp_path / "cache"))
    no_teacher = tmp_path / "no_teacher.json"  # the experts and heads alone: no foundation needed
    no_teacher.write_text(json.dumps({"teacher": None, "beta": 0.0}))
    bundle = REPO / "bundles" / "lorkd_cls"
    bundle_run(
        config_file=[str(bundle / "configs" / "train.json"), str(no_teacher)], bundle_root=str(bundle),
        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "runs"), epochs=5, val_interval=5, warmup_epochs=0,
        batch_size=8, spatial_size=[16, 16, 16], **{"synthetic#size": 16, "synthetic#train_cases": 24,
        "synthetic#val_cases": 12, "synthetic#tasks": list(TASKS), "train#random_transforms": []},
    )  # fmt: skip
    metrics = json.loads((tmp_path / "models" / "training_summary.json").read_text())["last_metrics"]
    for task in TASKS:  # chance: AUC 0.5
        assert metrics[f"auc/{task}"] >= 0.7, metrics
    assert metrics["mean_accuracy"] >= metrics["mean_majority_accuracy"] + 0.15, metrics
    sd = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    experts = {k: v for k, v in sd.items() if ".lora_B." in k}
    assert {k.rsplit(".", 1)[-1] for k in experts} == {"0", "1"}, sorted(experts)[:4]  # one expert per task
    untrained = [k for k, v in experts.items() if not v.abs().sum() > 0]  # B starts at zero
    assert not untrained, f"experts that never trained: {untrained[:4]}"
