# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The configs of a standalone segmentation-expert bundle: JSON files shipped in ``templates/seg_expert/configs``.

The template files are the one definition of the expert bundle's pipeline (preprocessing, network, inferer, label
rule, fine-tuning). Writing a bundle copies them and sets their literal top-level values (network, channels,
spacing, window, training settings); no config is assembled in Python.

The deterministic preprocessing is one list, ``deterministic_transforms`` in ``train.json``, and ``inference.json``
carries the same list as its ``preprocessing`` (it must stand alone: MONAI Label loads it by itself). The list loads
the image only (MONAI Label replaces ``LoadImaged`` with a loader that requires every key it names); ``train.json``
loads the label in a ``load_label`` step before it, and every later step names both keys with
``allow_missing_keys``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["TEMPLATE_DIR", "CONFIG_FILES", "render_configs"]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates" / "seg_expert"

#: config files of the template: ``inference.json`` and ``train.json`` stand alone (MONAI Label loads each by
#: itself), ``evaluate.json``, ``train_lora.json`` and ``train_sparse.json`` are difference-only overrides of
#: ``train.json``
CONFIG_FILES = ("inference.json", "train.json", "evaluate.json", "train_lora.json", "train_sparse.json")


def _load(name: str) -> dict[str, Any]:
    return json.loads((TEMPLATE_DIR / "configs" / name).read_text(encoding="utf-8"))


def render_configs(
    values: Mapping[str, Any], file_values: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict]:
    """
    The template configs with their literal top-level entries replaced.

    Args:
        values: entries set in every file that defines them (``network_def``, ``output_channels``, ``num_labels``,
            ``spacing``, ``roi_size``, ``label_dtype``, ...). Each key must exist in ``inference.json``.
        file_values: entries set in one file only, ``{file name: {key: value}}``, e.g.
            ``{"train.json": {"epochs": 20}, "train_lora.json": {"lora_rank": 4}, "train_sparse.json":
            {"sparse_budget": 0.05}}``; each key must exist there.

    Returns:
        ``{file name: config dict}`` for :data:`CONFIG_FILES`.

    Raises:
        KeyError: for a key the template does not define (a typo would otherwise be silently ignored).
    """
    configs = {name: _load(name) for name in CONFIG_FILES}
    for key in values:
        if key not in configs["inference.json"]:
            raise KeyError(f"the expert bundle template has no top-level entry {key!r} in inference.json.")
    for name, entries in (file_values or {}).items():
        if name not in configs:
            raise KeyError(f"the expert bundle template has no config file {name!r}; files: {list(configs)}.")
        for key in entries:
            if key not in configs[name]:
                known = sorted(k for k, v in configs[name].items() if not isinstance(v, (dict, list)))
                raise KeyError(f"the expert bundle template's {name} has no entry {key!r}; settable: {known}.")
    for name, cfg in configs.items():
        for key, value in values.items():
            if key in cfg:
                cfg[key] = copy.deepcopy(value)
    for name, entries in (file_values or {}).items():
        for key, value in entries.items():
            configs[name][key] = copy.deepcopy(value)
    return configs
