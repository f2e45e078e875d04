# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Clinical-site fine-tuning of one region expert (full, LoRA or sparse SH-PEFT), written as a complete, versioned
MONAI bundle.

Modules: ``source`` (what a site starts from), ``split`` (the saved train/validation split), ``head`` (site classes
onto the expert's channels), ``start`` (starting weights), ``lora`` (the modes; adapters, fused back),
``bundle_run`` (a bundle's own configs run in-process), ``scoring`` (DSC/NSD of written label maps), ``report``
(tables, changelog, README), ``settings`` (:py:class:`SiteFinetuneSettings`, every setting and its default, once),
``pipeline`` (:py:func:`finetune_expert`, the whole run). The sparse mode's maths is :py:mod:`medfm_ops.peft`, used
by the bundle's ``configs/train_sparse.json``. The data-efficiency study built on it (public/site split, N-case
draws) is a benchmark: ``benchmarks/site_study.py``.
"""

from __future__ import annotations

from .bundle_run import predict_with_bundle, run_bundle_configs
from .head import HEAD_MODES, HeadPlan, match_classes, out_channel_dims, plan_head, resize_head
from .lora import (
    FINETUNE_MODES,
    SingleTaskAdapter,
    add_lora,
    check_mode,
    fuse_lora,
    save_fused_lora,
    trainable_parameters,
)
from .pipeline import MODE_CONFIGS, SUMMARY_RELPATH, finetune_expert
from .scoring import score_label_maps
from .settings import SiteFinetuneSettings
from .source import INIT_MODES, SourceModel, load_source
from .split import SPLIT_FILENAME, SPLIT_ORIGINS, load_or_create_split, write_split, write_unseen_split
from .start import StartingPoint, prepare_start, site_class_names

__all__ = [
    "FINETUNE_MODES",
    "HEAD_MODES",
    "INIT_MODES",
    "MODE_CONFIGS",
    "SPLIT_FILENAME",
    "SPLIT_ORIGINS",
    "SUMMARY_RELPATH",
    "HeadPlan",
    "SingleTaskAdapter",
    "SiteFinetuneSettings",
    "SourceModel",
    "StartingPoint",
    "add_lora",
    "check_mode",
    "finetune_expert",
    "load_or_create_split",
    "load_source",
    "match_classes",
    "fuse_lora",
    "out_channel_dims",
    "plan_head",
    "predict_with_bundle",
    "prepare_start",
    "resize_head",
    "run_bundle_configs",
    "save_fused_lora",
    "score_label_maps",
    "site_class_names",
    "trainable_parameters",
    "write_split",
    "write_unseen_split",
]
