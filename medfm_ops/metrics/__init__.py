# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Segmentation metrics per region and class (Dice, NSD in mm), report writers and learning-curve plots."""

from __future__ import annotations

from .dice_nsd import binary_dice_nsd
from .region_seg_metrics import RegionSegMetrics, region_metric_output_transform
from .learning_curve import compare_over_seeds, mean_std, plot_learning_curve
from .report import format_markdown, markdown_sections, region_summary, write_markdown_section, write_table
from .score_bars import plot_score_bars

__all__ = [
    "RegionSegMetrics",
    "binary_dice_nsd",
    "compare_over_seeds",
    "format_markdown",
    "markdown_sections",
    "mean_std",
    "plot_learning_curve",
    "plot_score_bars",
    "region_metric_output_transform",
    "region_summary",
    "write_markdown_section",
    "write_table",
]

from .cls_metrics import MultiTaskClsMetric, mean_score_row, task_score_rows
from .cls_scores import SCORE_NAMES, WORKING_MARGIN, binary_auc, classification_scores, majority_classes, working_verdict

__all__ += [
    "MultiTaskClsMetric",
    "SCORE_NAMES",
    "WORKING_MARGIN",
    "binary_auc",
    "classification_scores",
    "majority_classes",
    "mean_score_row",
    "task_score_rows",
    "working_verdict",
]
