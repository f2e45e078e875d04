# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Engines: batch routing, inferers, loss adapters and handlers for MONAI / Ignite workflows."""

from medfm_ops.engines.handlers import (
    AtomicCheckpointSaver,
    EpochSummaryHandler,
    ExpertWarmupHandler,
    FinalValidationHandler,
    KeyMetricEarlyStop,
)
from medfm_ops.engines.loss_adapter import ClsLossAdapter, NonFiniteLossError, TaskLossAdapter
from medfm_ops.engines.lorkd_loss_adapter import LoRKDLossAdapter
from medfm_ops.engines.training_state import (
    ValidationState,
    atomic_write_text,
    model_fingerprint,
    resume_training,
    write_training_summary,
)
from medfm_ops.engines.lorkd_evaluation import count_flops, count_params, evaluate_decomposition, evaluate_segmentation
from medfm_ops.engines.task_batch import RegionPrepareBatch, TaskPrepareBatch, batch_filenames
from medfm_ops.engines.teacher_cache import TeacherFeatureCache, teacher_cache_settings
from medfm_ops.engines.rd_export import export_rd_student, rd_student_network_def, student_task_table
from medfm_ops.engines.cls_evaluation import (
    classifier_metric,
    decision_thresholds,
    evaluate_classifier,
    evaluate_cls_decomposition,
    evaluate_rd,
    score_classifier,
)
from medfm_ops.engines.handlers import LinearDecayHandler, TerminalProgressBar, RandomStates
from medfm_ops.engines.routing import RoutedSimpleInferer, RoutedSlidingWindowInferer
from medfm_ops.engines.region_window import RegionSlidingWindowInferer
from medfm_ops.engines.loss_log import loss_values

#: the former classification-only name of :func:`write_training_summary` (one writer for every kind of task; kept
#: while bundle configs switch)
write_cls_summary = write_training_summary

__all__ = [
    "AtomicCheckpointSaver",
    "EpochSummaryHandler",
    "ExpertWarmupHandler",
    "FinalValidationHandler",
    "KeyMetricEarlyStop",
    "TerminalProgressBar",
    "LoRKDLossAdapter",
    "NonFiniteLossError",
    "TaskLossAdapter",
    "RandomStates",
    "RegionPrepareBatch",
    "RoutedSimpleInferer",
    "RoutedSlidingWindowInferer",
    "RegionSlidingWindowInferer",
    "loss_values",
    "batch_filenames",
    "atomic_write_text",
    "resume_training",
    "ValidationState",
    "model_fingerprint",
    "write_training_summary",
    "count_flops",
    "count_params",
    "evaluate_decomposition",
    "evaluate_segmentation",
    "ClsLossAdapter",
    "TaskPrepareBatch",
    "TeacherFeatureCache",
    "teacher_cache_settings",
    "LinearDecayHandler",
    "evaluate_classifier",
    "evaluate_cls_decomposition",
    "evaluate_rd",
    "score_classifier",
    "classifier_metric",
    "decision_thresholds",
    "write_cls_summary",
    "export_rd_student",
    "rd_student_network_def",
    "student_task_table",
]
