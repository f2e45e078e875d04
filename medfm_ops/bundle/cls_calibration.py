# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Give a two-class classification bundle a decision threshold chosen on labelled validation items, so that it
predicts the minority class where its probabilities say so instead of the argmax's majority class."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfm_ops.utils import staged_directory
from medfm_ops.utils.atomic_io import atomic_write_text

from .bundle_scripts import write_bundle_scripts
from .cls_bundle_scoring import cls_bundle_outputs
from .cls_expert_bundle import _render, cls_bundle_readme, decision_record
from .expert_bundle import _write_json, write_metadata

__all__ = ["bundle_decision_threshold", "calibrate_cls_bundle", "calibrate_when_binary", "next_patch_version"]


def next_patch_version(version: str) -> str:
    """``"0.1.0"`` -> ``"0.1.1"``: the bundle version after a change that keeps the network and its weights.

    Raises:
        ValueError: for a version that is not ``MAJOR.MINOR.PATCH``.
    """
    parts = str(version).split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"bundle version must be MAJOR.MINOR.PATCH, got {version!r}.")
    return f"{parts[0]}.{parts[1]}.{int(parts[2]) + 1}"


def bundle_decision_threshold(bundle_dir: str | os.PathLike) -> tuple[str, float] | None:
    """``(task, threshold)`` of a classification bundle that decides at a decision threshold (its metadata's
    ``medfm.decision``); None for a bundle that decides by argmax, or no bundle at ``bundle_dir``."""
    meta_file = Path(bundle_dir) / "configs" / "metadata.json"
    if not meta_file.is_file():
        return None
    info = json.loads(meta_file.read_text(encoding="utf-8")).get("medfm") or {}
    decision = info.get("decision") or {}
    if decision.get("rule") != "threshold":
        return None
    return str(info["task"]), float(decision["threshold"])


def calibrate_cls_bundle(
    bundle_dir: str | os.PathLike,
    items: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike | None = None,
    chosen_on: str | None = None,
    verify: bool = True,
    min_sensitivity: float | None = None,
) -> dict[str, Any]:
    """
    Choose the decision threshold of a two-class bundle written by :func:`~medfm_ops.bundle.write_cls_expert_bundle`
    on labelled validation items (:func:`~medfm_ops.metrics.choose_decision_threshold` on the probabilities of the
    bundle's own ``inference.json``) and write the bundle with it: ``configs/inference.json`` (re-rendered from the
    current template with ``decision_threshold``), ``scripts/`` refreshed, ``metadata.json`` (``medfm.decision``,
    the next patch version with its changelog entry) and ``docs/README.md``. The weights are unchanged. The bundle is
    written as a whole (staged, verified with ``verify``, swapped in): a failed calibration leaves it as it was.

    Args:
        bundle_dir: the two-class classification bundle.
        items: labelled validation items of its task (``image`` [+ ``array``, ``index``], task-local ``label``, both
            classes present); never the items the bundle is reported on.
        out_dir: where the calibrated bundle goes. Defaults to None (``bundle_dir`` itself).
        chosen_on: what ``items`` are, for the metadata and README (e.g. ``"the 240 cases of the validation split
            carved from training"``). Defaults to ``"the N cases of the training run's validation split"``.
        verify: run :func:`~medfm_ops.bundle.verify_bundle` on the staged bundle. Defaults to True.
        min_sensitivity: choose the highest specificity at a sensitivity of at least this (a screening operating
            point) instead of the highest balanced accuracy. Defaults to None.

    Returns:
        the choice (:func:`~medfm_ops.metrics.choose_decision_threshold`'s dict) with ``"chosen_on"``.

    Raises:
        ValueError: for a bundle that is not a medfm classification bundle (naming its metadata file), a task with
            other than two classes, or items without both classes.
    """
    from medfm_ops.metrics import choose_decision_threshold

    bundle = Path(bundle_dir)
    meta_file = bundle / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    info = meta.get("medfm") or {}
    if "class_names" not in info or "spatial_size" not in info:
        raise ValueError(f"{meta_file}: not a medfm classification bundle (no medfm.class_names / spatial_size).")
    names = list(info["class_names"])
    if len(names) != 2:
        raise ValueError(f"{meta_file}: a decision threshold needs a two-class task, the bundle has classes {names}.")
    chosen_on = chosen_on or f"the {len(items)} cases of the training run's validation split"
    probs, _ = cls_bundle_outputs(bundle, items)
    labels = np.array([int(it["label"]) for it in items])
    choice = {**choose_decision_threshold(probs, labels, min_sensitivity), "chosen_on": chosen_on}
    cfg = json.loads((bundle / "configs" / "inference.json").read_text(encoding="utf-8"))
    cfg = _render({"network_def": cfg["network_def"], "spatial_size": cfg["spatial_size"], "class_names": names,
                   "decision_threshold": choice["threshold"]})  # fmt: skip
    version = next_patch_version(meta["version"])
    meta["changelog"] = {
        version: f"decision threshold {choice['threshold']:.4g} on the {names[1]} probability, the highest "
        f"{choice['criterion']} on {chosen_on} (balanced accuracy {choice['balanced_accuracy']:.3f}, sensitivity "
        f"{choice['sensitivity']:.3f}, specificity {choice['specificity']:.3f}; argmax "
        f"{choice['argmax_balanced_accuracy']:.3f})",
        **meta["changelog"],
    }  # fmt: skip
    meta["version"] = version
    meta["medfm"] = {**info, "decision": decision_record(choice)}
    with staged_directory(bundle if out_dir is None else out_dir) as root:
        if root.resolve() != bundle.resolve():  # (inside an open staging folder of the same bundle it is written there)
            shutil.copytree(bundle, root, dirs_exist_ok=True, ignore=shutil.ignore_patterns("eval", "__pycache__"))
        _write_json(root / "configs" / "inference.json", cfg)
        write_bundle_scripts(root)
        write_metadata(root, meta)
        readme = cls_bundle_readme(meta, meta["description"], info["spatial_size"], names)
        atomic_write_text(root / "docs" / "README.md", readme)
        if verify:
            from .verify import verify_bundle

            verify_bundle(root)
    return choice


def calibrate_when_binary(
    bundle_dir: str | os.PathLike, items: Sequence[Mapping[str, Any]] | None, **kwargs: Any
) -> dict[str, Any] | None:
    """
    :func:`calibrate_cls_bundle` when it applies: a two-class bundle and ``items`` with both classes; otherwise the
    bundle keeps the argmax and one log line says why (a synthetic task of more classes, a smoke run whose validation
    split holds one class). The step of the exporters that receive the run's validation split.

    Returns:
        the choice, or None when the bundle keeps the argmax.
    """
    import logging

    log = logging.getLogger("medfm")
    meta = json.loads((Path(bundle_dir) / "configs" / "metadata.json").read_text(encoding="utf-8"))
    names = meta["medfm"]["class_names"]
    labels = {int(it["label"]) for it in items or []}
    if len(names) != 2 or labels != {0, 1}:
        why = f"{len(names)} classes" if len(names) != 2 else f"the validation items have labels {sorted(labels)}"
        log.info(f"{bundle_dir}: decision by argmax ({why}; a threshold needs two classes, both in the items).")
        return None
    choice = calibrate_cls_bundle(bundle_dir, items, **kwargs)
    log.info(f"{bundle_dir}: decision threshold {choice['threshold']:.4g} (validation balanced accuracy "
             f"{choice['balanced_accuracy']:.3f}, argmax {choice['argmax_balanced_accuracy']:.3f}, n = {choice['n']}).")
    return choice
