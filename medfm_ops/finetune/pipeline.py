# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Site fine-tuning of one region expert: runs the expert bundle's own configs and writes a new, versioned bundle."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import monai
import nibabel as nib
import torch

from medfm_ops.bundle import verify_bundle, write_expert_bundle, write_metadata, write_readme
from medfm_ops.data import check_segmentation_cases
from medfm_ops.finetune.bundle_run import predict_with_bundle, run_bundle_configs
from medfm_ops.finetune.report import (
    COLUMNS,
    bump_version,
    changelog_entry,
    comparison_rows,
    readme_section,
    regression_note,
)
from medfm_ops.finetune.scoring import score_label_maps
from medfm_ops.finetune.settings import SiteFinetuneSettings
from medfm_ops.finetune.source import SourceModel, load_source
from medfm_ops.finetune.split import SPLIT_FILENAME, load_or_create_split
from medfm_ops.finetune.start import prepare_start
from medfm_ops.metrics import format_markdown, write_table
from medfm_ops.utils.atomic_io import atomic_torch_save, atomic_write_json
from medfm_ops.utils.machine import machine_info
from medfm_ops.utils.staging import staged_directory

__all__ = ["finetune_expert", "SUMMARY_RELPATH", "MODE_CONFIGS"]

logger = logging.getLogger("medfm.finetune")

#: the fine-tuning summary inside a written bundle; written last, with ``"status": "complete"``
SUMMARY_RELPATH = "docs/finetune_summary.json"
#: config files each mode runs (difference-only overrides of the expert bundle's ``train.json``)
MODE_CONFIGS = {"full": ["train.json"], "lora": ["train.json", "train_lora.json"],
                "sparse": ["train.json", "train_sparse.json"]}  # fmt: skip
_BEST = {"full": "finetune_best.pt", "lora": "lora_adapter.pt", "sparse": "sparse_best.pt"}


def _source_metadata(source: SourceModel) -> dict[str, Any]:
    path = Path(source.path) / "configs" / "metadata.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    return {
        "name": str(meta.get("name", Path(source.path).name)),
        "version": str(meta.get("version", "0.0.0")),
        "changelog": dict(meta.get("changelog", {})) if source.kind == "expert_bundle" else {},
        "modality": meta.get("network_data_format", {}).get("inputs", {}).get("image", {}).get("modality"),
    }


def _spacing_of(image: str) -> list[float]:
    return [round(float(z), 4) for z in nib.load(image).header.get_zooms()[:3]]


def _score(bundle: Path, cases: list[dict], names: list[str], tolerance: float, stage: str, device: Any) -> dict:
    out = bundle / "eval" / stage
    preds = predict_with_bundle(bundle, [c["image"] for c in cases], out, device=device)
    result = score_label_maps(preds, [c["label"] for c in cases], names, tolerance)
    logger.info(f"{stage}: mean DSC {result['mean_dsc']:.4f}, NSD {result['mean_nsd']:.4f} on {len(cases)} cases")
    return result


