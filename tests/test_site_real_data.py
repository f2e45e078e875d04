# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A shortened site fine-tuning run on the real MSD Task04 Hippocampus data (../shared/data/msd_hippocampus).

The data are required: the test FAILS (never skips) with a message saying where it looked. Override the location
with ``MEDFM_SHARED_DATA`` (the folder holding ``msd_hippocampus/``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from medfm_ops.bundle import write_expert_bundle
from medfm_ops.finetune import SUMMARY_RELPATH, SiteFinetuneSettings, finetune_expert
from medfm_ops.networks import instantiate

REPO = Path(__file__).resolve().parents[1]
STUDENT = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 12,
           "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "INSTANCE"}  # fmt: skip


def shared_data() -> Path:
    return Path(os.environ.get("MEDFM_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def test_site_finetune_on_msd_hippocampus(tmp_path):
    data = shared_data() / "msd_hippocampus"
    assert (data / "dataset.json").is_file(), (
        f"real data set not found at {data} (expected dataset.json, imagesTr/, labelsTr/ of MSD Task04 Hippocampus); "
        "set MEDFM_SHARED_DATA to the folder holding msd_hippocampus/."
    )
    # an expert bundle with the student architecture; trained from scratch here (init=scratch) to stay independent
    # of the pre-trained checkpoints, which the benchmark (benchmarks/site_finetune.py) covers
    net = instantiate(dict(STUDENT))
    expert = write_expert_bundle(tmp_path / "expert", STUDENT, net.state_dict(), "brain_mri",
                                 {1: "ventricles", 2: "hippocampus_left", 3: "hippocampus_right"}, [0, 1, 2],
                                 (1.0, 1.0, 1.0), (32, 48, 32), modality="MR")  # fmt: skip
    out = tmp_path / "site_bundle"
    start = time.perf_counter()
    finetune_expert(expert, data, out, SiteFinetuneSettings(
        init="scratch", mode="full", epochs=10, val_interval=10, num_train_cases=60, num_val_cases=10,
        batch_size=2, learning_rate=0.003, roi_size=[32, 48, 32], verify=False, progress=False))  # fmt: skip
    seconds = time.perf_counter() - start
    summary = json.loads((out / SUMMARY_RELPATH).read_text())
    split = json.loads((out / "docs" / "split.json").read_text())
    assert split["num_training"] == 160 and split["num_validation"] == 40 and split["seed"] == 0
    assert summary["split"]["num_training_used"] == 60 and summary["split"]["num_validation_used"] == 10
    assert [r["class"] for r in summary["after"]["table"]] == ["anterior", "posterior"]
    before, after = summary["before"], summary["after"]
    print(f"hippocampus, scratch, 10 epochs x 60 cases: DSC {before['mean_dsc']:.3f} -> {after['mean_dsc']:.3f}, "
          f"NSD {before['mean_nsd']:.3f} -> {after['mean_nsd']:.3f} in {seconds:.0f} s")  # fmt: skip
    assert after["mean_dsc"] > 0.5, f"fine-tuned mean DSC {after['mean_dsc']:.3f} is not far above chance"
    assert after["mean_dsc"] > before["mean_dsc"] + 0.3 and after["mean_nsd"] > before["mean_nsd"] + 0.3
    infer = json.loads((out / "configs" / "inference.json").read_text())
    assert infer["roi_size"] == [32, 48, 32]  # the bundle serves with the window it was trained and validated with
    deployed = instantiate(infer["network_def"])
    deployed.load_state_dict(torch.load(out / "models" / "model.pt", weights_only=True), strict=True)  # stock, 2 out
