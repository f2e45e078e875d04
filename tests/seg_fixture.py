# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The tiny synthetic setting of the segmentation bundle tests and a copy of both bundles with a trained teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

from monai.bundle import run as bundle_run

REPO = Path(__file__).resolve().parents[1]
#: command-line overrides of the tiny synthetic set (16^3 volumes, 4 cases per region, 4 regions)
TINY = {
    "synthetic#size": 16,
    "synthetic#cases_per_region": 4,
    "synthetic#test_cases_per_region": 1,
    "roi_size": [16, 16, 16],
    "batch_size": 4,
    "num_workers": 0,
}


def copy_seg_bundles(root: Path) -> Path:
    """Copies of ``foundation_seg`` and ``lorkd_seg`` (configs, docs, licence; no models, eval or runs) in ``root``."""
    for name in ("foundation_seg", "lorkd_seg"):
        shutil.copytree(REPO / "bundles" / name, root / name, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    return root


def train_teacher(root: Path) -> None:
    """Train ``root/foundation_seg`` for 2 epochs on the tiny set (data cached in ``root/cache``)."""
    bundle = root / "foundation_seg"
    bundle_run(config_file=str(bundle / "configs" / "train.json"), bundle_root=str(bundle),
               **{**TINY, "data_cache": str(root / "cache"), "epochs": 2, "val_interval": 1})
