# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""EKS transposed convolution: exactness against per-task and per-sample loops, gradient separation, fusion,
routing inside a network."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn


from medfm_ops.layers import EXECUTION_MODES, EKSConvTranspose
from medfm_ops.networks import ExpertNetwork, eks_layers, export_expert

CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
SPATIAL = {1: (6,), 2: (4, 5), 3: (3, 4, 3)}

# spatial_dims, kernel, stride, padding, output_padding, dilation, bias, ranks
CASES = [
    (1, 3, 2, 1, 1, 1, True, [4, 2, 0]),
    (1, 4, 2, 0, 0, 2, False, 2),
    (2, 3, 2, 1, 1, 1, True, [2, 0, 3]),
    (2, 2, 2, 0, 0, 1, False, [1, 1, 1]),
    (3, 3, 2, 1, 1, 1, True, [2, 4, 0]),
    (3, (3, 2, 3), 2, (1, 0, 1), (1, 0, 0), 1, False, 2),  # non-cubic kernel
]
TASK_BATCHES = [[0, 2, 1, 0], [2, 2], [1, 0, 1]]


def _layer(spatial_dims, kernel, stride, padding, output_padding, dilation, bias, ranks, seed=0) -> EKSConvTranspose:
    torch.manual_seed(seed)
    layer = EKSConvTranspose(spatial_dims, 4, 3, kernel, num_tasks=3, ranks=ranks, alpha=6.0, stride=stride,
                             padding=padding, output_padding=output_padding, dilation=dilation, bias=bias,
                             dtype=torch.float64)
    return layer


def _ref(layer, x, weight):
    return CONV_T[layer.spatial_dims](x, weight, layer.bias, layer.stride, layer.padding, layer.output_padding, 1,
                                      layer.dilation)


@pytest.mark.parametrize("case,tasks,execution", list(itertools.product(CASES, TASK_BATCHES, EXECUTION_MODES)))
def test_equals_per_task_and_per_sample_loops(eks_oracle, case, tasks, execution):
    layer = eks_oracle.with_random_experts(_layer(*case))
    layer.execution = execution
    x = torch.randn(len(tasks), 4, *SPATIAL[case[0]], dtype=torch.float64)
    eks_oracle.assert_equals_loops(layer, x, tasks, _ref)


@pytest.mark.parametrize("case", CASES)
def test_none_is_shared_kernel_and_fuse_is_exact(eks_oracle, case):
    layer = eks_oracle.with_random_experts(_layer(*case))
    x = torch.randn(2, 4, *SPATIAL[case[0]], dtype=torch.float64)
    assert torch.equal(layer(x), _ref(layer, x, layer.weight))
    w0 = layer.weight.detach().clone()
    for t in range(3):
        fused = layer.fuse(t)
        assert type(fused) is getattr(nn, f"ConvTranspose{case[0]}d")
        for attr in ("stride", "padding", "output_padding", "dilation"):
            assert tuple(getattr(fused, attr)) == getattr(layer, attr), attr
        assert (fused.bias is None) == (layer.bias is None)
        assert (fused(x) - layer(x, torch.full((2,), t))).abs().max().item() <= 1e-10
    assert torch.equal(layer.weight, w0), "fuse must not modify W0 in place"
    assert torch.equal(layer.fuse(None).weight, w0)


def test_from_conv_keeps_stock_keys_and_fresh_experts_equal_w0():
    torch.manual_seed(0)
    stock = nn.ConvTranspose3d(4, 3, 3, stride=2, padding=1, output_padding=1).double()
    layer = EKSConvTranspose.from_conv(stock, num_tasks=3, ranks=[2, 0, 3])
    assert torch.equal(layer.weight, stock.weight) and torch.equal(layer.bias, stock.bias)
    keys = set(layer.state_dict())
    assert {"weight", "bias"} == set(stock.state_dict()) == {k for k in keys if not k.startswith("lora_")}
    assert [tuple(a.shape) for a in layer.lora_A] == [(6, 27), (0, 27), (9, 27)]  # (r k, C_out k^2)
    assert [tuple(b.shape) for b in layer.lora_B] == [(12, 6), (12, 0), (12, 9)]  # (C_in k, r k)
    x = torch.randn(3, 4, 3, 3, 3, dtype=torch.float64)
    assert torch.equal(layer(x, torch.tensor([0, 1, 2])), stock(x))
    with pytest.raises(ValueError, match="groups"):
        EKSConvTranspose.from_conv(nn.ConvTranspose2d(4, 4, 3, groups=2), 2)
    with pytest.raises(TypeError, match="ConvTranspose"):
        EKSConvTranspose.from_conv(nn.Conv2d(4, 4, 3), 2)
    with pytest.raises(ValueError, match="output_padding"):
        EKSConvTranspose(2, 4, 4, 3, 2, stride=1, output_padding=1)