def finetune_expert(
    expert_bundle: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    settings: SiteFinetuneSettings | None = None,
) -> dict[str, Any]:
    """
    Fine-tune one region expert on a site's MSD-style data set and write the result as a complete MONAI bundle.

    The run is the source expert's own pipeline: a new bundle is written (with the starting weights and the site's
    label names) and its ``configs/train.json`` (plus ``configs/train_lora.json`` or ``configs/train_sparse.json`` for
    ``mode="lora"`` / ``"sparse"``) is run on the saved split. Before and after training the validation cases are
    labelled by the bundle's own ``configs/inference.json`` and scored against the site's label files (DSC, NSD), so
    the reported scores are the ones a user of the bundle gets. The bundle is built in a hidden sibling of
    ``output_dir`` and renamed over it only when complete (``docs/finetune_summary.json`` with ``"status":
    "complete"``); a failed or killed run leaves any earlier ``output_dir`` untouched.

    Args:
        expert_bundle: a standalone expert bundle (``tools/export_expert_bundle.py``), or a medfm training bundle
            (``bundles/foundation_seg``, ``bundles/lorkd_seg``) with ``region``.
        dataset_dir: the site's MSD-style folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        output_dir: the bundle to write (replaced when it exists and the run succeeds).
        settings: every other setting, with its default and meaning (mode, epochs, split, LoRA / SH-PEFT
            values, ...): :class:`~medfm_ops.finetune.SiteFinetuneSettings`. Defaults to
            ``SiteFinetuneSettings()``. ``epochs``, ``val_interval``, ``batch_size``, ``learning_rate``,
            ``weight_decay``, the LoRA and SH-PEFT values are written into the new bundle's configs.

    Returns:
        the summary written to ``docs/finetune_summary.json``.

    Raises:
        FloatingPointError: when a training loss is NaN/inf (the bundle's train.json names the batch's files);
            nothing is written.
        ValueError: on bad settings, a mismatched saved split, a head that cannot hold the site classes, or bad
            cases (:class:`~medfm_ops.data.DatasetIntegrityError` lists every one: unreadable file, not 3D, image and
            label shapes differ, label values outside ``dataset.json``'s labels); nothing is written in these cases.
        FileNotFoundError: when the source, the data set or a case is missing.
    """
    start_time = time.perf_counter()
    settings = (SiteFinetuneSettings() if settings is None else settings).check()
    mode, epochs, device = settings.mode, int(settings.epochs), settings.device
    out = Path(output_dir).expanduser().resolve()
    saved_split = Path(settings.split_file) if settings.split_file else out / "docs" / SPLIT_FILENAME
    source = load_source(expert_bundle, region=settings.region, init=settings.init)  # validates init, path, region
    # one writer; swapped in as a whole when complete, else out stays as it was (a folder holding only a saved split
    # to reuse is an earlier output too)
    with staged_directory(out, markers=("configs/metadata.json", f"docs/{SPLIT_FILENAME}")) as stage:
        staged_split = stage / "docs" / SPLIT_FILENAME
        split = load_or_create_split(
            dataset_dir, saved_split if saved_split.is_file() else staged_split, val_split=settings.val_split,
            seed=settings.effective_split_seed, num_train_cases=settings.num_train_cases, num_val_cases=settings.num_val_cases,
        )  # fmt: skip
        if saved_split.is_file():
            staged_split.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(saved_split, staged_split)
        names = [str(split["label_names"][str(i)]) for i in range(1, len(split["label_names"]) + 1)]
        check_segmentation_cases(split["training"] + split["validation"], split["label_names"], str(dataset_dir))
        start = prepare_start(source, names, head=settings.head, seed=settings.seed)
        src_meta = _source_metadata(source)
        spacing = settings.spacing or source.spacing or _spacing_of(split["training"][0]["image"])
        roi_size = settings.roi_size or source.roi_size
        if roi_size is None:
            raise ValueError(f"{source.path} records no roi_size (patch/window): pass roi_size.")
        version = settings.version or bump_version(src_meta["version"])
        dataset_json = Path(split["dataset_dir"]) / "dataset.json"
        dataset_name = str(json.loads(dataset_json.read_text()).get("name") or Path(split["dataset_dir"]).name)
        changelog = {**src_meta["changelog"], version: "site fine-tuning in progress"}
        modality = src_meta["modality"] or ("MR" if "mr" in source.region.lower() else "CT")

        def write_start(dest: Path, values: SiteFinetuneSettings) -> None:  # the new bundle before training
            write_expert_bundle(
                dest, start.network_def, start.state_dict, region_name=source.region,
                label_names={i: n for i, n in enumerate(names, start=1)}, output_channels=start.output_channels,
                spacing=spacing, roi_size=roi_size, version=version,
                description=(f"{src_meta['name']} {src_meta['version']} fine-tuned at a site on '{dataset_name}' "
                             f"({mode}); classes {', '.join(names)}."),
                extra_metadata={"name": f"{src_meta['name']} ({dataset_name})", "changelog": changelog},
                modality=modality,
                config_values=values.config_values(),
                intensity_nonzero=source.intensity == "zscore_nonzero",
            )  # fmt: skip

        write_start(stage, settings)
        atomic_write_json(stage / SUMMARY_RELPATH, {"status": "in_progress"})
        cases = split["validation"]
        before = _score(stage, cases, names, settings.nsd_tolerance_mm, "before", device) if settings.score_before else None
        rates = [float(r) for r in settings.lr_grid] if settings.lr_grid else [float(settings.learning_rate)]
        grid: dict[float, dict[str, Any]] = {}
        for rate in rates:  # one rate: the bundle itself trains; a grid: one candidate bundle per rate
            candidate = stage if len(rates) == 1 else stage / "grid" / f"lr{rate:g}"
            if candidate != stage:
                write_start(candidate, dataclasses.replace(settings, learning_rate=rate))
                logger.info(f"learning rate {rate:g} ({len(grid) + 1} of {len(rates)})")
            grid[rate] = _train_and_score(candidate, split, settings, names, device)
        chosen = max(rates, key=lambda r: grid[r]["after"]["mean_dsc"])  # the first of equals
        if len(rates) > 1:  # the chosen candidate's rate and weights become the bundle's
            settings = dataclasses.replace(settings, learning_rate=chosen)
            chosen_dir = stage / "grid" / f"lr{chosen:g}"  # differs from the stage only in train.json's learning_rate
            shutil.copyfile(chosen_dir / "configs" / "train.json", stage / "configs" / "train.json")
            shutil.rmtree(stage / "models")
            shutil.copytree(chosen_dir / "models", stage / "models")
            shutil.rmtree(stage / "grid")
            logger.info(f"learning rate {chosen:g} kept: the best validation DSC of "
                        + ", ".join(f"{r:g}: {grid[r]['after']['mean_dsc']:.4f}" for r in rates))
        run = grid[chosen]
        after, train_seconds, parameters = run["after"], run["train_seconds"], run["parameters"]
        shutil.rmtree(stage / "eval", ignore_errors=True)

        rows = comparison_rows({"before": before, "after": after} if before else {"after": after})
        write_table(rows, stage / "docs" / "metrics.csv", stage / "docs" / "metrics.md", COLUMNS)
        summary = {
            "status": "complete",
            "bundle": {"name": f"{src_meta['name']} ({dataset_name})", "version": version},
            "source": {"path": source.path, "kind": source.kind, "name": src_meta["name"],
                       "version": src_meta["version"], "region": source.region},
            "dataset": {"dir": split["dataset_dir"], "name": dataset_name},
            "mode": mode,
            "init": start.init,
            "head": {"mode": start.plan.mode, "out_channels": start.plan.out_channels,
                     "classes": start.plan.describe(source.class_names)},
            "epochs": int(epochs),
            "epochs_trained": run["epochs_trained"],  # below epochs when early stopping ended the run
            "train_settings": settings.train_settings(),
            "settings": settings.to_dict(),
            "lora": {"rank": int(settings.lora_rank), "alpha": float(settings.lora_alpha)} if mode == "lora" else None,
            "sparse": {"budget": float(settings.sparse_budget), "variant": settings.sparse_variant, "lambda": float(settings.sparse_lambda),
                       "selected": parameters["trainable"], **run["estimation"]} if mode == "sparse" else None,
            "split": {"file": SPLIT_FILENAME, "origin": split["origin"], "seed": split["seed"],
                      "val_split": split["val_split"], "info": split["info"], "reused": split["reused"],
                      "num_training_total": split["num_training_total"],
                      "num_validation_total": split["num_validation_total"],
                      "num_training_used": len(split["training"]), "num_validation_used": len(cases)},
            "spacing": [float(z) for z in spacing],
            "roi_size": [int(r) for r in roi_size],
            "nsd_tolerance_mm": float(settings.nsd_tolerance_mm),
            "parameters": parameters,
            "device": run["device"],
            "train_seconds": train_seconds,  # of the kept learning rate's run
            "best_validation": run["kept"],  # the kept epoch, by the training-time validation (MONAI MeanDice)
            "learning_rate_grid": {f"{r:g}": {"mean_dsc": grid[r]["after"]["mean_dsc"],
                                              "epochs_trained": grid[r]["epochs_trained"],
                                              "train_seconds": grid[r]["train_seconds"]} for r in rates}
            if len(rates) > 1 else None,
            "before": before,
            "after": after,
            "machine": {**machine_info(run["device"]), "monai": monai.__version__},
        }  # fmt: skip
        summary["lowered_score"] = regression_note(summary)  # None unless the DSC went down
        if summary["lowered_score"]:
            logger.warning(summary["lowered_score"])
        meta = json.loads((stage / "configs" / "metadata.json").read_text())
        meta["changelog"][version] = changelog_entry(summary)
        meta["medfm"]["site_finetuning"] = {k: summary[k] for k in ("source", "dataset", "mode", "init", "epochs")}
        meta["medfm"]["site_finetuning"]["validation"] = {
            "mean_dsc": after["mean_dsc"], "mean_nsd": after["mean_nsd"], "num_cases": len(cases)}  # fmt: skip
        write_metadata(stage, meta)
        network_def = json.loads((stage / "configs" / "inference.json").read_text())["network_def"]
        write_readme(stage, meta, network_def, readme_section(summary, rows))
        if settings.verify:
            verify_bundle(stage)
        else:
            _export_torchscript(stage)
        summary["total_seconds"] = time.perf_counter() - start_time
        atomic_write_json(stage / SUMMARY_RELPATH, summary)
    print("\n[site fine-tuning] validation scores of the written bundle's inference.json, before vs after\n"
          + format_markdown(rows, COLUMNS) + f"\n[site fine-tuning] bundle written to {out}", flush=True)  # fmt: skip
    return summary


