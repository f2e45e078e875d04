# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The decision threshold of a two-class classifier, chosen on labelled validation items: the probability of class 1
above which the model predicts class 1, maximising balanced accuracy (on imbalanced tasks the argmax, i.e. 0.5,
often predicts the majority class for almost every case although the probabilities rank the cases well)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ARGMAX_THRESHOLD", "choose_decision_threshold", "specificity_sensitivity", "threshold_decisions"]

#: the threshold at which :func:`threshold_decisions` equals the argmax of two class probabilities
ARGMAX_THRESHOLD = 0.5


def threshold_decisions(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """
    Predicted classes ``(N,)`` of class probabilities ``probs`` ``(N, C)``: class 1 where ``probs[:, 1] > threshold``
    (two classes), the argmax where ``threshold`` is None.

    Raises:
        ValueError: for a threshold with other than two classes.
    """
    probs = np.asarray(probs, float)
    if threshold is None:
        return probs.argmax(1)
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise ValueError(f"a decision threshold needs two-class probabilities (N, 2), got shape {probs.shape}.")
    return (probs[:, 1] > float(threshold)).astype(int)


def specificity_sensitivity(pred: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(specificity, sensitivity) of two-class decisions ``pred`` ``(N,)`` against ``labels`` ``(N,)``: the recall of
    class 0 and of class 1 (nan for a class absent from ``labels``)."""
    return float((pred[labels == 0] == 0).mean()), float((pred[labels == 1] == 1).mean())


def _balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(specificity_sensitivity(pred, labels)))


def choose_decision_threshold(
    probs: np.ndarray, labels: np.ndarray, min_sensitivity: float | None = None
) -> dict[str, Any]:
    """
    The threshold on the class-1 probability chosen on ``(probs, labels)`` (validation items; never the split that is
    reported): the highest balanced accuracy, or, with ``min_sensitivity``, the highest specificity among the
    thresholds whose sensitivity (recall of class 1) is at least ``min_sensitivity`` (a screening operating point).
    The candidates are 0.5 (the argmax), the midpoints between consecutive distinct class-1 probabilities and one just
    below the smallest (every case positive); of equally good ones the closest to 0.5 is kept, so a model whose argmax
    is already best keeps it.

    Args:
        probs: ``(N, 2)`` class probabilities.
        labels: ``(N,)`` labels 0 / 1, both present.
        min_sensitivity: the sensitivity the threshold must reach, in (0, 1]. Defaults to None (balanced accuracy).

    Returns:
        ``{"threshold", "criterion", "balanced_accuracy", "sensitivity", "specificity"`` (at the threshold),
        ``"argmax_balanced_accuracy", "n", "positives"}``.

    Raises:
        ValueError: for other than two classes, mismatched shapes, labels without both classes, a
            ``min_sensitivity`` outside (0, 1], or one no threshold in (0, 1) reaches.
    """
    probs, labels = np.asarray(probs, float), np.asarray(labels).astype(int).ravel()
    if probs.ndim != 2 or probs.shape[1] != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must be (N, 2) with N = len(labels), got {probs.shape} and {labels.shape}.")
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError(f"choosing a threshold needs items of both classes 0 and 1, got labels {sorted(set(labels.tolist()))}.")
    if min_sensitivity is not None and not 0.0 < float(min_sensitivity) <= 1.0:
        raise ValueError(f"min_sensitivity must be in (0, 1], got {min_sensitivity}.")
    p = probs[:, 1]
    values = np.unique(p)
    below = np.nextafter(values[0], -np.inf)
    candidates = np.unique(np.concatenate([[ARGMAX_THRESHOLD], (values[:-1] + values[1:]) / 2, [below]]))
    candidates = candidates[(candidates > 0.0) & (candidates < 1.0)]  # what a bundle's decision_threshold accepts
    spec_sens = np.array([specificity_sensitivity((p > t).astype(int), labels) for t in candidates])
    if min_sensitivity is None:
        scores, criterion = spec_sens.mean(1), "balanced accuracy"
    else:
        allowed = spec_sens[:, 1] >= float(min_sensitivity) - 1e-12
        if not allowed.any():
            raise ValueError(f"no threshold in (0, 1) reaches sensitivity {min_sensitivity} on these items.")
        scores, criterion = np.where(allowed, spec_sens[:, 0], -1.0), f"specificity at sensitivity >= {float(min_sensitivity):g}"
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    pick = best[np.argmin(np.abs(candidates[best] - ARGMAX_THRESHOLD))]
    return {
        "threshold": float(candidates[pick]),
        "criterion": criterion,
        "balanced_accuracy": float(spec_sens[pick].mean()),
        "sensitivity": float(spec_sens[pick, 1]),
        "specificity": float(spec_sens[pick, 0]),
        "argmax_balanced_accuracy": _balanced_accuracy(threshold_decisions(probs, None), labels),
        "n": int(len(labels)),
        "positives": int(labels.sum()),
    }
