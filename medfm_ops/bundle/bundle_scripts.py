# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Bundle-local code (``scripts/``, as model-zoo bundles ship it) of the exported bundles: verbatim copies of
self-contained medfm_ops modules, so that an exported bundle runs with MONAI alone and behaves as the package does."""

from __future__ import annotations

import os
from pathlib import Path

from medfm_ops.data import input_guard
from . import class_decision
from medfm_ops.utils import atomic_checkpoint, atomic_io, errors
from medfm_ops.utils.atomic_io import atomic_write_text

__all__ = ["BUNDLE_SCRIPTS", "write_bundle_scripts"]

#: ``scripts/<name>`` of an exported bundle -> the medfm_ops module it copies (standard library, numpy, torch, Ignite
#: and MONAI imports only, or a relative import of another copied module): the input guard (loaders, value and shape
#: checks, the finite-loss check), the exception hook that prints the cause of a failure last, the checkpoint
#: saver of ``train.json`` (atomic writes; a full disk is one line naming the file) with the atomic writes it uses,
#: and a classifier's decision (argmax or a two-class decision threshold)
BUNDLE_SCRIPTS = {
    "input_guard.py": Path(input_guard.__file__),
    "class_decision.py": Path(class_decision.__file__),
    "errors.py": Path(errors.__file__),
    "atomic_io.py": Path(atomic_io.__file__),
    "atomic_checkpoint.py": Path(atomic_checkpoint.__file__),
}

_INIT = '"""Bundle-local code: copies of medfm_ops modules (see each file), so that this bundle needs MONAI only."""\n'


def write_bundle_scripts(root: str | os.PathLike) -> Path:
    """
    Write ``{root}/scripts/`` (a package: ``__init__.py`` and :data:`BUNDLE_SCRIPTS`, each byte for byte its
    medfm_ops module). A config names them as ``scripts.input_guard.InputGuardd``; MONAI puts the bundle root on
    ``sys.path`` before the ``run`` step, so they can be used from ``run`` on (not in ``initialize``): the exception
    hook (``scripts.errors.report_cause_last``) is the first item of ``run``; the checkpoint saver
    (``scripts.atomic_checkpoint.AtomicCheckpointSaver``) is built inside it.

    Returns:
        the ``scripts`` folder.
    """
    scripts = Path(root) / "scripts"
    atomic_write_text(scripts / "__init__.py", _INIT)
    for name, source in BUNDLE_SCRIPTS.items():
        atomic_write_text(scripts / name, source.read_text(encoding="utf-8"))
    return scripts
