# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Small shared utilities: atomic writes (files and whole folders), one writer per folder, readable errors, JSON
files."""

from medfm_ops.utils.atomic_io import (
    NonFiniteWeightsError,
    OutputWriteError,
    atomic_directory,
    atomic_torch_save,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    replace_directory,
    write_error,
)
from medfm_ops.utils.errors import install_excepthook, report_cause_last, root_cause
from medfm_ops.utils.hashing import file_sha256
from medfm_ops.utils.json_file import read_json_object
from medfm_ops.utils.output_lock import OutputLockedError, lock_path, output_lock
from medfm_ops.utils.staging import staged_directory

__all__ = [
    "NonFiniteWeightsError",
    "OutputLockedError",
    "OutputWriteError",
    "atomic_directory",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_json",
    "atomic_write_text",
    "file_sha256",
    "install_excepthook",
    "report_cause_last",
    "lock_path",
    "output_lock",
    "read_json_object",
    "replace_directory",
    "root_cause",
    "staged_directory",
    "write_error",
]
