# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Segmentation metrics per region and class (Dice, NSD in mm) and their tables."""

from __future__ import annotations

from .dice_nsd import binary_dice_nsd
from .region_seg_metrics import RegionSegMetrics, region_metric_output_transform, task_seg_metrics
from .report import format_markdown, region_summary, write_table

__all__ = [
    "RegionSegMetrics",
    "task_seg_metrics",
    "binary_dice_nsd",
    "format_markdown",
    "region_metric_output_transform",
    "region_summary",
    "write_table",
]

from .cls_metrics import MultiTaskClsMetric, mean_score_row, task_score_rows
from .decision_threshold import (
    ARGMAX_THRESHOLD,
    choose_decision_threshold,
    specificity_sensitivity,
    threshold_decisions,
)
from .cls_scores import SCORE_NAMES, WORKING_MARGIN, binary_auc, classification_scores, majority_classes, working_verdict

__all__ += [
    "ARGMAX_THRESHOLD",
    "MultiTaskClsMetric",
    "SCORE_NAMES",
    "WORKING_MARGIN",
    "binary_auc",
    "choose_decision_threshold",
    "classification_scores",
    "majority_classes",
    "mean_score_row",
    "specificity_sensitivity",
    "task_score_rows",
    "threshold_decisions",
    "working_verdict",
]
