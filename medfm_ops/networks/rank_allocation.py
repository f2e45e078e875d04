# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""LoRKD*: per-region expert ranks from the loss drop of a warm-up phase."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["round_to_even", "lorkd_star_ranks"]


def round_to_even(x: float) -> int:
    """Nearest even integer (ties go to the larger one): 2.9 -> 2, 3.0 -> 4, 5.2 -> 6."""
    return int(2 * int(x / 2 + 0.5))


def lorkd_star_ranks(loss_drops: Sequence[float], base_rank: int, min_rank: int = 0, max_rank: int | None = None) -> list[int]:
    """
    ``r_i = round_to_even(base_rank * (dL_i / mean(dL))^2)``, clipped to ``[min_rank, max_rank]`` only when asked (the
    clip is not part of the LoRKD* formula; by default a rank may be 0: that region uses the shared kernel only). A
    negative drop (the region's loss rose during the warm-up) counts as 0, so it gets rank 0 rather than the square of
    a negative ratio.

    Args:
        loss_drops: per-region loss drop during warm-up ``dL_i = L_i(start) - L_i(end)`` (a larger drop means a
            region that learns more from the shared backbone gets a larger expert, as in the LoRKD journal version).
        base_rank: the uniform rank ``r``.
        min_rank: lower clip. Defaults to 0 (rank 0 = region uses the shared kernel only).
        max_rank: upper clip. Defaults to None (no clip).

    Raises:
        ValueError: when the mean loss drop is not positive (the warm-up did not reduce the loss: ranks undefined), or,
            without ``max_rank``, when a rank exceeds ``4 * base_rank * len(loss_drops)**2``, four times the largest
            the formula gives when no loss rose: regions whose loss rose cancel more than half of the others' drops,
            so the mean is near 0 and the ranks explode (warm up longer, or set ``max_rank``).
    """
    drops = [float(d) for d in loss_drops]
    if not drops:
        raise ValueError("loss_drops is empty.")
    mean = sum(drops) / len(drops)
    if not mean > 0:
        raise ValueError(f"mean warm-up loss drop must be > 0 to allocate LoRKD* ranks, got drops {drops}.")
    ranks = [max(min_rank, round_to_even(base_rank * (max(d, 0.0) / mean) ** 2)) for d in drops]
    if max_rank is not None:
        return [min(r, max_rank) for r in ranks]
    bound = 4 * base_rank * len(drops) ** 2
    if max(ranks) > bound:
        raise ValueError(
            f"LoRKD* ranks {ranks} exceed {bound} (4 x base rank x number of tasks^2; without a rise in any task's loss "
            f"the formula gives at most a quarter of it): the warm-up loss drops {drops} have a mean near 0 "
            f"({mean:.3g}) because some rose. Warm up longer, or set lorkd_star_max_rank."
        )
    return ranks
