# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Multi-task classification scores as an Ignite metric (thin wrapper over :mod:`medfm_ops.metrics.cls_scores`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from medfm_ops.metrics.cls_scores import SCORE_NAMES, classification_scores, working_verdict
from medfm_ops.metrics.decision_threshold import threshold_decisions

__all__ = ["MultiTaskClsMetric", "mean_score_row", "task_score_rows"]


def mean_score_row(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``mean`` row of per-task rows: the unweighted mean of every score over the tasks (NaN ignored), ``n`` the
    total, and ``verdict`` "working" only when every task's row is working, else "not working on k of n tasks"."""
    mean = {k: float(np.nanmean([r[k] for r in rows])) if not all(math.isnan(r[k]) for r in rows) else float("nan")
            for k in SCORE_NAMES}  # fmt: skip
    failing = sum(working_verdict(r) != "working" for r in rows)
    verdict = "working" if not failing else f"not working on {failing} of {len(rows)} tasks"
    return {"task": "mean", "n": int(sum(r["n"] for r in rows)), **mean, "verdict": verdict}


def task_score_rows(
    probs: Sequence[np.ndarray], labels: Sequence[int], task_ids: Sequence[int], task_names: Mapping[int, str],
    majority: Mapping[int, int] | None = None, thresholds: Mapping[int, float | None] | None = None,
) -> list[dict[str, Any]]:
    """One row per task present (``task``, ``n``, :data:`SCORE_NAMES` and ``verdict``: "not working" when the
    balanced accuracy is at the majority level, see :func:`~medfm_ops.metrics.working_verdict`), then a ``mean`` row
    (:func:`mean_score_row`). ``probs[i]`` holds the class probabilities of sample ``i`` over ITS task's classes.
    ``thresholds``: task id -> two-class decision threshold (:func:`~medfm_ops.metrics.threshold_decisions`) of the
    predictions; tasks without one predict the argmax."""
    rows = []
    tids = np.asarray(task_ids)
    for t in sorted(set(int(x) for x in tids)):
        idx = np.nonzero(tids == t)[0]
        p = np.stack([probs[i] for i in idx])
        threshold = (thresholds or {}).get(t)
        pred = None if threshold is None else threshold_decisions(p, threshold)
        s = classification_scores(p, np.asarray(labels)[idx], (majority or {}).get(t), predictions=pred)
        rows.append({"task": task_names.get(t, str(t)), "n": int(len(idx)), **s, "verdict": working_verdict(s)})
    if rows:
        rows.append(mean_score_row(rows))
    return rows


class MultiTaskClsMetric(Metric):
    """
    Accuracy, balanced accuracy, AUC, F1 and what a majority-class predictor scores, per task and averaged over
    tasks; the rows also carry the "working" / "not working" verdict (balanced accuracy above the majority level).

    Reads ``engine.state.output`` ``{"pred": logits, "label": labels}`` and the batch's ``task_id``. The logits are
    either task-local (multi-head ``(B, C_max)``: the first ``n_t`` columns) or a unified head (``offsets`` given:
    columns ``offsets[t] .. offsets[t] + n_t``); probabilities are the softmax over the task's own classes.

    ``compute()`` returns the key metric (mean over tasks of ``key``, AUC by default); ``completed`` also puts
    ``mean_<score>`` and ``<score>/<task>`` into ``engine.state.metrics``. Under DDP the samples of all processes
    are gathered.

    Args:
        num_classes: classes per task (task-id order).
        task_names: task id -> name. Defaults to the ids.
        offsets: unified-head offset per task (foundation). Defaults to None (task-local logits).
        key: score returned by ``compute``. Defaults to ``"auc"``.
        majority: task id -> class predicted by the trivial classifier. Defaults to each task's most frequent.
        output_transform: as in Ignite. Defaults to identity.
        task_key: batch key of the task ids. Defaults to ``"task_id"``.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        task_names: Mapping[int, str] | None = None,
        offsets: Sequence[int] | None = None,
        key: str = "auc",
        majority: Mapping[int, int] | None = None,
        output_transform: Callable = lambda x: x,
        task_key: str = "task_id",
    ) -> None:
        if key not in SCORE_NAMES:
            raise ValueError(f"key must be one of {SCORE_NAMES}, got {key!r}.")
        self.num_classes = [int(n) for n in num_classes]
        self.task_names = {int(k): str(v) for k, v in (task_names or {t: str(t) for t in range(len(self.num_classes))}).items()}
        self.offsets = [int(o) for o in offsets] if offsets is not None else None
        self.key, self.majority, self.task_key = key, majority, task_key
        self._rows: list[dict[str, Any]] | None = None
        super().__init__(output_transform=output_transform)

    @classmethod
    def from_task_table(
        cls, task_table: Any, unified: bool = False, task_num_classes: Sequence[int] | None = None, **kwargs: Any
    ) -> MultiTaskClsMetric:
        """
        The metric of a :class:`~medfm_ops.data.TaskTable`'s tasks (class counts and names from the table).

        Args:
            task_table: the task table.
            unified: the logits are a unified head over all tasks (its offsets). Defaults to False.
            task_num_classes: class count per task overriding the table's (e.g. a single-task student scored on the
                columns of its task). Defaults to None.
            kwargs: further arguments of the constructor (``key``, ``majority``...).
        """
        offsets = [task_table.offset_of(t) for t in task_table.task_ids] if unified else None
        num = task_num_classes if task_num_classes is not None else task_table.task_num_classes
        return cls(num, task_table.task_names, offsets=offsets, **kwargs)

    @reinit__is_reduced
    def reset(self) -> None:
        self._probs: list[torch.Tensor] = []
        self._labels: list[int] = []
        self._tasks: list[int] = []
        self._rows = None

    def iteration_completed(self, engine: Engine) -> None:
        out = self._output_transform(engine.state.output)
        pred, label = (out["pred"], out["label"]) if isinstance(out, Mapping) else out[:2]
        tasks = engine.state.batch[self.task_key]
        self.update((pred, label, tasks))

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        pred, label, tasks = output
        pred = torch.as_tensor(pred).detach().float().cpu()
        label = torch.as_tensor(label).view(-1).long().cpu()
        tasks = torch.as_tensor(tasks).view(-1).long().cpu()
        for i in range(pred.shape[0]):
            t = int(tasks[i])
            if not 0 <= t < len(self.num_classes):
                raise ValueError(f"MultiTaskClsMetric: task id {t} outside 0..{len(self.num_classes) - 1}.")
            o = self.offsets[t] if self.offsets is not None else 0
            logits = pred[i, o : o + self.num_classes[t]]
            padded = torch.full((max(self.num_classes),), float("nan"))
            padded[: self.num_classes[t]] = torch.softmax(logits, 0)
            self._probs.append(padded)
            self._labels.append(int(label[i]))
            self._tasks.append(t)

    def _gathered(self) -> tuple[list[np.ndarray], list[int], list[int]]:
        if not self._labels and idist.get_world_size() == 1:
            raise NotComputableError("MultiTaskClsMetric needs at least one sample.")
        probs = torch.stack(self._probs) if self._probs else torch.zeros(0, max(self.num_classes))
        labels, tasks = torch.tensor(self._labels, dtype=torch.long), torch.tensor(self._tasks, dtype=torch.long)
        if idist.get_world_size() > 1:
            probs, labels, tasks = idist.all_gather(probs), idist.all_gather(labels), idist.all_gather(tasks)
        return ([p[: self.num_classes[int(t)]].numpy() for p, t in zip(probs, tasks)], labels.tolist(), tasks.tolist())

    def rows(self, thresholds: Mapping[int, float | None] | None = None) -> list[dict[str, Any]]:
        """Per-task rows and the ``mean`` row (see :func:`task_score_rows`) of the samples seen; ``thresholds``: task
        id -> two-class decision threshold of the predictions (default: the argmax)."""
        if thresholds:
            return task_score_rows(*self._gathered(), self.task_names, self.majority, thresholds)
        if self._rows is None:
            self._rows = task_score_rows(*self._gathered(), self.task_names, self.majority)
        return [dict(r) for r in self._rows]

    def task_outputs(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Task id -> ``(probs (N_t, C_t), labels (N_t,))`` of the samples seen."""
        probs, labels, tasks = self._gathered()
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for t in sorted(set(tasks)):
            idx = [i for i, x in enumerate(tasks) if x == t]
            out[t] = (np.stack([probs[i] for i in idx]), np.array([labels[i] for i in idx]))
        return out

    def compute(self) -> float:
        return float(self.rows()[-1][self.key])

    def completed(self, engine: Engine, name: str) -> None:
        rows = self.rows()
        metrics = engine.state.metrics
        metrics[name] = float(rows[-1][self.key])
        for k in SCORE_NAMES:
            metrics[f"mean_{k}"] = rows[-1][k]
        for r in rows[:-1]:
            for k in SCORE_NAMES:
                metrics[f"{k}/{r['task']}"] = r[k]
            metrics[f"working/{r['task']}"] = float(r["verdict"] == "working")
