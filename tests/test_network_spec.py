# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A trained LoRKD model's architecture travels with it: models/network_def.json records the to_experts settings and
expert_model_from_spec rebuilds exactly that model (older specs: the 0.2.0 layout)."""

from __future__ import annotations

import json

import torch
from monai.networks.nets import UNet

from medfm_ops.data import RegionTable
from medfm_ops.layers import EKSConv, EKSConvTranspose
from medfm_ops.networks import (
    MONAI_UNET_DECODER,
    eks_layers,
    expert_model_from_spec,
    load_expert_state_dict,
    load_network_spec,
    save_network_spec,
    to_experts,
)

NETWORK_DEF = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
               "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "instance"}  # fmt: skip
REGIONS = [{"name": "a", "task_id": 0, "labels": {"1": "x", "2": "y"}},
           {"name": "b", "task_id": 1, "labels": {"1": "z"}}]  # fmt: skip
EXPERTS = {"ranks": 4, "alpha": 16.0, "convert_transposed": True,
           "rank_multipliers": dict.fromkeys(MONAI_UNET_DECODER, 2), "scaling": "constant"}  # fmt: skip


def _layout(model) -> dict[str, tuple]:
    return {n: (type(m).__name__, m.ranks, m.rank_multiplier, m.scaling) for n, m in eks_layers(model)}


def test_recorded_settings_rebuild_the_trained_model(tmp_path):
    table = RegionTable.from_regions(REGIONS)
    save_network_spec(tmp_path, NETWORK_DEF, table, experts=EXPERTS)
    assert json.loads((tmp_path / "network_def.json").read_text())["experts"]["scaling"] == "constant"
    torch.manual_seed(0)
    trained = to_experts(UNet(**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"}), 2, **EXPERTS)
    for p in trained.parameters():
        torch.nn.init.normal_(p, std=0.1)  # every factor non-zero, as after training
    torch.save(trained.state_dict(), tmp_path / "model.pt")

    rebuilt = expert_model_from_spec(tmp_path)
    assert _layout(rebuilt) == _layout(trained)
    kinds = {t for t, *_ in _layout(rebuilt).values()}
    assert kinds == {"EKSConv", "EKSConvTranspose"}, "transposed convs carry experts"
    assert {m for *_, m, _ in _layout(rebuilt).values()} == {1, 2}, "decoder at twice the base rank"
    load_expert_state_dict(rebuilt, tmp_path / "model.pt")
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x, torch.tensor([0, 1])), trained.eval()(x, torch.tensor([0, 1])))


def test_spec_without_experts_is_read_with_the_old_layout(tmp_path):
    save_network_spec(tmp_path, NETWORK_DEF, RegionTable.from_regions(REGIONS))
    assert "experts" not in load_network_spec(tmp_path)
    model = expert_model_from_spec(tmp_path)
    layers = [m for _, m in eks_layers(model)]
    assert layers and all(isinstance(m, EKSConv) and not isinstance(m, EKSConvTranspose) for m in layers)
    assert all(m.ranks == (8, 8) and m.rank_multiplier == 1 and m.scaling == "rank" for m in layers)
