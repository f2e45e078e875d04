"""Engines: batch routing, inferers, loss adapters and handlers for MONAI / Ignite workflows."""

from medfm_ops.engines.handlers import AtomicCheckpointSaver, ExpertWarmupHandler
from medfm_ops.engines.lorkd_loss_adapter import LoRKDLossAdapter, NonFiniteLossError
from medfm_ops.engines.routing import RegionPrepareBatch, RoutedSimpleInferer, RoutedSlidingWindowInferer, batch_filenames

__all__ = [
    "AtomicCheckpointSaver",
    "ExpertWarmupHandler",
    "LoRKDLossAdapter",
    "NonFiniteLossError",
    "RegionPrepareBatch",
    "RoutedSimpleInferer",
    "RoutedSlidingWindowInferer",
    "batch_filenames",
]
