# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The settings of a network's experts, defined once: :class:`ExpertSettings` owns the defaults that the EKS layers,
:func:`~medfm_ops.networks.to_experts`, the LoRKD* warm-up, the recorded ``models/network_def.json`` and the export /
inference rebuilding read."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["EXPERT_SCALINGS", "ExpertSettings"]

#: How expert ``t`` of a layer with rank multiplier ``m`` is scaled.
#: ``rank``: ``alpha / (m * r_t)`` (loralib): an expert's scale, hence its effective learning rate, follows its rank.
#: ``constant``: ``alpha / (m * base_rank)`` with ``base_rank`` fixed at construction: re-ranking an expert (LoRKD*)
#: leaves its scale unchanged (the LoRKD authors' choice).
EXPERT_SCALINGS = ("rank", "constant")


@dataclass(frozen=True)
class ExpertSettings:
    """
    How every converted convolution gets its experts (the keyword arguments of
    :func:`~medfm_ops.networks.to_experts`, under the names a training run records in ``models/network_def.json``).

    Args:
        ranks: base rank of every expert, or one per expert (0: that task uses ``W0`` only). Defaults to 8.
        alpha: scaling numerator. Defaults to 16.0.
        scaling: ``"rank"`` (expert ``t`` scaled by ``alpha / (m * r_t)``) or ``"constant"`` (``alpha / (m *
            base_rank)``, fixed at conversion, the LoRKD authors' choice). Defaults to ``"rank"``.
        convert_transposed: give transposed convolutions experts too. Defaults to True.
        rank_multipliers: ``{fnmatch pattern of a layer name: multiplier}``, e.g. the decoder at twice the rank
            (``dict.fromkeys(MONAI_UNET_DECODER, 2)``). Defaults to None (1 everywhere).

    Example::

        settings = ExpertSettings.from_record(spec["experts"])   # what a training run recorded
        model = to_experts(backbone, num_tasks, **settings.to_experts_kwargs())
    """

    ranks: int | Sequence[int] = 8
    alpha: float = 16.0
    scaling: str = "rank"
    convert_transposed: bool = True
    rank_multipliers: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.scaling not in EXPERT_SCALINGS:
            raise ValueError(f"scaling must be one of {EXPERT_SCALINGS}, got {self.scaling!r}.")

    @classmethod
    def from_record(cls, record: Mapping[str, Any] | None, source: str = "experts") -> ExpertSettings:
        """
        The settings a training run recorded (``network_def.json``'s ``experts``); missing keys take the defaults.

        Raises:
            ValueError: naming ``source`` and the unknown keys.
        """
        record = dict(record or {})
        unknown = sorted(set(record) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown expert settings {unknown}; known: "
                             f"{[f.name for f in dataclasses.fields(cls)]}.")  # fmt: skip
        return cls(**record)

    def to_record(self) -> dict[str, Any]:
        """Plain JSON values, as recorded in ``network_def.json`` (``rank_multipliers`` omitted when None)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["ranks"] = out["ranks"] if isinstance(out["ranks"], int) else [int(r) for r in out["ranks"]]
        if out["rank_multipliers"] is None:
            del out["rank_multipliers"]
        else:
            out["rank_multipliers"] = dict(out["rank_multipliers"])
        return out

    def to_experts_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~medfm_ops.networks.to_experts`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


#: the defaults, read by every signature that takes one of these settings
DEFAULT_EXPERTS = ExpertSettings()