@pytest.mark.parametrize("execution", EXECUTION_MODES)
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_gradient_separation(eks_oracle, execution, spatial_dims):
    layer = eks_oracle.with_random_experts(_layer(spatial_dims, 3, 2, 1, 1, 1, True, 2))
    layer.execution = execution
    x = torch.randn(3, 4, *SPATIAL[spatial_dims], dtype=torch.float64)
    layer(x, torch.tensor([0, 2, 0])).square().sum().backward()
    for p in (layer.lora_A[1], layer.lora_B[1]):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    for t in (0, 2):
        assert torch.count_nonzero(layer.lora_A[t].grad) > 0 and torch.count_nonzero(layer.lora_B[t].grad) > 0
    per_sample = []  # W0 and the bias get the sum of the per-sample gradients
    for b, t in enumerate([0, 2, 0]):
        layer.zero_grad()
        layer(x[b : b + 1], torch.tensor([t])).square().sum().backward()
        per_sample.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
    layer.zero_grad()
    layer(x, torch.tensor([0, 2, 0])).square().sum().backward()
    assert torch.allclose(layer.weight.grad, sum(g for g, _ in per_sample), atol=1e-9)
    assert torch.allclose(layer.bias.grad, sum(g for _, g in per_sample), atol=1e-9)


def test_routed_inside_a_network_and_exported():
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), up)
    net = net.double()
    net[1] = EKSConvTranspose.from_conv(net[1], num_tasks=2, ranks=2)
    model = ExpertNetwork(net, 2)
    assert [type(m).__name__ for _, m in eks_layers(model)] == ["EKSConvTranspose"]
    with torch.no_grad():
        net[1].lora_B[1].normal_()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    ids = torch.tensor([1, 0])
    out = model(x, ids)
    assert out.shape == (2, 2, 10, 10) and not torch.allclose(out, model(x))
    for t in (0, 1):
        expert = export_expert(model, t)
        assert type(expert[1]) is nn.ConvTranspose2d
        assert (expert(x[ids == t]) - out[ids == t]).abs().max().item() <= 1e-10


# spatial_dims, c_in, c_out, bias, stride, padding, output_padding, dilation
PADDED_CASES = [(3, 16, 12, True, 2, 1, 1, 1), (2, 10, 9, False, 2, 0, 0, 1), (1, 12, 10, True, 2, 1, 2, 3)]


@pytest.mark.parametrize("spatial_dims,c_in,c_out,bias,stride,padding,output_padding,dilation", PADDED_CASES)
def test_cpu_channel_padding_of_grouped_execution_is_exact(eks_oracle, spatial_dims, c_in, c_out, bias, stride, padding,
                                                           output_padding, dilation):
    """Unaligned channels: the CPU grouped execution pads the input gradient; same outputs and gradients as the
    unpadded grouped and the per-task execution."""
    torch.manual_seed(0)
    layer = EKSConvTranspose(spatial_dims, c_in, c_out, 3, num_tasks=3, ranks=[2, 0, 1], stride=stride,
                             padding=padding, output_padding=output_padding, dilation=dilation, bias=bias,
                             dtype=torch.float64)
    eks_oracle.with_random_experts(layer)
    x = torch.randn(4, c_in, *SPATIAL[spatial_dims], dtype=torch.float64)
    eks_oracle.assert_executions_agree(layer, x, torch.tensor([0, 2, 1, 2]))
