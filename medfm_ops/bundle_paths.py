# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Helpers of the bundle configs for what JSON cannot say: where a bundle lives, a config item as literal JSON,
and renamed config keys."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "find_bundle_root",
    "default_cache_dir",
    "bundle_network_config",
    "reject_renamed_keys",
    "check_writable",
]


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
    """Where generated default data is cached: ``$MEDFM_CACHE`` or, when it is unset or empty, ``~/.cache/medfm``
    (an empty value would otherwise put the cache into the current directory)."""
    return os.environ.get("MEDFM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medfm")


def bundle_network_config(config_file: str | os.PathLike, **values: Any) -> dict[str, Any]:
    """
    The literal network config (``{"_target_": ..., ...}``) that a bundle config's ``network_config`` item builds
    (:func:`~medfm_ops.networks.network_config`), with ``values`` set first (e.g. ``num_classes=12``).

    Example::

        bundle_network_config("bundles/lorkd_seg/configs/train.json", num_classes=5)["out_channels"]  # 5
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update(values)
    return dict(parser.get_parsed_content("network_config"))


def reject_renamed_keys(renamed: Mapping[str, str], **given: Any) -> None:
    """
    Fail on config keys that were renamed: ``given`` holds the old keys' values (``None`` = not set).

    Args:
        renamed: old key -> new key, e.g. ``{"rank": "expert_rank"}``.
        given: the old keys' current values, e.g. ``rank=@rank``.

    Raises:
        ValueError: naming the old key, its new name and the command-line option to use instead.
    """
    used = {k: v for k, v in given.items() if v is not None}
    if used:
        hints = "; ".join(
            f"'{k}' is now '{renamed.get(k, k)}' (--{renamed.get(k, k)} {json.dumps(v)})" for k, v in used.items()
        )
        raise ValueError(f"renamed config key(s): {hints}. Use the new key(s) instead of {sorted(used)}.")


def check_writable(folder: str | os.PathLike) -> str:
    """
    Create ``folder`` if needed and check that a file can be written in it, BEFORE any computation (a read-only
    or full output location would otherwise fail only after inference, with a writer error that names no folder).

    Raises:
        PermissionError: naming the folder and the reason.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        raise PermissionError(f"output folder {path} is not writable ({e.strerror or e}): pass --output_dir <a writable folder>.") from e
    return str(path)
