# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""EKS convolution: exactness against per-task and per-sample loops, gradient separation, fusion."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F


from medfm_ops.layers import EXECUTION_MODES, EKSConv, EKSConvTranspose

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL = {1: (11,), 2: (9, 10), 3: (7, 8, 6)}

# spatial_dims, kernel, stride, padding, dilation, bias, ranks
CASES = [
    (1, 3, 1, 1, 1, True, [4, 2, 0]),
    (1, 5, 2, 0, 2, False, 3),
    (2, 3, 1, 1, 1, True, [4, 0, 2]),
    (2, 3, 2, 2, 2, False, 2),
    (2, 1, 1, 0, 1, True, [1, 1, 1]),
    (3, 3, 1, 1, 1, True, [2, 4, 0]),
    (3, 3, 2, 1, 1, False, 2),
    (3, 3, 1, 2, 2, True, [0, 0, 2]),
    (3, (3, 1, 3), 1, (1, 0, 1), 1, True, [2, 2, 2]),  # non-cubic kernel
]
TASK_BATCHES = [[0, 2, 1, 0], [2, 2, 2], [1], [0, 1, 2, 1, 0, 2]]


def _layer(spatial_dims, kernel, stride, padding, dilation, bias, ranks, seed=0) -> EKSConv:
    torch.manual_seed(seed)
    layer = EKSConv(spatial_dims, 4, 5, kernel, num_tasks=3, ranks=ranks, alpha=6.0, stride=stride, padding=padding,
                    dilation=dilation, bias=bias, dtype=torch.float64)
    return layer


def _ref_conv(layer, x, weight):
    return CONV[layer.spatial_dims](x, weight, layer.bias, layer.stride, layer.padding, layer.dilation)


@pytest.mark.parametrize("case,tasks,execution", list(itertools.product(CASES, TASK_BATCHES, EXECUTION_MODES)))
def test_equals_per_task_and_per_sample_loops(eks_oracle, case, tasks, execution):
    layer = eks_oracle.with_random_experts(_layer(*case))
    layer.execution = execution
    x = torch.randn(len(tasks), 4, *SPATIAL[case[0]], dtype=torch.float64)
    eks_oracle.assert_equals_loops(layer, x, tasks, _ref_conv)


@pytest.mark.parametrize("case", CASES)
def test_none_is_shared_kernel_and_fuse_is_exact(eks_oracle, case):
    layer = eks_oracle.with_random_experts(_layer(*case))
    x = torch.randn(2, 4, *SPATIAL[case[0]], dtype=torch.float64)
    assert torch.equal(layer(x), _ref_conv(layer, x, layer.weight))
    w0 = layer.weight.detach().clone()
    for t in range(3):
        fused = layer.fuse(t)
        assert type(fused).__name__ == f"Conv{case[0]}d"
        ref = layer(x, torch.full((2,), t))
        assert (fused(x) - ref).abs().max().item() <= 1e-10
    assert torch.equal(layer.weight, w0), "fuse must not modify W0 in place"
    assert torch.equal(layer.fuse(None).weight, w0)


def test_fresh_experts_equal_w0():
    layer = EKSConv(3, 3, 4, 3, num_tasks=4, ranks=[8, 2, 0, 4], padding=1, dtype=torch.float64)
    x = torch.randn(4, 3, 6, 6, 6, dtype=torch.float64)
    assert torch.allclose(layer(x, torch.tensor([0, 1, 2, 3])), layer(x), atol=0, rtol=0)
    assert all(torch.count_nonzero(a) > 0 for a, r in zip(layer.lora_A, layer.ranks) if r > 0), "A is Kaiming-uniform"
    assert all(torch.count_nonzero(b) == 0 for b in layer.lora_B), "B starts at zero"
    assert [tuple(a.shape) for a in layer.lora_A] == [(24, 27), (6, 27), (0, 27), (12, 27)]
    assert [tuple(b.shape) for b in layer.lora_B] == [(12, 24), (12, 6), (12, 0), (12, 12)]


@pytest.mark.parametrize("execution", EXECUTION_MODES)
@pytest.mark.parametrize("bias", [True, False])
def test_gradient_separation(eks_oracle, execution, bias):
    layer = eks_oracle.with_random_experts(_layer(3, 3, 1, 1, 1, bias, [2, 2, 2, 2][:3]))
    layer.execution = execution
    x = torch.randn(3, 4, 5, 5, 5, dtype=torch.float64)
    layer(x, torch.tensor([0, 2, 0])).square().sum().backward()
    for p in (layer.lora_A[1], layer.lora_B[1]):
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    for t in (0, 2):
        assert torch.count_nonzero(layer.lora_A[t].grad) > 0 and torch.count_nonzero(layer.lora_B[t].grad) > 0
    # W0 receives gradient from every sample: its gradient is the sum of the per-sample gradients
    per_sample = []
    for b, t in enumerate([0, 2, 0]):
        layer.zero_grad()
        layer(x[b : b + 1], torch.tensor([t])).square().sum().backward()
        per_sample.append(layer.weight.grad.clone())
        assert torch.count_nonzero(per_sample[-1]) > 0
    layer.zero_grad()
    layer(x, torch.tensor([0, 2, 0])).square().sum().backward()
    assert torch.allclose(layer.weight.grad, sum(per_sample), atol=1e-9)


