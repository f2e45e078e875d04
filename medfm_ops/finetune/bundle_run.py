# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Run a bundle's own configs in this process (what ``python -m monai.bundle run`` does), for site fine-tuning."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigWorkflow

from medfm_ops.utils.atomic_io import OutputWriteError, torch_write_failure
from medfm_ops.utils.errors import root_cause

__all__ = ["run_bundle_configs", "predict_with_bundle"]


def run_bundle_configs(
    bundle_dir: str | os.PathLike,
    config_files: Sequence[str],
    overrides: Mapping[str, Any] | None = None,
    extra_train_handlers: Sequence[dict] = (),
) -> ConfigWorkflow:
    """
    Run ``initialize``, ``run`` and ``finalize`` of the bundle configs ``config_files`` (names under
    ``{bundle_dir}/configs``, merged in order, later files overriding) with ``bundle_root = bundle_dir``.

    Args:
        bundle_dir: the bundle root.
        config_files: e.g. ``["train.json", "train_lora.json"]``.
        overrides: config ids (``"train#dataset#data"``, ``"epochs"``, ...) and their values, applied last.
        extra_train_handlers: handler configs appended to ``train#handlers`` for this run only (e.g. a progress
            bar); the bundle's files are not changed.

    Returns:
        the finished :class:`~monai.bundle.ConfigWorkflow` (its ``parser`` holds the instantiated components).

    Raises:
        the error that stopped the run, unwrapped from MONAI's "Failed to evaluate/instantiate" wrappers so that
        its own message (naming the file or batch) is what the user reads last; a full disk is an
        :class:`~medfm_ops.utils.OutputWriteError` naming the file (also when the bundle-local saver,
        ``scripts/atomic_checkpoint.py``, raised its copy of that class, or MONAI's stock ``CheckpointSaver`` left
        torch's "unexpected pos").
    """
    root = Path(bundle_dir)
    files = [str(root / "configs" / f) for f in config_files]
    _forget_other_bundle_scripts(root)
    workflow = ConfigWorkflow(
        config_file=files,
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(root),
        **dict(overrides or {}),
    )
    if extra_train_handlers:
        workflow.parser["train#handlers"] = list(workflow.parser["train#handlers"]) + list(extra_train_handlers)
    try:
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    except (RuntimeError, OSError) as e:  # surface the real error (a bad file, a NaN loss), not the config wrapper
        cause = root_cause(e)
        disk = _package_write_error(cause) or torch_write_failure(cause, root)  # a full disk: say so, name the file
        if disk is not None:
            raise disk from cause
        if cause is e:
            raise
        raise cause.with_traceback(cause.__traceback__) from None
    return workflow


def _forget_other_bundle_scripts(root: Path) -> None:
    """
    Unload a bundle-local ``scripts`` package imported from another bundle folder. MONAI puts each bundle root on
    ``sys.path``, but Python keeps the first ``scripts`` package it imported, whose folder may be gone (a staged
    bundle renamed into place): a module of it not imported yet would not be found. MONAI Label unloads ``scripts``
    before each bundle run in the same way.
    """
    cached = sys.modules.get("scripts")
    folders = [Path(p).resolve() for p in getattr(cached, "__path__", [])]
    if cached is None or folders == [(root / "scripts").resolve()]:
        return
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[name]


def _package_write_error(error: BaseException) -> OutputWriteError | None:
    """The package's :class:`~medfm_ops.utils.OutputWriteError` for the same error raised by a bundle's verbatim copy
    of :mod:`medfm_ops.utils.atomic_io` (``scripts/atomic_io.py`` defines its own class of that name), so callers
    catch one class; None for any other error."""
    if isinstance(error, OutputWriteError) or not isinstance(error, OSError):
        return None
    if type(error).__name__ != OutputWriteError.__name__:
        return None
    out = OutputWriteError(error.errno, str(error))
    out.filename, out.reason = error.filename, getattr(error, "reason", None)
    return out


def predict_with_bundle(
    bundle_dir: str | os.PathLike, images: Sequence[str], output_dir: str | os.PathLike, device: Any = None
) -> list[Path]:
    """
    Label maps of ``images`` from the bundle's own ``configs/inference.json`` (its preprocessing, window, inferer
    and label rule), written to ``output_dir`` as ``<name>_seg.nii.gz``: exactly what the bundle gives a user.

    Returns:
        the written label map of every image, in order.
    """
    overrides: dict[str, Any] = {"datalist": [str(i) for i in images], "output_dir": str(output_dir)}
    if device is not None:
        overrides["device"] = device
    run_bundle_configs(bundle_dir, ["inference.json"], overrides)
    out = []
    for image in images:
        name = Path(image).name
        stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
        path = Path(output_dir) / f"{stem}_seg.nii.gz"
        if not path.is_file():
            raise FileNotFoundError(f"the bundle's inference.json wrote no label map for {image} (expected {path}).")
        out.append(path)
    return out
