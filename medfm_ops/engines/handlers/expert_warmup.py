# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Warm-up of the shared backbone with frozen experts, then (optionally) LoRKD* per-region expert ranks."""

from __future__ import annotations

import logging
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch import nn

from medfm_ops.networks import eks_layers, expert_parameters, lorkd_star_ranks, set_expert_ranks, set_experts_trainable

__all__ = ["ExpertWarmupHandler"]


def _uniform_rank(network: nn.Module) -> int:
    """The base rank every expert of ``network`` was built with (LoRKD* starts from a uniform rank)."""
    ranks = {r for _, layer in eks_layers(network) for r in layer.ranks}
    if len(ranks) != 1:
        raise ValueError(f"LoRKD* needs experts built with one uniform base rank, found ranks {sorted(ranks)}: "
                         "pass base_rank.")  # fmt: skip
    return ranks.pop()


class ExpertWarmupHandler:
    """
    Train the shared backbone alone (experts frozen) for ``warmup_epochs``, then experts and backbone jointly.

    With ``lorkd_star=True`` the per-region task loss is tracked during the warm-up and, at its end, every expert is
    re-created with rank ``r_i = round_to_even(base_rank * (dL_i / mean dL)^2)`` where ``dL_i`` is the drop of
    region ``i``'s mean task loss between the first and the last third of its warm-up samples (summed over DDP
    processes, so every process gets the same ranks). The formula's value is applied as it is, 0 included (that
    region then uses the shared ``W0`` only; a region whose loss rose counts as a drop of 0), unless ``min_rank`` /
    ``max_rank`` ask for a clip; both the formula's ranks (``formula_ranks``) and the applied ones (``ranks``) are
    logged and kept. The experts were frozen at ``B = 0`` during the warm-up, so re-creating them loses nothing; the
    optimizer's ``experts`` param group is re-pointed to the new parameters. When the mean warm-up loss drop is not
    positive the rule is undefined: every region keeps ``base_rank`` and a warning is logged.

    The handler keeps its state (ranks, whether the warm-up is done, loss history) in :meth:`state_dict`: put it in
    the checkpoint's ``save_dict`` BEFORE the network and optimizer, so that on resume the experts are re-shaped
    before their weights are loaded.

    Args:
        network: the :class:`~medfm_ops.networks.ExpertNetwork` (or its DDP wrapper).
        optimizer: optimizer built with :func:`~medfm_ops.networks.param_groups` (a group named ``experts``).
        loss_function: object exposing ``last_per_sample_task`` and ``last_regions`` after each iteration
            (:class:`~medfm_ops.engines.LoRKDLossAdapter`).
        num_regions: number of regions / experts.
        warmup_epochs: epochs with frozen experts. Defaults to 1. 0 disables the warm-up.
        lorkd_star: allocate per-region ranks after the warm-up. Defaults to False.
        base_rank: uniform rank ``r`` for LoRKD*. Defaults to None: the rank the network's experts were built with
            (the same in every EKS layer; its :class:`~medfm_ops.layers.ExpertSettings` ``ranks``).
        min_rank: lower clip of the applied LoRKD* ranks (not part of the formula). Defaults to 0 (no clip).
        max_rank: upper clip of the applied LoRKD* ranks (not part of the formula). Defaults to None (no clip).

    Raises:
        ValueError: on ``warmup_epochs < 0``, ``lorkd_star`` without a warm-up or under DDP, ``min_rank < 0`` or
            ``max_rank < min_rank``.
    """

    def __init__(
        self,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Any,
        num_regions: int,
        warmup_epochs: int = 1,
        lorkd_star: bool = False,
        base_rank: int | None = None,
        min_rank: int = 0,
        max_rank: int | None = None,
    ) -> None:
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        if min_rank < 0 or (max_rank is not None and max_rank < min_rank):
            raise ValueError(f"LoRKD* rank clip must satisfy 0 <= min_rank <= max_rank, got min_rank={min_rank}, "
                             f"max_rank={max_rank} (max_rank None: no upper clip).")
        if lorkd_star and warmup_epochs == 0:
            raise ValueError("lorkd_star=True needs warmup_epochs >= 1 (ranks come from the warm-up loss drop).")
        if lorkd_star and isinstance(network, torch.nn.parallel.DistributedDataParallel):
            raise ValueError(
                "lorkd_star=True re-shapes the experts after the warm-up, which a DistributedDataParallel wrapper "
                "cannot follow: run the LoRKD* warm-up single-process (configs/train.json with lorkd_star=true), then "
                "train multi-GPU with `--expert_rank` set to the logged ranks (a list) and `--warmup_epochs 0`."
            )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.num_regions = num_regions
        self.warmup_epochs = warmup_epochs
        self.lorkd_star = lorkd_star
        self.base_rank = None if base_rank is None else int(base_rank)  # None: read from the network when used
        self.min_rank, self.max_rank = min_rank, max_rank
        self.done = warmup_epochs == 0
        self.ranks: list[int] | None = None
        self.formula_ranks: list[int] | None = None
        self.loss_drops: list[float] | None = None
        self._history: list[tuple[int, int, float]] = []  # (iteration, region, task loss)
        self.logger = logging.getLogger("medfm.warmup")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    # ------------------------------------------------------------------ events
    def _started(self, engine: Engine) -> None:
        set_experts_trainable(self.network, self.done)
        if not self.done:
            self.logger.info(f"warm-up: experts frozen for {self.warmup_epochs} epoch(s), shared backbone trains")

    def _iteration_completed(self, engine: Engine) -> None:
        if self.done or not self.lorkd_star:
            return
        losses, regions = self.loss_function.last_per_sample_task, self.loss_function.last_regions
        if losses is None or regions is None:
            raise RuntimeError("LoRKD* needs a loss_function exposing last_per_sample_task and last_regions.")
        it = engine.state.iteration
        self._history.extend((it, int(r), float(v)) for r, v in zip(regions.tolist(), losses.tolist()))

    def _epoch_completed(self, engine: Engine) -> None:
        if self.done or engine.state.epoch < self.warmup_epochs:
            return
        if self.lorkd_star:
            self.loss_drops = self._loss_drops()
            if self.base_rank is None:
                self.base_rank = _uniform_rank(self.network)
            try:
                self.ranks = lorkd_star_ranks(self.loss_drops, self.base_rank, self.min_rank, self.max_rank)
                try:
                    self.formula_ranks = lorkd_star_ranks(self.loss_drops, self.base_rank)
                except ValueError:  # an exploding allocation, applied only through the asked-for clip
                    self.formula_ranks = None
            except ValueError as e:  # no loss drop, or an exploding allocation without a clip: the rule is undefined
                self.formula_ranks, self.ranks = None, [self.base_rank] * self.num_regions
                self.logger.warning(f"LoRKD*: {e} Keeping the uniform rank {self.base_rank} for every region.")
            set_expert_ranks(self.network, self.ranks)
            self._repoint_optimizer()
            upper = "inf" if self.max_rank is None else self.max_rank
            clip = "no clip" if (self.min_rank, self.max_rank) == (0, None) else f"clipped to [{self.min_rank}, {upper}]"
            self.logger.info(
                f"LoRKD*: warm-up loss drops {[round(d, 4) for d in self.loss_drops]} -> formula ranks "
                f"{self.formula_ranks}, applied ranks {self.ranks} ({clip}; rank 0 = shared W0 only)"
            )
        self.done = True
        set_experts_trainable(self.network, True)
        self.logger.info(f"warm-up done after epoch {engine.state.epoch}: experts and backbone train jointly")

    # ------------------------------------------------------------------ helpers
    def _loss_drops(self) -> list[float]:
        """Per region: mean task loss of its first third of warm-up samples minus that of its last third."""
        stats = torch.zeros(4, self.num_regions, dtype=torch.float64)  # first sum, first count, last sum, last count
        for r in range(self.num_regions):
            values = [v for _, reg, v in sorted(self._history) if reg == r]
            k = len(values) // 3 if len(values) >= 3 else len(values) // 2
            if k:
                stats[0, r], stats[1, r] = sum(values[:k]), k
                stats[2, r], stats[3, r] = sum(values[-k:]), k
        stats = idist.all_reduce(stats)  # every process gets the same drops, hence the same ranks
        missing = [r for r in range(self.num_regions) if stats[1, r] == 0]
        if missing:
            raise RuntimeError(
                f"LoRKD*: regions {missing} have fewer than 2 samples during the warm-up, so their loss drop is "
                "undefined; use more warm-up epochs or more cases of these regions."
            )
        return (stats[0] / stats[1] - stats[2] / stats[3]).tolist()

    def _repoint_optimizer(self) -> None:
        groups = [g for g in self.optimizer.param_groups if g.get("name") == "experts"]
        if len(groups) != 1:
            raise RuntimeError("LoRKD* needs an optimizer with one param group named 'experts' (see param_groups).")
        for p in groups[0]["params"]:
            self.optimizer.state.pop(p, None)
        groups[0]["params"] = expert_parameters(self.network)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "done": torch.tensor(self.done),
            "ranks": torch.tensor(self.ranks if self.ranks is not None else [], dtype=torch.long),
            "formula_ranks": torch.tensor(self.formula_ranks or [], dtype=torch.long),
            "loss_drops": torch.tensor(self.loss_drops if self.loss_drops is not None else [], dtype=torch.float64),
        }

    def load_state_dict(self, state: dict) -> None:
        self.done = bool(state["done"])
        ranks = state["ranks"].tolist()
        self.ranks = ranks or None
        formula = state.get("formula_ranks")  # absent in older checkpoints
        self.formula_ranks = (formula.tolist() or None) if formula is not None else None
        self.loss_drops = state["loss_drops"].tolist() or None
        first = next(eks_layers(self.network), None)  # None: a baseline network without experts
        if first is not None and self.ranks is not None and tuple(self.ranks) != tuple(first[1].ranks):
            set_expert_ranks(self.network, self.ranks)
            self._repoint_optimizer()
