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
from pathlib import Path

from medfm_ops.data.msd_mapping import convert_msd_mapping

__all__ = ["ensure_mapped_datalist"]


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
