# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Region-wise evaluation of a LoRKD decomposition: teacher, unfused expert model and every fused expert."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer
from monai.utils import ensure_tuple
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medfm_ops.engines.task_batch import TaskPrepareBatch
from medfm_ops.metrics import RegionSegMetrics, write_table
from medfm_ops.networks import eks_layers, export_expert

__all__ = ["count_params", "count_flops", "evaluate_segmentation", "evaluate_decomposition"]

logger = logging.getLogger("medfm.evaluate")


def count_params(net: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in net.parameters())


def count_flops(net: nn.Module, input_shape: Sequence[int], task_ids: torch.Tensor | None = None) -> float:
    """FLOPs of one forward pass on a zero input of ``input_shape`` ``(B, C, *spatial)``, per sample (torch counter)."""
    device = next(net.parameters()).device
    x = torch.zeros(*input_shape, device=device)
    was_training = net.training
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x) if task_ids is None else net(x, task_ids.to(device))
    net.train(was_training)
    return counter.get_total_flops() / input_shape[0]


def evaluate_segmentation(
    network: nn.Module,
    files: list[dict],
    preprocessing: Callable,
    inferer: Inferer,
    region_table: Any,
    device: torch.device | str,
    route: bool,
    tolerance_mm: float = 1.0,
) -> RegionSegMetrics:
    """
    Run ``network`` over ``files`` with ``inferer`` and compute region-wise DSC/NSD. Logs nothing itself (the caller
    prints one line per region).

    Args:
        network: ``(B, 1, *sp) -> (B, C_union, *sp)`` logits; with ``route=True`` called as ``network(x, region)``.
        files: datalist items (``image``, ``label``, ``region``).
        preprocessing: evaluation preprocessing, e.g. a bundle's ``validate#preprocessing``.
        inferer: e.g. a bundle's ``validate#inferer`` (a :class:`RoutedSlidingWindowInferer` when ``route=True``).
        region_table: the data set's region table (``region_channels``, ``region_names``, ``class_names``).
        device: where to run.
        route: pass each sample's region id to the network (unfused expert model).
        tolerance_mm: NSD tolerance in mm. Defaults to 1.0.

    Returns:
        the computed metric (``.table()`` gives the per-class rows).
    """
    metric = RegionSegMetrics(
        region_table.task_channels, region_table.task_names, region_table.class_names, tolerance_mm=tolerance_mm
    )
    prepare_batch = TaskPrepareBatch("segmentation", route=route)
    run_metric(metric, "mean_dsc", network, files, preprocessing, inferer, prepare_batch, device)
    return metric


def run_metric(
    metric: Any,
    name: str,
    network: nn.Module,
    files: list[dict],
    preprocessing: Callable,
    inferer: Inferer,
    prepare_batch: Callable,
    device: torch.device | str,
    batch_size: int = 1,
) -> None:
    """
    Run ``network`` over ``files`` in a MONAI :class:`~monai.engines.SupervisedEvaluator` that feeds the Ignite
    ``metric`` (attached as ``name``, not a key metric: no "best metric" bookkeeping or log line), with Ignite's
    run log lines silenced (the callers log their own line per task). Segmentation and classification scoring.
    """
    loader = DataLoader(Dataset(files, preprocessing), batch_size=batch_size, shuffle=False, num_workers=0)
    evaluator = SupervisedEvaluator(
        device=torch.device(device), val_data_loader=loader, network=network.to(device), inferer=inferer,
        prepare_batch=prepare_batch, decollate=False,
    )  # fmt: skip
    metric.attach(evaluator, name)
    level = evaluator.logger.level
    evaluator.logger.setLevel(logging.WARNING)
    try:
        evaluator.run()
    finally:
        evaluator.logger.setLevel(level)


def _region_scores(metric: RegionSegMetrics) -> dict[str, tuple[float, float]]:
    rows = metric.table()
    scores: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        scores.setdefault(r["region"], []).append((r["dsc_mean"], r["nsd_mean"]))
    return {k: (sum(d for d, _ in v) / len(v), sum(n for _, n in v) / len(v)) for k, v in scores.items()}


def _log_regions(label: str, scores: dict[str, tuple[float, float]]) -> None:
    for region, (dsc, nsd) in scores.items():
        logger.info(f"{label} | {region}: DSC {dsc:.4f}, NSD {nsd:.4f}")


