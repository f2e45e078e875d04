# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Keep the running statistics of a network's normalisation layers fixed while it trains (PEFT rows that claim to
train only a subset of the weights must not adapt the BatchNorm statistics either)."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["freeze_norm_statistics", "norm_statistics_layers"]


def norm_statistics_layers(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` of every normalisation layer of ``network`` that keeps running statistics (BatchNorm,
    SyncBatchNorm, InstanceNorm with ``track_running_stats=True``)."""
    return [
        (n, m) for n, m in network.named_modules()
        if isinstance(m, (_BatchNorm, _InstanceNorm)) and m.track_running_stats
    ]  # fmt: skip


def _eval_mode(module: nn.Module, args: Any) -> None:
    module.training = False


def freeze_norm_statistics(network: nn.Module) -> list[Any]:
    """
    Make every layer of :func:`norm_statistics_layers` run in evaluation mode, whatever ``network.train()`` says:
    it normalises with its stored running statistics and never updates them (``running_mean``, ``running_var``,
    ``num_batches_tracked`` stay bit-for-bit). Its affine weight and bias still train if the optimiser holds them.
    Done with a forward pre-hook per layer (an engine calling ``network.train()`` every epoch cannot undo it).

    Args:
        network: the network (hooks are added in place).

    Returns:
        the hook handles; ``handle.remove()`` restores the usual behaviour.

    Example::

        handles = freeze_norm_statistics(net)  # training now leaves the BatchNorm buffers as they were
    """
    return [m.register_forward_pre_hook(_eval_mode) for _, m in norm_statistics_layers(network)]
