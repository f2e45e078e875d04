# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Standalone MONAI bundles for region experts: writer, configs, metadata schema and checks."""

from .expert_bundle import SCHEMA_RELPATH, write_bundle_folder, write_expert_bundle, write_metadata, write_readme
from .metadata_schema import METADATA_SCHEMA, write_metadata_schema
from .from_lorkd import export_lorkd_expert
from .template import CONFIG_FILES, TEMPLATE_DIR, render_configs
from .verify import BundleCheckError, bundle_check_commands, verify_bundle
from .cls_expert_bundle import CLS_TEMPLATE_DIR, export_lorkd_cls_expert, write_cls_expert_bundle
from .cls_bundle_scoring import cls_bundle_outputs, score_cls_bundle
from .cls_calibration import calibrate_cls_bundle, calibrate_when_binary, next_patch_version
from .bundle_scripts import BUNDLE_SCRIPTS, write_bundle_scripts
from .finetuned_cls import FINAL_MODELS, check_result_settings, save_finetuned_classifier

__all__ = [
    "write_bundle_folder",
    "write_expert_bundle",
    "write_metadata",
    "write_readme",
    "render_configs",
    "CONFIG_FILES",
    "TEMPLATE_DIR",
    "export_lorkd_expert",
    "verify_bundle",
    "bundle_check_commands",
    "BundleCheckError",
    "METADATA_SCHEMA",
    "write_metadata_schema",
    "SCHEMA_RELPATH",
    "CLS_TEMPLATE_DIR",
    "export_lorkd_cls_expert",
    "write_cls_expert_bundle",
    "score_cls_bundle",
    "cls_bundle_outputs",
    "calibrate_cls_bundle",
    "calibrate_when_binary",
    "next_patch_version",
    "BUNDLE_SCRIPTS",
    "write_bundle_scripts",
    "FINAL_MODELS",
    "check_result_settings",
    "save_finetuned_classifier",
]
