# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Whole parameter tensors chosen by name (full fine-tuning, linear probe, BitFit, adapters), with the interface of
:class:`~medfm_ops.peft.SparseParameters` so that one training config serves every method."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from medfm_ops.peft.norm_statistics import freeze_norm_statistics

__all__ = ["TensorSubset", "match_parameters"]


def match_parameters(names: Iterable[str], patterns: Sequence[str], what: str = "patterns") -> list[str]:
    """
    The names matching any of ``patterns`` (``fnmatch``, case-sensitive), in the order of ``names``.

    Raises:
        ValueError: when a pattern matches no name (naming it and a few of the names), so that a typo or a network
            without such layers fails loudly instead of training nothing.
    """
    names = list(names)
    if isinstance(patterns, str):
        patterns = [patterns]
    for p in patterns:
        if not any(fnmatchcase(n, p) for n in names):
            raise ValueError(f"{what}: pattern {p!r} matches no parameter; parameters are e.g. {names[:6]} "
                             f"({len(names)}).")  # fmt: skip
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]


class TensorSubset:
    """
    Train whole parameter tensors selected by name; freeze the others (``requires_grad=False``).

    Same interface as :class:`~medfm_ops.peft.SparseParameters` (``parameters``, ``attach``, ``masks``,
    ``num_selected``, ``num_weights``): a training config builds its optimiser over ``trainable.parameters()`` and
    calls ``trainable.attach(optimizer)`` whatever the method. Frozen tensors get no gradient, so no optimiser
    (momentum, weight decay) can change them.

    Args:
        network: the network (modified in place: ``requires_grad`` flags).
        include: ``fnmatch`` patterns of ``named_parameters()`` names to train, e.g. ``["*"]`` (full fine-tuning),
            ``["fc.*"]`` (linear probe), ``["*.bias", "fc.*"]`` (BitFit).
        exclude: patterns removed from the selection. Defaults to None.
        update_norm_stats: let BatchNorm (and tracked InstanceNorm) layers update their running statistics during
            training. False runs them in evaluation mode (:py:func:`~medfm_ops.peft.freeze_norm_statistics`): their
            buffers never change, as the linear probe, BitFit and LoRA rows require. Defaults to True (plain
            PyTorch behaviour; the SH-PEFT bundle passes False except for full fine-tuning).

    Raises:
        ValueError: when a pattern of ``include`` matches nothing, or nothing remains selected.

    Example::

        trainable = TensorSubset(net, include=["*.bias", "fc.*"])  # BitFit
        optimizer = trainable.attach(torch.optim.AdamW(trainable.parameters(), lr=1e-3))
    """

    def __init__(
        self, network: nn.Module, include: Sequence[str], exclude: Sequence[str] | None = None,
        update_norm_stats: bool = True,
    ) -> None:  # fmt: skip
        params = dict(network.named_parameters())
        chosen = set(match_parameters(params, include, "TensorSubset include"))
        if exclude:
            chosen -= set(match_parameters(params, exclude, "TensorSubset exclude"))
        if not chosen:
            raise ValueError(f"TensorSubset selects nothing (include {list(include)}, exclude {list(exclude or [])}).")
        self.network = network
        self.names = [n for n in params if n in chosen]
        for name, p in params.items():
            p.requires_grad_(name in chosen)
        self.update_norm_stats = bool(update_norm_stats)
        self._hooks = [] if self.update_norm_stats else freeze_norm_statistics(network)

    @property
    def num_selected(self) -> int:
        """Number of trainable entries."""
        params = dict(self.network.named_parameters())
        return sum(params[n].numel() for n in self.names)

    @property
    def num_weights(self) -> int:
        """Number of entries of all of the network's parameters."""
        return sum(p.numel() for p in self.network.parameters())

    def parameters(self) -> list[nn.Parameter]:
        """The trainable tensors (what the optimiser is built over)."""
        params = dict(self.network.named_parameters())
        return [params[n] for n in self.names]

    def masks(self) -> dict[str, torch.Tensor]:
        """``{name: bool mask}`` of every parameter: all True for a trainable tensor, all False for a frozen one."""
        chosen = set(self.names)
        return {
            n: torch.full(p.shape, n in chosen, dtype=torch.bool, device=p.device)
            for n, p in self.network.named_parameters()
        }

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Check that ``optimizer`` holds exactly :py:meth:`parameters` and return it (nothing to hook).

        Raises:
            ValueError: when it holds other tensors.
        """
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if held != {id(p) for p in self.parameters()}:
            raise ValueError(
                f"the optimizer must be built over trainable.parameters() ({len(self.names)} tensors), it holds "
                f"{len(held)}."
            )
        return optimizer

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_selected} of {self.num_weights} weights "
                f"({100.0 * self.num_selected / max(1, self.num_weights):.3g}%) in {len(self.names)} tensors, "
                f"update_norm_stats={self.update_norm_stats})")  # fmt: skip
