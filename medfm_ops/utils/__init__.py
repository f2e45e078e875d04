# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Small shared utilities: atomic writes, readable errors, JSON files."""

from medfm_ops.utils.atomic_io import (
    NonFiniteWeightsError,
    atomic_directory,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    replace_directory,
)
from medfm_ops.utils.errors import install_excepthook, root_cause
from medfm_ops.utils.hashing import file_sha256
from medfm_ops.utils.json_file import read_json_object

__all__ = [
    "NonFiniteWeightsError",
    "atomic_directory",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "file_sha256",
    "install_excepthook",
    "read_json_object",
    "replace_directory",
    "root_cause",
]
