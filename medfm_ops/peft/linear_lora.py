# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""LoRA on the ``nn.Linear`` layers of a network (attention and MLP projections of a ViT), fused back into stock
``nn.Linear`` layers. Convolutions have their LoRA in :py:func:`medfm_ops.finetune.add_lora` (EKS, one expert)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRALinear", "add_linear_lora", "fuse_linear_lora"]


class LoRALinear(nn.Module):
    """
    ``y = base(x) + (alpha / r) * x A^T B^T`` with a frozen ``base`` and trainable ``A (r, in)``, ``B (out, r)``;
    ``B`` starts at zero, so the layer initially equals ``base``.

    Args:
        base: the ``nn.Linear`` to adapt (kept as is, used by reference).
        rank: ``r``. Defaults to 8.
        alpha: scaling numerator. Defaults to 16.

    Raises:
        ValueError: when ``rank < 1``.

    Example::

        layer = LoRALinear(nn.Linear(64, 32), rank=4)
        layer(torch.zeros(2, 10, 64)).shape  # (2, 10, 32)
        plain = layer.fuse()  # nn.Linear with W0 + (alpha / r) B A
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if int(rank) < 1:
            raise ValueError(f"rank must be >= 1 for LoRA, got {rank}.")
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(self.rank, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, self.rank, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(*, in_features)`` -> ``(*, out_features)``."""
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def fuse(self) -> nn.Linear:
        """A new ``nn.Linear`` with kernel ``W0 + (alpha / r) B A`` and the base's bias (this layer unchanged)."""
        w = self.base.weight
        fused = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                          device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            fused.weight.copy_(w + (self.lora_B @ self.lora_A) * self.scaling)
            if self.base.bias is not None:
                fused.bias.copy_(self.base.bias)
        return fused


def _set(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def add_linear_lora(
    net: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    allow_none: bool = False,
) -> nn.Module:
    """
    A copy of ``net`` with every selected ``nn.Linear`` wrapped in :class:`LoRALinear`. Only the wrapping is done:
    which parameters train is the caller's choice (e.g. :class:`~medfm_ops.peft.TensorSubset` on ``*.lora_*``).

    Args:
        net: the network (not modified).
        rank: LoRA rank. Defaults to 8.
        alpha: scaling numerator. Defaults to 16.
        include: ``fnmatch`` patterns of module names to adapt. Defaults to None (every ``nn.Linear``).
        exclude: patterns of module names to leave as they are (e.g. the classifier head). Defaults to None.
        allow_none: return the copy unchanged when no layer matches (a CNN whose only linear layer is the
            excluded head). Defaults to False.

    Raises:
        ValueError: when no ``nn.Linear`` matches and ``allow_none`` is False.
    """
    net = copy.deepcopy(net)
    names = [
        n for n, m in net.named_modules()
        if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear)
        and (include is None or any(fnmatchcase(n, p) for p in include))
        and not any(fnmatchcase(n, p) for p in exclude or ())
    ]  # fmt: skip
    if not names and not allow_none:
        raise ValueError(
            f"add_linear_lora: no nn.Linear of {type(net).__name__} matches include={include}, exclude={exclude}."
        )
    for n in names:
        _set(net, n, LoRALinear(net.get_submodule(n), rank, alpha))
    return net


def fuse_linear_lora(net: nn.Module) -> nn.Module:
    """A copy of ``net`` with every :class:`LoRALinear` replaced by its fused ``nn.Linear`` (the stock layout again,
    same state-dict keys as before :py:func:`add_linear_lora`). A network without one is returned unchanged."""
    names = [n for n, m in net.named_modules() if isinstance(m, LoRALinear)]
    if not names:
        return net
    out = copy.deepcopy(net)
    for n in names:
        _set(out, n, out.get_submodule(n).fuse())
    return out
