# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Linear CKA (centred kernel alignment) between two batches of features, and the CKA loss of RD."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["linear_cka", "CKALoss"]


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """
    Linear CKA of feature matrices ``x (N, D1)`` and ``y (N, D2)`` (the same N samples; widths may differ):
    ``<K, L>_F / (||K||_F ||L||_F)`` with ``K = Xc Xc^T``, ``L = Yc Yc^T`` the Gram matrices of the column-centred
    features (Kornblith et al., ICML 2019). 1 for identical features; invariant to orthogonal transforms and
    isotropic scaling of either input; in ``[0, 1]``.

    Raises:
        ValueError: when the inputs are not 2D with the same number of rows (>= 2).
    """
    x, y = x.flatten(1), y.flatten(1)
    if x.shape[0] != y.shape[0] or x.shape[0] < 2:
        raise ValueError(f"linear_cka needs two (N, D) feature matrices with the same N >= 2, got {tuple(x.shape)} and {tuple(y.shape)}.")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    k, l = x @ x.T, y @ y.T
    return (k * l).sum() / (k.norm() * l.norm()).clamp_min(eps)


class CKALoss(nn.Module):
    """``1 - linear_cka(f_a, f_b)``: 0 for identical (up to rotation and scale) batch features.

    Example::

        >>> CKALoss()(torch.randn(8, 16), torch.randn(8, 32)).shape
        torch.Size([])
    """

    def forward(self, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        return 1.0 - linear_cka(f_a, f_b)
