# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Data of the segmentation bundles: synthetic multi-region set, MSD converter, datalist loading, transforms."""

from __future__ import annotations

from .datalist import SECTIONS, load_datalist, require_files
from .msd import convert_msd, read_msd_dataset, split_cases
from .region_table import RegionTable
from .synthetic import (
    GENERATOR_VERSION,
    ensure_synthetic_dataset,
    generate_case,
    synthetic_fingerprint,
    write_synthetic_dataset,
)
from .synthetic_regions import SYNTHETIC_REGIONS, RegionSpec, StructureSpec
from .transforms import (
    CheckImageLabelShaped,
    ImageLoadError,
    RegionLabelToChannelsd,
    SafeLoadImage,
    SafeLoadImaged,
    case_name,
    seg_transforms,
)

__all__ = [
    "GENERATOR_VERSION",
    "SECTIONS",
    "SYNTHETIC_REGIONS",
    "CheckImageLabelShaped",
    "ImageLoadError",
    "RegionLabelToChannelsd",
    "RegionSpec",
    "RegionTable",
    "SafeLoadImage",
    "SafeLoadImaged",
    "StructureSpec",
    "case_name",
    "convert_msd",
    "ensure_synthetic_dataset",
    "generate_case",
    "load_datalist",
    "read_msd_dataset",
    "require_files",
    "seg_transforms",
    "split_cases",
    "synthetic_fingerprint",
    "write_synthetic_dataset",
]
