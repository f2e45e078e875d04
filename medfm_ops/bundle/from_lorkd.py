# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Export one region expert of a trained ``lorkd_seg`` bundle as a standalone MONAI bundle."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import nibabel as nib

from medfm_ops.data import TaskTable, load_datalist, recorded_preprocessing
from medfm_ops.engines import model_fingerprint
from medfm_ops.networks import expert_model_from_spec, export_expert, load_expert_state_dict, load_network_spec
from medfm_ops.bundle.expert_bundle import write_expert_bundle

__all__ = ["export_lorkd_expert", "check_model_is_from_last_run"]

logger = logging.getLogger("medfm.export")


def _bundle_config(bundle_root: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle_root)
    return parser


def check_model_is_from_last_run(models_dir: Path) -> None:
    """
    Refuse a ``model.pt`` that the last training run did not write: ``training_summary.json`` (written at the end of
    every run) records whether that run wrote ``model.pt`` and its SHA-256.

    Raises:
        ValueError: when the summary is missing, says the last run wrote no model (it never validated), or records
            another file than the one present (a later run was interrupted after replacing it).
    """
    summary_path, model = models_dir / "training_summary.json", models_dir / "model.pt"
    if not summary_path.is_file():
        raise ValueError(f"{summary_path} is missing: cannot tell which run wrote {model}; train the bundle to the end.")
    summary = json.loads(summary_path.read_text())
    if "model_sha256" not in summary:
        raise ValueError(f"{summary_path} has no model fingerprint (written by an older medfm): retrain the bundle.")
    if not summary.get("model_written_by_this_run"):
        epochs = summary.get("epochs")
        if summary.get("resumed_from") and summary.get("validated_this_run", True):
            why = (f"the run resumed from {summary['resumed_from']} (epoch {summary.get('resumed_epoch')}) validated "
                   f"but never beat the best score of the epochs before the interruption (epoch "
                   f"{summary.get('best_metric_epoch')}), so it kept that earlier model file")
            fix = "Export with force=True to ship that best model, or train on"
        else:
            why = (f"it never validated in its {epochs} epoch(s), e.g. epochs < val_interval: it is an earlier run's "
                   "model")
            fix = "Retrain with validation, or pass force=True"
        raise ValueError(f"{model} was not written by the last training run ({why}). {fix}.")
    if model_fingerprint(model) != summary["model_sha256"]:
        raise ValueError(
            f"{model} is not the model the last finished training run wrote ({summary_path}): a later run was "
            "interrupted after replacing it. Finish or resume that run, or pass force=True."
        )


def _region_spacing(files: list[dict], task: int) -> tuple[float, ...]:
    own = [f for f in files if int(f["region"]) == task]
    if not own:
        raise ValueError(f"no case of region {task} in the datalist: cannot read its voxel spacing.")
    zooms = nib.load(own[0]["image"]).header.get_zooms()[:3]
    return tuple(round(float(z), 4) for z in zooms)


def export_lorkd_expert(
    bundle_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    region: str | None = None,
    datalist: str | os.PathLike | None = None,
    spacing: tuple[float, ...] | None = None,
    roi_size: tuple[int, ...] | None = None,
    version: str = "0.1.0",
    verify: bool = False,
    force: bool = False,
) -> Path:
    """
    Fuse the expert of ``region`` from ``{bundle_root}/models/model.pt`` into the stock backbone and write it with
    :func:`~medfm_ops.bundle.write_expert_bundle` (stock MONAI network in ``network_def``, fused weights, the
    region's label names in the metadata).

    Args:
        bundle_root: the trained ``lorkd_seg`` bundle (``models/model.pt`` and ``models/network_def.json``).
        out_dir: the new bundle's directory.
        region: region name. Defaults to the first region of the data set.
        datalist: datalist of the training data (to read the region's voxel spacing). Defaults to the bundle's own
            ``datalist`` (the synthetic default set).
        spacing: target spacing of the exported bundle. Defaults to the region's training spacing (its row of
            ``models/region_preprocessing.json``, recorded by the run), else the spacing of the region's first case.
        roi_size: sliding-window size. Defaults to the region's training window (same row), else the bundle's
            ``roi_size``.
        version: version of the new bundle. Defaults to ``"0.1.0"``.
        verify: run MONAI's ``verify_metadata`` / ``verify_net_in_out`` / ``ckpt_export`` on the staged bundle before
            it replaces ``out_dir`` (a failed check keeps an earlier bundle there).
        force: export even when ``models/model.pt`` is not the one the last training run wrote (a warning is
            logged). Defaults to False (refused, see :func:`check_model_is_from_last_run`).
    """
    root = Path(bundle_root).resolve()
    try:
        check_model_is_from_last_run(root / "models")
    except ValueError as e:
        if not force:
            raise
        logger.warning(f"exporting anyway (force=True): {e}")
    spec = load_network_spec(root / "models")
    if not spec.get("tasks"):
        raise ValueError(f"{root / 'models'}: network_def.json has no 'tasks' (class layout); retrain the bundle.")
    table = TaskTable.from_regions(spec["tasks"], source=str(root / "models" / "network_def.json"))
    task = table.task_ids[0] if region is None else table.task_id_of(region)
    name = table.task_names[task]
    parser = _bundle_config(root)
    if datalist is None:
        datalist = parser.get_parsed_content("datalist")
    _, sections = load_datalist(datalist)
    row = recorded_preprocessing(root / "models", name)
    if spacing is None:
        spacing = row["spacing"] if row.get("spacing") else _region_spacing(sections["training"], task)
    if roi_size is None:
        roi_size = tuple(row["window_size"]) if row else tuple(int(r) for r in parser.get_parsed_content("roi_size"))
    # rebuild the trained expert model (settings recorded by its run, LoRKD* ranks from the checkpoint), fuse
    model = expert_model_from_spec(spec)
    load_expert_state_dict(model, root / "models" / "model.pt")
    fused = export_expert(model, task)
    modality = "MR" if "mr" in name.lower() else "CT"
    out = write_expert_bundle(
        out_dir,
        spec["network_def"],
        fused.state_dict(),
        region_name=name,
        label_names={i: c for i, c in enumerate(table.class_names[task], start=1)},
        output_channels=table.channels_of(task),
        spacing=spacing,
        roi_size=roi_size,
        version=version,
        description=(
            f"LoRKD expert for region '{name}' ({', '.join(table.class_names[task])}), fused from "
            f"{root.name} into a stock {spec['network_def']['_target_'].rsplit('.', 1)[-1]}."
        ),
        modality=modality,
        verify=verify,
        intensity_nonzero=row.get("intensity") == "zscore_nonzero",
    )
    if verify:
        logger.info("verify_metadata, verify_net_in_out and ckpt_export passed")
    logger.info(f"wrote the '{name}' expert bundle to {out}")
    return out