def evaluate_decomposition(
    teacher: nn.Module | None,
    model: nn.Module,
    region_table: Any,
    files: list[dict],
    preprocessing: Callable,
    inferer: Inferer,
    device: torch.device | str,
    out_dir: str | os.PathLike,
    tolerance_mm: float = 1.0,
    network_label: str = "stock network (no experts)",
) -> list[dict]:
    """
    Evaluate the teacher, the unfused decomposed model and every fused expert region by region, with the bundle's
    own evaluation preprocessing and inferer; log one line per model and region (DSC/NSD); write
    ``{out_dir}/regions.csv|md`` (one row per model: DSC/NSD per region, their means, params and GFLOPs per sample of
    one window forward (``inferer.roi_size``), for training (the routed EKS model, expert deltas included) and for
    deployment (one fused expert)) and ``{out_dir}/classes.csv|md`` (per class). Fused experts are scored on their
    own region's cases only and run as plain networks (no routing), i.e. exactly as deployed.

    A ``model`` without EKS layers (the stock network of a baseline: single-task, multi-task, multi-task KD) gets one
    row instead, ``network_label``, scored unrouted as it is deployed (training = deployment parameters/FLOPs).

    Args:
        teacher: the foundation model, or None to skip its row.
        model: the trained :class:`~medfm_ops.networks.ExpertNetwork`, or a stock network without experts.
        region_table: the data set's region table.
        files: datalist items to score (``image``, ``label``, ``region``).
        preprocessing: evaluation preprocessing (``validate#preprocessing``).
        inferer: sliding-window inferer (``validate#inferer``): a :class:`RoutedSlidingWindowInferer`, which runs
            unrouted networks as MONAI's ``SlidingWindowInferer`` does.
        device: where to run.
        out_dir: where the tables go.
        tolerance_mm: NSD tolerance in mm. Defaults to 1.0.
        network_label: the row name of a model without experts. Defaults to ``"stock network (no experts)"``.

    Returns:
        the region-table rows.
    """
    os.makedirs(out_dir, exist_ok=True)
    names = [region_table.task_names[t] for t in sorted(region_table.task_names)]
    in_shape = (1, 1, *ensure_tuple(inferer.roi_size))
    rows: list[dict] = []
    class_rows: list[dict] = []

    def _row(
        label: str,
        scores: dict[str, tuple[float, float]],
        train_params: int,
        deploy_params: int,
        train_flops: float,
        deploy_flops: float,
    ) -> None:
        row: dict[str, Any] = {"model": label}
        for n in names:
            d, s = scores.get(n, (float("nan"), float("nan")))
            row[f"{n} DSC"], row[f"{n} NSD"] = d, s
        present = [scores[n] for n in names if n in scores]
        row["mean DSC"] = sum(d for d, _ in present) / max(len(present), 1)
        row["mean NSD"] = sum(s for _, s in present) / max(len(present), 1)
        row["train params (M)"] = train_params / 1e6
        row["deploy params (M)"] = deploy_params / 1e6
        row["train GFLOPs"] = train_flops / 1e9
        row["deploy GFLOPs"] = deploy_flops / 1e9
        rows.append(row)
        logger.info(f"{label}: mean DSC {row['mean DSC']:.4f}, mean NSD {row['mean NSD']:.4f}")

    def _score(label: str, net: nn.Module, cases: list[dict], route: bool) -> dict[str, tuple[float, float]]:
        m = evaluate_segmentation(net, cases, preprocessing, inferer, region_table, device, route, tolerance_mm)
        nonlocal class_rows
        class_rows += [{"model": label, **r} for r in m.table()]
        scores = _region_scores(m)
        _log_regions(label, scores)
        return scores

    if teacher is not None:
        scores = _score("Foundation (teacher)", teacher, files, False)
        n, f = count_params(teacher), count_flops(teacher, in_shape)
        _row("Foundation (teacher)", scores, n, n, f, f)

    if not any(True for _ in eks_layers(model)):  # a baseline's stock network: scored as deployed, unrouted
        scores = _score(network_label, model, files, False)
        n, f = count_params(model), count_flops(model, in_shape)
        _row(network_label, scores, n, n, f, f)
        _write(rows, class_rows, out_dir)
        return rows

    scores = _score("LoRKD (unfused)", model, files, True)
    backbone = export_expert(model, None)
    train_flops = count_flops(model, in_shape, torch.zeros(1, dtype=torch.long))
    deploy_flops = count_flops(backbone, in_shape)
    _row("LoRKD (unfused, routed)", scores, count_params(model), count_params(model), train_flops, train_flops)

    fused_scores: dict[str, tuple[float, float]] = {}
    for task in sorted(region_table.task_names):
        own = [f for f in files if int(f["region"]) == task]
        if not own:
            continue
        expert = export_expert(model, task).to(device)
        scores = _score(f"expert {region_table.task_names[task]} (fused)", expert, own, False)
        fused_scores.update(scores)
    _row(
        "LoRKD experts (fused, one per region)",
        fused_scores,
        count_params(model),
        count_params(backbone),
        train_flops,
        deploy_flops,
    )

    _write(rows, class_rows, out_dir)
    return rows


def _write(rows: list[dict], class_rows: list[dict], out_dir: str | os.PathLike) -> None:
    write_table(rows, os.path.join(out_dir, "regions.csv"), os.path.join(out_dir, "regions.md"))
    write_table(class_rows, os.path.join(out_dir, "classes.csv"), os.path.join(out_dir, "classes.md"))
