# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Batch preparation of the classification workflows (task routing, frozen teacher)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.utils import CommonKeys
from torch import nn

from medfm_ops.engines.cls_teacher_cache import TeacherFeatureCache
from medfm_ops.engines.loss_adapter import TaskLossAdapter
from medfm_ops.engines.routing import batch_filenames

__all__ = ["TaskPrepareBatch", "ClsLossAdapter"]


class TaskPrepareBatch:
    """
    ``prepare_batch`` for MONAI engines over a multi-task classification set; returns ``(image, targets, args,
    kwargs)`` so that the engine calls ``network(image, *args, **kwargs)``.

    Args:
        teacher: a :class:`~medfm_ops.networks.TeacherFeatures` (frozen; ``(logits, features)``, no gradient).
            Defaults to None.
        route: pass the ``(B,)`` task ids as the network's second argument (:class:`~medfm_ops.networks.TaskHeadNetwork`).
            Defaults to True.
        targets_as_dict: targets = ``{"label", "task_id", "global_label"?, "filenames", "teacher_logits"?,
            "teacher_features"?, "teacher_task_logits"?}`` (training) instead of the label tensor (evaluation).
            Defaults to False.
        return_features: call the network with ``return_features=True``. Defaults to False.
        pass_teacher_features: call the network with ``teacher_features=`` (RD). Defaults to False.
        task_offsets: unified-head offset per task of the teacher's logits, to give ``teacher_task_logits`` (the
            teacher's logits over the sample's task classes, ``-inf`` padded). Defaults to None.
        task_num_classes: classes per task (with ``task_offsets``).
        cache: a :class:`TeacherFeatureCache`. Defaults to None (the teacher runs on every batch).
    """

    def __init__(
        self,
        teacher: nn.Module | None = None,
        route: bool = True,
        targets_as_dict: bool = False,
        return_features: bool = False,
        pass_teacher_features: bool = False,
        task_offsets: Sequence[int] | None = None,
        task_num_classes: Sequence[int] | None = None,
        cache: TeacherFeatureCache | None = None,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        task_key: str = "task_id",
    ) -> None:
        if pass_teacher_features and teacher is None:
            raise ValueError("TaskPrepareBatch(pass_teacher_features=True) needs a teacher.")
        if task_offsets is not None and task_num_classes is None:
            raise ValueError("TaskPrepareBatch(task_offsets=...) also needs task_num_classes.")
        self.teacher, self.route, self.targets_as_dict = teacher, route, targets_as_dict
        self.return_features, self.pass_teacher_features = return_features, pass_teacher_features
        self.task_offsets, self.task_num_classes, self.cache = task_offsets, task_num_classes, cache
        self.image_key, self.label_key, self.task_key = image_key, label_key, task_key

    def _task_logits(self, logits: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        width = max(self.task_num_classes)
        out = logits.new_full((logits.shape[0], width), float("-inf"))
        for i, t in enumerate(tasks.tolist()):
            o, n = self.task_offsets[t], self.task_num_classes[t]
            out[i, :n] = logits[i, o : o + n]
        return out

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
        for key in (self.image_key, self.label_key, self.task_key):
            if key not in batchdata:
                raise KeyError(f"batch has no '{key}' entry (keys: {sorted(batchdata)}); check the datalist items and transforms.")
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = torch.as_tensor(batchdata[self.label_key]).view(-1).long().to(device=device)
        tasks = torch.as_tensor(batchdata[self.task_key]).view(-1).long().to(device=device)
        t_logits = t_feats = None
        if self.teacher is not None:
            names = batch_filenames(batchdata, self.image_key)
            if self.cache is not None:
                t_logits, t_feats = self.cache(names, image, self.teacher)
            else:
                t_logits, t_feats = self.teacher(image)
        args = (tasks,) if self.route else ()
        kw: dict[str, Any] = {}
        if self.return_features:
            kw["return_features"] = True
        if self.pass_teacher_features:
            kw["teacher_features"] = t_feats
        if not self.targets_as_dict:
            return image, label, args, kw
        targets: dict[str, Any] = {"label": label, "task_id": tasks, "filenames": batch_filenames(batchdata, self.image_key)}
        if "global_label" in batchdata:
            targets["global_label"] = torch.as_tensor(batchdata["global_label"]).view(-1).long().to(device=device)
        if t_logits is not None:
            targets.update(teacher_logits=t_logits, teacher_features=t_feats)
            if self.task_offsets is not None:
                targets["teacher_task_logits"] = self._task_logits(t_logits, tasks)
        return image, targets, args, kw


#: the former classification-only name of the one task loss adapter (kept while bundle configs switch)
ClsLossAdapter = TaskLossAdapter
