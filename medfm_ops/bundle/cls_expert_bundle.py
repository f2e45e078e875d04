# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Write a classification model (a fused LoRKD task expert, an RD student) as a standalone MONAI bundle: a stock
network with its task head and a plain state dict, configs from ``templates/cls_expert/configs``."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .expert_bundle import SCHEMA_RELPATH, _plain_state_dict, _version, bundle_metadata, write_bundle_folder

__all__ = [
    "CLS_TEMPLATE_DIR",
    "write_cls_expert_bundle",
    "export_lorkd_cls_expert",
    "cls_bundle_readme",
    "decision_record",
]

CLS_TEMPLATE_DIR = Path(__file__).resolve().parent / "templates" / "cls_expert"
_OUT_KEYS = ("num_classes", "out_channels")


def _render(values: Mapping[str, Any]) -> dict:
    cfg = json.loads((CLS_TEMPLATE_DIR / "configs" / "inference.json").read_text(encoding="utf-8"))
    for k, v in values.items():
        if k not in cfg:
            raise KeyError(f"the classification bundle template has no top-level entry {k!r} in inference.json.")
        cfg[k] = copy.deepcopy(v)
    return cfg


def write_cls_expert_bundle(
    out_dir: str | os.PathLike,
    network_def: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    task_name: str,
    class_names: Sequence[str],
    spatial_size: Sequence[int],
    modality: str = "CT",
    version: str = "0.1.0",
    description: str | None = None,
    authors: str = "medfm contributors",
    extra_metadata: Mapping[str, Any] | None = None,
    required_packages: Mapping[str, str] | None = None,
    verify: bool = False,
    decision: Mapping[str, Any] | None = None,
) -> Path:
    """
    Write a standalone classification bundle: ``configs/{metadata,inference}.json`` and ``logging.conf``,
    ``models/model.pt`` (plain state dict, atomically, finite weights only), ``scripts/`` (the input guard, a copy of
    :py:mod:`medfm_ops.data.input_guard`), ``LICENSE``, ``docs/README.md`` and ``docs/metadata_schema.json``
    (offline ``verify_metadata``). ``inference.json`` reads the NIfTI images of ``--dataset_dir``, refuses an image
    with NaN/inf voxels, not 3D or not single-channel (naming the file), and writes ``eval/predictions.csv`` (one
    row per image: its class probabilities) and ``eval/decisions.csv`` (its predicted class: the argmax, or the
    decision threshold of ``decision``).

    The bundle is written as a whole (:func:`~medfm_ops.utils.staged_directory`): staged beside ``out_dir``,
    checked (``verify``), then swapped in; a failed or killed writer leaves an earlier bundle there as it was.

    Args:
        out_dir: bundle directory (created).
        network_def: stock network config whose outputs are the task's classes (``num_classes`` or
            ``out_channels`` equal to ``len(class_names)``).
        state_dict: weights loading strictly into ``network_def``.
        task_name: the task, e.g. ``"adrenalmnist3d"``.
        class_names: class names in label order.
        spatial_size: input size the images are resized to.
        modality: input modality for the metadata. Defaults to ``"CT"``.
        version: bundle version (listed in ``changelog``). Defaults to ``"0.1.0"``.
        description: metadata description. Defaults to a generated one.
        authors: metadata authors. Defaults to ``"medfm contributors"``.
        extra_metadata: keys merged into ``metadata.json`` last.
        required_packages: extra ``required_packages_version`` entries (e.g. ``{"medfm_ops": "0.1.0"}`` for a
            network class of medfm_ops). Defaults to none (MONAI only).
        verify: run :func:`~medfm_ops.bundle.verify_bundle` on the staged bundle before it replaces ``out_dir``.
            Defaults to False.
        decision: a two-class decision threshold chosen on validation items
            (:func:`~medfm_ops.metrics.choose_decision_threshold`'s dict, + ``"chosen_on"``: where), recorded in the
            metadata (``medfm.decision``) and applied by ``inference.json`` (``decision_threshold``). Defaults to
            None (the argmax; see :func:`~medfm_ops.bundle.calibrate_cls_bundle`).

    Raises:
        ValueError: when the class count and the network's outputs differ, or the state dict does not load.
        OutputWriteError: when the disk is full (one line naming the file); ``out_dir`` is untouched.
        OutputLockedError: when another running process writes ``out_dir``.
    """
    if len(class_names) < 2:
        raise ValueError(f"class_names needs at least 2 classes, got {list(class_names)}.")
    outs = [network_def[k] for k in _OUT_KEYS if k in network_def]
    if outs and int(outs[0]) != len(class_names):
        raise ValueError(f"network_def outputs {outs[0]} classes but class_names has {len(class_names)}: {list(class_names)}.")
    plain = _plain_state_dict(state_dict, network_def)
    net_cfg = json.loads(json.dumps(dict(network_def)))
    threshold = None if decision is None else float(decision["threshold"])
    if threshold is not None and len(class_names) != 2:
        raise ValueError(f"a decision threshold needs a two-class task, got classes {list(class_names)}.")
    cfg = _render({"network_def": net_cfg, "spatial_size": [int(s) for s in spatial_size],
                   "class_names": list(class_names), "decision_threshold": threshold})  # fmt: skip
    n = len(class_names)
    description = description or (
        f"3D classifier of task {task_name} ({', '.join(class_names)}): a stock {net_cfg['_target_']} with its task "
        f"head, input resized to {list(spatial_size)} and z-score normalised per image; outputs {n} logits."
    )
    pred = {"type": "probabilities", "format": "classes", "num_channels": n, "spatial_shape": [1], "dtype": "float32",
            "value_range": [0, 1], "is_patch_data": False, "channel_def": {str(i): c for i, c in enumerate(class_names)}}  # fmt: skip
    meta = {
        **bundle_metadata(
            version, f"{task_name} classifier exported by medfm (stock network + task head)", f"medfm {task_name} classifier",
            f"Classification of {task_name}: {', '.join(class_names)}", description, authors, modality, spatial_size,
            False, pred, required_packages,
        ),  # fmt: skip
        "medfm": {"task": task_name, "class_names": list(class_names), "spatial_size": [int(s) for s in spatial_size],
                  "decision": decision_record(decision)},
    }  # fmt: skip
    meta.update(dict(extra_metadata or {}))
    readme = cls_bundle_readme(meta, description, spatial_size, class_names)
    return write_bundle_folder(out_dir, {"inference.json": cfg}, CLS_TEMPLATE_DIR, meta, readme, plain, authors, verify)


