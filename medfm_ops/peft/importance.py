# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Importance of every weight of a network for a target task (SH-PEFT): task-driven and task-agnostic parts.

Plain PyTorch: a network, a loss and a data loader; no engine, no handler.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["IMPORTANCE_VARIANTS", "ImportanceEstimate", "default_prepare_batch", "estimate_importance"]

#: ``"l2"``: I_td = sum_b (dL_b/dw)^2, I_ta = w^2; ``"l1"``: I_td = |sum_b dL_b/dw|, I_ta = |w|
IMPORTANCE_VARIANTS = ("l2", "l1")


@dataclass
class ImportanceEstimate:
    """
    Task-driven and task-agnostic importance of every parameter entry, keyed by ``named_parameters()`` name.

    Attributes:
        task_driven: ``I_td`` per parameter (same shape): gradient statistics of the loss on the target data.
        task_agnostic: ``I_ta`` per parameter (same shape): weight magnitude (``w^2`` for l2, ``|w|`` for l1).
        variant: ``"l2"`` or ``"l1"``.
        num_batches: mini-batches the gradients were taken over.
        seconds: wall time of the estimation (forward + backward passes).
    """

    task_driven: dict[str, torch.Tensor]
    task_agnostic: dict[str, torch.Tensor]
    variant: str
    num_batches: int
    seconds: float

    @property
    def num_weights(self) -> int:
        """Number of weights scored (all entries of all parameters)."""
        return sum(t.numel() for t in self.task_agnostic.values())

    def release(self) -> None:
        """Drop the score tensors (two model-sized copies) once the masks are chosen; the timing fields stay."""
        self.task_driven, self.task_agnostic = {}, {}


def default_prepare_batch(batch: Any, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of a batch: ``batch["image"], batch["label"]`` for a dict, else ``batch[0], batch[1]``."""
    inputs, targets = (batch["image"], batch["label"]) if isinstance(batch, Mapping) else (batch[0], batch[1])
    return torch.as_tensor(inputs).to(device), torch.as_tensor(targets).to(device)


def estimate_importance(
    network: nn.Module,
    dataloader: Iterable,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    variant: str = "l2",
    num_batches: int | None = None,
    device: torch.device | str | None = None,
    prepare_batch: Callable[..., tuple[torch.Tensor, torch.Tensor]] = default_prepare_batch,
) -> ImportanceEstimate:
    """
    Gradient (task-driven) and magnitude (task-agnostic) importance of ALL parameter entries of ``network``:
    convolution and linear kernels, biases, normalisation weights, attention projections, embeddings.

    For each mini-batch ``b`` the loss ``L_b = loss_function(network(x_b), y_b)`` is back-propagated and

    - ``variant="l2"``: ``I_td = sum_b (dL_b/dw)^2``, ``I_ta = w^2``;
    - ``variant="l1"``: ``I_td = |sum_b dL_b/dw|``, ``I_ta = |w|``.

    The network runs in ``eval()`` mode (no dropout, normalisation statistics frozen) and is left exactly as it was:
    weights, buffers, ``requires_grad`` flags, gradients and train/eval mode are restored. Gradients are accumulated
    in the parameters' dtype; use a float64 network for an exact oracle.

    Args:
        network: the pretrained network (its current weights are scored).
        dataloader: the target task's mini-batches (e.g. the training loader).
        loss_function: ``loss_function(outputs, targets) -> scalar``, the training loss.
        variant: ``"l2"`` or ``"l1"``. Defaults to ``"l2"``.
        num_batches: stop after this many mini-batches. Defaults to None (one pass over ``dataloader``).
        device: device of the inputs. Defaults to None (the first parameter's device).
        prepare_batch: ``prepare_batch(batch, device) -> (inputs, targets)``. Defaults to
            :py:func:`default_prepare_batch` (``"image"`` / ``"label"`` keys, or a pair).

    Returns:
        an :class:`ImportanceEstimate` (scores on the parameters' devices, wall time in ``seconds``).

    Raises:
        ValueError: for an unknown ``variant``, ``num_batches < 1``, an empty ``dataloader``, or a non-finite
            loss (named with the batch index).

    Example::

        est = estimate_importance(net, train_loader, DiceCELoss(sigmoid=True), variant="l2", num_batches=20)
        masks = select_weights(est, budget=0.01)  # the 1% most important weights
    """
    if variant not in IMPORTANCE_VARIANTS:
        raise ValueError(f"variant must be one of {IMPORTANCE_VARIANTS}, got {variant!r}.")
    if num_batches is not None and int(num_batches) < 1:
        raise ValueError(f"num_batches must be >= 1 or None (one epoch), got {num_batches}.")
    params = dict(network.named_parameters())
    if not params:
        raise ValueError(f"network {type(network).__name__} has no parameters to score.")
    device = device if device is not None else next(iter(params.values())).device
    start = time.perf_counter()
    was_training = network.training
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    acc = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in params.items()}
    count = 0
    try:
        network.eval()
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for batch in dataloader:
            if num_batches is not None and count >= int(num_batches):
                break
            inputs, targets = prepare_batch(batch, device)
            loss = loss_function(network(inputs), targets)
            if not bool(torch.isfinite(loss.detach()).all()):
                raise ValueError(f"importance estimation: non-finite loss {loss.item()} at batch {count}.")
            loss.backward()
            for n, p in params.items():
                if p.grad is not None:
                    acc[n].add_(p.grad.square() if variant == "l2" else p.grad)
                    p.grad = None
            count += 1
    finally:
        network.train(was_training)
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
    if count == 0:
        raise ValueError("importance estimation: the dataloader gave no batch.")
    with torch.no_grad():
        task_driven = acc if variant == "l2" else {n: a.abs_() for n, a in acc.items()}
        task_agnostic = {n: (p.detach().square() if variant == "l2" else p.detach().abs()) for n, p in params.items()}
    return ImportanceEstimate(task_driven, task_agnostic, variant, count, time.perf_counter() - start)
