# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Small shared utilities."""

from medfm_ops.utils.json_file import read_json_object
from medfm_ops.utils.atomic_io import atomic_directory, atomic_torch_save, atomic_write, atomic_write_json, atomic_write_text

__all__ = ["atomic_write", "atomic_write_text", "atomic_write_json", "atomic_torch_save", "atomic_directory", "read_json_object"]
