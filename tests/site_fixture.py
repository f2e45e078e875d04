# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A tiny MSD-style site data set and a tiny expert bundle, shared by the site fine-tuning tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medfm_ops.bundle import write_expert_bundle
from medfm_ops.networks import instantiate

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
