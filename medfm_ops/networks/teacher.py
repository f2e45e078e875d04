# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Load a frozen teacher ("foundation model") from local files: a MONAI bundle, a TorchScript file, or a state dict."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medfm_ops.networks.spec import (
    SPEC_FILENAME,
    check_same_tasks,
    instantiate,
    load_network_spec,
    recorded_spatial_size,
)

__all__ = ["load_teacher", "freeze", "teacher_input_size"]

_HOW_TO = (
    "Train the default teacher first with `python -m monai.bundle run --config_file "
    "bundles/foundation_seg/configs/train.json`, or point `teacher_path` to a bundle directory, a TorchScript file, "
    "or a state dict together with `teacher_def` (a network config)."
)


def freeze(net: nn.Module) -> nn.Module:
    """Eval mode and no gradients for every parameter; returns ``net``."""
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


class _FrozenTeacher(nn.Module):
    """Keeps the wrapped teacher in eval mode even when a parent calls ``.train()``, and runs it without grad."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = freeze(net)

    def train(self, mode: bool = True) -> _FrozenTeacher:  # noqa: D102 - a teacher never trains
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _instantiate(network_def: dict | str | Path) -> nn.Module:
    from monai.bundle import ConfigParser

    if isinstance(network_def, (str, Path)):
        network_def = ConfigParser.load_config_file(str(network_def))
        network_def = network_def.get("network_def", network_def)
    return instantiate(network_def)


def _bundle_network_def(bundle_dir: Path, region_table: Any = None) -> dict:
    """``models/network_def.json`` written by a medfm training run, else a literal ``network_def`` in the configs."""
    spec_file = bundle_dir / "models" / SPEC_FILENAME
    if spec_file.is_file():
        spec = load_network_spec(spec_file)
        check_same_tasks(spec, region_table, f"teacher {bundle_dir}")
        return spec["network_def"]
    for name in ("inference.json", "train.json", "inference.yaml", "train.yaml"):
        cfg = bundle_dir / "configs" / name
        if cfg.is_file():
            from monai.bundle import ConfigParser

            content = ConfigParser.load_config_file(str(cfg))
            if "network_def" in content:
                return _resolve_plain_refs(content["network_def"], content)
    raise ValueError(
        f"teacher bundle {bundle_dir}: no models/{SPEC_FILENAME} and no configs/inference.json or train.json with a "
        "'network_def'."
    )


def _resolve_plain_refs(item: Any, content: dict) -> Any:
    """Replace ``@key`` references of a network_def by the referenced top-level literal values."""
    if isinstance(item, dict):
        return {k: _resolve_plain_refs(v, content) for k, v in item.items()}
    if isinstance(item, list):
        return [_resolve_plain_refs(v, content) for v in item]
    if isinstance(item, str) and item.startswith("@") and item[1:] in content:
        return _resolve_plain_refs(content[item[1:]], content)
    return item


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"teacher weights {path}: cannot be read as a state dict ({e}).") from e
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ValueError(f"teacher weights {path}: expected a state dict, got {type(sd).__name__}.")
    return sd


def _load_into(net: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict(strict=True)`` with a short summary of a mismatch instead of hundreds of key names."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [(k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]  # fmt: skip
    if missing or unexpected or shapes:
        first = f"; first shape mismatch: {shapes[0][0]} is {shapes[0][1]} in the file, {shapes[0][2]} in the network" if shapes else ""
        raise ValueError(
            f"teacher weights {path} do not fit the teacher network {type(net).__name__}: {len(missing)} missing, "
            f"{len(unexpected)} unexpected key(s) (e.g. missing {missing[:2]}, unexpected {unexpected[:2]}), "
            f"{len(shapes)} shape mismatch(es){first}. Is this the right checkpoint for the network config?"
        )
    net.load_state_dict(state_dict)


def load_teacher(
    teacher_path: str | os.PathLike,
    teacher_def: dict | str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    region_table: Any = None,
) -> nn.Module:
    """
    Load a frozen teacher that maps ``(B, C_in, *spatial)`` to logits; it stays in eval mode and never gets gradients.

    Args:
        teacher_path: one of
            - a MONAI bundle directory (``configs/inference.json`` or ``train.json`` with ``network_def``, and
              ``models/model.pt``, or ``models/model.ts``);
            - a TorchScript file (``.ts`` / ``.pt`` saved by ``torch.jit.save``);
            - a state dict file, with ``teacher_def``.
        teacher_def: network config (dict with ``_target_`` or a JSON/YAML file holding one, optionally under
            ``network_def``), required for a state dict file.
        device: where to put the teacher.
        region_table: the student's class layout; when the teacher bundle recorded its own (``models/network_def.json``)
            they must match. Defaults to None (no check).

    Raises:
        FileNotFoundError: when nothing exists at ``teacher_path`` (the message says how to produce a teacher).
        ValueError: when the file cannot be interpreted as a teacher, or its weights do not fit the network (the
            message counts missing/unexpected keys and names the first shape mismatch).
    """
    path = Path(teacher_path)
    if not path.exists():
        raise FileNotFoundError(f"teacher not found at {path}. {_HOW_TO}")
    if path.is_dir():
        weights, script = path / "models" / "model.pt", path / "models" / "model.ts"
        if weights.is_file():
            net = _instantiate(teacher_def if teacher_def is not None else _bundle_network_def(path, region_table))
            _load_into(net, _load_state_dict(weights), weights)
        elif script.is_file():
            net = torch.jit.load(str(script), map_location="cpu")
        else:
            raise FileNotFoundError(f"teacher bundle {path} has no models/model.pt nor models/model.ts. {_HOW_TO}")
    else:
        net = None
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception:  # not TorchScript: a state dict
            if teacher_def is None:
                raise ValueError(
                    f"teacher file {path} is not TorchScript; as a state dict it needs `teacher_def` (network config)."
                ) from None
            net = _instantiate(teacher_def)
            _load_into(net, _load_state_dict(path), path)
    return _FrozenTeacher(net).to(device)


def teacher_input_size(
    teacher_path: str | os.PathLike, student_size: Sequence[int], teacher_images: Mapping[str, Any] | None = None
) -> list[int]:
    """
    The input size a teacher reads: the size its bundle recorded it was trained at (``spatial_size`` of its
    ``models/network_def.json``, :func:`~medfm_ops.networks.recorded_spatial_size`), else ``student_size`` (a
    TorchScript or state-dict teacher, or a bundle written before the size was recorded).

    Without ``teacher_images`` the teacher is fed the student's own input: when it was trained at another size a
    warning says so (its scores and features are then those of a resized input it never saw in training).

    Args:
        teacher_path: the teacher (see :func:`load_teacher`).
        student_size: the student's input size ``(H, W, D)``.
        teacher_images: task -> file of the teacher's own images (rd_cls ``teacher_images``). Defaults to None.
    """
    path = Path(teacher_path)
    has_spec = path.is_dir() and (path / "models" / SPEC_FILENAME).is_file()
    recorded = recorded_spatial_size(path) if has_spec else None
    if recorded is None:
        return [int(v) for v in student_size]
    if not teacher_images and recorded != [int(v) for v in student_size]:
        logging.getLogger("medfm.teacher").warning(
            f"teacher {path} was trained at {recorded} but reads the student's {list(student_size)} input; "
            "give it its own images at its size with teacher_images (rd_cls, lorkd_cls)."
        )
    return recorded
