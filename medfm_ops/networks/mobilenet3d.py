# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A MobileNetV2-style classifier (inverted residual blocks) for 1D/2D/3D inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Pool
from torch import nn

from medfm_ops.networks.cls_blocks import conv_norm_act

__all__ = ["MobileNetV2"]


_RELU6 = ("relu6", {"inplace": True})


class _InvertedResidual(nn.Module):
    def __init__(self, spatial_dims: int, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_norm_act(spatial_dims, cin, hidden, 1, 1, 1, _RELU6))
        layers += [
            conv_norm_act(spatial_dims, hidden, hidden, 3, stride, hidden, _RELU6),  # depthwise: stays shared
            conv_norm_act(spatial_dims, hidden, cout, 1, 1, 1),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """
    MobileNetV2-style network (Sandler et al., CVPR 2018) for any number of spatial dimensions: stem conv, inverted
    residual blocks ``(expand t, width c, repeats n, stride s)``, a 1x1 conv, global average pooling, ``fc``.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        num_classes: outputs of ``fc``.
        settings: ``[(t, c, n, s), ...]``. Defaults to a light 3D setting
            ``((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2))``.
        stem_channels: stem width. Defaults to 16.
        last_channels: width of the last 1x1 conv (the features). Defaults to 256.
        dropout: dropout before ``fc``. Defaults to 0.

    Example::

        >>> MobileNetV2(3, 1, 3)(torch.zeros(2, 1, 16, 16, 16)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        settings: Sequence[Sequence[int]] = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 2)),
        stem_channels: int = 16,
        last_channels: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stem = conv_norm_act(spatial_dims, in_channels, stem_channels, 3, 1, 1, _RELU6)
        blocks: list[nn.Module] = []
        cin = stem_channels
        for entry in settings:
            if len(entry) != 4:
                raise ValueError(f"each setting is (expand, width, repeats, stride), got {list(entry)}.")
            t, c, n, s = (int(v) for v in entry)
            for i in range(n):
                blocks.append(_InvertedResidual(spatial_dims, cin, c, s if i == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.conv_last = conv_norm_act(spatial_dims, cin, last_channels, 1, 1, 1, _RELU6)
        self.avgpool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_last(self.blocks(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
