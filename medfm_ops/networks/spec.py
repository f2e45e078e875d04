# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A trained network's literal description (``network_def`` + class layout), saved next to its weights."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from medfm_ops.utils.atomic_io import atomic_write_text
from medfm_ops.utils.json_file import read_json_object

__all__ = ["instantiate", "save_network_spec", "load_network_spec", "check_same_regions", "SPEC_FILENAME"]

#: written into a bundle's ``models/`` folder by its training config
SPEC_FILENAME = "network_def.json"


def instantiate(network_def: dict[str, Any]) -> nn.Module:
    """Build a network from a MONAI bundle config dict with ``_target_`` (literal values, no references)."""
    from monai.bundle import ConfigParser

    if not isinstance(network_def, dict) or "_target_" not in network_def:
        raise ValueError(f"network_def must be a dict with a '_target_' key, got {network_def!r}.")
    return ConfigParser({"network_def": network_def}).get_parsed_content("network_def")


def save_network_spec(ckpt_dir: str | os.PathLike, network_def: dict[str, Any], region_table: Any = None) -> Path:
    """
    Write ``{ckpt_dir}/network_def.json`` = ``{"network_def": ..., "regions": [...]}`` atomically, so the weights
    in ``ckpt_dir`` can be rebuilt without the training data (teacher loading, expert export, inference).
    """
    instantiate(network_def)  # fail now, not at load time, on a config that cannot be built
    content: dict[str, Any] = {"network_def": network_def}
    if region_table is not None:
        content["regions"] = region_table.to_regions()
    path = Path(ckpt_dir) / SPEC_FILENAME
    atomic_write_text(path, json.dumps(content, indent=2))
    return path


def load_network_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read a spec written by :func:`save_network_spec` (a file, or a directory holding ``network_def.json``)."""
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no network description at {path} (written by the bundle's training run).")
    content = read_json_object(path, "network description")
    if "network_def" not in content:
        raise ValueError(f"{path}: missing the 'network_def' entry.")
    return content


def check_same_regions(spec: dict[str, Any], region_table: Any, what: str) -> None:
    """Raise when a saved class layout differs from ``region_table`` (same regions, task ids and label names)."""
    saved = spec.get("regions")
    if saved is None or region_table is None:
        return
    current = region_table.to_regions()
    norm = lambda rs: [(r["name"], int(r["task_id"]), {str(k): v for k, v in r["labels"].items()}) for r in rs]  # noqa: E731
    if norm(saved) != norm(current):
        raise ValueError(
            f"{what} was trained on another class layout: regions {[r['name'] for r in saved]} with labels "
            f"{[r['labels'] for r in saved]} vs the data set's {[r['name'] for r in current]} with "
            f"{[r['labels'] for r in current]}. Train it on the same datalist (or the same region table)."
        )
