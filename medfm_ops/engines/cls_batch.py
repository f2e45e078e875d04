# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Batch preparation and the loss adapter of the classification workflows (task routing, frozen teacher)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.utils import CommonKeys
from torch import nn

from medfm_ops.engines.lorkd_loss_adapter import NonFiniteLossError
from medfm_ops.engines.routing import batch_filenames
from medfm_ops.utils.atomic_io import atomic_torch_save

__all__ = ["TaskPrepareBatch", "ClsLossAdapter", "TeacherFeatureCache"]


class TeacherFeatureCache:
    """
    Teacher outputs ``(logits, features)`` per item name (``file.npz[array][index]``), kept in memory and, with a
    ``path``, saved there (atomically) after every epoch that added entries and read back by the next run. Only valid
    without random augmentation (the teacher must see the same input every time): the caller decides.

    Args:
        path: cache file (e.g. ``{bundle}/models/teacher_features.pt``). Defaults to None (memory only).
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._dirty = False
        if self.path is not None and self.path.is_file():
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
            self.entries = {k: (v[0], v[1]) for k, v in raw.items()}

    def __call__(self, names: Sequence[str], image: torch.Tensor, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if names and len(names) == image.shape[0] and all(n in self.entries for n in names):
            logits, feats = zip(*(self.entries[n] for n in names))
            return torch.stack(logits).to(image.device), torch.stack(feats).to(image.device)
        logits, feats = teacher(image)
        if len(names) == image.shape[0] and len(set(names)) == len(names):
            for n, lo, fe in zip(names, logits.cpu(), feats.cpu()):
                self.entries[n] = (lo, fe)
            self._dirty = True
        return logits, feats

    def save(self, engine: Engine | None = None) -> None:
        if self.path is not None and self._dirty:
            atomic_torch_save({k: list(v) for k, v in self.entries.items()}, self.path)
            self._dirty = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)


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


class ClsLossAdapter(nn.Module):
    """
    ``forward(pred, targets)`` for :class:`monai.engines.SupervisedTrainer`: feeds a classification loss the batch
    entries it names in ``input_keys`` (from the network output — a dict, or a tensor read as ``logits``/``z_s`` —
    and the targets of :class:`TaskPrepareBatch` with ``targets_as_dict=True``); stops with
    :class:`~medfm_ops.engines.NonFiniteLossError` naming the batch's items when the loss is not finite. Exposes
    ``last_components``, ``last_per_sample_task`` and ``last_regions`` (task ids) to handlers (epoch summary,
    LoRKD* warm-up).

    Args:
        loss: a loss of :mod:`medfm_ops.losses.cls_losses` (it has ``input_keys``).
    """

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        if not hasattr(loss, "input_keys"):
            raise TypeError(f"{type(loss).__name__} has no input_keys: use a loss of medfm_ops.losses.cls_losses.")
        self.loss = loss
        self.last_regions: torch.Tensor | None = None

    @property
    def last_components(self) -> dict[str, float]:
        return getattr(self.loss, "last_components", {})

    @property
    def last_per_sample_task(self) -> torch.Tensor | None:
        return getattr(self.loss, "last_per_sample_task", None)

    def forward(self, pred: Any, targets: dict[str, Any]) -> torch.Tensor:
        if not isinstance(targets, dict):
            raise TypeError("ClsLossAdapter expects dict targets: use TaskPrepareBatch(targets_as_dict=True).")
        entries = dict(targets)
        entries.update(pred if isinstance(pred, dict) else {"logits": pred, "z_s": pred})
        value = self.loss(*[entries.get(k) for k in self.loss.input_keys])
        self.last_regions = targets["task_id"].detach()
        if not math.isfinite(float(value.detach())):
            raise NonFiniteLossError(
                f"training loss is {float(value.detach())} (components {self.last_components}) for the batch "
                f"{targets.get('filenames', [])}: check these images for NaN/Inf values or lower the learning rate."
            )
        return value
