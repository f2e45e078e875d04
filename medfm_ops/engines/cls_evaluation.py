# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Evaluation of the classification workflows: per-task scores of a foundation, an unfused LoRKD model, its fused
experts, an RD student and its teacher, with train/deploy parameters and FLOPs; run summaries."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.inferers import SimpleInferer
from torch import nn

from medfm_ops.engines.task_batch import TaskPrepareBatch
from medfm_ops.engines.lorkd_evaluation import count_flops, count_params, run_metric
from medfm_ops.metrics import MultiTaskClsMetric, mean_score_row, write_table
from medfm_ops.networks.cls_heads import export_cls_expert

__all__ = [
    "classifier_metric",
    "decision_thresholds",
    "score_classifier",
    "evaluate_classifier",
    "evaluate_cls_decomposition",
    "evaluate_rd",
]

logger = logging.getLogger("medfm.evaluate")


def classifier_metric(
    network: nn.Module,
    files: list[dict],
    preprocessing: Callable,
    task_table: Any,
    device: torch.device | str,
    route: bool = False,
    unified: bool = False,
    prepare_batch: TaskPrepareBatch | None = None,
    batch_size: int = 8,
    majority: Mapping[int, int] | None = None,
) -> MultiTaskClsMetric:
    """
    Run ``network`` over ``files`` through an Ignite evaluator into a :class:`~medfm_ops.metrics.MultiTaskClsMetric`
    and return it: its ``rows()`` (per-task scores, optionally at decision thresholds) and ``task_outputs()``
    (per-task probabilities and labels).

    Args:
        network: a multi-head network (``route=True``), a unified-head foundation (``unified=True``) or a
            single-task stock classifier (task-local logits).
        files: checked datalist items.
        preprocessing: the bundle's deterministic preprocessing (``validate#preprocessing``).
        task_table: the :class:`~medfm_ops.data.TaskTable`.
        device: where to run.
        route: pass task ids to the network. Defaults to False.
        unified: logits are the unified head over all tasks. Defaults to False.
        prepare_batch: overrides the default ``TaskPrepareBatch(route=route)``. Defaults to None.
        batch_size: evaluation batch size. Defaults to 8.
        majority: task id -> class of the trivial classifier (e.g. :func:`~medfm_ops.metrics.majority_classes` of the
            training items). Defaults to None (each task's most frequent class in ``files``).
    """
    metric = MultiTaskClsMetric(
        task_table.task_num_classes, task_table.task_names,
        offsets=[task_table.offset_of(t) for t in task_table.task_ids] if unified else None, majority=majority,
    )  # fmt: skip
    run_metric(metric, "mean_auc", network, files, preprocessing, SimpleInferer(),
               prepare_batch or TaskPrepareBatch(route=route), device, batch_size)  # fmt: skip
    return metric


