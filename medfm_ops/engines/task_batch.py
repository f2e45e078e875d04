# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Batch preparation of the multi-task workflows, segmentation or classification: task routing, the targets of a
task-aware loss, a frozen teacher run without gradient."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import CommonKeys
from torch import nn

from medfm_ops.data.task_table import TASK_KINDS

if TYPE_CHECKING:
    from medfm_ops.engines.teacher_cache import TeacherFeatureCache

__all__ = ["TaskPrepareBatch", "RegionPrepareBatch", "batch_filenames"]


def batch_filenames(batch: dict, key: str = CommonKeys.IMAGE) -> list[str]:
    """Source file of every sample of a collated batch (``filename_or_obj`` meta), for error messages."""
    meta = getattr(batch.get(key), "meta", {}) or {}
    names = meta.get("filename_or_obj", [])
    return [str(n) for n in names] if isinstance(names, (list, tuple)) else [str(names)]


class TaskPrepareBatch:
    """
    ``prepare_batch`` for MONAI engines over a multi-task data set; returns ``(image, targets, args, kwargs)`` so that
    the engine calls ``network(image, *args, **kwargs)``.

    - ``route=True`` passes the ``(B,)`` task ids as the network's second argument (an
      :class:`~medfm_ops.networks.ExpertNetwork` or :class:`~medfm_ops.networks.TaskHeadNetwork`); ``route=False``
      calls ``network(image)`` (teacher, fused expert, stock network).
    - ``targets_as_dict=True`` gives the dict targets of :class:`~medfm_ops.engines.TaskLossAdapter` (training):
      ``{"label", <task_key>: (B,) task ids, "filenames"}``, plus ``"channel_mask"`` with a ``channel_mask_fn``,
      ``"global_label"`` when the batch has one, and, with a ``teacher`` (run without gradient),
      ``"teacher_logits"``, ``"teacher_features"`` (a teacher returning ``(logits, features)``) and, with
      ``task_offsets``, ``"teacher_task_logits"``. Otherwise the targets are the label tensor (evaluators).

    The kind (``"segmentation"`` / ``"classification"``, as in :class:`~medfm_ops.data.TaskTable`) sets the label
    form and the batch key of the task ids: segmentation labels are dense ``(B, C, *spatial)`` maps moved as they
    are, task ids under ``"region"``; classification labels are ``(B,)`` class indices, task ids under
    ``"task_id"``.

    The ``(B, C)`` channel mask (segmentation) is per case: the batch's ``mask_key`` entry when present (written by
    :class:`~medfm_ops.data.RegionLabelToChannelsd`: the channels the case's data set annotates, partial labels),
    else ``channel_mask_fn(task_ids)`` (every channel of the sample's task). A batch mask must stay inside the task's
    channels.

    Args:
        kind: ``"segmentation"`` or ``"classification"``. Defaults to ``"classification"``.
        channel_mask_fn: maps ``(B,)`` task ids to a ``(B, C)`` boolean mask of each sample's channels (e.g.
            ``TaskTable.channel_mask``); required for segmentation with ``targets_as_dict=True``. Defaults to None.
        teacher: frozen teacher network: ``(B, C_in, *sp) -> logits`` or ``-> (logits, features)``
            (:class:`~medfm_ops.networks.TeacherFeatures`). Defaults to None.
        route: pass the task ids to the network. Defaults to True.
        targets_as_dict: see above. Defaults to False.
        return_features: call the network with ``return_features=True``. Defaults to False.
        pass_teacher_features: call the network with ``teacher_features=`` (RD). Defaults to False.
        task_offsets: unified-head offset per task of the teacher's logits, to give ``teacher_task_logits`` (the
            teacher's logits over the sample's task classes, ``-inf`` padded). Defaults to None.
        task_num_classes: classes per task (with ``task_offsets``). Defaults to None.
        cache: a :class:`~medfm_ops.engines.TeacherFeatureCache` of a ``(logits, features)`` teacher. Defaults to
            None (the teacher runs on every batch).
        image_key, label_key: batch keys. Default to ``"image"``, ``"label"``.
        task_key: batch key of the ``(B,)`` task ids, also their key in the dict targets. Defaults to the kind's
            (``"region"``, ``"task_id"``).
        mask_key: batch key of the per-case ``(B, C)`` channel mask. Defaults to ``"channel_mask"``.
        teacher_image_key: batch key of the teacher's own input (the same cases at the teacher's resolution,
            :func:`~medfm_ops.data.with_teacher_images`); a cache still names the cases by ``image_key``. Defaults to
            None (the teacher reads ``image_key``).

    Raises:
        ValueError: on an unknown kind, segmentation ``targets_as_dict`` without ``channel_mask_fn``,
            ``pass_teacher_features`` without a teacher, ``task_offsets`` without ``task_num_classes`` or with a
            leave-one-task-out teacher (``unseen_task``: no logits of the task); (on call)
            when a batch mask has the wrong shape or selects a channel outside the case's task.
        KeyError: (on call) when the batch misses the image, label or task ids.
    """

    def __init__(
        self,
        kind: str = "classification",
        channel_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
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
        task_key: str | None = None,
        mask_key: str = "channel_mask",
        teacher_image_key: str | None = None,
    ) -> None:
        name = type(self).__name__
        if kind not in TASK_KINDS:
            raise ValueError(f"{name}(kind={kind!r}): kind must be one of {sorted(TASK_KINDS)}.")
        if kind == "segmentation" and targets_as_dict and channel_mask_fn is None:
            raise ValueError(f"{name}(targets_as_dict=True) of segmentation needs channel_mask_fn.")
        if pass_teacher_features and teacher is None:
            raise ValueError(f"{name}(pass_teacher_features=True) needs a teacher.")
        if task_offsets is not None and task_num_classes is None:
            raise ValueError(f"{name}(task_offsets=...) also needs task_num_classes.")
        unseen = getattr(teacher, "unseen_task", None)
        if task_offsets is not None and unseen:
            raise ValueError(f"{name}(task_offsets=...): logit KD needs the teacher's logits of the task, but the "
                             f"leave-one-task-out teacher was never trained on '{unseen}' (its logits have no class of "
                             "it); distil from its features instead (RD: reprogramming + co-trained student).")
        self.kind, self.channel_mask_fn = kind, channel_mask_fn
        self.teacher, self.route, self.targets_as_dict = teacher, route, targets_as_dict
        self.return_features, self.pass_teacher_features = return_features, pass_teacher_features
        self.task_offsets, self.task_num_classes, self.cache = task_offsets, task_num_classes, cache
        self.image_key, self.label_key, self.mask_key = image_key, label_key, mask_key
        self.task_key = task_key or TASK_KINDS[kind].item_key
        self.teacher_image_key = teacher_image_key

    def __call__(
        self, batchdata: dict, device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, Any, tuple, dict]:
        for key in (self.image_key, self.label_key, self.task_key):
            if key not in batchdata:
                raise KeyError(f"batch has no '{key}' entry (keys: {sorted(batchdata)}); check the datalist items "
                               "and transforms.")  # fmt: skip
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        if self.kind == "segmentation":
            label = batchdata[self.label_key].to(device=device, non_blocking=non_blocking, **kwargs)
        else:
            label = torch.as_tensor(batchdata[self.label_key]).view(-1).long().to(device=device)
        tasks = torch.as_tensor(batchdata[self.task_key]).view(-1).long().to(device=device)
        t_logits = t_feats = None
        if self.teacher is not None and (self.targets_as_dict or self.pass_teacher_features):
            t_logits, t_feats = self._run_teacher(batchdata, image)
        args = (tasks,) if self.route else ()
        kw: dict[str, Any] = {}
        if self.return_features:
            kw["return_features"] = True
        if self.pass_teacher_features:
            kw["teacher_features"] = t_feats
        if not self.targets_as_dict:
            return image, label, args, kw
        targets: dict[str, Any] = {"label": label, self.task_key: tasks}
        if self.channel_mask_fn is not None:
            targets["channel_mask"] = self._channel_mask(batchdata, tasks, label, device)
        targets["filenames"] = batch_filenames(batchdata, self.image_key)
        if "global_label" in batchdata:
            targets["global_label"] = torch.as_tensor(batchdata["global_label"]).view(-1).long().to(device=device)
        if t_logits is not None:
            targets["teacher_logits"] = t_logits
            if t_feats is not None:
                targets["teacher_features"] = t_feats
            if self.task_offsets is not None:
                targets["teacher_task_logits"] = self._task_logits(t_logits, tasks)
        return image, targets, args, kw

    def _run_teacher(self, batchdata: dict, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, features or None)`` of the frozen teacher (from the cache when there is one), no gradient; the
        teacher reads ``batchdata[teacher_image_key]`` when that key is set, else the student's ``image``."""
        if self.teacher_image_key is not None:
            if self.teacher_image_key not in batchdata:
                raise KeyError(f"batch has no '{self.teacher_image_key}' entry, the teacher's input (keys: "
                               f"{sorted(batchdata)}); check the datalist items (teacher_images) and transforms.")  # fmt: skip
            image = batchdata[self.teacher_image_key].to(device=image.device)
        with torch.no_grad():
            if self.cache is not None:
                logits, feats = self.cache(batch_filenames(batchdata, self.image_key), image, self.teacher)
            else:
                out = self.teacher(image)
                logits, feats = out if isinstance(out, (tuple, list)) else (out, None)
        return logits.detach(), feats

    def _task_logits(self, logits: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        width = max(self.task_num_classes)
        out = logits.new_full((logits.shape[0], width), float("-inf"))
        for i, t in enumerate(tasks.tolist()):
            o, n = self.task_offsets[t], self.task_num_classes[t]
            out[i, :n] = logits[i, o : o + n]
        return out

    def _channel_mask(
        self, batchdata: dict, tasks: torch.Tensor, label: torch.Tensor, device: str | torch.device | None
    ) -> torch.Tensor:
        task_mask = self.channel_mask_fn(tasks).to(device=device)
        if self.mask_key not in batchdata:
            return task_mask
        mask = torch.as_tensor(batchdata[self.mask_key]).to(device=device).bool()
        if tuple(mask.shape) != tuple(label.shape[:2]):
            raise ValueError(
                f"batch '{self.mask_key}' has shape {tuple(mask.shape)}, expected (B, C) = {tuple(label.shape[:2])} "
                f"of the label (batch {batch_filenames(batchdata, self.image_key)})."
            )
        outside = (mask & ~task_mask).any(dim=1).nonzero().flatten().tolist()
        if outside:
            names, kind = batch_filenames(batchdata, self.image_key), TASK_KINDS[self.kind]
            raise ValueError(
                f"batch '{self.mask_key}' selects channels outside the {kind.word} of case(s) "
                f"{[names[i] if i < len(names) else i for i in outside]} "
                f"({kind.entries_key} {tasks[outside].tolist()})."
            )
        return mask


class RegionPrepareBatch(TaskPrepareBatch):
    """
    Former name of the segmentation :class:`TaskPrepareBatch` (``kind="segmentation"``, task ids under
    ``region_key``); takes its former arguments.
    """

    def __init__(
        self,
        channel_mask_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        teacher: nn.Module | None = None,
        route: bool = True,
        targets_as_dict: bool = False,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        region_key: str = "region",
        mask_key: str = "channel_mask",
    ) -> None:
        super().__init__("segmentation", channel_mask_fn, teacher, route, targets_as_dict, image_key=image_key,
                         label_key=label_key, task_key=region_key, mask_key=mask_key)  # fmt: skip
