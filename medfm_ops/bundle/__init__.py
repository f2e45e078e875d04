"""Standalone MONAI bundles for region experts: writer, configs, metadata schema and checks."""

from .expert_bundle import SCHEMA_RELPATH, write_expert_bundle
from .metadata_schema import METADATA_SCHEMA, write_metadata_schema
from .from_lorkd import export_lorkd_expert
from .verify import BundleCheckError, bundle_check_commands, verify_bundle

__all__ = [
    "write_expert_bundle",
    "export_lorkd_expert",
    "verify_bundle",
    "bundle_check_commands",
    "BundleCheckError",
    "METADATA_SCHEMA",
    "write_metadata_schema",
    "SCHEMA_RELPATH",
]