def score_classifier(
    network: nn.Module, files: list[dict], preprocessing: Callable, task_table: Any, device: torch.device | str,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Per-task score rows (and a ``mean`` row) of ``network`` on ``files`` at the argmax (``kwargs``: ``route``,
    ``unified``, ``prepare_batch``, ``batch_size``, ``majority`` of :func:`classifier_metric`)."""
    return classifier_metric(network, files, preprocessing, task_table, device, **kwargs).rows()


def decision_thresholds(metric: MultiTaskClsMetric) -> dict[int, dict[str, Any]]:
    """Task id -> :func:`~medfm_ops.metrics.choose_decision_threshold` of each two-class task with both classes among
    the samples of ``metric`` (a :func:`classifier_metric` run on validation items); other tasks keep the argmax."""
    from medfm_ops.metrics import choose_decision_threshold

    out = {}
    for t, (probs, labels) in metric.task_outputs().items():
        if probs.shape[1] == 2 and set(labels.tolist()) == {0, 1}:
            out[t] = choose_decision_threshold(probs, labels)
    return out


class _ScoreTable:
    """
    The rows of one evaluation table: models scored on the same items (:func:`score_classifier`), each with its
    (train, deploy) parameters and MFLOPs per sample, one log line per model; written as ``tasks.csv|md``.
    """

    def __init__(self, files: list[dict], preprocessing: Callable, task_table: Any, device: torch.device | str,
                 spatial_size: Sequence[int]) -> None:  # fmt: skip
        self.files, self.preprocessing, self.task_table, self.device = files, preprocessing, task_table, device
        self.shape = (1, 1, *[int(s) for s in spatial_size])
        self.rows: list[dict] = []

    def add(
        self, label: str, network: nn.Module | None, params: tuple[int, int] | None = None,
        flops: tuple[float, float] | None = None, scores: list[dict] | None = None, **score_kwargs: Any,
    ) -> list[dict]:  # fmt: skip
        """Score ``network`` (or take ``scores``) and add its rows; ``params``/``flops`` default to the network's own
        count for both training and deployment. Returns the scores."""
        if scores is None:
            scores = score_classifier(network, self.files, self.preprocessing, self.task_table, self.device, **score_kwargs)
        if params is None:
            params = (count_params(network),) * 2
        if flops is None:
            flops = (count_flops(network, self.shape),) * 2
        for r in scores:
            self.rows.append({"model": label, **r, "train params (M)": params[0] / 1e6, "deploy params (M)": params[1] / 1e6,
                              "train MFLOPs": flops[0] / 1e6, "deploy MFLOPs": flops[1] / 1e6})  # fmt: skip
        mean = scores[-1]
        logger.info(
            f"{label}: mean acc {mean['accuracy']:.4f} (majority {mean['majority_accuracy']:.4f}), balanced acc "
            f"{mean['balanced_accuracy']:.4f} (majority {mean['majority_balanced_accuracy']:.4f}), AUC {mean['auc']:.4f}, "
            f"F1 {mean['f1']:.4f}: {mean.get('verdict', '?')}"
        )
        return scores

    def write(self, out_dir: str | os.PathLike) -> list[dict]:
        os.makedirs(out_dir, exist_ok=True)
        write_table(self.rows, os.path.join(out_dir, "tasks.csv"), os.path.join(out_dir, "tasks.md"))
        return self.rows


def evaluate_cls_decomposition(
    teacher: nn.Module | None,
    model: nn.Module,
    task_table: Any,
    files: list[dict],
    preprocessing: Callable,
    spatial_size: Sequence[int],
    device: torch.device | str,
    out_dir: str | os.PathLike,
) -> list[dict]:
    """
    Score the foundation (unified head), the unfused multi-head model (routed) and every fused expert (its stock
    network and head, on its own task's items, no routing: exactly as deployed); write ``{out_dir}/tasks.csv|md``
    (one row per model and task plus a ``mean`` row per model, with train/deploy parameters and MFLOPs per sample)
    and return the rows.
    """
    table = _ScoreTable(files, preprocessing, task_table, device, spatial_size)
    model = model.eval()
    if teacher is not None:
        table.add("foundation (unified head)", teacher, unified=True)
    routed = getattr(model, "routed", False)
    train = (count_params(model), count_flops(model, table.shape, torch.zeros(1, dtype=torch.long)))
    table.add("LoRKD (unfused, routed)" if routed else "multi-head model", model, (train[0],) * 2, (train[1],) * 2, route=True)
    fused: list[dict] = []
    deploy = (0, 0.0)
    for t in task_table.task_ids:
        own = [f for f in files if int(f["task_id"]) == t]
        if not own:
            continue
        expert = export_cls_expert(model, t).eval()
        fused += score_classifier(expert, own, preprocessing, task_table, device)[:-1]
        deploy = (count_params(expert), count_flops(expert, table.shape))
    if fused:
        mean = mean_score_row(fused)
        name = "LoRKD experts (fused, one per task)" if routed else "task heads (exported, one per task)"
        table.add(name, None, (train[0], deploy[0]), (train[1], deploy[1]), scores=fused + [mean])
    return table.write(out_dir)


def evaluate_rd(
    rd_model: nn.Module,
    teacher: nn.Module,
    task_table: Any,
    files: list[dict],
    preprocessing: Callable,
    spatial_size: Sequence[int],
    device: torch.device | str,
    out_dir: str | os.PathLike,
    score_foundation: bool = True,
    export_dir: str | os.PathLike | None = None,
    score_teacher: bool = True,
) -> list[dict]:
    """
    Score the deployed RD student (its stock network + ``g``), the reprogrammed teacher ``g(phi(F_t(x)))`` and the
    foundation's unified head on ``files``; write ``{out_dir}/tasks.csv|md`` with params and MFLOPs (teacher + phi +
    g for the reprogrammed teacher) and return the rows. ``score_foundation=False`` leaves the foundation's own row
    out (a leave-one-task-out teacher has no head for the task). Defaults to True. ``export_dir``: the run's exported
    bundle; when it carries a decision threshold (:func:`~medfm_ops.bundle.calibrate_cls_bundle`) the student is also
    scored at that threshold, as the bundle decides. Defaults to None. ``score_teacher=False`` leaves out both
    teacher rows (reprogrammed teacher and foundation): a teacher that reads its own input at another resolution
    (``teacher_images``) would be scored on the student's input here. Defaults to True.
    """
    from medfm_ops.bundle.cls_calibration import bundle_decision_threshold

    table = _ScoreTable(files, preprocessing, task_table, device, spatial_size)
    student = rd_model.export_student().eval()
    params = (count_params(rd_model), count_params(student))
    metric = classifier_metric(student, files, preprocessing, task_table, device)  # one pass serves both rows
    table.add("RD student (deployed)", student, params, scores=metric.rows())
    decision = bundle_decision_threshold(export_dir) if export_dir is not None else None
    if decision is not None:
        task, threshold = decision
        table.add(f"RD student (exported bundle, decision threshold {threshold:.3g})", student, params,
                  scores=metric.rows({task_table.task_id_of(task): threshold}))  # fmt: skip
    if not score_teacher:
        return table.write(out_dir)
    predict = rd_model.predict
    rd_model.predict = "teacher"
    n_t, f_t = count_params(teacher), count_flops(teacher.teacher, table.shape)
    extra = count_params(rd_model.phi) + count_params(rd_model.g)
    try:
        pb = TaskPrepareBatch(teacher=teacher, route=False, pass_teacher_features=True)
        table.add("reprogrammed teacher g(phi(F_t))", rd_model.eval(), (extra, n_t + extra), (f_t, f_t), prepare_batch=pb)
    finally:
        rd_model.predict = predict
    if score_foundation:
        table.add("foundation (unified head)", teacher.teacher, (n_t, n_t), (f_t, f_t), unified=True)
    return table.write(out_dir)


def evaluate_classifier(
    network: nn.Module,
    model_path: str | os.PathLike,
    task_table: Any,
    files: list[dict],
    preprocessing: Callable,
    spatial_size: Sequence[int],
    device: torch.device | str,
    out_dir: str | os.PathLike,
    label: str = "foundation (unified head)",
    unified: bool = True,
    majority: Mapping[int, int] | None = None,
) -> list[dict]:
    """Load ``model_path`` into ``network``, score it per task (see :func:`score_classifier`; ``majority`` as there),
    log one line and write ``{out_dir}/tasks.csv|md`` with its params and MFLOPs per sample."""
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"no trained model at {model_path}: run the bundle's configs/train.json first.")
    network.load_state_dict(torch.load(model_path, map_location="cpu", weights_only=True))
    table = _ScoreTable(files, preprocessing, task_table, device, spatial_size)
    table.add(label, network.eval(), unified=unified, majority=majority)
    return table.write(out_dir)
