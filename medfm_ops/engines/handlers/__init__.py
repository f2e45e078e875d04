# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Ignite handlers of the medfm workflows (thin adapters; the maths lives in plain modules)."""

from medfm_ops.engines.handlers.checkpoint import AtomicCheckpointSaver
from medfm_ops.engines.handlers.early_stop import KeyMetricEarlyStop
from medfm_ops.engines.handlers.epoch_summary import EpochSummaryHandler
from medfm_ops.engines.handlers.expert_warmup import ExpertWarmupHandler
from medfm_ops.engines.handlers.final_validation import FinalValidationHandler
from medfm_ops.engines.handlers.linear_decay import LinearDecayHandler
from medfm_ops.engines.handlers.progress import TerminalProgressBar
from medfm_ops.engines.handlers.random_states import RandomStates

__all__ = [
    "AtomicCheckpointSaver",
    "EpochSummaryHandler",
    "ExpertWarmupHandler",
    "FinalValidationHandler",
    "KeyMetricEarlyStop",
    "LinearDecayHandler",
    "TerminalProgressBar",
    "RandomStates",
]
