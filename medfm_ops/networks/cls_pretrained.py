# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A pretrained 3D classifier read from a local checkpoint, and its stock network re-headed for one target task.

Sources: a trained ``foundation_cls`` bundle (``models/model.pt`` + ``models/network_def.json``), a standalone
classifier bundle such as an exported LoRKD expert (``models/model.pt`` + the literal ``network_def`` of
``configs/inference.json``), or any state dict with its ``network_def``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm_ops.networks.cls_heads import head_layer_name
from medfm_ops.networks.spec import SPEC_FILENAME, instantiate, saved_task_entries
from medfm_ops.networks.teacher import _bundle_network_def
from medfm_ops.utils.hashing import file_sha256
from medfm_ops.utils.json_file import read_json_object

__all__ = [
    "HEAD_INITS",
    "PretrainedClassifier",
    "StartingClassifier",
    "load_pretrained_classifier",
    "retarget_classifier",
]

#: ``auto``: the pretrained head's rows of the target task when the checkpoint knows that task (same name and class
#: names), else ``fresh``; ``matched``: those rows, an error when the task is unknown; ``fresh``: a new head drawn
#: with its own seed (``U(-1/sqrt(d), 1/sqrt(d))``, ``nn.Linear``'s default law)
HEAD_INITS = ("auto", "matched", "fresh")
_OUT_KEYS = ("num_classes", "out_channels")

_HOW_TO = (
    "Train the foundation classifier first (python -m monai.bundle run --config_file "
    "bundles/foundation_cls/configs/train.json --bundle_root bundles/foundation_cls), or pass --pretrained <a trained "
    "classifier bundle, or a model.pt> (with --pretrained_network_def <network_def dict or JSON file> for a bare "
    "state dict). A LoRKD expert is used through its exported bundle (medfm_ops.bundle.export_lorkd_cls_expert)."
)


def _out_key(network_def: Mapping[str, Any]) -> str:
    keys = [k for k in _OUT_KEYS if k in network_def]
    if not keys:
        raise ValueError(f"network_def {network_def.get('_target_')} sets none of {_OUT_KEYS}: cannot resize its head.")
    return keys[0]


@dataclass
class PretrainedClassifier:
    """
    A pretrained classifier checkpoint, read but not built.

    Attributes:
        network_def: literal MONAI config of the stock network (its outputs are the checkpoint's classes).
        state_dict: the weights (CPU), loading strictly into ``network_def``.
        path: the ``model.pt`` read.
        sha256: hash of that file (identifies the starting point of a fine-tuning run).
        tasks: class layout of the outputs when known, ``[{"name", "task_id", "labels"}]`` in output order
            (a foundation's unified head: all its tasks; an expert bundle: its one task). Defaults to None.
    """

    network_def: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    path: str
    sha256: str
    tasks: list[dict[str, Any]] | None = None

    def rows_of(self, task_name: str, class_names: Sequence[str]) -> list[int] | None:
        """Output rows of task ``task_name`` when the checkpoint has it with exactly ``class_names``, else None."""
        offset = 0
        for t in sorted(self.tasks or [], key=lambda r: int(r["task_id"])):
            labels = t["labels"]
            names = [str(labels[str(i)] if str(i) in labels else labels[i]) for i in range(len(labels))]
            if t["name"] == task_name and names == [str(c) for c in class_names]:
                return list(range(offset, offset + len(names)))
            offset += len(names)
        return None


def _network_def_from(value: Any) -> tuple[dict[str, Any], list[dict] | None]:
    """``(network_def, tasks)`` from a dict or a JSON file holding a ``network_def`` (whole file or under the key)."""
    if isinstance(value, (str, os.PathLike)):
        content = read_json_object(Path(value), "network description")
    elif isinstance(value, Mapping):
        content = dict(value)
    else:
        raise TypeError(f"pretrained_network_def must be a dict or a JSON file path, got {type(value).__name__}.")
    if isinstance(content.get("network_def"), Mapping):
        return dict(content["network_def"]), saved_task_entries(content)
    if "_target_" not in content:
        raise ValueError(f"pretrained_network_def {value!r:.120}: no '_target_' and no 'network_def' entry.")
    return content, None


