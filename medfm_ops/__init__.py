# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""medfm_ops: shared operations of the medfm MONAI bundles (LoRKD, RD, SH-PEFT, site fine-tuning).

The subpackages load on first use, so a bundle config needs one ``"$import medfm_ops"`` to name e.g.
``medfm_ops.data.load_datalist`` (no import line per subpackage).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__version__ = "0.1.0"

_SUBMODULES = (
    "bundle", "bundle_paths", "data", "engines", "finetune", "layers", "losses", "metrics", "networks", "peft",
    "utils", "visualize",
)  # fmt: skip


def __getattr__(name: str) -> ModuleType:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_SUBMODULES])
