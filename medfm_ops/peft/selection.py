# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Which weights train: hybrid importance (SH-PEFT) or a baseline score, and ONE global top-k threshold."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence

import torch

from medfm_ops.peft.importance import IMPORTANCE_VARIANTS, ImportanceEstimate
from medfm_ops.peft.tensor_subset import match_parameters

__all__ = [
    "ALLOCATIONS",
    "SELECTION_METHODS",
    "budget_count",
    "check_sparse_settings",
    "importance_scores",
    "module_shares",
    "select_top_k",
    "top_level_module",
    "weights_per_top_level_module",
    "select_weights",
]

#: ``hybrid``: I_td + lambda * s * I_ta (SH-PEFT); ``gradient``: I_td only; ``magnitude``: I_ta only;
#: ``random``: a seeded random mask of the same size
SELECTION_METHODS = ("hybrid", "gradient", "magnitude", "random")


def importance_scores(
    estimate: ImportanceEstimate, method: str = "hybrid", lambda_: float = 1.0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """
    Score of every weight for a selection method.

    ``hybrid``: ``I = I_td + lambda_ * s * I_ta`` with ``s = sum(I_td) / sum(I_ta)`` summed over ALL weights of the
    network (``s = 0`` when every weight is zero), so that both parts weigh the same at ``lambda_ = 1``.

    Args:
        estimate: from :py:func:`~medfm_ops.peft.estimate_importance` (its ``variant`` picks l1 or l2).
        method: one of :data:`SELECTION_METHODS`. Defaults to ``"hybrid"``.
        lambda_: weight of the task-agnostic part (``hybrid`` only). Defaults to 1.0.
        seed: seed of the ``random`` scores. Defaults to 0.

    Returns:
        ``{parameter name: score}`` (same shapes as the parameters, float64 for ``hybrid``/``random``).

    Raises:
        ValueError: for an unknown ``method`` or a negative ``lambda_``.
    """
    if method not in SELECTION_METHODS:
        raise ValueError(f"method must be one of {SELECTION_METHODS}, got {method!r}.")
    if float(lambda_) < 0:
        raise ValueError(f"lambda_ must be >= 0, got {lambda_}.")
    td, ta = estimate.task_driven, estimate.task_agnostic
    if method == "gradient":
        return dict(td)
    if method == "magnitude":
        return dict(ta)
    if method == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return {n: torch.rand(t.shape, generator=gen, dtype=torch.float64) for n, t in ta.items()}
    sum_td = sum(float(t.double().sum()) for t in td.values())
    sum_ta = sum(float(t.double().sum()) for t in ta.values())
    s = sum_td / sum_ta if sum_ta > 0 else 0.0
    return {n: td[n].double() + (float(lambda_) * s) * ta[n].double() for n in ta}


def check_sparse_settings(budget: float, variant: str = "l2", lambda_: float = 1.0, method: str = "hybrid") -> None:
    """
    Validate SH-PEFT settings before any work (e.g. before a bundle is written).

    Raises:
        ValueError: naming the offending argument: ``budget`` outside (0, 1], an unknown ``variant`` or ``method``,
            a negative ``lambda_``.
    """
    _check_budget(budget)
    if variant not in IMPORTANCE_VARIANTS:
        raise ValueError(f"variant must be one of {IMPORTANCE_VARIANTS}, got {variant!r}.")
    if method not in SELECTION_METHODS:
        raise ValueError(f"method must be one of {SELECTION_METHODS}, got {method!r}.")
    if not float(lambda_) >= 0:
        raise ValueError(f"lambda_ must be >= 0, got {lambda_}.")


def _check_budget(budget: float) -> None:
    if not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"budget is a fraction of the weights in (0, 1], got {budget} (e.g. 0.01 for 1%).")


def budget_count(budget: float, num_weights: int) -> int:
    """
    Number of weights a budget selects: ``round(budget * num_weights)``, at least 1 (with a warning when the budget
    rounds to no weight: the run is then a linear probe in effect).

    Raises:
        ValueError: when ``budget`` is not in (0, 1].
    """
    _check_budget(budget)
    k = int(round(float(budget) * int(num_weights)))
    if k < 1:
        logging.getLogger("medfm.peft").warning(
            f"budget {budget} of {int(num_weights):,} weights selects {float(budget) * int(num_weights):.3g} weights: "
            "only 1 trains besides the head (a linear probe in effect); raise the budget (e.g. 0.01 for 1%)."
        )
    return max(1, min(int(num_weights), k))


