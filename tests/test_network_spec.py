# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A trained LoRKD model's architecture travels with it: models/network_def.json records the to_experts settings and
expert_model_from_spec rebuilds exactly that model (older specs: the 0.2.0 layout)."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from monai.networks.nets import UNet

from medfm_ops.data import TaskTable
from medfm_ops.engines.handlers.expert_warmup import _uniform_rank
from medfm_ops.layers import EKSConv, EKSConvTranspose, ExpertSettings
from medfm_ops.networks import (
    MONAI_UNET_DECODER,
    eks_layers,
    expert_model_from_spec,
    load_expert_state_dict,
    load_network_spec,
    save_network_spec,
    set_expert_ranks,
    to_experts,
    trained_expert_settings,
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
    table = TaskTable.from_regions(REGIONS)
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
    save_network_spec(tmp_path, NETWORK_DEF, TaskTable.from_regions(REGIONS))
    assert "experts" not in load_network_spec(tmp_path)
    model = expert_model_from_spec(tmp_path)
    layers = [m for _, m in eks_layers(model)]
    assert layers and all(isinstance(m, EKSConv) and not isinstance(m, EKSConvTranspose) for m in layers)
    assert all(m.ranks == (8, 8) and m.rank_multiplier == 1 and m.scaling == "rank" for m in layers)


def test_expert_settings_own_the_defaults_and_are_recorded_complete(tmp_path):
    """ExpertSettings is where a default lives: the layers, to_experts and the warm-up read it; a spec records every
    setting (defaults written out), and an unknown recorded key is refused by name."""
    defaults = ExpertSettings()
    for fn in (to_experts, EKSConv.__init__, EKSConvTranspose.__init__):
        params = inspect.signature(fn).parameters
        assert params["ranks"].default == defaults.ranks and params["alpha"].default == defaults.alpha, fn
    assert inspect.signature(to_experts).parameters["scaling"].default == defaults.scaling
    assert inspect.signature(to_experts).parameters["convert_transposed"].default == defaults.convert_transposed
    save_network_spec(tmp_path, NETWORK_DEF, TaskTable.from_regions(REGIONS), experts={"ranks": 4})
    recorded = load_network_spec(tmp_path)["experts"]
    assert recorded == {"ranks": 4, "alpha": defaults.alpha, "scaling": defaults.scaling,
                        "convert_transposed": defaults.convert_transposed}  # fmt: skip
    assert ExpertSettings.from_record(recorded) == ExpertSettings(ranks=4)
    assert trained_expert_settings(tmp_path) == {**ExpertSettings(ranks=4).to_experts_kwargs()}
    with pytest.raises(ValueError, match=r"unknown expert settings \['rank'\]"):
        ExpertSettings.from_record({"rank": 4})
    with pytest.raises(ValueError, match="scaling must be one of"):
        ExpertSettings(scaling="linear")


def test_warmup_reads_the_base_rank_of_the_network():
    """LoRKD* without base_rank re-ranks from the rank the experts were built with (here 4, not the default 8)."""
    net = to_experts(UNet(**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"}), 2, ranks=4)
    assert _uniform_rank(net) == 4
    set_expert_ranks(net, [4, 2])
    with pytest.raises(ValueError, match="one uniform base rank"):
        _uniform_rank(net)


def test_recorded_input_size_is_the_teacher_input_size(tmp_path, caplog):
    """spatial_size recorded with the weights is read back (bundle folder or its models folder) and is the teacher's
    input size; a spec without it, or a teacher file, falls back to the student's size; a bad value is one error."""
    from medfm_ops.networks import recorded_spatial_size, teacher_input_size

    bundle = tmp_path / "teacher"
    save_network_spec(bundle / "models", NETWORK_DEF, spatial_size=(64, 64, 64))
    assert json.loads((bundle / "models" / "network_def.json").read_text())["spatial_size"] == [64, 64, 64]
    assert recorded_spatial_size(bundle) == recorded_spatial_size(bundle / "models") == [64, 64, 64]
    with caplog.at_level("WARNING", logger="medfm.teacher"):
        assert teacher_input_size(bundle, [28, 28, 28], {"a": "a64.npz"}) == [64, 64, 64]
        assert not caplog.records
        assert teacher_input_size(bundle, [28, 28, 28]) == [64, 64, 64]  # reads the student's input: said
    assert "trained at [64, 64, 64] but reads the student's [28, 28, 28] input" in caplog.text
    old = tmp_path / "old"
    save_network_spec(old / "models", NETWORK_DEF)
    assert recorded_spatial_size(old) is None and teacher_input_size(old, (28, 28, 28)) == [28, 28, 28]
    assert teacher_input_size(tmp_path / "model.ts", [28, 28, 28]) == [28, 28, 28]
    spec = json.loads((old / "models" / "network_def.json").read_text())
    (old / "models" / "network_def.json").write_text(json.dumps({**spec, "spatial_size": [28, 0, 28]}))
    with pytest.raises(ValueError, match="'spatial_size' must be a list of positive integers"):
        recorded_spatial_size(old)
