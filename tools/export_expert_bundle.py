# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Write a region expert as a standalone MONAI bundle.

    python tools/export_expert_bundle.py write \
        --network_config net.json --state_dict expert.pt --out_dir bundles/abdomen_expert \
        --region_name abdomen --label_names "{1: 'liver', 2: 'spleen', 3: 'kidney'}" \
        --output_channels "[2, 3, 4]" --spacing "[1.5, 1.5, 1.5]" --roi_size "[96, 96, 96]" --verify

``--network_config``: a JSON/YAML file holding the network's ``_target_`` config, either as the whole file or under a
``network_def`` key (e.g. a bundle's ``configs/inference.json``). ``--state_dict``: a ``torch.save`` file with the
plain state dict (``--key model`` picks a nested entry). ``--label_names``: a dict ``{1: name, ...}``, a list of names
(labels 1..n in order) or a JSON/YAML file with either. Commands that produce the state dict themselves (e.g. fusing
an expert out of a LoRKD checkpoint) call :func:`medfm_ops.bundle.write_expert_bundle` and are added to ``COMMANDS``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fire
import torch
import yaml

from medfm_ops.bundle import export_lorkd_expert, verify_bundle, write_expert_bundle


def _load_structured(path: str | Path) -> Any:
    text = Path(path).read_text()
    return json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)


def load_network_def(path: str | Path) -> dict:
    """The ``_target_`` network config in ``path`` (whole file, or its ``network_def`` entry)."""
    cfg = _load_structured(path)
    if isinstance(cfg, Mapping) and "_target_" not in cfg and "network_def" in cfg:
        cfg = cfg["network_def"]
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        raise ValueError(f"{path}: expected a `_target_` network config or a `network_def` entry holding one.")
    return dict(cfg)


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """A tensors-only state dict from ``path`` (``weights_only`` load), optionally the nested entry ``key``."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if key:
        if key not in sd:
            raise KeyError(f"{path}: no entry {key!r}; top-level keys: {list(sd)[:10]}.")
        sd = sd[key]
    return dict(sd)


def parse_label_names(label_names: Any) -> dict[int, str]:
    """``{1: name, ...}`` from a dict, a list of names (1..n) or a JSON/YAML file holding either."""
    if isinstance(label_names, str) and Path(label_names).is_file():
        label_names = _load_structured(label_names)
    if isinstance(label_names, Mapping):
        return {int(k): str(v) for k, v in label_names.items()}
    if isinstance(label_names, Sequence) and not isinstance(label_names, str):
        return {i: str(v) for i, v in enumerate(label_names, start=1)}
    raise ValueError(f"label_names must be a dict, a list or a file, got {label_names!r}.")


def write(
    network_config: str,
    state_dict: str,
    out_dir: str,
    region_name: str,
    label_names: Any,
    output_channels: Sequence[int],
    spacing: Sequence[float],
    roi_size: Sequence[int],
    version: str = "0.1.0",
    description: str | None = None,
    authors: str = "medfm contributors",
    modality: str = "CT",
    key: str | None = None,
    verify: bool = False,
) -> str:
    """Write the bundle (see :func:`medfm_ops.bundle.write_expert_bundle`); ``--verify`` runs MONAI's checks."""
    root = write_expert_bundle(
        out_dir,
        load_network_def(network_config),
        load_state_dict(state_dict, key),
        region_name=region_name,
        label_names=parse_label_names(label_names),
        output_channels=[int(c) for c in output_channels],
        spacing=tuple(float(s) for s in spacing),
        roi_size=tuple(int(r) for r in roi_size),
        version=version,
        description=description,
        authors=authors,
        modality=modality,
    )
    if verify:
        verify_bundle(root)
    return str(root)


def from_lorkd(
    bundle_root: str = "bundles/lorkd_seg",
    out_dir: str | None = None,
    region: str | None = None,
    datalist: str | None = None,
    spacing: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    version: str = "0.1.0",
    verify: bool = False,
    force: bool = False,
) -> str:
    """Fuse one region expert of a trained lorkd_seg bundle into a standalone bundle (see ``export_lorkd_expert``).

    ``--out_dir`` defaults to ``{bundle_root}/eval/expert_{region}``. The export is refused when ``models/model.pt``
    is not the model the last training run wrote (``--force`` exports it anyway, with a warning).
    """
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    if out_dir is None:
        out_dir = str(Path(bundle_root) / "eval" / f"expert_{region or 'region0'}")
    root = export_lorkd_expert(
        bundle_root,
        out_dir,
        region=region,
        datalist=datalist,
        spacing=None if spacing is None else tuple(float(s) for s in spacing),
        roi_size=None if roi_size is None else tuple(int(r) for r in roi_size),
        version=version,
        verify=verify,
        force=force,
    )
    return str(root)


COMMANDS = {"write": write, "from_lorkd": from_lorkd}

if __name__ == "__main__":
    fire.Fire(COMMANDS)
