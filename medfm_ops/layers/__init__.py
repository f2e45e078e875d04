# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Layers: the EKS (efficient knowledge separation) convolutions and their execution modes."""

from medfm_ops.layers.eks_base import EXPERT_SCALINGS, EKSLayer, check_scaling
from medfm_ops.layers.eks_conv import EKSConv
from medfm_ops.layers.eks_conv_transpose import EKSConvTranspose
from medfm_ops.layers.execution import EXECUTION_MODES, check_execution_mode
from medfm_ops.layers.expert_settings import DEFAULT_EXPERTS, ExpertSettings

__all__ = [
    "EKSLayer",
    "EKSConv",
    "EKSConvTranspose",
    "EXECUTION_MODES",
    "check_execution_mode",
    "EXPERT_SCALINGS",
    "check_scaling",
    "DEFAULT_EXPERTS",
    "ExpertSettings",
]
