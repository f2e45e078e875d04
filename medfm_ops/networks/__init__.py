# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Networks: expert conversion / fusion, per-call task routing, execution modes and LoRKD* rank allocation."""

from medfm_ops.networks.experts import (
    MONAI_UNET_DECODER,
    ExpertNetwork,
    backbone_parameters,
    eks_layers,
    expert_parameters,
    load_expert_state_dict,
    load_fused_expert,
    ranks_from_state_dict,
    export_expert,
    param_groups,
    set_expert_ranks,
    set_experts_trainable,
    to_experts,
)
from medfm_ops.networks.execution import select_execution, set_execution
from medfm_ops.networks.rank_allocation import lorkd_star_ranks, round_to_even
from medfm_ops.networks.spec import (
    LEGACY_EXPERT_SETTINGS,
    SPEC_FILENAME,
    check_same_regions,
    expert_model_from_spec,
    trained_expert_settings,
    instantiate,
    load_network_spec,
    save_network_spec,
    save_trained_network_spec,
)
from medfm_ops.networks.routing import TaskRouting
from medfm_ops.networks.teacher import freeze, load_teacher
from medfm_ops.networks.cls_shufflenet import ShuffleNetV2, channel_shuffle
from medfm_ops.networks.cls_mobilenet import MobileNetV2
from medfm_ops.networks.cls_heads import (
    PAD_LOGIT,
    TaskHeadNetwork,
    TeacherFeatures,
    export_cls_expert,
    head_layer_name,
    load_fused_cls_expert,
    load_teacher_features,
    mask_task_logits,
)
from medfm_ops.networks.cls_zoo import CLS_NETWORKS, ViTClassifier, build_cls_network, cls_network_def, network_config
from medfm_ops.networks.cls_reprogram import (
    ReprogrammedStudent,
    ReprogrammingModule,
    init_from_checkpoint,
    load_rd_student,
    teacher_for_finetuning,
    trained_student_network,
    trained_student_task_table,
)
from medfm_ops.networks.cls_pretrained import (
    HEAD_INITS,
    PretrainedClassifier,
    StartingClassifier,
    load_pretrained_classifier,
    retarget_classifier,
)

__all__ = [
    "ExpertNetwork",
    "MONAI_UNET_DECODER",
    "TaskRouting",
    "to_experts",
    "export_expert",
    "eks_layers",
    "expert_parameters",
    "backbone_parameters",
    "set_experts_trainable",
    "param_groups",
    "set_expert_ranks",
    "set_execution",
    "select_execution",
    "lorkd_star_ranks",
    "round_to_even",
    "ranks_from_state_dict",
    "load_expert_state_dict",
    "load_fused_expert",
    "load_teacher",
    "freeze",
    "instantiate",
    "save_network_spec",
    "save_trained_network_spec",
    "expert_model_from_spec",
    "trained_expert_settings",
    "LEGACY_EXPERT_SETTINGS",
    "load_network_spec",
    "check_same_regions",
    "SPEC_FILENAME",
    "ShuffleNetV2",
    "MobileNetV2",
    "channel_shuffle",
    "PAD_LOGIT",
    "TaskHeadNetwork",
    "TeacherFeatures",
    "export_cls_expert",
    "head_layer_name",
    "load_fused_cls_expert",
    "load_teacher_features",
    "mask_task_logits",
    "CLS_NETWORKS",
    "ViTClassifier",
    "build_cls_network",
    "cls_network_def",
    "network_config",
    "ReprogrammedStudent",
    "ReprogrammingModule",
    "init_from_checkpoint",
    "load_rd_student",
    "teacher_for_finetuning",
    "trained_student_network",
    "trained_student_task_table",
    "HEAD_INITS",
    "PretrainedClassifier",
    "StartingClassifier",
    "load_pretrained_classifier",
    "retarget_classifier",
]
