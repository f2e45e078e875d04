# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Atomic writes: a JSON file or a whole directory appears complete or not at all."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_json", "atomic_directory"]


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """
    Write ``obj`` as indented JSON to ``path`` through a temporary file in the same directory and ``os.replace``,
    so readers see either the old file or the complete new one.

    Returns:
        the written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0o600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """
    Build a directory in a temporary sibling of ``target`` and rename it to ``target`` on success.

    On an exception the temporary directory is removed and ``target`` is untouched. When ``target`` appeared
    meanwhile (another process built it first), the new copy is discarded and the existing one kept.

    Yields:
        the temporary directory to fill.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp creates 0o700
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race: keep the copy that is already published
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
