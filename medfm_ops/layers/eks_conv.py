# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""EKS convolution: ``nn.Conv{1,2,3}d`` with a shared kernel plus one low-rank expert per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfm_ops.layers.blocked_grouped_conv import blocked_grouped_conv
from medfm_ops.layers.eks_base import EKSLayer, _tuple
from medfm_ops.layers.expert_settings import DEFAULT_EXPERTS

__all__ = ["EKSConv"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class EKSConv(EKSLayer):
    """
    Convolution whose kernel for a sample of task ``t`` is ``W0 + delta W_t`` with a low-rank ``delta W_t``.

    ``weight`` has the ``nn.Conv{1,2,3}d`` layout ``(C_out, C_in, *kernel_size)``; a mixed-task batch runs as ONE
    grouped convolution (``groups = B``, kernels ``(B * C_out, C_in, *kernel_size)``). The expert machinery
    (factors, ranks, execution modes, :meth:`fuse` to a plain ``nn.Conv{1,2,3}d``) is :class:`EKSLayer`'s; see
    there for the remaining arguments. Only ``groups == 1`` convolutions with zero padding are supported:
    grouped/depthwise convolutions stay shared (:func:`medfm_ops.networks.to_experts` leaves them untouched).

    On CPU, oneDNN runs a grouped convolution and its input gradient on its fast blocked kernels only when the
    channels per group are multiples of 8; otherwise it falls back to a path measured 2-4x slower (e.g. 12 output
    classes). Grouped execution on CPU therefore runs such layers through
    :func:`~medfm_ops.layers.blocked_grouped_conv.blocked_grouped_conv` (channels zero-padded to multiples of
    :attr:`CPU_CHANNEL_BLOCK` for the forward pass and input gradient; exact) when ``C_in >= CPU_CHANNEL_BLOCK``
    (a stem with few input channels is faster as it is) and the padding is not ``"same"``.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        kernel_size: convolution kernel size.
        num_tasks: number of experts ``T``.
        ranks: rank of every expert, or one per expert (0: ``W0`` only). Defaults to 8.
        alpha: scaling numerator. Defaults to 16.
        stride: convolution stride. Defaults to 1.
        padding: zero padding, an int/sequence or ``"same"``/``"valid"``. Defaults to 0.
        dilation: kernel dilation. Defaults to 1.
        kwargs: the remaining :class:`EKSLayer` arguments (``bias``, ``execution``, ``device``, ``dtype``, ...).

    Example::

        >>> conv = EKSConv(3, 8, 16, 3, num_tasks=4, ranks=[8, 4, 0, 8], padding=1)
        >>> x = torch.randn(2, 8, 16, 16, 16)
        >>> conv(x, torch.tensor([0, 3])).shape
        torch.Size([2, 16, 16, 16, 16])
    """

    _STOCK_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    #: per-group channel multiple of the CPU grouped execution (0 disables the padding)
    CPU_CHANNEL_BLOCK = 8
    _GEOMETRY = ("stride", "padding", "dilation")

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        num_tasks: int,
        ranks: int | Sequence[int] = DEFAULT_EXPERTS.ranks,
        alpha: float = DEFAULT_EXPERTS.alpha,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        **kwargs,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, kernel_size, num_tasks, ranks, alpha, **kwargs)
        self.stride = _tuple(stride, spatial_dims, "stride")
        self.padding = padding if isinstance(padding, str) else _tuple(padding, spatial_dims, "padding")
        self.dilation = _tuple(dilation, spatial_dims, "dilation")

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def _operator(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1
    ) -> torch.Tensor:
        return _CONV_FNS[self.spatial_dims](x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def _forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        block, c_in, c_out = self.CPU_CHANNEL_BLOCK, self.in_channels, self.out_channels
        if x.device.type != "cpu" or not block or c_in < block or self.padding == "same":
            return super()._forward_grouped(x, weights, bias)
        if c_in % block == 0 and c_out % block == 0:
            return super()._forward_grouped(x, weights, bias)
        padding = (0,) * self.spatial_dims if self.padding == "valid" else self.padding
        return blocked_grouped_conv(x, weights, bias, self.stride, padding, self.dilation, block=block)
