"""Ignite handlers of the medfm workflows."""

from medfm_ops.engines.handlers.checkpoint import AtomicCheckpointSaver
from medfm_ops.engines.handlers.expert_warmup import ExpertWarmupHandler

__all__ = ["AtomicCheckpointSaver", "ExpertWarmupHandler"]
