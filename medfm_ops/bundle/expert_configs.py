"""Config dictionaries (``inference.json``, ``train.json``) of a standalone region-expert bundle.

Only stock MONAI components and config expressions are used, so the written bundle runs with ``monai`` alone (no
medfm import) under ``python -m monai.bundle run`` and inside MONAI Label.

Label rule shared by inference, validation and MONAI Label: the network outputs one sigmoid logit per class of the
label union; the expert keeps the region's ``output_channels``, puts a constant zero logit in front and takes the
argmax, so label ``i`` (1-based, in ``output_channels`` order) wins where its logit is the largest positive one and
background (0) wins where no region logit is above 0 (probability 0.5).
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["inference_config", "train_config", "PATH_KEY", "PARKED_PATH_KEY"]

# MONAI Label puts the request's file name under "image_path"; MONAI 1.6's Spacingd calls ``.update()`` on every
# ``image_*`` entry and fails on that string. The path is parked under a neutral key around the resampling and put
# back afterwards, because MONAI Label's writer reads "image_path" to choose the result's file extension.
PATH_KEY = "image_path"
PARKED_PATH_KEY = "source_path"

# [zero logit, logits of the region channels] for a (C, *spatial) MetaTensor; meta data are kept.
_SELECT_EXPR = "$lambda x: torch.cat([torch.zeros_like(x[:1]), x[@output_channels]], dim=0)"


def _resample_block(keys: Sequence[str], modes: Sequence[str]) -> list[dict[str, Any]]:
    return [
        {"_target_": "CopyItemsd", "keys": PATH_KEY, "names": PARKED_PATH_KEY, "allow_missing_keys": True},
        {"_target_": "DeleteItemsd", "keys": PATH_KEY},
        {"_target_": "Spacingd", "keys": list(keys), "pixdim": "@spacing", "mode": list(modes)},
        {"_target_": "CopyItemsd", "keys": PARKED_PATH_KEY, "names": PATH_KEY, "allow_missing_keys": True},
        {"_target_": "DeleteItemsd", "keys": PARKED_PATH_KEY},
    ]


def _common(
    network_def: dict, output_channels: Sequence[int], spacing: Sequence[float], roi_size: Sequence[int]
) -> dict[str, Any]:
    return {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch", "$import monai"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "output_channels": [int(c) for c in output_channels],
        "num_labels": len(output_channels),
        "spacing": [float(s) for s in spacing],
        "roi_size": [int(r) for r in roi_size],
        "axcodes": "RAS"[: len(roi_size)],
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
    }


def inference_config(
    network_def: dict, output_channels: Sequence[int], spacing: Sequence[float], roi_size: Sequence[int], dtype: str
) -> dict[str, Any]:
    """Inference config: NIfTI in ``dataset_dir`` -> label maps ``<name>_seg.nii.gz`` in ``output_dir``.

    Args:
        network_def: ``_target_`` config of the stock network.
        output_channels: channels of the network output that form the region's labels 1..n.
        spacing: target voxel spacing (mm), one value per spatial dimension.
        roi_size: sliding-window patch size, one value per spatial dimension.
        dtype: numpy dtype name of the written label map, e.g. ``"uint8"``.
    """
    cfg = _common(network_def, output_channels, spacing, roi_size)
    cfg.update(
        {
            "dataset_dir": "/workspace/data",
            "output_dir": "$@bundle_root + '/eval'",
            "datalist": "$list(sorted(glob.glob(os.path.join(@dataset_dir, '*.nii*'))))",
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                    {"_target_": "EnsureChannelFirstd", "keys": "image"},
                    {"_target_": "Orientationd", "keys": "image", "axcodes": "@axcodes"},
                    *_resample_block(["image"], ["bilinear"]),
                    {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": False, "channel_wise": True},
                    {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
                ],
            },
            "dataset": {
                "_target_": "Dataset",
                "data": "$[{'image': i} for i in @datalist]",
                "transform": "@preprocessing",
            },
            "dataloader": {
                "_target_": "DataLoader",
                "dataset": "@dataset",
                "batch_size": 1,
                "shuffle": False,
                "num_workers": 0,
            },
            "inferer": {
                "_target_": "SlidingWindowInferer",
                "roi_size": "@roi_size",
                "sw_batch_size": 1,
                "overlap": 0.25,
                "mode": "gaussian",
            },
            "postprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "Lambdad", "keys": "pred", "func": _SELECT_EXPR},
                    {
                        "_target_": "Invertd",
                        "keys": "pred",
                        "transform": "@preprocessing",
                        "orig_keys": "image",
                        "nearest_interp": False,
                        "to_tensor": True,
                    },
                    {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                    {"_target_": "CastToTyped", "keys": "pred", "dtype": f"$torch.{dtype}"},
                    {
                        "_target_": "SaveImaged",
                        "keys": "pred",
                        "output_dir": "@output_dir",
                        "output_postfix": "seg",
                        "output_dtype": f"$numpy.{dtype}",
                        "resample": False,
                        "separate_folder": False,
                        "print_log": False,
                    },
                ],
            },
            "handlers": [
                {
                    "_target_": "CheckpointLoader",
                    "load_path": "$@ckpt_dir + '/model.pt'",
                    "load_dict": {"model": "@network"},
                    "map_location": "@device",
                },
                {"_target_": "StatsHandler", "iteration_log": False},
            ],
            "evaluator": {
                "_target_": "SupervisedEvaluator",
                "device": "@device",
                "val_data_loader": "@dataloader",
                "network": "@network",
                "inferer": "@inferer",
                "postprocessing": "@postprocessing",
                "val_handlers": "@handlers",
                "amp": False,
            },
            "initialize": ["$monai.utils.set_determinism(seed=0)"],
            "run": ["$@evaluator.run()"],
        }
    )
    return cfg


def train_config(
    network_def: dict, output_channels: Sequence[int], spacing: Sequence[float], roi_size: Sequence[int]
) -> dict[str, Any]:
    """Fine-tuning config (also what MONAI Label's bundle trainer runs).

    MONAI Label overrides ``train#trainer#max_epochs``, ``train#dataset#data``, ``validate#dataset#data``,
    ``train#handlers``, ``device`` and ``bundle_root``. Data items are ``{"image": path, "label": path}`` with label
    values 0..n. The loss is ``DiceCELoss(sigmoid=True)`` on the region channels only against the one-hot labels
    1..n, the objective the expert's channels were trained with; channels outside the region get no gradient.
    """
    cfg = _common(network_def, output_channels, spacing, roi_size)
    keys = ["image", "label"]
    cfg.update(
        {
            "dataset_dir": "/workspace/data",
            "images": "$list(sorted(glob.glob(os.path.join(@dataset_dir, 'imagesTr', '*.nii*'))))",
            "labels": "$list(sorted(glob.glob(os.path.join(@dataset_dir, 'labelsTr', '*.nii*'))))",
            "val_interval": 1,
            "learning_rate": 1e-4,
            "loss": {"_target_": "DiceCELoss", "sigmoid": True, "squared_pred": True, "smooth_nr": 1e-5},
            "loss_function": (
                "$lambda p, y: @loss(p[:, @output_channels], "
                "monai.networks.one_hot(y, @num_labels + 1)[:, 1:])"
            ),
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
            "train": {
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
                        {"_target_": "EnsureChannelFirstd", "keys": keys},
                        {"_target_": "Orientationd", "keys": keys, "axcodes": "@axcodes"},
                        {"_target_": "Spacingd", "keys": keys, "pixdim": "@spacing", "mode": ["bilinear", "nearest"]},
                        {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True},
                        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": "@roi_size"},
                        {
                            "_target_": "RandCropByPosNegLabeld",
                            "keys": keys,
                            "label_key": "label",
                            "spatial_size": "@roi_size",
                            "pos": 1,
                            "neg": 1,
                            "num_samples": 2,
                            "image_key": "image",
                            "image_threshold": -1e9,
                        },
                        {"_target_": "RandFlipd", "keys": keys, "prob": 0.5, "spatial_axis": 0},
                        {"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": 0.5},
                        {"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": 0.5},
                        {"_target_": "EnsureTyped", "keys": keys, "dtype": ["$torch.float32", "$torch.float32"]},
                    ],
                },
                "dataset": {
                    "_target_": "Dataset",
                    "data": "$[{'image': i, 'label': l} for i, l in zip(@images[:-1], @labels[:-1])]",
                    "transform": "@train#preprocessing",
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@train#dataset",
                    "batch_size": 1,
                    "shuffle": True,
                    "num_workers": 0,
                },
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": [
                    {
                        "_target_": "ValidationHandler",
                        "validator": "@validate#evaluator",
                        "epoch_level": True,
                        "interval": "@val_interval",
                    },
                    {
                        "_target_": "StatsHandler",
                        "tag_name": "train_loss",
                        "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                    },
                ],
                "trainer": {
                    "_target_": "SupervisedTrainer",
                    "max_epochs": 100,
                    "device": "@device",
                    "train_data_loader": "@train#dataloader",
                    "network": "@network",
                    "loss_function": "@loss_function",
                    "optimizer": "@optimizer",
                    "inferer": "@train#inferer",
                    "train_handlers": "@train#handlers",
                    "amp": False,
                },
            },
            "validate": {
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
                        {"_target_": "EnsureChannelFirstd", "keys": keys},
                        {"_target_": "Orientationd", "keys": keys, "axcodes": "@axcodes"},
                        {"_target_": "Spacingd", "keys": keys, "pixdim": "@spacing", "mode": ["bilinear", "nearest"]},
                        {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True},
                        {"_target_": "EnsureTyped", "keys": keys, "dtype": ["$torch.float32", "$torch.float32"]},
                    ],
                },
                "dataset": {
                    "_target_": "Dataset",
                    "data": "$[{'image': i, 'label': l} for i, l in zip(@images[-1:], @labels[-1:])]",
                    "transform": "@validate#preprocessing",
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@validate#dataset",
                    "batch_size": 1,
                    "shuffle": False,
                    "num_workers": 0,
                },
                "inferer": {
                    "_target_": "SlidingWindowInferer",
                    "roi_size": "@roi_size",
                    "sw_batch_size": 1,
                    "overlap": 0.25,
                },
                "postprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "Lambdad", "keys": "pred", "func": _SELECT_EXPR},
                        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True, "to_onehot": "$@num_labels + 1"},
                        {"_target_": "AsDiscreted", "keys": "label", "to_onehot": "$@num_labels + 1"},
                    ],
                },
                "handlers": [
                    {"_target_": "StatsHandler", "iteration_log": False},
                    {
                        "_target_": "CheckpointSaver",
                        "save_dir": "@ckpt_dir",
                        "save_dict": {"model": "@network"},
                        "save_key_metric": True,
                        "key_metric_filename": "model.pt",
                    },
                ],
                "key_metric": {
                    "val_mean_dice": {
                        "_target_": "MeanDice",
                        "include_background": False,
                        "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
                    }
                },
                "evaluator": {
                    "_target_": "SupervisedEvaluator",
                    "device": "@device",
                    "val_data_loader": "@validate#dataloader",
                    "network": "@network",
                    "inferer": "@validate#inferer",
                    "postprocessing": "@validate#postprocessing",
                    "key_val_metric": "@validate#key_metric",
                    "val_handlers": "@validate#handlers",
                    "amp": False,
                },
            },
            "initialize": ["$monai.utils.set_determinism(seed=0)"],
            "run": ["$@train#trainer.run()"],
        }
    )
    return cfg
