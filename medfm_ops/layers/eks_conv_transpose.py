# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""EKS transposed convolution: ``nn.ConvTranspose{1,2,3}d`` with a shared kernel plus one low-rank expert per task."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfm_ops.layers.blocked_grouped_conv import blocked_grouped_conv
from medfm_ops.layers.eks_base import EKSLayer, _tuple
from medfm_ops.layers.expert_settings import DEFAULT_EXPERTS

__all__ = ["EKSConvTranspose"]

_CONV_T_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class EKSConvTranspose(EKSLayer):
    """
    Transposed convolution whose kernel for a sample of task ``t`` is ``W0 + delta W_t`` (low-rank ``delta W_t``).

    ``weight`` has the ``nn.ConvTranspose{1,2,3}d`` layout ``(C_in, C_out, *kernel_size)`` (so the expert factors
    are ``A_t: (r_t k_0, C_out k_1...)``, ``B_t: (C_in k_0, r_t k_0)``); a mixed-task batch runs as ONE grouped
    transposed convolution (``groups = B``, kernels ``(B * C_in, C_out, *kernel_size)``). The expert machinery is
    :class:`EKSLayer`'s; :meth:`fuse` returns a plain ``nn.ConvTranspose{1,2,3}d`` with the same stride, padding,
    output padding, dilation and bias. Only ``groups == 1`` and zero padding mode are supported, and ``forward``
    takes no ``output_size`` (set ``output_padding`` instead).

    On CPU, the input gradient of a grouped transposed convolution is a grouped convolution reading ``C_out``
    channels per group, which oneDNN runs 2x slower unless the channels are multiples of 8 (e.g. 12 output
    classes): grouped execution on CPU then runs through
    :func:`~medfm_ops.layers.blocked_grouped_conv.blocked_grouped_conv` (that gradient zero-padded; exact) when
    ``C_out >= CPU_CHANNEL_BLOCK``.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        kernel_size: kernel size.
        num_tasks: number of experts ``T``.
        ranks: rank of every expert, or one per expert (0: ``W0`` only). Defaults to 8.
        alpha: scaling numerator. Defaults to 16.
        stride: stride. Defaults to 1.
        padding: implicit zero padding removed from the output (``dilation * (k - 1) - padding`` added to the
            input), as in torch. Defaults to 0.
        output_padding: extra size added to one side of each output dimension. Defaults to 0.
        dilation: kernel dilation. Defaults to 1.
        kwargs: the remaining :class:`EKSLayer` arguments (``bias``, ``execution``, ``device``, ``dtype``, ...).

    Example::

        >>> up = EKSConvTranspose(3, 16, 8, 3, num_tasks=4, stride=2, padding=1, output_padding=1)
        >>> up(torch.randn(2, 16, 8, 8, 8), torch.tensor([0, 3])).shape
        torch.Size([2, 8, 16, 16, 16])
    """

    _STOCK_TYPES = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
    _GEOMETRY = ("stride", "padding", "output_padding", "dilation")
    #: per-group channel multiple of the CPU grouped execution (0 disables the padding)
    CPU_CHANNEL_BLOCK = 8

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
        padding: int | Sequence[int] = 0,
        output_padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        **kwargs,
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, kernel_size, num_tasks, ranks, alpha, **kwargs)
        self.stride = _tuple(stride, spatial_dims, "stride")
        self.padding = _tuple(padding, spatial_dims, "padding")
        self.output_padding = _tuple(output_padding, spatial_dims, "output_padding")
        self.dilation = _tuple(dilation, spatial_dims, "dilation")
        if any(op >= max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(
                f"output_padding {self.output_padding} must be smaller than stride {self.stride} or dilation "
                f"{self.dilation} in every dimension."
            )

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.out_channels, *self.kernel_size)

    def _operator(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1
    ) -> torch.Tensor:
        fn = _CONV_T_FNS[self.spatial_dims]
        return fn(x, weight, bias, self.stride, self.padding, self.output_padding, groups, self.dilation)

    def _forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        block, c_in, c_out = self.CPU_CHANNEL_BLOCK, self.in_channels, self.out_channels
        if x.device.type != "cpu" or not block or c_out < block or (c_in % block == 0 and c_out % block == 0):
            return super()._forward_grouped(x, weights, bias)
        return blocked_grouped_conv(x, weights, bias, self.stride, self.padding, self.dilation, self.output_padding,
                                    transposed=True, block=block)