def decision_record(decision: Mapping[str, Any] | None) -> dict[str, Any]:
    """``metadata.json``'s ``medfm.decision``: ``{"rule": "argmax"}``, or ``{"rule": "threshold", "threshold",
    ...}`` with how it was chosen (:func:`~medfm_ops.metrics.choose_decision_threshold`'s dict)."""
    if decision is None:
        return {"rule": "argmax"}
    return {"rule": "threshold", **json.loads(json.dumps(dict(decision), default=float))}


def cls_bundle_readme(
    meta: Mapping[str, Any], description: str, spatial_size: Sequence[int], class_names: Sequence[str]
) -> str:
    """``docs/README.md`` of a classification bundle: overview, data, inference and its outputs (with the decision
    rule of ``meta["medfm"]["decision"]``), checks, intended use, licence."""
    d = meta["medfm"]["decision"]
    if d["rule"] == "threshold":
        where = f" on {d['chosen_on']}" if d.get("chosen_on") else ""
        at = ", ".join(f"{k} {d[k]:.3f}" for k in ("sensitivity", "specificity") if k in d)
        rule = (
            f"{class_names[1]} where its probability is above the decision threshold {d['threshold']:.4g} "
            f"(`decision_threshold` in `configs/inference.json`), chosen{where} for the highest "
            f"{d.get('criterion', 'balanced accuracy')} (there: balanced accuracy {d['balanced_accuracy']:.3f}"
            f"{', ' + at if at else ''}; balanced accuracy {d['argmax_balanced_accuracy']:.3f} at the argmax, "
            f"n = {d['n']})"
        )
    else:
        rule = "the class of the highest probability (argmax; `decision_threshold`: null)"
    return (
        f"# {meta['name']}\n\n## Overview\n{description}\n\n## Data\nOne-channel 3D volumes (NIfTI), resized to "
        f"{list(spatial_size)}.\n\n## Inference\n\n```bash\npython -m monai.bundle run --config_file "
        f"configs/inference.json --bundle_root . --dataset_dir <folder of .nii.gz>\n```\n\nWrites "
        f"`eval/predictions.csv`: file name, then the probabilities of {', '.join(class_names)}; and "
        f"`eval/decisions.csv`: file name, then the predicted class index: {rule}. An image with NaN/inf "
        "voxels, not 3D or not single-channel is refused, naming its file (`scripts/input_guard.py`).\n\n## Checks\n\n"
        "```bash\npython -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath "
        f"{SCHEMA_RELPATH}\npython -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json "
        "--config_file configs/inference.json --device cpu\n```\n\n## Intended use\nResearch only; not for clinical "
        "use.\n\n## Licence\nApache-2.0 (see LICENSE).\n"
    )