def test_set_ranks_and_errors():
    layer = EKSConv(2, 3, 4, 3, num_tasks=2, ranks=4)
    layer.set_ranks([6, 0])
    assert layer.ranks == (6, 0) and layer.lora_A[0].shape == (18, 9)
    with pytest.raises(ValueError, match="ranks"):
        layer.set_ranks([1, 2, 3])
    with pytest.raises(IndexError, match="out of range"):
        layer(torch.randn(2, 3, 5, 5), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="batch of 2"):
        layer(torch.randn(2, 3, 5, 5), torch.tensor([0]))
    with pytest.raises(ValueError, match="groups"):
        EKSConv.from_conv(torch.nn.Conv2d(4, 4, 3, groups=4), 2)
    layer.execution = "bogus"
    with pytest.raises(ValueError, match="execution"):
        layer(torch.randn(2, 3, 5, 5), torch.tensor([0, 1]))


def test_rank_multiplier_scales_factor_ranks_not_base_ranks(eks_oracle):
    torch.manual_seed(0)
    stock = torch.nn.Conv2d(3, 4, 3, padding=1).double()
    layer = EKSConv.from_conv(stock, num_tasks=3, ranks=[2, 0, 1], alpha=6.0, rank_multiplier=2)
    assert layer.ranks == (2, 0, 1) and layer.layer_ranks == (4, 0, 2)
    assert [tuple(a.shape) for a in layer.lora_A] == [(12, 9), (0, 9), (6, 9)]
    assert layer.ranks_of_factors([12, 0, 6]) == (2, 0, 1)
    with pytest.raises(ValueError, match="rank_multiplier=2"):
        layer.ranks_of_factors([9])
    eks_oracle.with_random_experts(layer)
    # layer rank 4 for base rank 2: delta = (alpha / 4) B A
    ref = layer.weight + (layer.lora_B[0] @ layer.lora_A[0]).reshape(layer.weight.shape) * (6.0 / 4)
    assert (layer.expert_weight(0) - ref).abs().max().item() <= 1e-12
    layer.set_ranks([1, 1, 3])
    assert layer.layer_ranks == (2, 2, 6) and layer.lora_B[2].shape == (12, 18)
    with pytest.raises(ValueError, match="rank_multiplier"):
        EKSConv(2, 3, 4, 3, num_tasks=2, rank_multiplier=0)


@pytest.mark.parametrize("layer_type", ["conv", "transposed"])
def test_constant_scaling_keeps_an_experts_scale_when_re_ranked(eks_oracle, layer_type):
    cls = EKSConv if layer_type == "conv" else EKSConvTranspose
    rank = cls(2, 3, 4, 3, num_tasks=3, ranks=8, alpha=16.0, rank_multiplier=2, dtype=torch.float64)
    const = cls(2, 3, 4, 3, num_tasks=3, ranks=8, alpha=16.0, rank_multiplier=2, scaling="constant",
                dtype=torch.float64)
    assert rank.scales == const.scales == (1.0, 1.0, 1.0)  # 16 / (2 * 8)
    for layer in (rank, const):
        layer.set_ranks([4, 0, 16])  # LoRKD* re-ranking
    assert rank.scales == (2.0, 0.0, 0.5) and const.scales == (1.0, 0.0, 1.0)
    eks_oracle.with_random_experts(const)
    ref = const.weight + (const.lora_B[2] @ const.lora_A[2]).reshape(const.weight.shape) * (16.0 / 16)
    assert (const.expert_weight(2) - ref).abs().max().item() <= 1e-12
    fused = const.fuse(2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert (fused(x) - const(x, torch.tensor([2, 2]))).abs().max().item() <= 1e-10
    # constant scaling needs its base rank when ranks are given per task
    assert cls(2, 3, 4, 3, 2, ranks=[4, 6], scaling="constant", base_rank=4).scales == (4.0, 4.0)
    with pytest.raises(ValueError, match="base_rank"):
        cls(2, 3, 4, 3, 2, ranks=[4, 6], scaling="constant")
    with pytest.raises(ValueError, match="scaling"):
        cls(2, 3, 4, 3, 2, scaling="sqrt")


# spatial_dims, c_in, c_out, bias, stride, padding, dilation
PADDED_CASES = [(3, 10, 6, True, 1, 1, 1), (2, 12, 16, False, 2, "valid", 1), (1, 16, 12, True, 1, 2, 2),
                (3, 9, 8, True, 2, 1, 1), (3, 1, 12, True, 2, 1, 1), (2, 2, 6, False, 1, 1, 1)]  # 1-2 inputs: unpadded


@pytest.mark.parametrize("spatial_dims,c_in,c_out,bias,stride,padding,dilation", PADDED_CASES)
def test_cpu_channel_padding_of_grouped_execution_is_exact(eks_oracle, spatial_dims, c_in, c_out, bias, stride, padding,
                                                          dilation):
    """Channels not multiples of 8 run padded (forward, input gradient) in grouped mode on CPU: same outputs and
    gradients as unpadded grouped and per-task execution."""
    torch.manual_seed(0)
    layer = EKSConv(spatial_dims, c_in, c_out, 3, num_tasks=3, ranks=[2, 0, 1], stride=stride, padding=padding,
                    dilation=dilation, bias=bias, dtype=torch.float64)
    eks_oracle.with_random_experts(layer)
    x = torch.randn(4, c_in, *SPATIAL[spatial_dims], dtype=torch.float64)
    eks_oracle.assert_executions_agree(layer, x, torch.tensor([0, 2, 1, 2]))
