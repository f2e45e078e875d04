# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The conv - batch norm - activation unit of the light classification students (ShuffleNetV2, MobileNetV2)."""

from __future__ import annotations

from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Norm

__all__ = ["conv_norm_act"]


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: str | tuple | None = None,
) -> Convolution:
    """
    MONAI's :class:`~monai.networks.blocks.Convolution` as the students use it: a bias-free convolution with "same"
    padding, batch norm, then ``act`` (none by default). ``groups == in_channels`` makes it depthwise (such convs stay
    shared when the network is converted with :func:`~medfm_ops.networks.to_experts`).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size. Defaults to 3.
        stride: stride. Defaults to 1.
        groups: convolution groups. Defaults to 1.
        act: activation name or ``(name, kwargs)`` of MONAI's ``Act`` factory, e.g. ``("relu6", {"inplace": True})``.
            Defaults to None (no activation).

    Example::

        >>> conv_norm_act(3, 8, 8, groups=8)(torch.zeros(2, 8, 6, 6, 6)).shape  # depthwise 3x3x3
        torch.Size([2, 8, 6, 6, 6])
    """
    return Convolution(
        spatial_dims, in_channels, out_channels, strides=stride, kernel_size=kernel_size, groups=groups, bias=False,
        norm=Norm.BATCH, act=act,
    )  # fmt: skip
