# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Data of the segmentation bundles: synthetic multi-region set, MSD converter, datalist loading, transforms."""

from __future__ import annotations

from .datalist import SECTIONS, load_datalist, require_files
from .datalist_merge import merge_datalists
from .datalist_real import ensure_mapped_datalist, write_datalist_subset
from .atomic_writer import AtomicNibabelWriter
from .input_guard import InputGuardd, require_images
from .integrity import DatasetIntegrityError, check_datalist_cases, check_segmentation_cases
from .msd import case_groups, convert_msd, read_msd_dataset, split_cases
from .msd_mapping import convert_msd_mapping, read_msd_mapping
from .msd_subset import write_msd_subset
from .population_split import HOLDOUT_PARTS, case_populations, split_held_out_population
from .region_preprocessing import (
    INTENSITY_MODES,
    RegionBatchSampler,
    RegionNormalizeIntensityd,
    RegionPreprocessing,
    RegionPreprocessingTable,
    RegionRandCropd,
    RegionSpacingd,
    RegionToMetad,
    check_intensity,
    check_trained_preprocessing,
    recorded_preprocessing,
    save_region_preprocessing,
)
from .task_table import TASK_KINDS, ClsTaskTable, RegionTable, TaskKind, TaskTable
from .synthetic import (
    GENERATOR_VERSION,
    ensure_synthetic_dataset,
    generate_case,
    partial_label,
    synthetic_fingerprint,
    write_synthetic_dataset,
)
from .synthetic_regions import SYNTHETIC_REGIONS, DatasetSpec, RegionSpec, StructureSpec
from .transforms import (
    CheckFinited,
    CheckInputShaped,
    CheckImageLabelShaped,
    ImageLoadError,
    RegionLabelToChannelsd,
    SafeLoadImage,
    SafeLoadImaged,
    case_name,
)

__all__ = [
    "AtomicNibabelWriter",
    "DatasetIntegrityError",
    "InputGuardd",
    "require_images",
    "check_datalist_cases",
    "check_segmentation_cases",
    "GENERATOR_VERSION",
    "SECTIONS",
    "SYNTHETIC_REGIONS",
    "CheckFinited",
    "CheckInputShaped",
    "CheckImageLabelShaped",
    "DatasetSpec",
    "ImageLoadError",
    "RegionLabelToChannelsd",
    "RegionSpec",
    "RegionTable",
    "TASK_KINDS",
    "TaskKind",
    "TaskTable",
    "INTENSITY_MODES",
    "check_intensity",
    "RegionBatchSampler",
    "RegionNormalizeIntensityd",
    "RegionPreprocessing",
    "RegionPreprocessingTable",
    "RegionRandCropd",
    "RegionSpacingd",
    "RegionToMetad",
    "save_region_preprocessing",
    "check_trained_preprocessing",
    "recorded_preprocessing",
    "SafeLoadImage",
    "SafeLoadImaged",
    "StructureSpec",
    "case_groups",
    "case_name",
    "convert_msd",
    "convert_msd_mapping",
    "ensure_mapped_datalist",
    "ensure_synthetic_dataset",
    "generate_case",
    "load_datalist",
    "merge_datalists",
    "partial_label",
    "read_msd_dataset",
    "read_msd_mapping",
    "require_files",
    "split_cases",
    "split_held_out_population",
    "case_populations",
    "HOLDOUT_PARTS",
    "synthetic_fingerprint",
    "write_datalist_subset",
    "write_msd_subset",
    "write_synthetic_dataset",
]

from .cls_datalist import ClsItemError, check_cls_item, cls_item_name, ensure_cls_dataset, load_cls_datalist
from .medmnist import MEDMNIST_TASKS, NpzReadError, medmnist_items, read_medmnist_split, read_npz_array
from .cls_synthetic import CLS_GENERATOR_VERSION, SYNTHETIC_CLS_TASKS, generate_cls_task, write_synthetic_cls_tasks
from .cls_transforms import CheckClsItemd, LoadClsImaged, VolumeShapeError
from .teacher_inputs import TEACHER_IMAGE_KEY, teacher_input_transforms, with_teacher_images

__all__ += [
    "CLS_GENERATOR_VERSION",
    "MEDMNIST_TASKS",
    "SYNTHETIC_CLS_TASKS",
    "TEACHER_IMAGE_KEY",
    "CheckClsItemd",
    "ClsItemError",
    "ClsTaskTable",
    "LoadClsImaged",
    "NpzReadError",
    "VolumeShapeError",
    "check_cls_item",
    "cls_item_name",
    "ensure_cls_dataset",
    "generate_cls_task",
    "load_cls_datalist",
    "medmnist_items",
    "read_medmnist_split",
    "read_npz_array",
    "teacher_input_transforms",
    "with_teacher_images",
    "write_synthetic_cls_tasks",
]
