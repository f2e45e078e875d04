# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""3D classification networks by name: literal ``network_def`` dicts (bundle config data) and their instances."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from medfm_ops.networks.spec import instantiate

__all__ = ["CLS_NETWORKS", "ViTClassifier", "cls_network_def", "build_cls_network", "network_config"]


class ViTClassifier(nn.Module):
    """MONAI's ``ViT`` (``classification=True``) returning the logits only (MONAI's returns ``(logits, hidden
    states)``), so that it is used like every other classifier here. Takes ViT's arguments."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from monai.networks.nets import ViT

        kwargs.setdefault("classification", True)
        self.vit = ViT(**kwargs)

    def forward(self, x):  # noqa: D102
        return self.vit(x)[0]

#: name -> network_def without ``num_classes`` (set by :func:`cls_network_def`); ``shufflenetv2`` and ``mobilenet``
#: are medfm_ops classes, the others stock MONAI networks
CLS_NETWORKS: dict[str, dict[str, Any]] = {
    "shufflenetv2": {"_target_": "medfm_ops.networks.ShuffleNetV2", "spatial_dims": 3, "in_channels": 1,
                     "stages_repeats": [2, 4, 2], "stages_out_channels": [24, 48, 96, 192, 512]},
    "mobilenet": {"_target_": "medfm_ops.networks.MobileNetV2", "spatial_dims": 3, "in_channels": 1},
    "resnet_tiny": {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
                    "block_inplanes": [16, 32, 64, 128], "spatial_dims": 3, "n_input_channels": 1,
                    "conv1_t_size": 3, "conv1_t_stride": 1},
    "resnet18": {"_target_": "monai.networks.nets.resnet18", "spatial_dims": 3, "n_input_channels": 1},
    "resnet50": {"_target_": "monai.networks.nets.resnet50", "spatial_dims": 3, "n_input_channels": 1},
    "densenet121": {"_target_": "monai.networks.nets.DenseNet121", "spatial_dims": 3, "in_channels": 1},
    "vit": {"_target_": "medfm_ops.networks.ViTClassifier", "in_channels": 1, "patch_size": 4, "hidden_size": 192,
            "mlp_dim": 768, "num_layers": 6, "num_heads": 6, "classification": True, "spatial_dims": 3},
}  # fmt: skip

_OUT_KEY = {"monai.networks.nets.DenseNet121": "out_channels"}


def cls_network_def(name: str, num_classes: int, spatial_size: Sequence[int] | None = None, **overrides: Any) -> dict:
    """
    Literal ``network_def`` of network ``name`` with ``num_classes`` outputs.

    Args:
        name: one of :data:`CLS_NETWORKS`.
        num_classes: classifier outputs.
        spatial_size: input size, needed by ``vit`` (``img_size``). Defaults to None.
        overrides: further constructor arguments.

    Raises:
        ValueError: for an unknown name (listing the known ones) or ``vit`` without ``spatial_size``.
    """
    if name not in CLS_NETWORKS:
        raise ValueError(f"unknown classification network '{name}'; known: {sorted(CLS_NETWORKS)}.")
    d = copy.deepcopy(CLS_NETWORKS[name])
    d[_OUT_KEY.get(d["_target_"], "num_classes")] = int(num_classes)
    if name == "vit":
        if spatial_size is None:
            raise ValueError("the 'vit' network needs spatial_size (its img_size).")
        d["img_size"] = [int(s) for s in spatial_size]
    d.update(overrides)
    return d


def network_config(target: str, **kwargs: Any) -> dict[str, Any]:
    """
    A literal network config ``{"_target_": target, **kwargs}`` built FROM a bundle config: the config writes
    ``{"_target_": "medfm_ops.networks.network_config", "target": "monai.networks.nets.ResNet", ...}`` and gets the
    plain dict back (its ``$``/``@`` values resolved), which it can both instantiate and record
    (``models/network_def.json``, an exported bundle) without re-reading its own file.

    Raises:
        ValueError: when a value is not JSON data (e.g. an instantiated object).

    Example::

        >>> network_config("monai.networks.nets.ResNet", block="basic", layers=[1, 1, 1, 1], num_classes=2)["_target_"]
        'monai.networks.nets.ResNet'
    """
    import json

    out = {"_target_": str(target), **kwargs}
    try:
        return json.loads(json.dumps(out))
    except TypeError as e:
        raise ValueError(f"network_config({target!r}): the values must be JSON data (numbers, strings, lists): {e}") from None


def build_cls_network(name: str, num_classes: int, spatial_size: Sequence[int] | None = None, **overrides: Any) -> nn.Module:
    """An instance of :func:`cls_network_def`."""
    return instantiate(cls_network_def(name, num_classes, spatial_size, **overrides))
