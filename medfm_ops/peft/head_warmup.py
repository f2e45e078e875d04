# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Fit a new task head on frozen features before sparse fine-tuning (linear probe, then SH-PEFT).

With a freshly initialised head the task-driven importance ``I_td`` of every backbone weight is the gradient of a
loss seen through random class directions; fitting the head first makes that gradient the task's. Plain PyTorch: a
network, a loss and a data loader; no engine, no handler.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .importance import default_prepare_batch

__all__ = ["fit_head"]


def fit_head(
    network: nn.Module,
    head_name: str,
    dataloader: Iterable,
    loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    learning_rate: float,
    weight_decay: float = 0.0,
    device: torch.device | str | None = None,
    prepare_batch: Callable[..., tuple[torch.Tensor, torch.Tensor]] = default_prepare_batch,
) -> nn.Module:
    """
    Train only the parameters of the module ``head_name`` (e.g. ``"fc"``) for ``epochs`` passes over ``dataloader``
    with AdamW, every other weight frozen and the network in ``eval()`` mode: normalisation statistics and dropout do
    not change, so the backbone leaves bit for bit as it came. ``requires_grad`` flags, gradients and the train/eval
    mode are restored. ``epochs=0`` returns the network untouched (the data loader is not read).

    Args:
        network: the network with its new head (trained in place).
        head_name: name of the head module in ``network.named_modules()``.
        dataloader: the target task's training mini-batches, inputs ``(B, C, *spatial)``, targets ``(B,)``.
        loss_function: ``loss_function(logits (B, K), targets (B,)) -> scalar``, the training loss.
        epochs: passes over ``dataloader`` (>= 0).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay. Defaults to 0.0.
        device: device of the inputs. Defaults to None (the first parameter's device).
        prepare_batch: ``prepare_batch(batch, device) -> (inputs, targets)``. Defaults to
            :py:func:`~medfm_ops.peft.default_prepare_batch`.

    Returns:
        ``network`` (the same object), its head fitted.

    Raises:
        ValueError: for ``epochs < 0``, a ``head_name`` that is not a module of ``network`` or has no parameters,
            an empty ``dataloader``, or a non-finite loss (named with the epoch and batch).

    Example::

        fit_head(net, "fc", train_loader, torch.nn.CrossEntropyLoss(), epochs=5, learning_rate=1e-3)
        estimate = estimate_importance(net, train_loader, torch.nn.CrossEntropyLoss())  # with the fitted head
    """
    if int(epochs) < 0:
        raise ValueError(f"head warm-up epochs must be >= 0, got {epochs}.")
    modules = dict(network.named_modules())
    if head_name not in modules:
        raise ValueError(f"head {head_name!r} is not a module of {type(network).__name__}.")
    head = list(modules[head_name].parameters())
    if not head:
        raise ValueError(f"head {head_name!r} of {type(network).__name__} has no parameters to fit.")
    if int(epochs) == 0:
        return network
    logger = logging.getLogger("medfm.peft")
    params = dict(network.named_parameters())
    device = device if device is not None else next(iter(params.values())).device
    head_ids = {id(p) for p in head}
    flags = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    was_training = network.training
    optimizer = torch.optim.AdamW(head, lr=float(learning_rate), weight_decay=float(weight_decay))
    start = time.perf_counter()
    try:
        network.eval()
        for p in params.values():
            p.requires_grad_(id(p) in head_ids)
            p.grad = None
        for epoch in range(1, int(epochs) + 1):
            total, count = 0.0, 0
            for batch in dataloader:
                inputs, targets = prepare_batch(batch, device)
                loss = loss_function(network(inputs), targets)
                if not bool(torch.isfinite(loss.detach()).all()):
                    raise ValueError(f"head warm-up: non-finite loss {loss.item()} at epoch {epoch}, batch {count}.")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()), count + 1
            if count == 0:
                raise ValueError("head warm-up: the data loader gave no batch.")
            logger.info(f"head warm-up ({head_name}) epoch {epoch}/{epochs}: mean loss {total / count:.4f}")
    finally:
        network.train(was_training)
        for n, p in params.items():
            p.requires_grad_(flags[n])
            p.grad = grads[n]
    logger.info(f"head warm-up ({head_name}): {epochs} epoch(s) in {time.perf_counter() - start:.1f} s")
    return network

