# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Batch preparation and inference that route each sample's region (task id) to an expert network."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import CommonKeys
from torch import nn

__all__ = ["RegionPrepareBatch", "RoutedSlidingWindowInferer", "RoutedSimpleInferer", "batch_filenames"]


def batch_filenames(batch: dict, key: str = CommonKeys.IMAGE) -> list[str]:
    """Source file of every sample of a collated batch (``filename_or_obj`` meta), for error messages."""
    meta = getattr(batch.get(key), "meta", {}) or {}
    names = meta.get("filename_or_obj", [])
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)]


class RegionPrepareBatch:
    """
    ``prepare_batch`` for MONAI engines over a multi-region data set.

    Returns ``(image, targets, args, kwargs)`` so that the engine calls ``network(image, region)``:

    - ``route=True`` passes the ``(B,)`` region ids as the network's second argument (an
      :class:`~medfm_ops.networks.ExpertNetwork`); ``route=False`` calls ``network(image)`` (teacher, fused expert).
    - with ``targets_as_dict=True`` the targets are a dict ``{"label", "channel_mask", "region", "filenames"}`` and,
      when a ``teacher`` is given, ``"teacher_logits"`` (computed without gradient): the input of
      :class:`~medfm_ops.engines.LoRKDLossAdapter`. Otherwise the targets are the label tensor (for evaluators).

    The ``(B, C)`` channel mask is per case: the batch's ``mask_key`` entry when present (written by
    :class:`~medfm_ops.data.RegionLabelToChannelsd`: the channels the case's data set annotates, partial labels),
    else ``channel_mask_fn(region)`` (every channel of the sample's region). A batch mask must stay inside the
    region's channels.

    Args:
        channel_mask_fn: maps ``(B,)`` region ids to a ``(B, C)`` boolean mask of each sample's region channels
            (e.g. ``RegionTable.channel_mask``). Required with ``targets_as_dict=True``.
        teacher: frozen teacher network (``(B, C_in, *sp) -> (B, C, *sp)`` logits). Defaults to None.
        route: pass region ids to the network. Defaults to True.
        targets_as_dict: see above. Defaults to False.
        image_key, label_key, region_key: batch keys. Default to ``"image"``, ``"label"``, ``"region"``.
        mask_key: batch key of the per-case ``(B, C)`` channel mask. Defaults to ``"channel_mask"``.

    Raises:
        KeyError: (on call) when the batch misses the image, label or region.
        ValueError: (on call) when a batch mask has the wrong shape or selects a channel outside the case's region.
    """

    def __init__(
        self,
        channel_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        teacher: nn.Module | None = None,
        route: bool = True,
        targets_as_dict: bool = False,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        region_key: str = "region",
        mask_key: str = "channel_mask",
    ) -> None:
        if targets_as_dict and channel_mask_fn is None:
            raise ValueError("RegionPrepareBatch(targets_as_dict=True) needs channel_mask_fn.")
        self.channel_mask_fn = channel_mask_fn
        self.teacher = teacher
        self.route = route
        self.targets_as_dict = targets_as_dict
        self.image_key, self.label_key, self.region_key = image_key, label_key, region_key
        self.mask_key = mask_key

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, Any, tuple, dict]:
        for key in (self.image_key, self.label_key, self.region_key):
            if key not in batchdata:
                raise KeyError(f"batch has no '{key}' entry (keys: {sorted(batchdata)}); check the datalist items.")
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        region = torch.as_tensor(batchdata[self.region_key]).view(-1).long().to(device=device)
        args = (region,) if self.route else ()
        if not self.targets_as_dict:
            return image, label, args, {}
        targets = {
            "label": label,
            "region": region,
            "channel_mask": self._channel_mask(batchdata, region, label, device),
            "filenames": batch_filenames(batchdata, self.image_key),
        }
        if self.teacher is not None:
            with torch.no_grad():
                targets["teacher_logits"] = self.teacher(image).detach()
        return image, targets, args, {}


    def _channel_mask(
        self, batchdata: dict, region: torch.Tensor, label: torch.Tensor, device: str | torch.device | None
    ) -> torch.Tensor:
        region_mask = self.channel_mask_fn(region).to(device=device)
        if self.mask_key not in batchdata:
            return region_mask
        mask = torch.as_tensor(batchdata[self.mask_key]).to(device=device).bool()
        if tuple(mask.shape) != tuple(label.shape[:2]):
            raise ValueError(
                f"batch '{self.mask_key}' has shape {tuple(mask.shape)}, expected (B, C) = {tuple(label.shape[:2])} "
                f"of the label (batch {batch_filenames(batchdata, self.image_key)})."
            )
        outside = (mask & ~region_mask).any(dim=1).nonzero().flatten().tolist()
        if outside:
            names = batch_filenames(batchdata, self.image_key)
            raise ValueError(
                f"batch '{self.mask_key}' selects channels outside the region of case(s) "
                f"{[names[i] if i < len(names) else i for i in outside]} (regions {region[outside].tolist()})."
            )
        return mask


class RoutedSlidingWindowInferer(SlidingWindowInferer):
    """
    Sliding-window inference for ``network(windows, task_ids)``: each sample's task id is repeated for its windows.

    Called with the region ids as the extra positional argument (as produced by :class:`RegionPrepareBatch`); called
    without it, it is MONAI's :class:`~monai.inferers.SlidingWindowInferer`. Takes the same arguments.
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if not args:
            return super().__call__(inputs, network, **kwargs)
        task_ids, rest = torch.as_tensor(args[0]).view(-1), args[1:]
        outs = []
        for b in range(inputs.shape[0]):
            tid = task_ids[b : b + 1]

            def _predict(window: torch.Tensor, *a: Any, _tid: torch.Tensor = tid, **kw: Any) -> Any:
                return network(window, _tid.expand(window.shape[0]).to(window.device), *a, **kw)

            outs.append(super().__call__(inputs[b : b + 1], _predict, *rest, **kwargs))
        return torch.cat(outs) if len(outs) > 1 else outs[0]


class RoutedSimpleInferer(Inferer):
    """Whole-volume inference ``network(inputs, *args)`` (MONAI's SimpleInferer, explicit about the routing args)."""

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Sequence, **kwargs: Any) -> Any:
        return network(inputs, *args, **kwargs)
