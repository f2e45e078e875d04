# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Explicit per-call routing of per-sample task ids to the expert layers of a network."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["TaskRouting", "checked_task_ids"]

# Serialises hook registration and removal across threads: nn.DataParallel replicas share their modules' hook
# dictionaries (``Module._replicate_for_data_parallel`` copies ``__dict__`` shallowly), and torch numbers hook
# handles with an unlocked class counter, so two replicas registering at once could otherwise get the same id.
_HOOK_LOCK = threading.Lock()


def checked_task_ids(task_ids: Any, x: torch.Tensor, num_tasks: int, what: str = "experts") -> torch.Tensor:
    """
    ``task_ids`` as a ``(B,)`` long tensor on ``x``'s device, checked against the batch of ``x`` ``(B, ...)``.

    Raises:
        ValueError: when there is not one task id per sample.
        IndexError: when a task id is outside ``0..num_tasks-1`` (the message names ``what`` is routed, e.g.
            ``"experts"``, ``"task heads"``).
    """
    task_ids = torch.as_tensor(task_ids, device=x.device).long().view(-1)
    if task_ids.numel() != x.shape[0]:
        raise ValueError(f"task_ids has {task_ids.numel()} entries for a batch of {x.shape[0]} samples.")
    if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= num_tasks):
        raise IndexError(f"task ids {task_ids.tolist()} out of range for {num_tasks} {what}.")
    return task_ids


class TaskRouting:
    """
    Pass ``task_ids`` to every given layer for the duration of one ``with`` block (one network forward call).

    On entry a forward pre-hook (``with_kwargs=True``) is registered on each layer; it adds the keyword argument
    ``task_ids`` to the layer's call unless the caller already passed task ids (positionally or by keyword). On
    exit, also when the forward raises, every hook is removed: the layers keep no routing attribute or hook
    between calls. The wrapped network's code is unchanged (it calls its layers as ``layer(x)``).

    This object is the only owner of the routing state, and it lives for one call: every DistributedDataParallel
    process and every nn.DataParallel replica routes its own batch. DataParallel replicas share their hook
    dictionaries with the original module, so a hook acts on the exact layer objects it was created for and does
    nothing on any other module.

    ``task_ids=None`` registers nothing (the layers run their shared weights).

    Args:
        layers: the modules to route, each with a ``forward(x, task_ids=None)`` signature (e.g. the
            EKS layers of a network, see :func:`~medfm_ops.networks.eks_layers`).
        task_ids: ``(B,)`` integer task of every sample of the batch, or None.

    Example::

        >>> from monai.networks.nets import UNet
        >>> model = to_experts(UNet(3, 1, 2, (8, 16), (2,)), num_tasks=4)
        >>> with TaskRouting([layer for _, layer in eks_layers(model)], torch.tensor([0, 3])):
        ...     out = model.net(torch.randn(2, 1, 16, 16, 16))
    """

    def __init__(self, layers: Iterable[nn.Module], task_ids: torch.Tensor | None) -> None:
        self.layers = tuple(layers)
        self.task_ids = task_ids
        self._routed = {id(layer) for layer in self.layers}
        self._handles: list[RemovableHandle] = []

    def _inject(self, module: nn.Module, args: tuple, kwargs: dict[str, Any] | None = None) -> tuple | None:
        # kwargs is None only when another thread removed this hook while a shared hook dict was being iterated
        if kwargs is None or id(module) not in self._routed or len(args) > 1 or "task_ids" in kwargs:
            return None
        return args, {**kwargs, "task_ids": self.task_ids}

    def __enter__(self) -> TaskRouting:
        if self._handles:
            raise RuntimeError("TaskRouting is already active: use one instance per forward call.")
        if self.task_ids is None:
            return self
        with _HOOK_LOCK:
            try:
                for layer in self.layers:
                    self._handles.append(layer.register_forward_pre_hook(self._inject, with_kwargs=True))
            except BaseException:
                self._remove()
                raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        with _HOOK_LOCK:
            self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
