# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The predicted class of a classification bundle's output (copied into exported bundles as
``scripts/class_decision.py``: torch and MONAI imports only): the argmax of the class probabilities, or, for a
two-class task with a decision threshold chosen on validation items
(:func:`~medfm_ops.metrics.choose_decision_threshold`), class 1 where its probability exceeds the threshold."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["ClassDecisiond"]


class ClassDecisiond(MapTransform):
    """
    Write the predicted class of ``d[key]`` (one item's class probabilities, shape ``(C,)``) to
    ``d[key + decision_postfix]`` as a ``(1,)`` int64 tensor.

    Args:
        keys: keys of the probabilities (e.g. ``"pred"``).
        threshold: class 1 where its probability is above ``threshold`` (two classes only); None: the argmax.
            Defaults to None.
        decision_postfix: suffix of the output key. Defaults to ``"_class"``.

    Raises:
        ValueError: for a threshold outside (0, 1), or a threshold with other than two classes (naming the shape).
    """

    def __init__(
        self, keys: KeysCollection, threshold: float | None = None, decision_postfix: str = "_class",
        allow_missing_keys: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise ValueError(f"decision_threshold must be in (0, 1) or null (argmax), got {threshold}.")
        self.threshold = None if threshold is None else float(threshold)
        self.decision_postfix = decision_postfix

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            p = torch.as_tensor(d[key]).reshape(-1)
            if self.threshold is None:
                cls = int(p.argmax())
            elif p.numel() != 2:
                raise ValueError(f"decision_threshold needs two class probabilities, got {p.numel()} in '{key}'.")
            else:
                cls = int(p[1] > self.threshold)
            d[f"{key}{self.decision_postfix}"] = torch.tensor([cls], dtype=torch.int64)
        return d
