# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Map a site's label set onto a region expert's classes, and resize a stock network's output head to it.

Rule (documented in ``docs/site_finetuning.md``):

1. a site class takes the region class of the same name (case-insensitive; spaces and ``-`` count as ``_``);
2. the remaining site classes take the remaining region classes, both in label order;
3. any further site class gets a fresh channel (new initialisation).

Head modes: ``keep`` keeps the network's (union) output layer and reads the site classes from the region's channels
(``output_channels``), exact, possible when no fresh channel is needed; ``resize`` rebuilds the network with
``out_channels = number of site classes`` and slices the weights; ``auto`` (the default) keeps when possible and
resizes otherwise.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medfm_ops.networks.spec import instantiate

__all__ = ["HEAD_MODES", "HeadPlan", "match_classes", "plan_head", "out_channel_dims", "resize_head"]

HEAD_MODES = ("auto", "keep", "resize")


def _norm(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", str(name).strip()).casefold()


def match_classes(site_names: Sequence[str], region_names: Sequence[str]) -> list[int | None]:
    """
    Region class (0-based index into ``region_names``) of every site class, or None for a fresh channel.

    Args:
        site_names: the site's class names, labels 1..n in order.
        region_names: the region's class names, labels 1..m in order.

    Returns:
        a list of length ``n``; the non-None entries are distinct.

    Raises:
        ValueError: when either list has duplicate names (after normalisation).

    Example::

        >>> match_classes(["Posterior", "anterior", "tail"], ["anterior", "body"])
        [1, 0, None]
    """
    site, region = [_norm(n) for n in site_names], [_norm(n) for n in region_names]
    for what, names in (("site_names", site), ("region_names", region)):
        if len(set(names)) != len(names):
            raise ValueError(f"{what} has duplicate class names (case-insensitive): {names}.")
    mapping: list[int | None] = [region.index(n) if n in region else None for n in site]
    free = [j for j in range(len(region)) if j not in mapping]
    for i, m in enumerate(mapping):
        if m is None and free:
            mapping[i] = free.pop(0)
    return mapping


@dataclass
class HeadPlan:
    """How the site classes are read from a network.

    Attributes:
        mode: ``"keep"`` or ``"resize"`` (``auto`` resolved).
        site_names: site classes, labels 1..n.
        region_classes: matched region class (0-based) of every site class, None for a fresh channel.
        source_channels: network channel of the SOURCE network each site class is initialised from (None: fresh).
        out_channels: ``out_channels`` of the fine-tuned network.
        output_channels: channels of the fine-tuned network holding site classes 1..n.
    """

    mode: str
    site_names: list[str]
    region_classes: list[int | None]
    source_channels: list[int | None]
    out_channels: int
    output_channels: list[int] = field(default_factory=list)

    def describe(self, region_names: Sequence[str]) -> list[dict[str, Any]]:
        """One row per site class: ``{"site_class", "region_class", "source_channel", "output_channel"}``."""
        return [
            {
                "site_class": s,
                "region_class": "(fresh)" if r is None else region_names[r],
                "source_channel": "(fresh)" if c is None else c,
                "output_channel": o,
            }
            for s, r, c, o in zip(self.site_names, self.region_classes, self.source_channels, self.output_channels)
        ]


def plan_head(
    site_names: Sequence[str],
    region_names: Sequence[str],
    region_channels: Sequence[int],
    out_channels: int,
    head: str = "auto",
) -> HeadPlan:
    """
    Decide the head of the fine-tuned network (see the module docstring for the rule and the modes).

    Args:
        site_names: the site's class names (labels 1..n).
        region_names: the source region's class names (labels 1..m).
        region_channels: network output channel of each region class (the bundle's ``output_channels``).
        out_channels: the source network's number of output channels.
        head: ``"auto"``, ``"keep"`` or ``"resize"``. Defaults to ``"auto"``.

    Raises:
        ValueError: on an unknown ``head``, ``region_channels`` not matching ``region_names``, or ``head="keep"``
            when the site has more classes than the region (a fresh channel is needed: use ``resize``).
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}.")
    if len(region_channels) != len(region_names):
        raise ValueError(f"region_channels has {len(region_channels)} entries for {len(region_names)} region classes.")
    if any(not 0 <= int(c) < out_channels for c in region_channels):
        raise ValueError(f"region_channels {list(region_channels)} outside the network's {out_channels} outputs.")
    classes = match_classes(site_names, region_names)
    sources = [None if j is None else int(region_channels[j]) for j in classes]
    fresh = any(j is None for j in classes)
    if head == "keep" and fresh:
        raise ValueError(
            f"head='keep' cannot hold the site's {len(site_names)} classes {list(site_names)} in the region's "
            f"{len(region_names)} channels {list(region_names)}: use head='resize' (or 'auto')."
        )
    mode = "resize" if head == "resize" or (head == "auto" and fresh) else "keep"
    if mode == "keep":
        return HeadPlan(mode, list(site_names), classes, sources, int(out_channels), [int(s) for s in sources])
    return HeadPlan(mode, list(site_names), classes, sources, len(site_names), list(range(len(site_names))))


def out_channel_dims(network_def: Mapping[str, Any], key: str = "out_channels") -> dict[str, list[int]]:
    """
    State-dict entries (and their dimensions) whose size follows ``network_def[key]``.

    Found by building the network twice, with ``key`` = C and C + 1, and comparing the state-dict shapes, so it does
    not depend on the architecture's module names nor on a channel width that happens to equal C.

    Returns:
        ``{state dict key: [dims whose size is C]}`` for every entry that depends on ``key``.

    Raises:
        KeyError: when ``network_def`` has no ``key``.
    """
    if key not in network_def:
        raise KeyError(f"network_def has no '{key}' entry: cannot resize its output head.")
    c = int(network_def[key])
    shapes = {k: v.shape for k, v in instantiate(dict(copy.deepcopy(dict(network_def)))).state_dict().items()}
    probe = {k: v.shape for k, v in instantiate({**copy.deepcopy(dict(network_def)), key: c + 1}).state_dict().items()}
    dims = {}
    for k, shape in shapes.items():
        changed = [d for d, (a, b) in enumerate(zip(shape, probe[k])) if a != b]
        if changed:
            dims[k] = changed
    return dims


def resize_head(
    network_def: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    source_channels: Sequence[int | None],
    key: str = "out_channels",
    seed: int = 0,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """
    Rebuild a stock network with ``len(source_channels)`` outputs and carry its weights over.

    Every state-dict tensor dimension whose size is the old ``out_channels`` (see :py:func:`out_channel_dims`) is
    indexed with ``source_channels``; positions that involve a fresh channel (None) take the new network's own
    initialisation (seeded). All other tensors are copied unchanged. When the output head is a single convolution
    the kept channels' outputs are exactly the source channels'; when channels mix after the last resized layer
    (e.g. MONAI ``UNet`` with residual units, whose top residual unit has a C x C kernel, sliced on both dims) the
    result is an initialisation, whose quality is the before-fine-tuning score.

    Args:
        network_def: ``_target_`` config of the source network (with ``key``).
        state_dict: the source network's weights.
        source_channels: source channel of each new output channel, None for a fresh one.
        key: the network argument holding the number of outputs. Defaults to ``"out_channels"``.
        seed: torch seed of the fresh initialisation. Defaults to 0.

    Returns:
        ``(new_network_def, new_state_dict)``.

    Raises:
        ValueError: on an out-of-range or repeated source channel, or no output channel at all.
    """
    old = int(network_def[key])
    kept = [c for c in source_channels if c is not None]
    if not source_channels:
        raise ValueError("source_channels must name at least one output channel.")
    if any(not 0 <= int(c) < old for c in kept) or len(set(kept)) != len(kept):
        raise ValueError(f"source_channels {list(source_channels)} must be distinct channels in 0..{old - 1} or None.")
    new_def = {**copy.deepcopy(dict(network_def)), key: len(source_channels)}
    dims = out_channel_dims(network_def, key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh_sd = instantiate(copy.deepcopy(new_def)).state_dict()
    index = torch.as_tensor([0 if c is None else int(c) for c in source_channels], dtype=torch.long)
    keep = torch.as_tensor([c is not None for c in source_channels])
    out: dict[str, torch.Tensor] = {}
    for k, value in state_dict.items():
        if k not in dims:
            out[k] = value.detach().clone()
            continue
        value = value.detach()
        if any(value.shape[d] != old for d in dims[k]):
            raise ValueError(f"state_dict['{k}'] has shape {tuple(value.shape)}, expected {old} along dims {dims[k]}.")
        gathered, mask = value, torch.ones((), dtype=torch.bool)
        for d in dims[k]:
            gathered = gathered.index_select(d, index.to(value.device))
            shape = [1] * value.ndim
            shape[d] = len(source_channels)
            mask = mask & keep.view(shape)
        new = fresh_sd[k].to(device=value.device, dtype=value.dtype)
        out[k] = torch.where(mask.to(value.device), gathered, new).clone()
    return new_def, out
