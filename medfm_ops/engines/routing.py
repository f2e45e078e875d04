# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Inference that routes each sample's task id (a segmentation region) to an expert network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer

__all__ = ["RoutedSlidingWindowInferer", "RoutedSimpleInferer"]


class RoutedSlidingWindowInferer(SlidingWindowInferer):
    """
    Sliding-window inference for ``network(windows, task_ids)``: each sample's task id is repeated for its windows.

    Called with the task ids as the extra positional argument (as produced by
    :class:`~medfm_ops.engines.TaskPrepareBatch`); called without it, it is MONAI's
    :class:`~monai.inferers.SlidingWindowInferer`. Takes the same arguments.
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not args:
            return super().__call__(inputs, network, **kwargs)
        task_ids, rest = torch.as_tensor(args[0]).view(-1), args[1:]
        outs = []
        for b in range(inputs.shape[0]):
            tid = task_ids[b : b + 1]

            def _predict(window: torch.Tensor, *a: Any, _tid: torch.Tensor = tid, **kw: Any) -> Any:
                return network(window, _tid.expand(window.shape[0]).to(window.device), *a, **kw)

            outs.append(super().__call__(inputs[b : b + 1], _predict, *rest, **kwargs))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class RoutedSimpleInferer(Inferer):
    """Whole-volume inference ``network(inputs, *args)`` (MONAI's SimpleInferer, explicit about the routing args)."""

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Sequence, **kwargs: Any) -> Any:
        return network(inputs, *args, **kwargs)
