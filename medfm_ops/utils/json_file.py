# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Read a JSON object from a file with one clear error naming the file and the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json_object", "read_saved_with_settings"]


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """
    The top-level JSON object of ``path``.

    Args:
        path: the JSON file.
        what: what the file is, used in messages (e.g. ``"datalist"``).

    Raises:
        FileNotFoundError: when ``path`` is not a file.
        ValueError: on invalid JSON (with line and column) or a top level that is not an object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path}: expected a JSON object at the top level, got {type(data).__name__}.")
    return data


def read_saved_with_settings(path: str | os.PathLike, settings: dict[str, Any], what: str = "file") -> dict[str, Any] | None:
    """
    The JSON object saved at ``path`` by an earlier run (e.g. a split), when it was made with ``settings``.

    Args:
        path: the saved file.
        settings: the values this run asks for; the saved object must hold the same value under each key.
        what: what the file is, used in messages (e.g. ``"study split"``).

    Returns:
        the saved object, or None when there is no file yet.

    Raises:
        ValueError: on invalid JSON, or when the file was made with other settings (naming both).
    """
    if not Path(path).is_file():
        return None
    saved = read_json_object(path, what)
    asked = {k: saved.get(k) for k in settings}
    if asked != settings:
        raise ValueError(
            f"{what} {path} was made with {asked} but {settings} were asked: pass the saved values, or delete the "
            "file and every run made from it (a new split changes what the models saw)."
        )
    return saved
