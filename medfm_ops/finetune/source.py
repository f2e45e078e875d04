# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Load the network a site fine-tunes: a standalone expert bundle, or one region of a medfm training bundle."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medfm_ops.data import INTENSITY_MODES, TaskTable, check_intensity, recorded_preprocessing
from medfm_ops.networks import expert_model_from_spec, instantiate, load_fused_expert, load_network_spec

__all__ = ["SourceModel", "load_source", "INIT_MODES"]

#: ``pretrained``: the source's weights; ``scratch``: the same stock architecture, random initialisation
INIT_MODES = ("pretrained", "scratch")


@dataclass
class SourceModel:
    """A stock network and the class layout of the region it serves.

    Attributes:
        network_def: ``_target_`` config of the stock network (literal values).
        state_dict: its weights; None for a random initialisation (``init="scratch"``).
        region: region name, e.g. ``"brain_mri"``.
        class_names: the region's class names, labels 1..n.
        output_channels: network output channel of every region class.
        spacing: the bundle's target spacing in mm (None when it does not record one).
        roi_size: the bundle's patch size (None when it does not record one).
        path: where it was loaded from.
        kind: ``"expert_bundle"`` or ``"training_bundle"``.
        intensity: the region's intensity rule, ``"zscore"`` or ``"zscore_nonzero"`` (z-score over the non-zero
            voxels), as the source was trained; the site bundle keeps it.
    """

    network_def: dict[str, Any]
    state_dict: dict[str, torch.Tensor] | None
    region: str
    class_names: list[str]
    output_channels: list[int]
    spacing: list[float] | None
    roi_size: list[int] | None
    path: str
    kind: str
    intensity: str = "zscore"

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary (no weights)."""
        return {
            "path": self.path,
            "kind": self.kind,
            "region": self.region,
            "class_names": self.class_names,
            "output_channels": self.output_channels,
            "network_def": self.network_def,
            "intensity": self.intensity,
            "pretrained": self.state_dict is not None,
        }


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e}).") from e


def _weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights at {path}: train or export the bundle first (see docs/site_finetuning.md)."
        )
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    return dict(sd)


def _expert_bundle(root: Path, init: str) -> SourceModel:
    infer = _read_json(root / "configs" / "inference.json")
    meta = _read_json(root / "configs" / "metadata.json")
    network_def = infer.get("network_def")
    if not isinstance(network_def, dict) or "_target_" not in network_def:
        raise ValueError(f"{root}/configs/inference.json: 'network_def' must be a literal `_target_` config.")
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    names = [str(channel_def[str(i)]) for i in range(1, len(channel_def))]
    output_channels = [int(c) for c in infer.get("output_channels", range(len(names)))]
    if len(output_channels) != len(names):
        raise ValueError(f"{root}: {len(output_channels)} output_channels for {len(names)} classes in channel_def.")
    return SourceModel(
        network_def=network_def,
        state_dict=_weights(root / "models" / "model.pt") if init == "pretrained" else None,
        region=str(meta.get("medfm", {}).get("region", root.name)),
        class_names=names,
        output_channels=output_channels,
        spacing=infer.get("spacing"),
        roi_size=infer.get("roi_size"),
        path=str(root),
        kind="expert_bundle",
        intensity=check_intensity(meta.get("medfm", {}).get("intensity", INTENSITY_MODES[0]),
                                  str(root / "configs" / "metadata.json")),
    )


def _literal(root: Path, key: str, default: Any) -> Any:
    """A literal top-level value of the bundle's ``configs/train.json`` (``default`` for expressions/absent)."""
    cfg = root / "configs" / "train.json"
    if not cfg.is_file():
        return default
    value = _read_json(cfg).get(key, default)
    return default if isinstance(value, str) and value.startswith(("$", "@")) else value


def _training_bundle(root: Path, region: str | None, init: str) -> SourceModel:
    spec = load_network_spec(root / "models")
    if not spec.get("tasks"):
        raise ValueError(f"{root}/models/network_def.json lists no tasks: cannot pick a region's classes.")
    table = TaskTable.from_regions(spec["tasks"], source=str(root))
    names = list(table.task_names.values())
    if region is None:
        if len(names) != 1:
            raise ValueError(f"{root} holds regions {names}: pass region=<one of them>.")
        region = names[0]
    task = table.task_id_of(region)
    network_def = spec["network_def"]
    state_dict = None
    if init == "pretrained":
        state_dict = _weights(root / "models" / "model.pt")
        if any(".lora_A." in k for k in state_dict):  # a LoRKD ExpertNetwork: fuse the region's expert
            experts = expert_model_from_spec(spec)  # the settings its training run recorded
            state_dict = load_fused_expert(instantiate(network_def), experts, state_dict, task).state_dict()
    roi = _literal(root, "roi_size", None)
    spacing = _literal(root, "spacing", None)
    row = recorded_preprocessing(root / "models", region)  # {} unless the run had region-wise preprocessing
    spacing, roi = row.get("spacing", spacing), row.get("window_size", roi)
    return SourceModel(
        network_def=network_def,
        state_dict=state_dict,
        region=region,
        class_names=list(table.class_names[task]),
        output_channels=table.channels_of(task),
        spacing=spacing,
        roi_size=roi,
        path=str(root),
        kind="training_bundle",
        intensity=row.get("intensity", INTENSITY_MODES[0]),
    )


def load_source(path: str | os.PathLike, region: str | None = None, init: str = "pretrained") -> SourceModel:
    """
    Load the network a site starts from.

    Args:
        path: either a standalone expert bundle (``configs/inference.json`` with ``network_def`` and
            ``output_channels``, ``configs/metadata.json`` with the ``pred`` ``channel_def``, ``models/model.pt``;
            written by ``tools/export_expert_bundle.py``), or a medfm training bundle (``models/network_def.json``
            with ``regions`` and ``models/model.pt``, e.g. ``bundles/foundation_seg`` or ``bundles/lorkd_seg``, whose
            LoRKD checkpoint is fused for ``region``).
        region: region of a training bundle (e.g. ``"brain_mri"``); ignored for an expert bundle. Defaults to None
            (the only region).
        init: ``"pretrained"`` or ``"scratch"`` (same architecture, weights not loaded). Defaults to
            ``"pretrained"``.

    Raises:
        FileNotFoundError: when ``path`` or its weights are missing (the message says how to make them).
        ValueError: on an unknown ``init``, an unrecognised bundle layout, or an ambiguous/unknown region.
    """
    if path is None:
        raise ValueError("no source bundle given: pass --expert_bundle <expert bundle or training bundle dir>.")
    if init not in INIT_MODES:
        raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}.")
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"source bundle {root} not found: export an expert bundle with `python tools/export_expert_bundle.py` "
            "or train bundles/foundation_seg / bundles/lorkd_seg first."
        )
    if (root / "configs" / "inference.json").is_file() and (root / "configs" / "metadata.json").is_file():
        has_def = "network_def" in _read_json(root / "configs" / "inference.json")
        if has_def and not (root / "models" / "network_def.json").is_file():
            return _expert_bundle(root, init)
    if (root / "models" / "network_def.json").is_file():
        return _training_bundle(root, region, init)
    raise ValueError(
        f"{root} is neither an expert bundle (configs/inference.json + configs/metadata.json) nor a medfm training "
        "bundle (models/network_def.json)."
    )
