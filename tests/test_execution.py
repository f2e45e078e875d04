# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""select_execution: picks a mode from the candidates, sets it everywhere, leaves no side effects; modes agree."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet

from medfm_ops.layers import EXECUTION_MODES
from medfm_ops.networks import eks_layers, select_execution, set_execution, to_experts

TASKS = torch.tensor([0, 2, 1, 2])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = UNet(3, 2, 2, channels=(4, 8), strides=(2,), num_res_units=1, norm="batch").double()
    model = to_experts(net, num_tasks=3, ranks=2)
    with torch.no_grad():  # non-zero B so the experts differ from W0 and the modes do different work
        for _, layer in eks_layers(model):
            for b in layer.lora_B:
                b.normal_()
    return model


@pytest.mark.parametrize("modes", [EXECUTION_MODES, ("per_task",)])
def test_select_sets_mode_and_restores_state(modes):
    model = _model()
    model.eval()
    x = torch.randn(4, 2, 8, 8, 8, dtype=torch.float64)
    buffers = [b.clone() for b in model.buffers()]
    record = select_execution(model, x, TASKS, modes=modes, repeats=2, warmup=1)
    assert record["chosen"] in modes
    assert set(record["timings_ms"]) == set(modes) and all(t > 0 for t in record["timings_ms"].values())
    assert record["device"] == "cpu"
    assert {layer.execution for _, layer in eks_layers(model)} == {record["chosen"]}
    assert not any(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))  # BatchNorm statistics untouched


def test_existing_grads_kept_and_forward_only():
    model = _model()
    first = next(model.parameters())
    first.grad = torch.ones_like(first)
    record = select_execution(model, torch.randn(4, 2, 8, 8, 8, dtype=torch.float64), TASKS, repeats=1, warmup=0,
                              backward=False)
    assert record["chosen"] in EXECUTION_MODES and model.training
    assert torch.equal(first.grad, torch.ones_like(first))


def test_outputs_identical_across_modes():
    model = _model()
    model.eval()
    x = torch.randn(4, 2, 8, 8, 8, dtype=torch.float64)
    outs = {}
    for mode in EXECUTION_MODES:
        set_execution(model, mode)
        outs[mode] = model(x, TASKS)
    ref = outs[EXECUTION_MODES[0]]
    for mode, out in outs.items():
        assert (out - ref).abs().max().item() <= 1e-10, mode


@pytest.mark.parametrize(
    "kwargs,match",
    [({"modes": ()}, "at least one"), ({"modes": ("fast",)}, "unknown"), ({"repeats": 0}, "repeats"),
     ({"warmup": -1}, "warmup")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select_execution(_model(), torch.randn(4, 2, 8, 8, 8, dtype=torch.float64), TASKS, **kwargs)


def test_no_eks_layer():
    with pytest.raises(ValueError, match="no EKSConv"):
        select_execution(torch.nn.Conv3d(2, 2, 3), torch.randn(1, 2, 4, 4, 4), [0])
