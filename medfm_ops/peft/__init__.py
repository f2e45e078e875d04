# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Sparse parameter-efficient fine-tuning (SH-PEFT): train only the most important weights of a stock network.

Modules: ``importance`` (task-driven and task-agnostic importance of every weight, from a data loader and a loss),
``head_warmup`` (fit a new task head on frozen features before the importance is estimated),
``selection`` (hybrid score or a baseline, one global top-k threshold), ``sparse_parameters`` (masked training:
frozen weights never change under any optimiser), ``delta`` (the result as a sparse delta on the base checkpoint),
``tensor_subset`` (whole tensors by name: the full / linear-probe / BitFit / adapter baselines, same interface as
``SparseParameters``), ``norm_statistics`` (BatchNorm running statistics kept fixed while a subset trains), ``linear_lora`` (LoRA on ``nn.Linear`` layers, fused back: the ViT adapter baseline).

Example::

    estimate = estimate_importance(net, train_loader, loss_function, variant="l2")  # one epoch
    sparse = SparseParameters(net, select_weights(estimate, budget=0.01, method="hybrid", lambda_=1.0))
    optimizer = sparse.attach(torch.optim.AdamW(sparse.parameters(), lr=1e-3, weight_decay=1e-2))
    ...  # train as usual; then
    delta = sparse_delta(base_state_dict, net.state_dict(), sparse.masks())
"""

from __future__ import annotations

from .delta import DELTA_FORMAT, apply_sparse_delta, save_sparse_result, sparse_delta, state_fingerprint
from .importance import IMPORTANCE_VARIANTS, ImportanceEstimate, default_prepare_batch, estimate_importance
from .head_warmup import fit_head
from .selection import (
    ALLOCATIONS,
    SELECTION_METHODS,
    budget_count,
    check_sparse_settings,
    importance_scores,
    module_shares,
    select_top_k,
    select_weights,
    top_level_module,
    weights_per_top_level_module,
)
from .norm_statistics import freeze_norm_statistics, norm_statistics_layers
from .sparse_parameters import SparseParameters
from .tensor_subset import TensorSubset, match_parameters
from .linear_lora import LoRALinear, add_linear_lora, fuse_linear_lora

__all__ = [
    "ALLOCATIONS",
    "DELTA_FORMAT",
    "IMPORTANCE_VARIANTS",
    "SELECTION_METHODS",
    "ImportanceEstimate",
    "LoRALinear",
    "SparseParameters",
    "TensorSubset",
    "add_linear_lora",
    "apply_sparse_delta",
    "budget_count",
    "check_sparse_settings",
    "default_prepare_batch",
    "estimate_importance",
    "fit_head",
    "freeze_norm_statistics",
    "fuse_linear_lora",
    "importance_scores",
    "match_parameters",
    "module_shares",
    "norm_statistics_layers",
    "save_sparse_result",
    "select_top_k",
    "select_weights",
    "sparse_delta",
    "state_fingerprint",
    "top_level_module",
    "weights_per_top_level_module",
]