def _train_and_score(bundle: Path, split: dict[str, Any], settings: SiteFinetuneSettings, names: list[str],
                     device: Any) -> dict[str, Any]:
    """Train the written ``bundle`` with its own ``configs/train*.json`` on the split's training cases (validating on
    its validation cases), keep the best validated weights as ``models/model.pt``, and score that bundle's own
    ``inference.json`` on the validation cases. Returns ``{"after", "train_seconds", "kept", "epochs_trained",
    "parameters", "estimation", "device"}``."""
    mode, cases = settings.mode, split["validation"]
    overrides: dict[str, Any] = {
        "train#dataset#data": [{"image": c["image"], "label": c["label"]} for c in split["training"]],
        "validate#dataset#data": [{"image": c["image"], "label": c["label"]} for c in cases],
        "best_model_filename": _BEST[mode],
    }
    if device is not None:
        overrides["device"] = torch.device(device)
    # the bundle's own train.json stops at the first non-finite loss (its `finite_loss` key), naming the batch
    handlers = [{"_target_": "medfm_ops.engines.TerminalProgressBar"}] if settings.progress else []
    logger.info(f"training ({mode}) for {settings.epochs} epochs on {len(split['training'])} cases")
    t0 = time.perf_counter()
    workflow = run_bundle_configs(bundle, MODE_CONFIGS[mode], overrides, extra_train_handlers=handlers)
    train_seconds = time.perf_counter() - t0
    val_state = workflow.parser.get_parsed_content("validate#evaluator").state
    network = workflow.parser.get_parsed_content("network")
    parameters = {"total": sum(p.numel() for p in network.parameters()),
                  "trainable": sum(p.numel() for p in network.parameters() if p.requires_grad)}  # fmt: skip
    estimation = {}
    if mode == "sparse":  # the selected entries train, not whole tensors
        parameters["trainable"] = workflow.parser.get_parsed_content("sparse#parameters").num_selected
        estimate = workflow.parser.get_parsed_content("sparse#estimate")
        estimation = {"estimation_batches": estimate.num_batches, "estimation_seconds": estimate.seconds}
    best = bundle / "models" / _BEST[mode]
    if not best.is_file():
        raise RuntimeError(f"training wrote no checkpoint ({best}): it never validated.")
    if mode == "full":  # lora, sparse: the mode's finalize already wrote the stock models/model.pt
        atomic_torch_save(torch.load(best, map_location="cpu", weights_only=True), bundle / "models" / "model.pt")
    best.unlink()
    return {
        "after": _score(bundle, cases, names, settings.nsd_tolerance_mm, "after", device),
        "train_seconds": train_seconds,
        "kept": {"epoch": int(val_state.best_metric_epoch), "val_mean_dice": float(val_state.best_metric)},
        "epochs_trained": int(workflow.parser.get_parsed_content("train#trainer").state.epoch),
        "parameters": parameters,
        "estimation": estimation,
        "device": str(workflow.parser.get_parsed_content("device")),
    }


def _export_torchscript(bundle: Path) -> None:
    from monai.bundle import ckpt_export

    ckpt_export(
        net_id="network_def", filepath=str(bundle / "models" / "model.ts"),
        ckpt_file=str(bundle / "models" / "model.pt"), meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle),
    )  # fmt: skip
