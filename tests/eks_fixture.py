# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Checks shared by the EKS convolution and EKS transposed convolution tests (float64 layers)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def with_random_experts(layer: torch.nn.Module) -> torch.nn.Module:
    """Give every expert a non-zero ``B`` (they start at zero), so the experts really differ from ``W0``."""
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def reference_kernel(layer: torch.nn.Module, t: int) -> torch.Tensor:
    """``W0 + (alpha / r_t) B_t A_t`` in the layer's stock kernel layout, written out independently of the layer."""
    r = layer.ranks[t]
    if r == 0:
        return layer.weight
    return layer.weight + (layer.lora_B[t] @ layer.lora_A[t]).reshape(layer.weight.shape) * (layer.alpha / r)


def assert_equals_loops(layer: torch.nn.Module, x: torch.Tensor, tasks: list[int], ref: Callable) -> None:
    """The layer's output on a mixed batch equals a per-sample and a per-task loop of ``ref(layer, x, kernel)``."""
    ids = torch.tensor(tasks)
    out = layer(x, ids)
    per_sample = torch.cat([ref(layer, x[b : b + 1], reference_kernel(layer, t)) for b, t in enumerate(tasks)])
    assert out.shape == per_sample.shape and (out - per_sample).abs().max().item() <= 1e-10
    per_task = torch.empty_like(out)
    for t in set(tasks):
        idx = (ids == t).nonzero().view(-1)
        per_task[idx] = ref(layer, x[idx], reference_kernel(layer, t))
    assert (out - per_task).abs().max().item() <= 1e-10


def assert_executions_agree(layer: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor) -> None:
    """Outputs and all gradients of the CPU grouped execution with channel padding (block 8), without it (block 0)
    and of the per-task execution are the same (float64, 1e-9)."""
    results = []
    for execution, block in (("grouped", 8), ("grouped", 0), ("per_task", 8)):
        layer.execution, layer.CPU_CHANNEL_BLOCK = execution, block
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        out = layer(xg, ids)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        results.append([out, xg.grad, *(p.grad for p in layer.parameters() if p.grad is not None)])
    for other in results[1:]:
        assert len(other) == len(results[0])
        assert all(torch.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(results[0], other))
