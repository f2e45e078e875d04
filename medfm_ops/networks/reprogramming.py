# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Reprogramming Distillation (RD) networks: the reprogramming module phi on a frozen teacher's features and a
student sharing the classifier g with it."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm_ops.networks.cls_heads import _set, head_layer_name

__all__ = [
    "ReprogrammingModule",
    "ReprogrammedStudent",
    "init_from_checkpoint",
    "teacher_for_finetuning",
    "load_rd_student",
    "trained_student_network",
    "trained_student_task_table",
]

#: keys of a classifier config that hold its number of outputs (MONAI ResNet/ViT: num_classes, DenseNet: out_channels)
_OUT_KEYS = ("num_classes", "out_channels")


class _ResidualBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ReprogrammingModule(nn.Module):
    """
    phi: teacher features ``(B, in_dim)`` -> ``(B, out_dim)``: a linear map to the student's width followed by
    ``num_blocks`` pre-norm residual MLP blocks.

    Args:
        in_dim: teacher feature width.
        out_dim: student feature width (the input of the shared classifier g).
        num_blocks: residual blocks. Defaults to 2.
    """

    def __init__(self, in_dim: int, out_dim: int, num_blocks: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.blocks = nn.Sequential(*[_ResidualBlock(out_dim) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.proj(x))


class ReprogrammedStudent(nn.Module):
    """
    The trainable part of RD: student backbone ``F_s`` (a stock classifier whose final linear layer is replaced by
    the shared classifier ``g``), reprogramming module ``phi`` and ``g``. The frozen teacher is NOT a submodule: its
    features come in as ``teacher_features`` (computed without gradient, possibly from a cache).

    Forward ``(x, teacher_features=None, return_features=False)``:

    - default: the student's logits ``g(F_s(x))`` ``(B, num_classes)`` (what is deployed);
    - ``predict="teacher"`` (direct-reprogramming baseline): ``g(phi(f_t))``, needs ``teacher_features``;
    - ``return_features=True``: ``{"z_s", "f_s"}`` plus, with ``teacher_features``, ``{"z_t", "f_t"}`` with
      ``f_t = phi(teacher_features)`` the REPROGRAMMED teacher features (the input of ``g``, compared with ``f_s``
      by RD's CKA term, so that ``phi`` gets its gradient) and ``z_t = g(f_t)``.

    Args:
        student: stock classifier (e.g. MONAI ``resnet18``) built with ``num_classes`` outputs.
        teacher_dim: teacher feature width.
        num_blocks: residual blocks of phi. Defaults to 2.
        predict: ``"student"`` or ``"teacher"``. Defaults to ``"student"``.
        head: qualified name of the student's classifier layer. Defaults to its last ``nn.Linear``.
    """

    def __init__(
        self, student: nn.Module, teacher_dim: int, num_blocks: int = 2, predict: str = "student", head: str | None = None
    ) -> None:
        super().__init__()
        if predict not in ("student", "teacher"):
            raise ValueError(f"predict must be 'student' or 'teacher', got {predict!r}.")
        self.head_name = head or head_layer_name(student)
        layer = student.get_submodule(self.head_name)
        self.feature_dim, self.num_classes = layer.in_features, layer.out_features
        self.g = layer
        _set(student, self.head_name, nn.Identity())
        self.student = student
        self.phi = ReprogrammingModule(int(teacher_dim), self.feature_dim, num_blocks)
        self.predict = predict

    def forward(self, x: torch.Tensor, teacher_features: torch.Tensor | None = None, return_features: bool = False) -> Any:
        if self.predict == "teacher" and not return_features:
            if teacher_features is None:
                raise ValueError("predict='teacher' needs teacher_features (TaskPrepareBatch(pass_teacher_features=True)).")
            return self.g(self.phi(teacher_features))
        f_s = self.student(x)
        z_s = self.g(f_s)
        if not return_features:
            return z_s
        out = {"z_s": z_s, "f_s": f_s}
        if teacher_features is not None:
            f_t = self.phi(teacher_features)
            out.update(z_t=self.g(f_t), f_t=f_t)
        return out

    def export_student(self) -> nn.Module:
        """The deployed artifact: the student's stock network with ``g`` as its classifier layer (a copy)."""
        net = copy.deepcopy(self.student)
        _set(net, self.head_name, copy.deepcopy(self.g))
        return net


def init_from_checkpoint(net: nn.Module, checkpoint: str | os.PathLike, skip: str | None = None) -> nn.Module:
    """
    Initialise ``net`` from a state dict file (e.g. the foundation's ``models/model.pt``) for full fine-tuning: every
    entry with the same name and shape is loaded; the classifier layer (``skip``, default the last ``nn.Linear``)
    keeps its fresh initialisation.

    Raises:
        FileNotFoundError: when the checkpoint is missing.
        ValueError: when fewer than half of the network's entries could be loaded (a different architecture).
    """
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"no checkpoint at {checkpoint}: train the foundation bundle first.")
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    skip = skip or head_layer_name(net)
    own = net.state_dict()
    take = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape and not k.startswith(skip + ".")}
    if len(take) < len(own) / 2:
        raise ValueError(f"{checkpoint}: only {len(take)} of {len(own)} entries match the network: another architecture?")
    net.load_state_dict(take, strict=False)
    return net


