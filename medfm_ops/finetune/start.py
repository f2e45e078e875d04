# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The weights a site fine-tuning starts from: the source network with its head mapped onto the site's classes."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medfm_ops.finetune.head import HeadPlan, plan_head, resize_head
from medfm_ops.finetune.source import SourceModel
from medfm_ops.networks import instantiate

__all__ = ["StartingPoint", "prepare_start", "site_class_names"]


def site_class_names(names: Sequence[str] | Mapping[str, str]) -> list[str]:
    """Class names of labels 1..n from a list or an MSD ``{"1": name, ...}`` dict (background excluded)."""
    if isinstance(names, Mapping):
        return [str(names[str(i)]) for i in range(1, len(names) + 1)]
    return [str(n) for n in names]


@dataclass
class StartingPoint:
    """A stock network ready to be written as the first state of a site bundle.

    Attributes:
        network_def: ``_target_`` config of the stock network (``out_channels`` resized when the head was).
        state_dict: its starting weights (seeded random ones for ``init="scratch"``).
        output_channels: network channels holding site labels 1..n.
        plan: the :class:`~medfm_ops.finetune.HeadPlan` (how site classes map onto the source's).
        init: ``"pretrained"`` or ``"scratch"``.
    """

    network_def: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    output_channels: list[int]
    plan: HeadPlan
    init: str


def prepare_start(
    source: SourceModel, site_names: Sequence[str] | Mapping[str, str], head: str = "auto", seed: int = 0
) -> StartingPoint:
    """
    Map the source network onto the site's classes.

    A source loaded with ``init="scratch"`` (no weights) gives its stock architecture with ``out_channels`` = number
    of site classes and a seeded random initialisation. Otherwise the head follows
    :py:func:`~medfm_ops.finetune.plan_head` (``keep``: the network as is, site classes read from the matched region
    channels; ``resize``: :py:func:`~medfm_ops.finetune.resize_head`, fresh channels seeded).

    Args:
        source: from :py:func:`~medfm_ops.finetune.load_source`.
        site_names: the site's class names (labels 1..n), a list or ``{"1": name, ...}``.
        head: ``"auto"``, ``"keep"`` or ``"resize"``. Defaults to ``"auto"``.
        seed: seed of every random initialisation. Defaults to 0.

    Raises:
        ValueError: on an unknown head mode or a head that cannot hold the site classes.
    """
    names = site_class_names(site_names)
    n = len(names)
    if source.state_dict is None:
        network_def = {**copy.deepcopy(source.network_def), "out_channels": n}
        plan = HeadPlan("resize", names, [None] * n, [None] * n, n, list(range(n)))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = instantiate(copy.deepcopy(network_def))
        state_dict, init = net.state_dict(), "scratch"
    else:
        plan = plan_head(names, source.class_names, source.output_channels, int(source.network_def["out_channels"]),
                         head)  # fmt: skip
        if plan.mode == "resize":
            network_def, state_dict = resize_head(source.network_def, source.state_dict, plan.source_channels, seed=seed)
        else:
            network_def, state_dict = copy.deepcopy(source.network_def), dict(source.state_dict)
        init = "pretrained"
    state_dict = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    return StartingPoint(network_def, state_dict, list(plan.output_channels), plan, init)
