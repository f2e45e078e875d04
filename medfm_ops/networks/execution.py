# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Execution mode of a network's EKS layers: set one everywhere, or pick the faster one by timing a training step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from medfm_ops.layers import EXECUTION_MODES, check_execution_mode
from medfm_ops.networks.experts import eks_layers

__all__ = ["set_execution", "select_execution"]


def set_execution(model: nn.Module, mode: str) -> None:
    """Set how every EKS layer of ``model`` runs a mixed-task batch.

    Args:
        model: a module holding EKS layers (:class:`~medfm_ops.layers.EKSLayer`), or a DDP/DataParallel wrapper of one.
        mode: one of :data:`~medfm_ops.layers.EXECUTION_MODES`.

    Raises:
        ValueError: when ``mode`` is unknown.
    """
    check_execution_mode(mode, "mode")
    for _, m in eks_layers(model):
        m.execution = mode


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _scalar_loss(output) -> torch.Tensor:
    """A scalar that depends on every floating tensor of ``output`` (a tensor, or a list/tuple/dict of them)."""
    if isinstance(output, torch.Tensor):
        return output.float().square().mean()
    items = output.values() if isinstance(output, dict) else output
    losses = [_scalar_loss(o) for o in items if isinstance(o, (torch.Tensor, list, tuple, dict))]
    if not losses:
        raise TypeError(f"select_execution: the model returned no tensor ({type(output).__name__}).")
    return torch.stack(losses).sum()


def select_execution(
    model: nn.Module,
    example_input: torch.Tensor,
    task_ids: torch.Tensor | Sequence[int],
    modes: Sequence[str] = EXECUTION_MODES,
    repeats: int = 5,
    warmup: int = 2,
    backward: bool = True,
) -> dict:
    """
    Time one step of ``model(example_input, task_ids)`` with every execution mode and keep the fastest.

    A step is a forward pass plus, when ``backward`` is True, the backward pass of a scalar loss (``mean(out^2)``)
    into every parameter that requires a gradient: the cost of one training step without the optimizer. It runs on
    the device of ``example_input`` (CUDA steps are synchronised before the clock is read). After ``warmup``
    untimed steps per mode, the modes are timed in turns (``repeats`` rounds, rotating the order each round, so
    load drift on a shared machine hits every mode alike) and compared by their median. The chosen mode is then set
    on every EKS layer of ``model`` with :func:`set_execution`.

    Side effects are undone: the train/eval flag of every submodule, the buffers (e.g. BatchNorm running
    statistics) and the ``.grad`` of every parameter are as before the call (gradients created here are set to
    None, existing ones are put back untouched).

    All modes compute the same function (up to float rounding); only speed differs. A batch holding one task
    only takes the same single-convolution path in every mode, so its timings differ by noise alone.

    Args:
        model: a network holding EKS layers, called as ``model(x, task_ids)``: an
            :class:`~medfm_ops.networks.ExpertNetwork` (or a DDP/DataParallel wrapper of one) or an EKS layer.
        example_input: a representative batch of shape ``(B, C_in, *spatial)`` on the device to tune for.
        task_ids: ``(B,)`` integer task of every sample (a mixed-task batch as met in training).
        modes: candidate modes, a subset of :data:`~medfm_ops.layers.EXECUTION_MODES`. Defaults to all of them.
        repeats: timed steps per mode. Defaults to 5.
        warmup: untimed steps per mode before timing (allocator, oneDNN/cuDNN kernel selection). Defaults to 2.
        backward: time forward + backward in train mode (True) or forward only under ``torch.no_grad`` in eval
            mode (False, for inference). Defaults to True.

    Returns:
        ``{"chosen": mode, "timings_ms": {mode: median step time in ms}, "device": str(example_input.device)}``.

    Raises:
        ValueError: when ``modes`` is empty or holds an unknown mode, when ``repeats < 1`` or ``warmup < 0``, or
            when ``model`` holds no EKS layer.

    Example::

        >>> from monai.networks.nets import UNet
        >>> model = to_experts(UNet(3, 1, 2, (8, 16), (2,)), num_tasks=4)
        >>> record = select_execution(model, torch.randn(4, 1, 16, 16, 16), torch.tensor([0, 1, 2, 3]))
        >>> record["chosen"] in EXECUTION_MODES
        True
    """
    modes = list(modes)
    if not modes:
        raise ValueError("modes must name at least one execution mode, got an empty sequence.")
    unknown = [m for m in modes if m not in EXECUTION_MODES]
    if unknown:
        raise ValueError(f"modes must be a subset of {EXECUTION_MODES}, got unknown {unknown}.")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}.")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}.")
    if next(eks_layers(model), None) is None:
        raise ValueError(f"model ({type(model).__name__}) holds no EKSConv layer: convert it with to_experts first.")

    device = example_input.device
    task_ids = torch.as_tensor(task_ids, device=device).long().view(-1)
    params = [p for p in model.parameters()]
    saved_grads = [p.grad for p in params]
    saved_training = [(m, m.training) for m in model.modules()]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]

    def step() -> None:
        if backward:
            for p in params:
                p.grad = None
            loss = _scalar_loss(model(example_input, task_ids))
            if loss.requires_grad:  # a fully frozen model has nothing to differentiate: time the forward alone
                loss.backward()
        else:
            with torch.no_grad():
                model(example_input, task_ids)

    timings: dict[str, list[float]] = {m: [] for m in modes}
    try:
        model.train(backward)
        for mode in modes:
            set_execution(model, mode)
            for _ in range(warmup):
                step()
        for r in range(repeats):
            for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                set_execution(model, mode)
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                timings[mode].append((time.perf_counter() - start) * 1e3)
    finally:
        for p, g in zip(params, saved_grads):
            p.grad = g
        for m, training in saved_training:
            m.training = training
        with torch.no_grad():
            for b, value in saved_buffers:
                b.copy_(value)
    medians = {m: statistics.median(t) for m, t in timings.items()}
    chosen = min(modes, key=lambda m: medians[m])
    set_execution(model, chosen)
    return {"chosen": chosen, "timings_ms": medians, "device": str(device)}
