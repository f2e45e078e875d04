# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""LoRA fine-tuning of a stock network as an EKS network with one expert, fused back into the stock class."""

from __future__ import annotations

from collections.abc import Sequence

import os

import torch
from torch import nn

from medfm_ops.utils.atomic_io import atomic_torch_save

from medfm_ops.networks import backbone_parameters, export_expert, expert_parameters, to_experts

__all__ = [
    "FINETUNE_MODES",
    "SingleTaskAdapter",
    "add_lora",
    "fuse_lora",
    "check_mode",
    "save_fused_lora",
    "trainable_parameters",
]

#: fine-tuning modes: all weights, LoRA adapters fused back, or SH-PEFT (the most important weights only)
FINETUNE_MODES = ("full", "lora", "sparse")


def check_mode(mode: str) -> str:
    """
    Validate a fine-tuning mode.

    Raises:
        ValueError: for a mode not in :data:`FINETUNE_MODES`.
    """
    if mode not in FINETUNE_MODES:
        raise ValueError(f"mode must be one of {FINETUNE_MODES}, got {mode!r}.")
    return mode


class SingleTaskAdapter(nn.Module):
    """
    A network converted by :py:func:`~medfm_ops.networks.to_experts` with ONE expert, called as ``net(x)``: every
    sample is routed to expert 0, i.e. every converted convolution runs ``W0 + (alpha / r) B A`` (LoRA).

    Args:
        model: an :class:`~medfm_ops.networks.ExpertNetwork` with ``num_tasks == 1``.

    Raises:
        ValueError: when ``model`` has more than one expert.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, "num_tasks", None) != 1:
            raise ValueError(f"SingleTaskAdapter needs an ExpertNetwork with one expert, got {model!r:.80}.")
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial)`` -> the wrapped network's output with the adapters applied."""
        return self.model(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


def add_lora(
    net: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> SingleTaskAdapter:
    """
    Add one LoRA adapter to every eligible convolution of ``net`` (a copy) and freeze everything else.

    This is :py:func:`~medfm_ops.networks.to_experts` with ``num_tasks=1``: ``B`` starts at zero, so the adapted
    network initially equals ``net``. Eligible are the ``groups == 1`` convolutions, transposed ones included (use
    ``exclude`` to leave some without adapter). All backbone parameters (kernels, biases, norms) get
    ``requires_grad=False``; only the ``lora_A``/``lora_B`` factors train.

    Args:
        net: a stock network (e.g. MONAI ``UNet``); not modified.
        rank: adapter rank ``r``. Defaults to 8 (the 3D LoRKD setting).
        alpha: scaling numerator (``alpha / r``). Defaults to 16.
        include: ``fnmatch`` patterns of module names to adapt. Defaults to None (all eligible convolutions).
        exclude: patterns of module names to leave without adapter. Defaults to None.

    Raises:
        ValueError: when ``rank < 1`` or no convolution matches.

    Example::

        adapted = add_lora(UNet(3, 1, 2, (16, 32, 64), (2, 2)), rank=8)
        stock = fuse_lora(adapted)  # a UNet again, W0 + delta W in its kernels
    """
    if int(rank) < 1:
        raise ValueError(f"rank must be >= 1 for LoRA, got {rank}.")
    model = to_experts(net, num_tasks=1, ranks=int(rank), alpha=alpha, include=include, exclude=exclude)
    for p in backbone_parameters(model):
        p.requires_grad_(False)
    for p in expert_parameters(model):
        p.requires_grad_(True)
    return SingleTaskAdapter(model)


def fuse_lora(adapter: nn.Module) -> nn.Module:
    """
    The stock network (an instance of the ORIGINAL class, same state-dict keys) with every adapter merged into its
    kernel: ``W = W0 + (alpha / r) B A``. The adapter is not modified; the result's parameters all require grad.
    A network without adapters (full fine-tuning) is returned as is.
    """
    if isinstance(adapter, SingleTaskAdapter):
        return export_expert(adapter.model, 0)
    return adapter


def trainable_parameters(net: nn.Module) -> list[nn.Parameter]:
    """The parameters with ``requires_grad`` (what the optimiser updates)."""
    return [p for p in net.parameters() if p.requires_grad]


def save_fused_lora(
    adapter: nn.Module, adapter_checkpoint: str | os.PathLike, model_path: str | os.PathLike
) -> nn.Module:
    """
    Load the best adapter weights saved during training into ``adapter``, merge them
    (:py:func:`fuse_lora`) and write the stock state dict to ``model_path`` atomically (non-finite weights refused).
    Used as the ``finalize`` step of an expert bundle's ``configs/train_lora.json``.

    Raises:
        FileNotFoundError: when ``adapter_checkpoint`` is missing (training never validated).
    """
    if not os.path.isfile(adapter_checkpoint):
        raise FileNotFoundError(
            f"no adapter checkpoint at {adapter_checkpoint}: the run never validated (val_interval > epochs?)."
        )
    state = torch.load(adapter_checkpoint, map_location="cpu", weights_only=True)
    adapter.load_state_dict(state.get("model", state) if isinstance(state.get("model"), dict) else state)
    merged = fuse_lora(adapter)
    atomic_torch_save({k: v.detach().cpu() for k, v in merged.state_dict().items()}, model_path)
    return merged
