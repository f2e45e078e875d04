# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""``docs/README.md`` of a region-expert bundle, generated from its metadata."""

from __future__ import annotations

__all__ = ["expert_readme"]


def expert_readme(meta: dict, network_def: dict) -> str:
    """Render the bundle README (overview, data, training, I/O, commands, references, licence) from ``meta``."""
    info = meta["medfm"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    image = meta["network_data_format"]["inputs"]["image"]
    labels = "\n".join(
        f"| {k} | {v} | {info['output_channels'][int(k) - 1] if int(k) else '-'} |"
        for k, v in pred["channel_def"].items()
    )
    net_args = ", ".join(f"{k}={v}" for k, v in network_def.items() if k != "_target_")
    return f"""# {meta['name']} (version {meta['version']})

## Overview
{meta['description']}

Network: `{network_def['_target_']}({net_args})`, a stock MONAI network; weights in `models/model.pt` (plain
state dict). Inference and full fine-tuning need MONAI {meta['monai_version']} (or newer 1.x) with nibabel and
pytorch-ignite, no medfm code.

## Labels
| label value | name | network output channel |
| --- | --- | --- |
{labels}

Label rule: `argmax([0, logits[{info['output_channels']}]])`: a voxel gets label i when logit i is the largest of
the region's logits and above 0 (sigmoid probability 0.5), otherwise background.

## Data
Single-channel {image.get('modality', '')} volumes (NIfTI). Preprocessing: orientation {'RAS'[: len(info['roi_size'])]},
resampling to {tuple(info['spacing'])} mm, per-image z-score intensity normalisation (`NormalizeIntensityd`).

## Input and output
- Input `image`: 1 channel, float32, patches of {info['roi_size']} voxels (sliding window, overlap 0.25, Gaussian).
- Output `pred`: the network gives {pred['num_channels']} logits per voxel (label union); inference writes a
  {info['label_dtype']} label map (values 0..{len(pred['channel_def']) - 1}) on the input's grid and affine.

## Training (fine-tuning)
`configs/train.json` fine-tunes this bundle's weights (`models/model.pt`, loaded when `pretrained` is true) on an
MSD-style folder under `dataset_dir` (`dataset.json` + `imagesTr/` + `labelsTr/`, labels 0..n as above), split
by `val_split` with `seed`. It uses the same deterministic preprocessing as `configs/inference.json` (the list
`deterministic_transforms`), then pads and crops random patches of `roi_size`. Loss: `DiceCELoss(sigmoid=True)` on
the region's channels only; AdamW with a cosine schedule; validation Dice after every `val_interval` epochs, the
best weights saved to `models/model.pt`; with `early_stop_patience` N > 0 training stops after N validations without
a better Dice (`epochs` is then a ceiling). MONAI Label runs the same config (it overrides the data lists, epochs,
device and handlers). Modes are difference-only overrides (they need the `medfm_ops` package):
`configs/train_lora.json` trains one low-rank adapter per convolution and fuses it into a stock `model.pt`;
`configs/train_sparse.json` (SH-PEFT) trains only the top 1% weights by hybrid importance and writes the stock
`model.pt` plus `models/sparse_delta.pt`. `configs/evaluate.json`
scores `models/model.pt` on the validation cases. medfm's site fine-tuning (`tools/finetune_site.py`) runs these
same configs and writes a new, versioned bundle.

## Commands
Run from the bundle directory.

Inference on a folder of NIfTI volumes (writes `<name>_seg.nii.gz`):

    python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/images --output_dir /path/to/out

Fine-tuning (in place, as MONAI Label does), and its LoRA variant:

    python -m monai.bundle run --config_file configs/train.json --dataset_dir /path/to/msd_task --epochs 50
    python -m monai.bundle run --config_file "['configs/train.json','configs/train_lora.json']" --dataset_dir /path/to/msd_task

Evaluation of `models/model.pt` on the validation split:

    python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir /path/to/msd_task

Checks (offline):

    python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath docs/metadata_schema.json
    python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json --device cpu
    python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json

MONAI Label: copy this directory to `<app>/model/<name>` of the `monaibundle` sample app and start the server with
`--conf models <name> --conf zoo_source local`.

## References
- LoRKD: low-rank knowledge decomposition of a medical foundation model into region experts.
- MONAI bundle specification: https://docs.monai.io/en/latest/mb_specification.html

## Licence
See `LICENSE`. Research use only; not for clinical use.
"""
