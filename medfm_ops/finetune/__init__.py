# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Clinical-site fine-tuning of one region network (full or LoRA), with a saved split and before/after reports."""

from __future__ import annotations

from .head import HEAD_MODES, HeadPlan, match_classes, out_channel_dims, plan_head, resize_head
from .lora import FINETUNE_MODES, SingleTaskAdapter, add_lora, check_mode, merge_lora, trainable_parameters
from .site import (
    ChannelSubsetLoss,
    SiteModel,
    SiteReport,
    build_site_model,
    evaluate,
    machine_info,
    site_metric,
    site_postprocessing,
    site_transforms,
)
from .source import INIT_MODES, SourceModel, load_source
from .split import SPLIT_FILENAME, load_or_create_split

__all__ = [
    "FINETUNE_MODES",
    "HEAD_MODES",
    "INIT_MODES",
    "SPLIT_FILENAME",
    "ChannelSubsetLoss",
    "HeadPlan",
    "SingleTaskAdapter",
    "SiteModel",
    "SiteReport",
    "SourceModel",
    "add_lora",
    "build_site_model",
    "check_mode",
    "evaluate",
    "load_or_create_split",
    "load_source",
    "machine_info",
    "match_classes",
    "merge_lora",
    "out_channel_dims",
    "plan_head",
    "resize_head",
    "site_metric",
    "site_postprocessing",
    "site_transforms",
    "trainable_parameters",
]
