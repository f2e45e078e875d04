"""Locate bundle directories, so bundles run both from their own folder and from the repository root."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["find_bundle_root", "default_cache_dir"]


def find_bundle_root(name: str, start: str | os.PathLike | None = None) -> str:
    """
    Directory of bundle ``name``: ``start`` (default: the working directory) when it is that bundle (its
    ``configs/metadata.json`` has ``"name": name`` or the folder is called ``name``), else ``start/bundles/name``.

    Raises:
        FileNotFoundError: when neither holds the bundle (the message says where to run from or what to pass).
    """
    here = Path(start or os.getcwd()).resolve()
    for candidate in (here, here / "bundles" / name):
        meta = candidate / "configs" / "metadata.json"
        if meta.is_file():
            try:
                meta_name = json.loads(meta.read_text()).get("name")
            except (OSError, json.JSONDecodeError):
                meta_name = None
            if meta_name == name or candidate.name == name:
                return str(candidate)
    raise FileNotFoundError(
        f"bundle '{name}' not found from {here}: run from the repository root or from bundles/{name}, "
        f"or pass --bundle_root <path to bundles/{name}>."
    )


def default_cache_dir() -> str:
    """Where generated default data is cached: ``$MEDFM_CACHE`` or ``~/.cache/medfm``."""
    return os.environ.get("MEDFM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "medfm"))