def select_top_k(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """
    Boolean masks of the ``k`` highest scores over ALL tensors, chosen with ONE global threshold ``t`` (the k-th
    largest score): every score above ``t`` is selected, and of the scores equal to ``t`` the first ones in the
    order of ``scores`` (then row-major within a tensor) until exactly ``k`` are selected.

    Args:
        scores: ``{name: score tensor}``; the order of the mapping breaks ties.
        k: number of entries to select, ``1 <= k <= total``.

    Returns:
        ``{name: bool tensor}`` of the scores' shapes, ``k`` entries True in all.

    Raises:
        ValueError: for ``k`` out of range or a non-finite score (named).
    """
    names = list(scores)
    total = sum(scores[n].numel() for n in names)
    if not 1 <= int(k) <= total:
        raise ValueError(f"k must be in [1, {total}] (the number of scored weights), got {k}.")
    for n in names:
        if not bool(torch.isfinite(scores[n]).all()):
            raise ValueError(f"importance score of {n!r} is not finite (NaN/inf): check the loss and the data.")
    flat = torch.cat([scores[n].detach().reshape(-1).double().cpu() for n in names])
    threshold = torch.topk(flat, int(k), sorted=False).values.min()
    chosen = flat > threshold
    ties = torch.nonzero(flat == threshold).flatten()[: int(k) - int(chosen.sum())]
    chosen[ties] = True
    masks, offset = {}, 0
    for n in names:
        t = scores[n]
        masks[n] = chosen[offset : offset + t.numel()].reshape(t.shape).to(t.device)
        offset += t.numel()
    return masks


#: how :py:func:`select_weights` spreads the budget: ``global`` (one threshold over all weights, the paper's),
#: ``per_module`` (each top-level module gets the budget's share of its own weight count, the layout a uniformly
#: random mask has, and its top-scored weights fill it) or ``per_tensor`` (the same for each parameter tensor: every
#: kernel, scale and bias gets its size's share, as with a random mask)
ALLOCATIONS = ("global", "per_module", "per_tensor")


def module_shares(counts: Mapping[str, int], k: int) -> dict[str, int]:
    """
    ``k`` split over groups in proportion to their sizes ``counts`` (largest remainders; ties to the earlier group),
    so that the shares sum to ``k`` exactly and none exceeds its group.

    Example::

        >>> module_shares({"conv1": 10, "layer1": 30}, 4)
        {'conv1': 1, 'layer1': 3}
    """
    total = sum(counts.values())
    exact = {g: int(k) * c / total for g, c in counts.items()}
    shares = {g: int(v) for g, v in exact.items()}
    order = sorted(counts, key=lambda g: (-(exact[g] - shares[g]), list(counts).index(g)))
    for g in order[: int(k) - sum(shares.values())]:
        shares[g] += 1
    return shares


def top_level_module(name: str) -> str:
    """The top-level module of a parameter name: ``"layer4.1.conv2.weight"`` -> ``"layer4"``."""
    return name.split(".", 1)[0]


def weights_per_top_level_module(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, int]:
    """Entries of ``(name, tensor)`` pairs (parameters, masks' index lists) summed per :func:`top_level_module`, in
    first-seen order."""
    out: dict[str, int] = {}
    for name, tensor in named:
        out[top_level_module(name)] = out.get(top_level_module(name), 0) + int(tensor.numel())
    return out


def select_weights(
    estimate: ImportanceEstimate,
    budget: float = 0.01,
    method: str = "hybrid",
    lambda_: float = 1.0,
    seed: int = 0,
    train_whole: Sequence[str] = (),
    allocation: str = "global",
) -> dict[str, torch.Tensor]:
    """
    Masks of the weights to train: the top ``budget`` fraction of all weights by :py:func:`importance_scores`.

    Args:
        estimate: from :py:func:`~medfm_ops.peft.estimate_importance`.
        budget: fraction of ALL weights to train (exact count ``round(budget * N)``). Defaults to 0.01 (1%).
        method: ``"hybrid"`` (SH-PEFT), ``"gradient"`` (I_td), ``"magnitude"`` (I_ta) or ``"random"``.
            Defaults to ``"hybrid"``.
        lambda_: weight of the task-agnostic part of ``hybrid``. Defaults to 1.0.
        seed: seed of ``random``. Defaults to 0.
        train_whole: ``fnmatch`` patterns of parameters that train entirely, e.g. ``["fc.*"]`` for a new task head:
            they are left out of the scores (and of the hybrid scale ``s``), of ``N`` and of the budget, and their
            masks are all True. Defaults to none (every weight competes).
        allocation: ``"global"``: the top ``k`` over all scored weights (SH-PEFT); ``"per_module"``: each top-level
            module (``conv1``, ``layer1``, ... of the parameter names) gets :py:func:`module_shares` of ``k`` by its
            weight count and its own top-scored weights fill it (an ablation: where the weights sit vs which ones);
            ``"per_tensor"``: the same for each parameter tensor. Defaults to ``"global"``.

    Returns:
        ``{parameter name: bool mask}`` with exactly :py:func:`budget_count` entries True among the scored
        parameters (plus every entry of the ``train_whole`` ones).

    Raises:
        ValueError: for a budget outside (0, 1], an unknown method or allocation, non-finite scores, or a
            ``train_whole`` pattern that matches no parameter.

    Example::

        masks = select_weights(estimate_importance(net, loader, loss), budget=0.01, method="hybrid", lambda_=1.0)
    """
    whole = set(match_parameters(estimate.task_agnostic, train_whole, "train_whole")) if train_whole else set()
    scored = estimate
    if whole:
        keep = lambda d: {n: t for n, t in d.items() if n not in whole}  # noqa: E731
        scored = dataclasses.replace(
            estimate, task_driven=keep(estimate.task_driven), task_agnostic=keep(estimate.task_agnostic)
        )
        if not scored.task_agnostic:
            raise ValueError(f"train_whole {list(train_whole)} covers every parameter: nothing is left to select.")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}.")
    k = budget_count(budget, scored.num_weights)
    scores = importance_scores(scored, method=method, lambda_=lambda_, seed=seed)
    if allocation == "global":
        masks = select_top_k(scores, k)
    else:
        group_of = top_level_module if allocation == "per_module" else (lambda name: name)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for n, t in scores.items():
            groups.setdefault(group_of(n), {})[n] = t
        shares = module_shares({g: sum(int(t.numel()) for t in ts.values()) for g, ts in groups.items()}, k)
        masks = {}
        for g, ts in groups.items():
            masks.update(select_top_k(ts, shares[g]) if shares[g] else {n: torch.zeros_like(t, dtype=torch.bool)
                                                                          for n, t in ts.items()})  # fmt: skip
    return {n: masks.get(n, torch.ones_like(t, dtype=torch.bool)) for n, t in estimate.task_agnostic.items()}
