# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A per-sample-kernel (grouped) convolution laid out for oneDNN's fast CPU kernels.

oneDNN (torch's CPU convolution backend) runs a grouped convolution, and the input gradient of a grouped
convolution or transposed convolution, on its fast blocked kernels only when the channels per group are multiples
of the SIMD block (8 floats with AVX2); otherwise it falls back to a path measured 2-4x slower on these machines
(e.g. 12 output classes at 32^3). A transposed convolution's forward pass, and anything over 1 or 2 input channels
(the image itself), are as fast or faster unpadded. :func:`blocked_grouped_conv` therefore zero-pads the channels
where that pays (a convolution's forward pass; the input and weight gradients of both kinds, computed in one call)
and leaves the rest unpadded. Zero channels add exact zeros, so the result equals the plain grouped call
(``groups = B``) up to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["blocked_grouped_conv"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FNS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _pad(t: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
    """Zero-pad dimension ``dim`` of ``t`` by ``pad`` at its end."""
    return t if pad == 0 else F.pad(t, (0, 0) * (t.dim() - 1 - dim) + (0, pad))


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, *rest)`` -> ``(1, B * C, *rest)`` (inputs and outputs) or ``(B * C, *rest)`` (kernels: 2 + k dims)."""
    return t.reshape(1, -1, *t.shape[2:])


def _input_pad(c_in: int, block: int) -> int:
    """Zero input channels to add in a convolution's forward pass: none for 1 or 2 channels (a one-channel image
    padded to 8 made the first layer's grouped call 1.6-2x slower, 25 vs 15 ms at 1->16 channels, 32^3, batch 4, one
    thread: the unpadded grouped call is then as fast as the plain one), else up to a multiple of ``block``."""
    return 0 if c_in <= 2 else -c_in % block


class _BlockedGroupedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, bias, stride, padding, dilation, output_padding, transposed, block):
        b, c_in, d = x.shape[0], x.shape[1], x.dim() - 2
        c_out = weights.shape[2] if transposed else weights.shape[1]
        bias_b = None if bias is None else bias.repeat(b)
        if transposed:  # unpadded: as fast
            w = weights.reshape(-1, *weights.shape[2:])
            out = _CONV_T_FNS[d](_grouped(x), w, bias_b, stride, padding, output_padding, b, dilation)
            out = out.view(b, c_out, *out.shape[2:])
        else:  # padded: the fast blocked kernel (input channels only from 3 on: see _input_pad)
            pad_in, pad_out = _input_pad(c_in, block), -c_out % block
            wp = _pad(_pad(weights, 2, pad_in), 1, pad_out)
            bp = None if bias is None else _pad(bias, 0, pad_out).repeat(b)
            out = _CONV_FNS[d](_grouped(_pad(x, 1, pad_in)), wp.reshape(-1, *wp.shape[2:]), bp, stride, padding,
                               dilation, b)
            out = out.view(b, c_out + pad_out, *out.shape[2:])[:, :c_out]
        ctx.save_for_backward(x, weights)
        ctx.conf = (stride, padding, dilation, output_padding, transposed, block, bias is not None)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weights = ctx.saved_tensors
        stride, padding, dilation, output_padding, transposed, block, has_bias = ctx.conf
        b, c_in, d = x.shape[0], x.shape[1], x.dim() - 2
        c_out = grad.shape[1]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            # both gradients in one padded call (input channels from 3 on, see _input_pad): the padded weight
            # gradient of 12 -> 12 channels at 32^3 took 22 instead of 38 ms unpadded (AVX-512 Xeon, 2 threads);
            # block 16 instead of 8 made the whole lorkd_seg training step slower there (1.36x vs 1.13x the plain's)
            pad_in, pad_out = _input_pad(c_in, block), -c_out % block
            dim_in, dim_out = (1, 2) if transposed else (2, 1)  # kernel dims of C_in and C_out per sample
            wp = _pad(_pad(weights, dim_in, pad_in), dim_out, pad_out)
            gx, gw, _ = torch.ops.aten.convolution_backward(
                _grouped(_pad(grad, 1, pad_out)), _grouped(_pad(x, 1, pad_in)), wp.reshape(-1, *wp.shape[2:]), None,
                stride, padding, dilation, transposed, output_padding if transposed else (0,) * d, b,
                (ctx.needs_input_grad[0], ctx.needs_input_grad[1], False),
            )
            if ctx.needs_input_grad[0]:
                grad_x = gx.reshape(b, c_in + pad_in, *x.shape[2:])[:, :c_in]
            if ctx.needs_input_grad[1]:
                gw = gw.view(wp.shape)
                grad_w = gw[:, :c_in, :c_out] if transposed else gw[:, :c_out, :c_in]
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(0, *range(2, grad.dim())))
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def blocked_grouped_conv(
    x: torch.Tensor,
    weights: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    output_padding: Sequence[int] | None = None,
    transposed: bool = False,
    block: int = 8,
) -> torch.Tensor:
    """
    Convolve (or transposed-convolve) every sample with its own kernel in one grouped call, channels zero-padded to
    multiples of ``block`` where oneDNN's fast kernels need it (see the module docstring).

    Args:
        x: input ``(B, C_in, *spatial)``.
        weights: per-sample kernels ``(B, C_out, C_in, *kernel_size)``, or ``(B, C_in, C_out, *kernel_size)`` when
            ``transposed``.
        bias: ``(C_out,)`` shared by all samples, or None.
        stride: stride per spatial dimension.
        padding: zero padding per spatial dimension (ints, not ``"same"``).
        dilation: dilation per spatial dimension.
        output_padding: output padding of a transposed convolution. Defaults to zeros.
        transposed: transposed convolution. Defaults to False.
        block: channel multiple. Defaults to 8.

    Returns:
        ``(B, C_out, *spatial_out)`` (for a convolution, a view with the padded channels sliced off).
    """
    d = x.dim() - 2
    output_padding = (0,) * d if output_padding is None else tuple(output_padding)
    return _BlockedGroupedConv.apply(
        x, weights, bias, tuple(stride), tuple(padding), tuple(dilation), output_padding, transposed, block
    )
