# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Classification scores of one task (plain numpy maths): accuracy, balanced accuracy, AUC, F1, what a majority-class
predictor scores, and the verdict "not working" for a model whose balanced accuracy stays at that level."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "binary_auc",
    "classification_scores",
    "majority_classes",
    "working_verdict",
    "SCORE_NAMES",
    "WORKING_MARGIN",
]

#: the numeric scores of :func:`classification_scores`, in table order (balanced accuracy next to AUC)
SCORE_NAMES = ("accuracy", "balanced_accuracy", "auc", "f1", "majority_accuracy", "majority_balanced_accuracy")

#: a model is "working" when its balanced accuracy exceeds the majority-class predictor's (``1 / classes``) by at
#: least this much: 0.10, so that a binary model at 0.50-0.59 (a majority predictor with a few lucky hits, what
#: 2-3-epoch runs gave in issue 19) reads "not working" whatever its AUC
WORKING_MARGIN = 0.10


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), float)
    sx = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U, ties counted 1/2); NaN when one of the two classes is absent."""
    scores, positive = np.asarray(scores, float).ravel(), np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(scores)
    return float((r[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_scores(
    probs: np.ndarray, labels: np.ndarray, majority_class: int | None = None, predictions: np.ndarray | None = None
) -> dict[str, float]:
    """
    Scores of one task.

    Args:
        probs: ``(N, C)`` class probabilities (or any scores; the AUC's ranking, and the argmax is the prediction
            unless ``predictions`` are given).
        labels: ``(N,)`` labels ``0..C-1``.
        majority_class: the class a trivial classifier always predicts (e.g. the training set's most frequent).
            Defaults to the most frequent class of ``labels``.
        predictions: ``(N,)`` predicted classes (e.g. at a bundle's decision threshold). Defaults to the argmax.

    Returns:
        ``accuracy``; ``balanced_accuracy`` (mean recall over the classes present); ``auc`` (binary: of class 1;
        multi-class: mean one-vs-rest AUC over the classes present with positives and negatives; NaN when none);
        ``f1`` (macro over the classes present in labels or predictions); ``majority_accuracy`` (accuracy of always
        predicting ``majority_class``); ``majority_balanced_accuracy`` (the balanced accuracy of any constant
        prediction: ``1 / number of classes present``).

    Raises:
        ValueError: on mismatched shapes, no samples, or labels (predictions) outside ``0..C-1``.
    """
    probs, labels = np.asarray(probs, float), np.asarray(labels).astype(int).ravel()
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or not len(labels):
        raise ValueError(f"probs must be (N, C) with N = len(labels) > 0, got {probs.shape} and {labels.shape}.")
    c = probs.shape[1]
    if labels.min() < 0 or labels.max() >= c:
        raise ValueError(f"labels must be in 0..{c - 1}, got values {sorted(set(labels.tolist()))}.")
    pred = probs.argmax(1) if predictions is None else np.asarray(predictions).astype(int).ravel()
    if pred.shape != labels.shape or pred.min() < 0 or pred.max() >= c:
        raise ValueError(f"predictions must be (N,) classes in 0..{c - 1}, got shape {pred.shape}, values {sorted(set(pred.tolist()))}.")
    present = np.unique(labels)
    recalls = [float((pred[labels == k] == k).mean()) for k in present]
    f1s = []
    for k in np.union1d(present, np.unique(pred)):
        tp = float(((pred == k) & (labels == k)).sum())
        denom = float((pred == k).sum() + (labels == k).sum())
        f1s.append(2 * tp / denom if denom else 0.0)
    if c == 2:
        auc = binary_auc(probs[:, 1], labels == 1)
    else:
        aucs = [binary_auc(probs[:, k], labels == k) for k in range(c)]
        aucs = [a for a in aucs if not np.isnan(a)]
        auc = float(np.mean(aucs)) if aucs else float("nan")
    maj = int(np.bincount(labels, minlength=c).argmax()) if majority_class is None else int(majority_class)
    return {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "auc": auc,
        "f1": float(np.mean(f1s)),
        "majority_accuracy": float((labels == maj).mean()),
        "majority_balanced_accuracy": 1.0 / len(present),
    }


def working_verdict(scores: Mapping[str, Any], margin: float = WORKING_MARGIN) -> str:
    """
    ``"working"`` when ``scores["balanced_accuracy"]`` is at least ``margin`` above
    ``scores["majority_balanced_accuracy"]`` (what always predicting one class gives), else ``"not working"`` (the
    model predicts the majority class, whatever its AUC says about its ranking). NaN scores give ``"not working"``.

    Args:
        scores: a dict of :func:`classification_scores` (or a table row holding the same keys).
        margin: required gain over the majority level. Defaults to :data:`WORKING_MARGIN`.

    Example::

        >>> working_verdict({"balanced_accuracy": 0.55, "majority_balanced_accuracy": 0.5})
        'not working'
    """
    ba, chance = float(scores["balanced_accuracy"]), float(scores["majority_balanced_accuracy"])
    return "working" if ba >= chance + float(margin) - 1e-12 else "not working"


def majority_classes(items: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """
    The class a trivial classifier predicts for each task: the most frequent ``label`` of the task's items (e.g. the
    training split), the lowest label on ties.

    Args:
        items: checked datalist items with ``task_id`` and ``label``.

    Returns:
        ``{task_id: majority label}`` for the tasks present.
    """
    by_task: dict[int, list[int]] = {}
    for item in items:
        by_task.setdefault(int(item["task_id"]), []).append(int(item["label"]))
    return {t: int(np.bincount(labels).argmax()) for t, labels in sorted(by_task.items())}