def _bundle_layout(root: Path) -> list[dict[str, Any]] | None:
    """A bundle's class layout: the tasks of ``models/network_def.json``, else the task of
    ``configs/metadata.json`` (``medfm.task`` / ``medfm.class_names`` of an exported classifier bundle)."""
    spec = root / "models" / SPEC_FILENAME
    if spec.is_file():
        return saved_task_entries(read_json_object(spec, "network description"))
    meta = root / "configs" / "metadata.json"
    info = read_json_object(meta, "bundle metadata").get("medfm", {}) if meta.is_file() else {}
    if isinstance(info, Mapping) and info.get("task") and info.get("class_names"):
        return [{"name": info["task"], "task_id": 0, "labels": {str(i): c for i, c in enumerate(info["class_names"])}}]
    return None


def load_pretrained_classifier(source: str | os.PathLike, network_def: Any = None) -> PretrainedClassifier:
    """
    Read a pretrained classifier checkpoint and check that it loads into its network.

    Args:
        source: a bundle directory (``models/model.pt`` with ``models/network_def.json``, or with a literal
            ``network_def`` in ``configs/inference.json``), or a ``model.pt`` file (a plain state dict, or
            ``{"model": state dict}``).
        network_def: the network's config (a dict or a JSON file with the dict, whole or under ``network_def``).
            Required for a bare ``model.pt`` without ``network_def.json`` beside it. Defaults to None (found in
            ``source``).

    Returns:
        a :class:`PretrainedClassifier`.

    Raises:
        FileNotFoundError: when the checkpoint or its description is missing (the message says how to make one).
        ValueError: when the weights do not load strictly into the network (e.g. an unfused LoRKD model).

    Example::

        pre = load_pretrained_classifier("bundles/foundation_cls")
        pre.network_def["_target_"], pre.tasks[0]["name"]  # 'monai.networks.nets.ResNet', 'lesion_ct'
    """
    src = Path(os.path.expanduser(str(source)))
    model = src / "models" / "model.pt" if src.is_dir() else src
    if not model.is_file():
        raise FileNotFoundError(f"no pretrained classifier checkpoint at {model}. {_HOW_TO}")
    if network_def is not None:
        net_def, tasks = _network_def_from(network_def)
    elif src.is_dir():
        try:
            net_def = dict(_bundle_network_def(src))
        except ValueError as e:
            raise FileNotFoundError(f"{e} Pass --pretrained_network_def. {_HOW_TO}") from None
        tasks = _bundle_layout(src)
    elif (model.parent / SPEC_FILENAME).is_file():
        net_def, tasks = _network_def_from(model.parent / SPEC_FILENAME)
    else:
        raise FileNotFoundError(
            f"no network description for {model}: no {SPEC_FILENAME} beside it; pass --pretrained_network_def. "
            f"{_HOW_TO}"
        )
    state = torch.load(model, map_location="cpu", weights_only=True)
    if isinstance(state.get("model"), Mapping):
        state = state["model"]
    net = instantiate(net_def)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lorkd = any(".lora_A." in k or k.startswith("heads.") for k in state)
        hint = (" It is an unfused multi-task LoRKD model: export one task's expert first (medfm_ops.bundle."
                "export_lorkd_cls_expert(bundle, task, out_dir)) and pass that bundle." if lorkd else "")
        raise ValueError(
            f"the weights of {model} do not load into {net_def.get('_target_')}: {str(e)[:600]}{hint}"
        ) from None
    weights = {k: v.detach().cpu() for k, v in state.items()}
    return PretrainedClassifier(dict(net_def), weights, str(model), file_sha256(model), tasks)


