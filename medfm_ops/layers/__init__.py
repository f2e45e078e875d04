"""Layers: the EKS (efficient knowledge separation) convolution."""

from medfm_ops.layers.eks_conv import EXECUTION_MODES, EKSConv

__all__ = ["EKSConv", "EXECUTION_MODES"]
from medfm_ops.layers.execution import select_execution

__all__ += ["select_execution"]