def teacher_for_finetuning(
    teacher_path: str | os.PathLike, num_classes: int, region_table: Any = None
) -> nn.Module:
    """
    The full fine-tuning baseline of RD: the teacher bundle's own network (its ``models/network_def.json``) built with
    a fresh ``num_classes``-way classifier and every other entry initialised from its ``models/model.pt``
    (:func:`init_from_checkpoint`). Trainable (not frozen).

    Args:
        teacher_path: the teacher bundle directory (e.g. ``bundles/foundation_cls``).
        num_classes: classes of the downstream task.
        region_table: the data set's task table; the teacher's recorded layout must match. Defaults to None.

    Raises:
        FileNotFoundError: when the bundle has no trained model.
        ValueError: when the teacher's network config has neither ``num_classes`` nor ``out_channels``.
    """
    from medfm_ops.networks.spec import instantiate
    from medfm_ops.networks.teacher import _bundle_network_def

    root = Path(teacher_path)
    net_def = dict(_bundle_network_def(root, region_table))
    key = next((k for k in _OUT_KEYS if k in net_def), None)
    if key is None:
        raise ValueError(f"teacher {root}: its network_def has none of {_OUT_KEYS} to set the task's class count.")
    net_def[key] = int(num_classes)
    return init_from_checkpoint(instantiate(net_def), root / "models" / "model.pt")


def load_rd_student(stock_network: nn.Module, checkpoint: str | os.PathLike | dict) -> nn.Module:
    """Load the deployed student of a :class:`ReprogrammedStudent` checkpoint (``student.*`` and the shared
    classifier ``g.*``) into ``stock_network`` (the student's stock class with the task's class count; strict).

    Raises:
        FileNotFoundError: when the checkpoint is missing (train the bundle first).
    """
    if not isinstance(checkpoint, dict):
        if not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"no trained model at {checkpoint}: run the bundle's configs/train.json first.")
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    head = head_layer_name(stock_network)
    sd = {k[len("student."):]: v for k, v in checkpoint.items() if k.startswith("student.")}
    sd.update({f"{head}.{k[2:]}": v for k, v in checkpoint.items() if k.startswith("g.")})
    stock_network.load_state_dict(sd, strict=True)
    return stock_network



def _trained_student_spec(ckpt_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The spec an rd_cls run recorded in ``{ckpt_dir}/network_def.json``, or None before any training.

    Raises:
        ValueError: when ``model.pt`` exists without ``network_def.json`` (a run of rd_cls older than 0.3.0), or the
            spec records no task.
    """
    from medfm_ops.networks.spec import SPEC_FILENAME, load_network_spec

    ckpt = Path(ckpt_dir)
    if (ckpt / SPEC_FILENAME).is_file():
        spec = load_network_spec(ckpt)
        if not spec.get("tasks"):
            raise ValueError(f"{ckpt / SPEC_FILENAME} records no task: it was not written by rd_cls's training.")
        return spec
    if (ckpt / "model.pt").is_file():
        raise ValueError(
            f"{ckpt / 'model.pt'} has no {SPEC_FILENAME} next to it (written by rd_cls >= 0.3.0 at the end of training): "
            "the trained task and network are unknown; run configs/train.json again."
        )
    return None


def trained_student_task_table(ckpt_dir: str | os.PathLike, untrained_tasks: list[dict[str, Any]]) -> Any:
    """
    The task table of the student an rd_cls run recorded in ``{ckpt_dir}/network_def.json`` (its one task, with its
    class names), so inference serves it under its own task's name whatever the task (synthetic or real). Before
    any training, the default recipe's ``untrained_tasks`` (for ``verify_net_in_out``).
    """
    from medfm_ops.data.task_table import TaskTable

    spec = _trained_student_spec(ckpt_dir)
    if spec is None:
        return TaskTable.from_tasks(untrained_tasks, source="untrained_tasks of configs/inference.json")
    return TaskTable.from_tasks(spec["tasks"], source=str(Path(ckpt_dir) / "network_def.json"))


def trained_student_network(ckpt_dir: str | os.PathLike, untrained_network: nn.Module) -> nn.Module:
    """The untrained stock network of the student recorded in ``{ckpt_dir}/network_def.json`` (load its weights with
    :func:`load_rd_student`); before any training, ``untrained_network`` (the default recipe's)."""
    from medfm_ops.networks.spec import instantiate

    spec = _trained_student_spec(ckpt_dir)
    return untrained_network if spec is None else instantiate(spec["network_def"])