@dataclass
class StartingClassifier:
    """
    The starting point of fine-tuning a pretrained classifier on one task.

    Attributes:
        network: the stock network with ``num_classes`` = the task's classes, pretrained weights everywhere but the
            head (see ``head_source``).
        network_def: its literal config (the pretrained one with the new class count).
        head: qualified name of its classifier layer (``fc``, ``class_layers.out``, ``vit.classification_head.0``).
        head_source: ``"matched rows [..]"`` or ``"fresh (seed s)"``.
        state: a CPU copy of ``network.state_dict()`` as built (the base of the sparse delta).
        pretrained: what it was built from.
    """

    network: nn.Module
    network_def: dict[str, Any]
    head: str
    head_source: str
    state: dict[str, torch.Tensor] = field(repr=False)
    pretrained: PretrainedClassifier = field(repr=False)

    def info(self) -> dict[str, Any]:
        """JSON-ready description (pretrained file and hash, network class, head)."""
        return {"pretrained": self.pretrained.path, "pretrained_sha256": self.pretrained.sha256,
                "network": self.network_def["_target_"], "head": self.head, "head_init": self.head_source,
                "num_weights": sum(p.numel() for p in self.network.parameters())}  # fmt: skip

    def __repr__(self) -> str:
        i = self.info()
        return (f"StartingClassifier({i['network']} from {i['pretrained']} (sha256 {i['pretrained_sha256'][:12]}), "
                f"{i['num_weights']:,} weights, head '{self.head}': {self.head_source})")  # fmt: skip


def _fresh_(layer: nn.Linear, seed: int) -> None:
    gen = torch.Generator().manual_seed(int(seed))
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        for p in (layer.weight, layer.bias):
            if p is not None:
                p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).mul_(2 * bound).sub_(bound))


def retarget_classifier(
    pretrained: PretrainedClassifier,
    task_name: str,
    class_names: Sequence[str],
    head_init: str = "auto",
    seed: int = 0,
    spatial_size: Sequence[int] | None = None,
) -> StartingClassifier:
    """
    The pretrained network with its classifier layer resized to ``len(class_names)`` outputs: every other weight is
    the checkpoint's, the head is initialised by ``head_init``. Deterministic: the same inputs give the same
    weights bit for bit (the fresh head has its own generator).

    Args:
        pretrained: from :py:func:`load_pretrained_classifier`.
        task_name: the target task (e.g. ``"adrenalmnist3d"``).
        class_names: its classes in label order (at least 2).
        head_init: one of :data:`HEAD_INITS`. Defaults to ``"auto"``.
        seed: seed of a fresh head. Defaults to 0.
        spatial_size: input size of the fine-tuning; checked against a ViT's ``img_size``. Defaults to None.

    Raises:
        ValueError: for an unknown ``head_init``, fewer than 2 classes, ``head_init="matched"`` for a task the
            checkpoint does not know, or a ViT ``img_size`` other than ``spatial_size``.
    """
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}.")
    if len(class_names) < 2:
        raise ValueError(f"class_names needs at least 2 classes, got {list(class_names)}.")
    img = pretrained.network_def.get("img_size")
    if img is not None and spatial_size is not None and [int(s) for s in img] != [int(s) for s in spatial_size]:
        raise ValueError(f"the pretrained network takes img_size {list(img)} but spatial_size is {list(spatial_size)}: "
                         f"set --spatial_size {json.dumps([int(s) for s in img])}.")  # fmt: skip
    net_def = copy.deepcopy(pretrained.network_def)
    net_def[_out_key(net_def)] = len(class_names)
    net = instantiate(net_def)
    head = head_layer_name(net)
    prefix = head + "."
    body = {k: v for k, v in pretrained.state_dict.items() if not k.startswith(prefix)}
    missing, unexpected = net.load_state_dict(body, strict=False)
    if unexpected or any(not k.startswith(prefix) for k in missing):
        raise ValueError(
            f"pretrained weights do not fit the re-headed network: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    layer = net.get_submodule(head)
    rows = pretrained.rows_of(task_name, class_names) if head_init != "fresh" else None
    if head_init == "matched" and rows is None:
        known = [t["name"] for t in pretrained.tasks or []]
        raise ValueError(f"head_init='matched': the checkpoint has no task '{task_name}' with classes "
                         f"{list(class_names)} (its tasks: {known}); use head_init 'fresh' or 'auto'.")  # fmt: skip
    if rows is not None:
        with torch.no_grad():
            layer.weight.copy_(pretrained.state_dict[prefix + "weight"][rows])
            if layer.bias is not None:
                layer.bias.copy_(pretrained.state_dict[prefix + "bias"][rows])
        source = f"matched rows {rows[0]}..{rows[-1]} of the pretrained head ('{task_name}')"
    else:
        _fresh_(layer, seed)
        source = f"fresh (seed {int(seed)})"
    state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    return StartingClassifier(net, net_def, head, source, state, pretrained)
