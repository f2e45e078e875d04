# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""An ensemble of classifiers as ONE network (a stronger teacher made of several trained ones): the members'
features concatenated and one linear classifier that computes the mean of the members' logits."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["EnsembleClassifier", "write_ensemble_teacher"]

#: what a folder written by :func:`write_ensemble_teacher` holds besides its weights: where its members came from
MEMBERS_FILENAME = "ensemble_members.json"


class EnsembleClassifier(nn.Module):
    """
    The mean of the logits of ``members``, written as a plain ``features -> nn.Linear`` classifier:
    each member's final ``nn.Linear`` (its classifier layer, :func:`~medfm_ops.networks.head_layer_name`) is
    replaced by an identity, the members' features ``(B, d_i)`` are concatenated to ``(B, sum d_i)`` and ``fc``
    (weights ``[W_1 / n, ..., W_n / n]``, bias ``mean(b_i)``) maps them to ``(B, num_classes)``. Its output equals
    ``mean_i member_i(x)`` for members whose classifier layer is their last operation (MONAI's ResNet,
    DenseNet); :class:`~medfm_ops.networks.TeacherFeatures` reads the concatenated features as the teacher's.

    Built from trained networks (their heads are copied into ``fc``; the modules passed are changed in place: their
    heads become identities) or, for loading a saved ensemble, from the members' network configs (then ``fc`` is
    overwritten by the state dict).

    Args:
        members: at least two classifiers (modules, or network configs with ``_target_``) with the same number of
            classes and input.
        head: qualified name of the members' classifier layer. Defaults to each member's last ``nn.Linear``.

    Raises:
        ValueError: fewer than two members, a member without an ``nn.Linear``, or members with different class counts.
    """

    def __init__(self, members: Sequence[nn.Module | Mapping[str, Any]], head: str | None = None) -> None:
        super().__init__()
        from medfm_ops.networks.cls_heads import _set, head_layer_name
        from medfm_ops.networks.spec import instantiate

        nets = [instantiate(dict(m)) if isinstance(m, Mapping) else m for m in members]
        if len(nets) < 2:
            raise ValueError(f"an ensemble needs at least two members, got {len(nets)}.")
        if len({id(n) for n in nets}) < len(nets):
            raise ValueError("ensemble members must be distinct networks (the same module was passed twice).")
        weights, biases = [], []
        for i, net in enumerate(nets):
            name = head or head_layer_name(net)
            layer = net.get_submodule(name)
            if not isinstance(layer, nn.Linear):
                raise ValueError(f"ensemble member {i}: its classifier layer {name!r} is a {type(layer).__name__}, "
                                 "expected nn.Linear.")  # fmt: skip
            weights.append(layer.weight.detach() / len(nets))
            bias = layer.bias.detach() if layer.bias is not None else torch.zeros(layer.out_features)
            biases.append(bias / len(nets))
            _set(net, name, nn.Identity())
        classes = {w.shape[0] for w in weights}
        if len(classes) != 1:
            raise ValueError(f"ensemble members have different class counts {[w.shape[0] for w in weights]}.")
        self.members = nn.ModuleList(nets)
        self.fc = nn.Linear(sum(w.shape[1] for w in weights), classes.pop())
        with torch.no_grad():
            self.fc.weight.copy_(torch.cat(weights, dim=1))
            self.fc.bias.copy_(torch.stack(biases).sum(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial)`` -> ``(B, num_classes)``: the mean of the members' logits."""
        return self.fc(torch.cat([m(x).flatten(1) for m in self.members], dim=1))


def write_ensemble_teacher(members: Sequence[str | os.PathLike], out_dir: str | os.PathLike, atol: float = 1e-4) -> Path:
    """
    Write the :class:`EnsembleClassifier` of trained classifier folders as one teacher folder, in the form of a
    trained ``foundation_cls`` (``models/model.pt`` + ``models/network_def.json``), that
    :func:`~medfm_ops.networks.load_teacher` and the distilling bundles (``teacher_path`` of rd_cls, lorkd_cls)
    read like any teacher; ``models/ensemble_members.json`` records each member's folder and weights' SHA-256.

    The members must record the same task table and input size (``models/network_def.json``); the ensemble's
    output is checked against the mean of the members' logits on a random input before anything is written. The
    folder is written as a whole (:func:`~medfm_ops.utils.staged_directory`): a failed call leaves an earlier
    ``out_dir`` as it was.

    Args:
        members: at least two trained classifier folders (e.g. ``foundation_cls`` runs with different seeds).
        out_dir: the teacher folder to write (``out_dir/models``).
        atol: largest tolerated difference between the ensemble's logits and the members' mean. Defaults to 1e-4.

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: a member folder without ``models/network_def.json`` or ``models/model.pt``.
        ValueError: fewer than two members; members with different task tables, input sizes or class counts; a
            member whose classifier layer is not its last operation (the ensemble's logits differ from the mean).
    """
    from medfm_ops.data import TaskTable
    from medfm_ops.networks.spec import load_network_spec, save_network_spec
    from medfm_ops.networks.teacher import load_teacher
    from medfm_ops.utils import staged_directory
    from medfm_ops.utils.atomic_io import atomic_torch_save, atomic_write_text
    from medfm_ops.utils.hashing import file_sha256

    folders = [Path(m) for m in members]
    if len(folders) < 2:
        raise ValueError(f"an ensemble teacher needs at least two member folders, got {[str(f) for f in folders]}.")
    specs = []
    for f in folders:
        if not (f / "models" / "model.pt").is_file():
            raise FileNotFoundError(f"ensemble member {f}: no models/model.pt (a trained classifier folder expected).")
        specs.append(load_network_spec(f / "models"))
    for key in ("tasks", "spatial_size"):
        values = [json.dumps(s.get(key), sort_keys=True) for s in specs]
        if len(set(values)) != 1:
            odd = next(i for i, v in enumerate(values) if v != values[0])
            raise ValueError(f"ensemble member {folders[odd]} records {key} {specs[odd].get(key)!r}, member "
                             f"{folders[0]} {specs[0].get(key)!r}: the members must share it.")  # fmt: skip
    size = specs[0].get("spatial_size")
    if size is None:
        raise ValueError(f"ensemble member {folders[0]}: its models/network_def.json records no spatial_size.")
    nets = [load_teacher(f).net for f in folders]
    probe = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.stack([n(probe) for n in nets]).mean(0)
        ensemble = EnsembleClassifier(nets).eval()
        got = ensemble(probe)
    gap = float((got - expected).abs().max())
    if gap > atol:
        raise ValueError(f"the ensemble's logits differ from the mean of its members' by {gap:.3g}: a member's "
                         "classifier layer (its last nn.Linear) is not its last operation.")  # fmt: skip
    network_def = {"_target_": f"{__name__.rpartition('.')[0]}.EnsembleClassifier",
                   "members": [s["network_def"] for s in specs]}  # fmt: skip
    tasks = specs[0].get("tasks")
    table = TaskTable.from_tasks(tasks, source=str(folders[0])) if tasks else None
    record = {"members": [{"path": str(f.resolve()), "sha256": file_sha256(f / "models" / "model.pt")} for f in folders]}
    with staged_directory(out_dir, markers=(f"models/{MEMBERS_FILENAME}",)) as stage:
        (stage / "models").mkdir(parents=True, exist_ok=True)
        atomic_torch_save({k: v.detach().clone() for k, v in ensemble.state_dict().items()}, stage / "models" / "model.pt")
        save_network_spec(stage / "models", network_def, table, spatial_size=size)
        atomic_write_text(stage / "models" / MEMBERS_FILENAME, json.dumps(record, indent=2) + "\n")
    return Path(out_dir)
