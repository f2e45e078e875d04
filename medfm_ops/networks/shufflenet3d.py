# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""ShuffleNetV2 for 1D/2D/3D classification (the LoRKD papers' student; its depthwise convs stay shared experts)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Pool
from torch import nn

from medfm_ops.networks.cls_blocks import conv_norm_act

__all__ = ["ShuffleNetV2", "channel_shuffle"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: ``(B, C, *sp)`` -> same shape."""
    b, c = x.shape[0], x.shape[1]
    return x.reshape(b, groups, c // groups, -1).transpose(1, 2).reshape(x.shape)


_RELU = ("relu", {"inplace": True})


class _ShuffleUnit(nn.Module):
    def __init__(self, spatial_dims: int, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout % 2:
            raise ValueError(f"ShuffleNetV2 stage widths must be even, got {cout}.")
        self.stride = stride
        half = cout // 2
        if stride == 1 and cin != cout:
            raise ValueError(f"a stride-1 ShuffleNetV2 unit keeps its width, got {cin} -> {cout}.")
        self.branch1 = (
            nn.Sequential(
                conv_norm_act(spatial_dims, cin, cin, 3, stride, cin),  # depthwise: stays shared
                conv_norm_act(spatial_dims, cin, half, 1, 1, 1, _RELU),
            )
            if stride > 1
            else nn.Identity()
        )
        self.branch2 = nn.Sequential(
            conv_norm_act(spatial_dims, cin if stride > 1 else half, half, 1, 1, 1, _RELU),
            conv_norm_act(spatial_dims, half, half, 3, stride, half),  # depthwise
            conv_norm_act(spatial_dims, half, half, 1, 1, 1, _RELU),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """
    ShuffleNetV2 (Ma et al., ECCV 2018) written once for any number of spatial dimensions (MONAI layer factories):
    stem conv + max-pool, three stages of shuffle units (the first of each downsamples), a 1x1 conv, global average
    pooling and a linear classifier ``fc``.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        num_classes: outputs of ``fc``.
        stages_repeats: units per stage. Defaults to ``(4, 8, 4)`` (the paper's).
        stages_out_channels: widths of stem, the three stages and the last conv. Defaults to
            ``(24, 48, 96, 192, 1024)`` (width 0.5x).
        stem_stride: stride of the stem conv (1 for small inputs such as 28^3). Defaults to 1.
        dropout: dropout before ``fc``. Defaults to 0.

    Example::

        >>> net = ShuffleNetV2(3, 1, 2, (1, 1, 1), (8, 16, 32, 64, 128))
        >>> net(torch.zeros(2, 1, 16, 16, 16)).shape
        torch.Size([2, 2])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        stages_repeats: Sequence[int] = (4, 8, 4),
        stages_out_channels: Sequence[int] = (24, 48, 96, 192, 1024),
        stem_stride: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(stages_repeats) != 3 or len(stages_out_channels) != 5:
            raise ValueError(
                f"stages_repeats needs 3 and stages_out_channels 5 values, got {list(stages_repeats)} and "
                f"{list(stages_out_channels)}."
            )
        w = list(stages_out_channels)
        self.stem = conv_norm_act(spatial_dims, in_channels, w[0], 3, stem_stride, 1, _RELU)
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=3, stride=2, padding=1)
        stages: list[nn.Module] = []
        cin = w[0]
        for repeats, cout in zip(stages_repeats, w[1:4]):
            units = [_ShuffleUnit(spatial_dims, cin, cout, 2)] + [_ShuffleUnit(spatial_dims, cout, cout, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.conv_last = conv_norm_act(spatial_dims, cin, w[4], 1, 1, 1, _RELU)
        self.avgpool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(w[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.stages(self.pool(self.stem(x))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
