# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
Build (or reuse) the datalist of a mapping file: the one call behind ``tools/prepare_data.py real_regions`` and the
``lorkd_seg`` / ``foundation_seg`` real-data override configs.

The datalist is rebuilt only when the mapping file's content, the data root or the split seed changed: the
inputs are recorded in the datalist's ``build`` entry and compared on every call, so a config may call this at
every run. The repository ships ``bundles/lorkd_seg/data/real_regions.json`` (brain MRI: MSD hippocampus; heart
MRI: ACDC, split by patient).

Example::

    ensure_mapped_datalist("bundles/lorkd_seg/data/real_regions.json", "~/.cache/medfm/real_regions", seed=0)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from medfm_ops.data.msd_mapping import convert_msd_mapping
from medfm_ops.utils.atomic_io import atomic_write_json

__all__ = ["ensure_mapped_datalist", "write_datalist_subset"]


def _build_record(mapping: Path, data_root: str | os.PathLike | None, seed: int) -> dict:
    return {
        "mapping": str(mapping),
        "mapping_sha256": hashlib.sha256(mapping.read_bytes()).hexdigest(),
        "data_root": None if data_root is None else str(Path(data_root).expanduser().absolute()),
        "seed": int(seed),
    }


def ensure_mapped_datalist(
    mapping: str | os.PathLike,
    out_dir: str | os.PathLike,
    seed: int = 0,
    data_root: str | os.PathLike | None = None,
) -> str:
    """
    Path of ``out_dir/datalist.json`` converted from ``mapping`` (:func:`~medfm_ops.data.convert_msd_mapping`),
    written when missing or built from other inputs (mapping content, ``data_root``, ``seed``).

    Args:
        mapping: the mapping JSON (format in :py:mod:`medfm_ops.data.msd_mapping`).
        out_dir: folder of the datalist (and of remapped labels, if any).
        seed: split seed, recorded in the datalist. Defaults to 0.
        data_root: overrides the mapping's ``data_root``. Defaults to None (the mapping's).

    Returns:
        the datalist path (string, for bundle configs).

    Raises:
        FileNotFoundError, ValueError: as :func:`~medfm_ops.data.convert_msd_mapping` (a missing data set names the
            mapping file and the directory it looked for).
    """
    src = Path(mapping).expanduser().absolute()
    if not src.is_file():
        raise FileNotFoundError(f"mapping file {src} not found.")
    out = Path(out_dir).expanduser().absolute() / "datalist.json"
    record = _build_record(src, data_root, seed)
    if out.is_file():
        try:
            built = json.loads(out.read_text(encoding="utf-8")).get("build")
        except (OSError, json.JSONDecodeError):
            built = None
        if built == record:
            return str(out)
    convert_msd_mapping(src, out, seed=seed, overwrite=True, data_root=data_root, extra={"build": record})
    return str(out)


def write_datalist_subset(
    datalist: str | os.PathLike, out_datalist: str | os.PathLike, per_region: Mapping[str, int | None]
) -> str:
    """
    Write a datalist holding the first ``per_region[section]`` cases of every region of each section of
    ``datalist`` (``None``: all of them), in the datalist's order, e.g. for a short run on a few real cases.
    Both frames of a grouped case stay together only if the count allows it: the source split is what keeps
    patients apart, and a subset of one section never mixes sections. Image/label paths are made absolute.

    Args:
        datalist: source datalist JSON.
        out_datalist: where to write the subset (atomically).
        per_region: ``{"training": 4, "validation": 2, "test": 2}``; sections not named are kept whole.

    Returns:
        the written path (string).

    Raises:
        ValueError: when a count is negative or leaves ``training`` or ``validation`` without a case of a region.
    """
    src = Path(datalist).expanduser().absolute()
    data = json.loads(src.read_text(encoding="utf-8"))
    for section, n in per_region.items():
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"per_region['{section}'] must be a case count >= 0 or None, got {n!r}.")
        if section not in data:
            continue
        counts: dict[int, int] = {}
        kept = []
        for item in data[section]:
            r = int(item["region"])
            if n is None or counts.get(r, 0) < n:
                counts[r] = counts.get(r, 0) + 1
                kept.append(item)
        data[section] = kept
    for section in ("training", "validation"):
        regions = {int(i["region"]) for i in data.get(section, [])}
        missing = [r["name"] for r in data["regions"] if r["task_id"] not in regions]
        if missing:
            raise ValueError(f"the subset of {src} has no '{section}' case of region(s) {missing}.")
    for section in ("training", "validation", "test"):
        for item in data.get(section, []):
            for key in ("image", "label"):
                item[key] = str((src.parent / item[key]).resolve()) if not os.path.isabs(item[key]) else item[key]
    out = Path(out_datalist).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, data)
    return str(out)
