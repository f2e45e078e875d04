# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A per-sample-kernel (grouped) convolution laid out for oneDNN's fast CPU kernels.

oneDNN (torch's CPU convolution backend) runs a grouped convolution's forward pass and input gradient on its fast
blocked kernels only when the channels per group are multiples of the SIMD block (8 floats with AVX2); otherwise
it falls back to a path measured 2-4x slower on these machines (e.g. 12 output classes at 32^3). Its weight
gradient, in contrast, is as fast or faster unpadded. :func:`blocked_grouped_conv` therefore zero-pads the
channels for the forward pass and the input gradient and computes the weight gradient unpadded. Zero channels add
exact zeros, so the result equals ``F.conv{d}d(x.reshape(1, B * C_in, ...), weights.reshape(B * C_out, ...),
groups=B)`` up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn import grad as conv_grad

__all__ = ["blocked_grouped_conv"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_INPUT_GRADS = {1: conv_grad.conv1d_input, 2: conv_grad.conv2d_input, 3: conv_grad.conv3d_input}
_WEIGHT_GRADS = {1: conv_grad.conv1d_weight, 2: conv_grad.conv2d_weight, 3: conv_grad.conv3d_weight}


def _pad_channels(t: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Zero-pad dimension ``dim`` of ``t`` by ``pad`` at its end."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (0, pad))


class _BlockedGroupedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, bias, stride, padding, dilation, block):
        b, c_in, c_out, d = x.shape[0], x.shape[1], weights.shape[1], x.dim() - 2
        pad_in, pad_out = -c_in % block, -c_out % block
        xp = _pad_channels(x, 1, pad_in).reshape(1, b * (c_in + pad_in), *x.shape[2:])
        wp = _pad_channels(_pad_channels(weights, 2, pad_in), 1, pad_out)
        bp = None if bias is None else _pad_channels(bias, 0, pad_out).repeat(b)
        out = _CONV_FNS[d](xp, wp.reshape(-1, *wp.shape[2:]), bp, stride, padding, dilation, b)
        ctx.save_for_backward(x, weights)
        ctx.conf = (stride, padding, dilation, block, bias is not None)
        return out.view(b, c_out + pad_out, *out.shape[2:])[:, :c_out]

    @staticmethod
    def backward(ctx, grad):
        x, weights = ctx.saved_tensors
        stride, padding, dilation, block, has_bias = ctx.conf
        b, c_in, c_out, d = x.shape[0], x.shape[1], weights.shape[1], x.dim() - 2
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # padded: the fast blocked kernel
            pad_in, pad_out = -c_in % block, -c_out % block
            wp = _pad_channels(_pad_channels(weights, 2, pad_in), 1, pad_out)
            gp = _pad_channels(grad, 1, pad_out).reshape(1, -1, *grad.shape[2:])
            size = (1, b * (c_in + pad_in), *x.shape[2:])
            grad_x = _INPUT_GRADS[d](size, wp.reshape(-1, *wp.shape[2:]), gp, stride, padding, dilation, b)
            grad_x = grad_x.view(b, c_in + pad_in, *x.shape[2:])[:, :c_in]
        if ctx.needs_input_grad[1]:  # unpadded: as fast or faster
            size = (b * c_out, *weights.shape[2:])
            g = grad.reshape(1, b * c_out, *grad.shape[2:])
            grad_w = _WEIGHT_GRADS[d](x.reshape(1, b * c_in, *x.shape[2:]), size, g, stride, padding, dilation, b)
            grad_w = grad_w.view(weights.shape)
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, *range(2, grad.dim())))
        return grad_x, grad_w, grad_b, None, None, None, None


def blocked_grouped_conv(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    block: int = 8,
) -> torch.Tensor:
    """
    Convolve every sample with its own kernel in one grouped call, channels padded to multiples of ``block`` for the
    forward pass and the input gradient (see the module docstring).

    Args:
        x: input ``(B, C_in, *spatial)``.
        weights: per-sample kernels ``(B, C_out, C_in, *kernel_size)``.
        bias: ``(C_out,)`` shared by all samples, or None.
        stride: stride per spatial dimension.
        padding: zero padding per spatial dimension (ints, not ``"same"``).
        dilation: dilation per spatial dimension.
        block: channel multiple. Defaults to 8.

    Returns:
        ``(B, C_out, *spatial_out)`` (a view with the padded channels sliced off).
    """
    return _BlockedGroupedConv.apply(x, weights, bias, tuple(stride), tuple(padding), tuple(dilation), block)
