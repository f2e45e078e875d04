# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Sliding-window inference with each region's own window (``RegionPreprocessingTable.window_size``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from medfm_ops.data.region_preprocessing import RegionPreprocessingTable
from medfm_ops.engines.routing import RoutedSlidingWindowInferer

__all__ = ["RegionSlidingWindowInferer"]


class RegionSlidingWindowInferer(RoutedSlidingWindowInferer):
    """
    :class:`RoutedSlidingWindowInferer` whose window is the sample's region ``window_size``. The region comes from
    the routing argument (``network(x, region)``, as :class:`~medfm_ops.engines.TaskPrepareBatch` passes it with ``route=True``) or,
    for an unrouted network (teacher, fused expert), from the image meta data ``meta["region"]`` written by
    :class:`~medfm_ops.data.RegionToMetad`. ``roi_size`` is the largest window (what a FLOP count of one window uses).

    Args:
        preprocessing: the regions' rows.
        sw_batch_size, overlap, mode, ...: as MONAI's ``SlidingWindowInferer``.

    Raises:
        ValueError: (on call) when a sample's region is neither passed nor in the image meta data.
    """

    def __init__(self, preprocessing: RegionPreprocessingTable, **kwargs: Any) -> None:
        super().__init__(roi_size=preprocessing.largest_window, **kwargs)
        self.preprocessing = preprocessing
        self._kwargs = kwargs

    def _regions(self, inputs: torch.Tensor, args: tuple) -> list[int]:
        if args:
            return [int(t) for t in torch.as_tensor(args[0]).view(-1)]
        meta = getattr(inputs, "meta", {}) or {}
        if "region" not in meta:
            raise ValueError("RegionSlidingWindowInferer needs each sample's region: route the network "
                             "(TaskPrepareBatch(route=True)) or add RegionToMetad to the preprocessing.")
        return [int(t) for t in torch.as_tensor(meta["region"]).view(-1)]

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        regions = self._regions(inputs, args)
        outs = []
        for b, region in enumerate(regions):
            window = RoutedSlidingWindowInferer(roi_size=self.preprocessing.of(region).window_size, **self._kwargs)
            rest = (torch.as_tensor(args[0]).view(-1)[b : b + 1], *args[1:]) if args else ()
            outs.append(window(inputs[b : b + 1], network, *rest, **kwargs))
        return torch.cat(outs) if len(outs) > 1 else outs[0]
