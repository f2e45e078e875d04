# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Classification heads: one head per task over a (routed) backbone, export of a task as its stock network, and
penultimate features of a frozen teacher."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from medfm_ops.networks.experts import ExpertNetwork, export_expert, load_expert_state_dict
from medfm_ops.networks.routing import checked_task_ids

__all__ = [
    "PAD_LOGIT",
    "TaskHeadNetwork",
    "TeacherFeatures",
    "head_layer_name",
    "load_teacher_features",
    "export_cls_expert",
    "load_fused_cls_expert",
    "mask_task_logits",
]

#: value of the logits of classes a sample's task does not have (a multi-head batch is padded to the widest task)
PAD_LOGIT = float("-inf")


def head_layer_name(net: nn.Module) -> str:
    """Qualified name of a classifier's final ``nn.Linear`` (the last one registered: ``fc`` of MONAI's ResNet,
    ``class_layers.out`` of DenseNet121, ``classification_head`` of ViT).

    Raises:
        ValueError: when the network has no ``nn.Linear``.
    """
    net = net.net if isinstance(net, ExpertNetwork) else net
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(net).__name__} has no nn.Linear classifier layer: pass `head` explicitly.")
    return names[-1]


def _set(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def mask_task_logits(logits: torch.Tensor, task_ids: torch.Tensor, num_classes: Sequence[int]) -> torch.Tensor:
    """``logits (B, C_max)`` with the classes beyond each sample's task's count set to ``-inf``."""
    n = torch.as_tensor(list(num_classes), device=logits.device)[task_ids.long()]
    valid = torch.arange(logits.shape[1], device=logits.device)[None] < n[:, None]
    return logits.masked_fill(~valid, PAD_LOGIT)


class TaskHeadNetwork(nn.Module):
    """
    A classifier with one linear head per task over a shared (optionally expert-routed) feature backbone.

    The backbone's final ``nn.Linear`` (see :func:`head_layer_name`) is replaced by ``nn.Identity`` (so the backbone
    outputs its penultimate features) and ``heads[t]`` is a new ``nn.Linear(feature_dim, num_classes[t])``.

    Args:
        backbone: a stock classifier (MTL) or its :func:`~medfm_ops.networks.to_experts` conversion (LoRKD: each
            sample's task id is routed to the experts). The module is used as is (not copied).
        num_classes: classes of every task, in task-id order.
        head: qualified name of the backbone's classifier layer. Defaults to the last ``nn.Linear``.

    Forward: ``(x (B, C, *sp), task_ids (B,))`` -> logits ``(B, max(num_classes))``, padded with ``-inf`` beyond each
    sample's task; with ``return_features=True`` a dict ``{"logits", "features" (B, feature_dim)}``.

    Example::

        >>> net = TaskHeadNetwork(to_experts(ShuffleNetV2(3, 1, 2, (1, 1, 1), (8, 16, 32, 64, 128)), 2), [2, 3])
        >>> net(torch.zeros(2, 1, 16, 16, 16), torch.tensor([0, 1])).shape
        torch.Size([2, 3])
    """

    def __init__(self, backbone: nn.Module, num_classes: Sequence[int], head: str | None = None) -> None:
        super().__init__()
        if not num_classes or any(int(n) < 2 for n in num_classes):
            raise ValueError(f"num_classes needs one entry >= 2 per task, got {list(num_classes)}.")
        self.num_classes = [int(n) for n in num_classes]
        self.head_name = head or head_layer_name(backbone)
        inner = backbone.net if isinstance(backbone, ExpertNetwork) else backbone
        layer = inner.get_submodule(self.head_name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"backbone layer '{self.head_name}' is {type(layer).__name__}, not nn.Linear.")
        self.feature_dim = layer.in_features
        _set(inner, self.head_name, nn.Identity())
        self.backbone = backbone
        self.heads = nn.ModuleList(nn.Linear(self.feature_dim, n) for n in self.num_classes)

    @property
    def routed(self) -> bool:
        return isinstance(self.backbone, ExpertNetwork)

    @property
    def num_tasks(self) -> int:
        return len(self.num_classes)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Expert ranks of a routed backbone."""
        return self.backbone.ranks

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, return_features: bool = False) -> Any:
        task_ids = checked_task_ids(task_ids, x, self.num_tasks, "task heads")
        feats = self.backbone(x, task_ids) if self.routed else self.backbone(x)
        logits = feats.new_full((x.shape[0], max(self.num_classes)), PAD_LOGIT)
        for t in task_ids.unique().tolist():
            idx = (task_ids == t).nonzero().view(-1)
            logits = logits.index_copy(
                0, idx, torch.nn.functional.pad(self.heads[t](feats[idx]), (0, logits.shape[1] - self.num_classes[t]), value=PAD_LOGIT)
            )
        return {"logits": logits, "features": feats} if return_features else logits


def export_cls_expert(model: nn.Module, task: int) -> nn.Module:
    """
    Task ``task`` of a :class:`TaskHeadNetwork` as an instance of the backbone's STOCK class: its expert fused into
    every EKS conv (routed backbone) and ``heads[task]`` put back as the classifier layer. Its state dict loads
    strictly into the stock ``network_def`` with ``num_classes`` = that task's class count. The model is not changed.

    Raises:
        IndexError: for a task outside ``[0, num_tasks)``.
    """
    model = getattr(model, "module", model)
    if not isinstance(model, TaskHeadNetwork):
        raise TypeError(f"expected a TaskHeadNetwork, got {type(model).__name__}.")
    if not 0 <= task < model.num_tasks:
        raise IndexError(f"task {task} out of range for {model.num_tasks} task heads.")
    net = export_expert(model.backbone, task) if model.routed else copy.deepcopy(model.backbone)
    _set(net, model.head_name, copy.deepcopy(model.heads[task]))
    return net


def load_fused_cls_expert(
    stock_network: nn.Module, model: nn.Module, checkpoint: str | os.PathLike | dict, task: int
) -> nn.Module:
    """Load a trained :class:`TaskHeadNetwork` checkpoint into ``model``, export task ``task`` and load it into
    ``stock_network`` (built from the bundle's ``network_def`` with that task's class count; strict)."""
    if isinstance(checkpoint, (str, os.PathLike)) and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no trained model at {checkpoint}: run the bundle's configs/train.json first.")
    if getattr(model, "routed", False):
        load_expert_state_dict(model, checkpoint)
    else:
        sd = torch.load(checkpoint, map_location="cpu", weights_only=True) if not isinstance(checkpoint, dict) else checkpoint
        model.load_state_dict(sd)
    stock_network.load_state_dict(export_cls_expert(model, task).state_dict(), strict=True)
    return stock_network


class TeacherFeatures(nn.Module):
    """
    Run a frozen teacher as a black box and return ``(logits, penultimate features)``: the input of its classifier
    layer is captured with a forward pre-hook; nothing is computed with gradient and nothing is trained.

    Args:
        teacher: the teacher network (e.g. from :func:`~medfm_ops.networks.load_teacher`).
        head: qualified name of its classifier layer. Defaults to its last ``nn.Linear``.
        unseen_task: the task the teacher was NOT trained on (a leave-one-task-out teacher): its features serve
            that task, its logits have no class of it. Defaults to None.
    """

    def __init__(self, teacher: nn.Module, head: str | None = None, unseen_task: str | None = None) -> None:
        super().__init__()
        inner = getattr(teacher, "net", teacher)
        self.teacher, self.unseen_task = teacher, unseen_task
        layer = inner.get_submodule(head or head_layer_name(inner))
        self.feature_dim = layer.in_features
        self._captured: list[torch.Tensor] = []
        layer.register_forward_pre_hook(lambda m, args: self._captured.append(args[0].detach()))

    def train(self, mode: bool = True) -> TeacherFeatures:  # a teacher never trains
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._captured.clear()
        logits = self.teacher(x)
        if len(self._captured) != 1:
            raise RuntimeError(f"teacher classifier layer ran {len(self._captured)} times in one forward (expected 1).")
        return logits.detach(), self._captured.pop().flatten(1)


def load_teacher_features(
    teacher_path: str | os.PathLike,
    task_table: Any,
    device: str | torch.device = "cpu",
    target_task: str | None = None,
    leave_task_out: bool = False,
) -> TeacherFeatures:
    """
    The frozen teacher bundle at ``teacher_path`` as :class:`TeacherFeatures` (``(logits, features)``, no gradient).

    - ``leave_task_out=False``: the teacher must have been trained on the data set's task table (same tasks, ids and
      labels, :func:`~medfm_ops.networks.load_teacher`'s check);
    - ``leave_task_out=True``: the teacher must NOT have been trained on ``target_task`` (the leave-one-task-out
      setting of RD: a foundation pre-trained on other tasks, e.g. ``foundation_cls`` with ``--exclude_tasks``);
      its task table may differ from the data set's, as only its features are used.

    Args:
        teacher_path: the teacher bundle directory (``models/model.pt`` + ``models/network_def.json``).
        task_table: the data set's :class:`~medfm_ops.data.TaskTable`.
        device: where to put the teacher. Defaults to ``"cpu"``.
        target_task: the task the student learns (with ``leave_task_out``).
        leave_task_out: see above. Defaults to False.

    Raises:
        ValueError: with ``leave_task_out``, when ``target_task`` is missing, the teacher recorded no task table,
            or its table contains ``target_task``; without it, when the tables differ.
    """
    from medfm_ops.networks.spec import load_network_spec
    from medfm_ops.networks.teacher import load_teacher

    if not leave_task_out:
        return TeacherFeatures(load_teacher(teacher_path, device=device, region_table=task_table))
    if not target_task:
        raise ValueError("load_teacher_features(leave_task_out=True) needs the target_task the student learns.")
    spec = load_network_spec(os.path.join(teacher_path, "models"))
    seen = [r["name"] for r in spec.get("tasks") or []]
    if not seen:
        raise ValueError(f"teacher {teacher_path}: its models/network_def.json records no task table, so it cannot be "
                         "shown to have been trained without the target task.")  # fmt: skip
    if target_task in seen:
        raise ValueError(
            f"teacher {teacher_path} was trained on the target task '{target_task}' (its tasks: {seen}): not a "
            f"leave-one-task-out teacher. Train foundation_cls with --exclude_tasks \"['{target_task}']\" first."
        )
    return TeacherFeatures(load_teacher(teacher_path, device=device, region_table=None), unseen_task=target_task)
