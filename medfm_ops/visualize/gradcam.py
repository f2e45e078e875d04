# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Grad-CAM of 3D classifiers (MONAI's ``GradCAM``) shown as overlays on the three mid slices of each volume."""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.visualize import GradCAM
from torch import nn

from medfm_ops.visualize.png import colormap, tile_grid, write_png

__all__ = ["gradcam_volume", "mid_slices", "overlay", "gradcam_panel"]


def _unit_range(x: torch.Tensor) -> torch.Tensor:
    """Min-max scaling of every sample to ``[0, 1]`` (high = important; MONAI's default normaliser flips it)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values.view(-1, *[1] * (x.ndim - 1)), flat.max(1).values.view(-1, *[1] * (x.ndim - 1))
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(x))


def gradcam_volume(network: nn.Module, image: torch.Tensor, class_idx: int, target_layer: str) -> np.ndarray:
    """
    Grad-CAM map of class ``class_idx`` for one volume, upsampled to the volume's size and scaled to ``[0, 1]``.

    The network is copied (gradients enabled on the copy, eval mode), so a frozen or shared model is not changed.

    Args:
        network: a classifier ``(B, C, *sp) -> (B, num_classes)`` that runs with gradient (a stock network, a fused
            expert; not a no-grad teacher wrapper: pass its inner network).
        image: a batch of one volume ``(1, C, *sp)``.
        class_idx: logit to explain (e.g. the label, or ``offset + label`` for a unified head).
        target_layer: qualified name of the layer whose activations are weighted, e.g. ``"layer3"`` (MONAI ResNet).

    Returns:
        ``(*sp)`` float array in ``[0, 1]``.

    Raises:
        ValueError: for a ``target_layer`` the network does not have, a ``class_idx`` outside its outputs, or an
            image that is not a batch of one.

    Example::

        cam = gradcam_volume(expert, batch["image"][:1], class_idx=1, target_layer="layer3")  # (28, 28, 28)
    """
    names = {n for n, _ in network.named_modules()}
    if target_layer not in names:
        raise ValueError(f"target_layer '{target_layer}' is not a module of {type(network).__name__}.")
    net = copy.deepcopy(network).eval().requires_grad_(True)
    device = next(net.parameters()).device
    x = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)  # MetaTensor -> Tensor
    x = x.to(device=device, dtype=torch.float32)
    conv = next((m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    dims = conv.weight.ndim - 2 if conv is not None else x.ndim - 2
    if x.ndim != dims + 2 or x.shape[0] != 1:
        raise ValueError(f"image must be a batch of one volume (1, C, *spatial), got shape {tuple(x.shape)}.")
    with torch.no_grad():
        n_out = net(x).shape[1]
    if not 0 <= int(class_idx) < n_out:
        raise ValueError(f"class_idx {class_idx} is outside the network's {n_out} outputs.")
    cam = GradCAM(nn_module=net, target_layers=target_layer, postprocessing=_unit_range)
    return cam(x, class_idx=int(class_idx))[0, 0].detach().cpu().numpy()


def mid_slices(volume: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """The three orthogonal mid slices ``[v[D//2], v[:, H//2], v[:, :, W//2]]`` of a ``(D, H, W)`` volume (a leading
    channel of size 1 is dropped)."""
    v = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=float)
    v = v[0] if v.ndim == 4 and v.shape[0] == 1 else v
    if v.ndim != 3:
        raise ValueError(f"mid_slices expects a (D, H, W) volume, got shape {v.shape}.")
    d, h, w = v.shape
    return [v[d // 2], v[:, h // 2], v[:, :, w // 2]]


def overlay(gray: np.ndarray, cam: np.ndarray | None = None, alpha: float = 0.6) -> np.ndarray:
    """``uint8`` RGB of a 2D ``gray`` image in ``[0, 1]`` with ``cam`` (``[0, 1]``, same shape) blended in as a colour
    map weighted by its own value (unimportant areas show the image). ``cam=None`` gives the grey image."""
    g = np.clip(np.nan_to_num(np.asarray(gray, dtype=float)), 0.0, 1.0)
    rgb = np.repeat(g[..., None] * 255.0, 3, axis=-1)
    if cam is not None:
        if np.shape(cam) != g.shape:
            raise ValueError(f"cam shape {np.shape(cam)} differs from the image's {g.shape}.")
        w = alpha * np.clip(np.asarray(cam, dtype=float), 0.0, 1.0)[..., None]
        rgb = (1.0 - w) * rgb + w * colormap(cam).astype(float)
    return rgb.round().astype(np.uint8)


def gradcam_panel(
    path: str | os.PathLike,
    images: Sequence[np.ndarray | torch.Tensor],
    maps: Sequence[Mapping[str, np.ndarray]],
    scale: int = 4,
    alpha: float = 0.6,
) -> Path:
    """
    Write a PNG with one row per volume: its three mid slices in grey, then for every model of ``maps[i]`` (same
    models in the same order on every row) the three mid slices with that model's Grad-CAM overlaid.

    Args:
        path: PNG file to write.
        images: volumes ``(D, H, W)`` or ``(1, D, H, W)``; each is scaled to ``[0, 1]`` by its own min and max.
        maps: per volume, ``{model name: (D, H, W) map in [0, 1]}`` (e.g. from :func:`gradcam_volume`).
        scale: nearest-neighbour enlargement of the slices. Defaults to 4.
        alpha: overlay strength. Defaults to 0.6.

    Raises:
        ValueError: when ``images`` and ``maps`` differ in length or the rows name different models.
    """
    if len(images) != len(maps) or not images:
        raise ValueError(f"gradcam_panel needs one map dict per image, got {len(images)} images and {len(maps)} maps.")
    models = list(maps[0])
    rows = []
    for img, m in zip(images, maps):
        if list(m) != models:
            raise ValueError(f"every row must show the same models {models}, got {list(m)}.")
        v = np.asarray(img.detach().cpu() if isinstance(img, torch.Tensor) else img, dtype=float)
        v = (v - v.min()) / max(v.max() - v.min(), 1e-12)
        grey = mid_slices(v)
        row = [overlay(s) for s in grey]
        for name in models:
            row += [overlay(s, c, alpha) for s, c in zip(grey, mid_slices(m[name]))]
        rows.append(row)
    return write_png(path, tile_grid(rows, pad=2, scale=scale))
