# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""JSON schema for the ``configs/metadata.json`` of the bundles medfm writes.

``python -m monai.bundle verify_metadata`` downloads the schema named by the metadata's ``schema`` URL unless a file
already lies at ``--filepath``. To verify offline, every bundle written by :func:`write_expert_bundle` carries this
schema at ``docs/metadata_schema.json`` and the documented command passes that path.

The schema was written for medfm from the metadata keys MONAI documents for a bundle (bundle specification, and the
defaults of ``monai.bundle.init_bundle``): the version fields, ``required_packages_version``, task/description/
authors/copyright and a ``network_data_format`` whose ``inputs``/``outputs`` entries describe each tensor. It adds
the two input/output fields that MONAI's ``verify_net_in_out`` reads (``num_channels``, ``spatial_shape``,
``dtype``) as required, and accepts further keys so that site-specific information can be added.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["METADATA_SCHEMA", "SCHEMA_URL", "write_metadata_schema"]

# Where MONAI model-zoo bundles point their ``schema`` key; used only by online checks.
SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"

_VERSION = {"type": "string", "pattern": r"^\d+(\.\d+)*([.+\-].*)?$"}
_SHAPE_ITEM = {"anyOf": [{"type": "integer", "minimum": 1}, {"type": "string", "minLength": 1}]}

_DTYPES = ("float16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64")

_TENSOR_SPEC = {
    "type": "object",
    "required": ["type", "format", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data"],
    "properties": {
        "type": {"type": "string", "enum": ["image", "tabular", "probabilities", "series", "tuples", "object"]},
        "format": {"type": "string", "minLength": 1},
        "modality": {"type": "string"},
        "num_channels": {"type": "integer", "minimum": 1},
        "spatial_shape": {"type": "array", "items": _SHAPE_ITEM, "minItems": 1},
        "dtype": {"type": "string", "enum": [*_DTYPES]},
        "value_range": {"type": "array", "items": {"type": ["number", "null"]}, "maxItems": 2},
        "is_patch_data": {"type": "boolean"},
        "channel_def": {
            "type": "object",
            "propertyNames": {"pattern": r"^\d+$"},
            "additionalProperties": {"type": "string", "minLength": 1},
        },
    },
}

METADATA_SCHEMA: dict = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "medfm bundle metadata",
    "type": "object",
    "required": [
        "schema",
        "version",
        "changelog",
        "monai_version",
        "pytorch_version",
        "numpy_version",
        "required_packages_version",
        "task",
        "description",
        "authors",
        "copyright",
        "network_data_format",
    ],
    "properties": {
        "schema": {"type": "string", "minLength": 1},
        "version": _VERSION,
        "changelog": {
            "type": "object",
            "minProperties": 1,
            "propertyNames": _VERSION,
            "additionalProperties": {"type": "string"},
        },
        "monai_version": _VERSION,
        "pytorch_version": _VERSION,
        "numpy_version": _VERSION,
        "required_packages_version": {"type": "object", "additionalProperties": _VERSION},
        "optional_packages_version": {"type": "object", "additionalProperties": _VERSION},
        "name": {"type": "string"},
        "task": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "authors": {"anyOf": [{"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string"}}]},
        "copyright": {"type": "string", "minLength": 1},
        "data_source": {"type": "string"},
        "data_type": {"type": "string"},
        "intended_use": {"type": "string"},
        "network_data_format": {
            "type": "object",
            "required": ["inputs", "outputs"],
            "properties": {
                "inputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR_SPEC},
                "outputs": {"type": "object", "minProperties": 1, "additionalProperties": _TENSOR_SPEC},
            },
        },
    },
}


def write_metadata_schema(path: str | Path) -> Path:
    """Write :data:`METADATA_SCHEMA` as JSON to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(METADATA_SCHEMA, indent=2) + "\n")
    return path