def export_lorkd_cls_expert(
    bundle_root: str | os.PathLike,
    task: str,
    out_dir: str | os.PathLike,
    version: str = "0.1.0",
    verify: bool = False,
    ckpt_dir: str | os.PathLike | None = None,
    calibration_items: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """
    Fuse task ``task``'s expert of a trained ``lorkd_cls`` bundle (``models/model.pt`` + ``models/network_def.json``)
    into its stock network with that task's head and write it with :func:`write_cls_expert_bundle`; optionally run
    :func:`~medfm_ops.bundle.verify_bundle` on it. ``ckpt_dir`` reads the weights of a run trained with
    ``--ckpt_dir`` elsewhere (the configs stay those of ``bundle_root``). Defaults to ``bundle_root/models``.
    ``calibration_items``: labelled validation items of ``task`` (the training run's validation split) on which a
    two-class expert's decision threshold is chosen (:func:`~medfm_ops.bundle.calibrate_when_binary`). Defaults to
    None (argmax).

    Raises:
        FileNotFoundError: when the bundle has not been trained.
        ValueError: for a task the model was not trained on (the message lists the tasks).
    """
    from medfm_ops.data import TaskTable
    from medfm_ops.networks import (
        TaskHeadNetwork,
        export_cls_expert,
        instantiate,
        load_expert_state_dict,
        load_network_spec,
        to_experts,
        trained_expert_settings,
    )

    root = Path(bundle_root)
    models = Path(ckpt_dir) if ckpt_dir is not None else root / "models"
    spec = load_network_spec(models)
    model_path = models / "model.pt"
    if not model_path.is_file():
        raise FileNotFoundError(f"no trained model at {model_path}: run {root}/configs/train.json first.")
    table = TaskTable.from_tasks(spec["tasks"], source=str(models / "network_def.json"))
    tid = table.task_id_of(task)
    train_cfg = json.loads((root / "configs" / "train.json").read_text())
    net_def = dict(spec["network_def"])
    key = next((k for k in _OUT_KEYS if k in net_def), "num_classes")
    net_def[key] = table.num_classes_of(tid)
    sd = torch.load(model_path, map_location="cpu", weights_only=True)
    routed = any(".lora_A." in k for k in sd)
    backbone = instantiate(net_def)
    if routed:
        backbone = to_experts(backbone, table.num_tasks, **trained_expert_settings(spec))
    model = TaskHeadNetwork(backbone, table.task_num_classes)
    load_expert_state_dict(model, sd) if routed else model.load_state_dict(sd)
    fused = export_cls_expert(model, tid)
    out = write_cls_expert_bundle(
        out_dir, net_def, fused.state_dict(), table.task_names[tid], table.class_names[tid],
        train_cfg.get("spatial_size", [28, 28, 28]), modality=table.modalities[tid], version=version,
        required_packages={"medfm_ops": _version("medfm_ops")} if str(net_def["_target_"]).startswith("medfm_ops") else None,
        verify=verify,
    )  # fmt: skip
    if calibration_items is not None:
        from .cls_calibration import calibrate_when_binary

        calibrate_when_binary(out, calibration_items, verify=verify)
    return out
