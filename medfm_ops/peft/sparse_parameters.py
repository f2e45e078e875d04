# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Masked training of a stock network: the optimiser sees only the selected weights, so frozen weights never change."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from medfm_ops.peft.norm_statistics import freeze_norm_statistics

__all__ = ["SparseParameters"]


class SparseParameters:
    """
    The selected entries of a network's parameters as small trainable tensors: the network stays the stock network,
    the optimiser is built over :py:meth:`parameters` (one 1D tensor of ``k_i`` values per masked parameter), and
    after every optimiser step the new values are written into the selected entries of the network's weights.

    Frozen entries are never written, whatever the optimiser does (momentum, coupled or decoupled weight decay,
    AdamW, schedulers): they stay bit-for-bit the starting weights. Masking gradients alone is not enough, because
    weight decay and momentum move weights whose gradient is zero. Memory: the network's weights once, the flat
    indices of the selected entries, and optimiser state for the selected entries only (AdamW keeps two moments of
    ``k`` values instead of two copies of the model).

    Mechanics: a post-accumulate-grad hook on each masked parameter gathers its gradient at the selected entries
    into the small tensor's ``.grad`` and drops the dense gradient; :py:meth:`attach` adds an optimiser step
    pre-hook (re-reads the current weights into the small tensors, so a checkpoint loaded into the network is
    respected) and a post-hook (writes the updated values back). Parameters without a selected entry get
    ``requires_grad=False`` (no weight gradient is computed for them).

    Args:
        network: the stock network (modified in place by training; no copy is made).
        masks: ``{name: bool tensor}`` over ``network.named_parameters()`` names (e.g.
            :py:func:`~medfm_ops.peft.select_weights`); a missing name is frozen entirely.
        update_norm_stats: let BatchNorm (and tracked InstanceNorm) layers update their running statistics during
            training, as plain ``train()`` mode does. False runs them in evaluation mode
            (:py:func:`~medfm_ops.peft.freeze_norm_statistics`): their buffers never change, as a row that claims
            to train only the selected weights requires. Defaults to True (plain PyTorch behaviour; the SH-PEFT
            bundle passes False).

    Raises:
        ValueError: for a mask that names no parameter, has the wrong shape or dtype, selects nothing at all, or a
            non-contiguous masked parameter.

    Example::

        sparse = SparseParameters(net, select_weights(estimate_importance(net, loader, loss), budget=0.01))
        optimizer = sparse.attach(torch.optim.AdamW(sparse.parameters(), lr=1e-3, weight_decay=1e-2))
        ...  # the usual loop: optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(self, network: nn.Module, masks: Mapping[str, torch.Tensor], update_norm_stats: bool = True) -> None:
        params = dict(network.named_parameters())
        unknown = sorted(set(masks) - set(params))
        if unknown:
            raise ValueError(f"masks name parameters the network does not have: {unknown[:5]} ({len(unknown)}).")
        self.network = network
        self._params: dict[str, nn.Parameter] = {}
        self._indices: dict[str, torch.Tensor] = {}
        self._values: dict[str, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        for name, p in params.items():
            mask = masks.get(name)
            if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != tuple(p.shape)):
                raise ValueError(
                    f"mask of {name!r} must be a bool tensor of shape {tuple(p.shape)}, got {mask.dtype} "
                    f"{tuple(mask.shape)}."
                )
            if mask is None or not bool(mask.any()):
                p.requires_grad_(False)
                continue
            if not p.is_contiguous():
                raise ValueError(f"parameter {name!r} is not contiguous: use network.to(memory_format=contiguous_format).")
            idx = torch.nonzero(mask.reshape(-1).to(p.device)).flatten()
            p.requires_grad_(True)
            self._params[name], self._indices[name] = p, idx
            self._values[name] = p.detach().reshape(-1).index_select(0, idx).clone().requires_grad_(True)
            self._hooks.append(p.register_post_accumulate_grad_hook(self._gather_hook(name)))
        if not self._params:
            raise ValueError("masks select no weight: pass at least one True entry (budget > 0).")
        self.update_norm_stats = bool(update_norm_stats)
        if not self.update_norm_stats:
            self._hooks.extend(freeze_norm_statistics(network))

    # ------------------------------------------------------------------------------------------------ queries
    @property
    def num_selected(self) -> int:
        """Number of trainable entries (the budget)."""
        return sum(int(i.numel()) for i in self._indices.values())

    @property
    def num_weights(self) -> int:
        """Number of entries of all of the network's parameters."""
        return sum(p.numel() for p in self.network.parameters())

    def parameters(self) -> list[torch.Tensor]:
        """The small trainable tensors, one per masked parameter (what the optimiser is built over)."""
        return list(self._values.values())

    def indices(self) -> dict[str, torch.Tensor]:
        """``{name: flat (row-major) indices of the selected entries}``, sorted."""
        return dict(self._indices)

    def masks(self) -> dict[str, torch.Tensor]:
        """``{name: bool mask}`` of every parameter (all False for a frozen one)."""
        out = {}
        for name, p in self.network.named_parameters():
            m = torch.zeros(p.numel(), dtype=torch.bool, device=p.device)
            if name in self._indices:
                m[self._indices[name]] = True
            out[name] = m.reshape(p.shape)
        return out

    # ------------------------------------------------------------------------------------------------- hooks
    def _gather_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if self._optimizer is None:
                raise RuntimeError(
                    f"SparseParameters: a gradient reached {name!r} but no optimiser is attached: build the optimiser "
                    "over sparse.parameters() and call sparse.attach(optimizer)."
                )
            g = p.grad.reshape(-1).index_select(0, self._indices[name])
            v = self._values[name]
            v.grad = g if v.grad is None else v.grad.add_(g)
            p.grad = None  # the dense gradient is not kept

        return hook

    def _read(self, *args: Any) -> None:
        with torch.no_grad():
            for name, p in self._params.items():
                self._values[name].copy_(p.detach().reshape(-1).index_select(0, self._indices[name]))

    def _write(self, *args: Any) -> None:
        with torch.no_grad():
            for name, p in self._params.items():
                p.detach().view(-1).index_copy_(0, self._indices[name], self._values[name].detach())

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """
        Connect ``optimizer`` (built over :py:meth:`parameters`): each ``step()`` re-reads the selected weights,
        updates them and writes them back into the network. Returns ``optimizer`` (still a stock optimiser, so LR
        schedulers and checkpointing work unchanged).

        Raises:
            ValueError: when ``optimizer`` does not hold exactly :py:meth:`parameters`, or another one is attached.
        """
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if held != {id(v) for v in self._values.values()}:
            raise ValueError(
                "the optimizer must be built over sparse.parameters() (the selected entries), not the network's "
                f"parameters: it holds {len(held)} tensors, expected {len(self._values)}."
            )
        if self._optimizer is not None and self._optimizer is not optimizer:
            raise ValueError("another optimizer is already attached to these SparseParameters.")
        if self._optimizer is None:
            self._hooks.append(optimizer.register_step_pre_hook(self._read))
            self._hooks.append(optimizer.register_step_post_hook(self._write))
        self._optimizer = optimizer
        return optimizer

    def detach(self) -> None:
        """Remove every hook, the frozen normalisation statistics' included (the network is then an ordinary network
        again; its weights are kept)."""
        for h in self._hooks:
            h.remove()
        self._hooks, self._optimizer = [], None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.num_selected} of {self.num_weights} weights "
            f"({100.0 * self.num_selected / max(1, self.num_weights):.3g}%) in {len(self._params)} tensors, "
            f"update_norm_stats={self.update_norm_stats})"
        )
