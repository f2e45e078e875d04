# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The result of fine-tuning a pretrained classifier on one task (``bundles/shpeft_cls`` and its baselines): the
merged stock model, its sparse delta on the starting weights, a run summary, and a complete standalone bundle."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine
from torch import nn

from medfm_ops.data import TaskTable
from medfm_ops.engines.cls_evaluation import score_classifier
from medfm_ops.networks import StartingClassifier, save_network_spec
from medfm_ops.peft import ImportanceEstimate, apply_sparse_delta, fuse_linear_lora, sparse_delta
from medfm_ops.utils.atomic_io import atomic_torch_save, atomic_write_text
from medfm_ops.utils.staging import staged_directory

from .cls_expert_bundle import write_cls_expert_bundle
from .expert_bundle import _version

__all__ = ["FINAL_MODELS", "check_result_settings", "save_finetuned_classifier", "summary_line"]

logger = logging.getLogger("medfm.finetune")

#: files of a models folder that a fine-tuning run never writes there (an earlier tool's TorchScript export)
_NOT_WRITTEN_HERE = ("model.ts",)

#: ``best``: the weights of the best validation epoch (key metric); ``last``: the weights after the last epoch
FINAL_MODELS = ("best", "last")


def _flag(value: Any, name: str) -> bool:
    """A boolean setting given as a bool or as the command-line strings ``true``/``false`` (Fire passes those as
    strings, and a non-empty string would read as True)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{name} must be true or false, got {value!r}.")


def check_result_settings(final_model: str, save_delta: Any = True, verify: Any = True) -> None:
    """
    Validate the result settings of a fine-tuning run before training (``initialize`` step).

    Raises:
        ValueError: for a ``final_model`` not in :data:`FINAL_MODELS`, or a ``save_delta`` / ``verify`` that is not
            a boolean (or ``"true"``/``"false"``).
    """
    if final_model not in FINAL_MODELS:
        raise ValueError(f"final_model must be one of {FINAL_MODELS} (best validation epoch or last), got {final_model!r}.")
    _flag(save_delta, "save_delta")
    _flag(verify, "verify_export")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (``-0.0 != 0.0``)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def save_finetuned_classifier(
    network: nn.Module,
    start: StartingClassifier,
    trainable: Any,
    task_table: TaskTable,
    task: str,
    ckpt_dir: str | os.PathLike,
    export_dir: str | os.PathLike | None,
    spatial_size: Sequence[int],
    settings: Mapping[str, Any],
    trainer: Engine | None = None,
    evaluator: Engine | None = None,
    importance: ImportanceEstimate | None = None,
    best_checkpoint: str | os.PathLike | None = None,
    score_files: list[dict] | None = None,
    preprocessing: Callable | None = None,
    majority: Mapping[int, int] | None = None,
    device: torch.device | str = "cpu",
    save_delta: bool = True,
    verify: bool = True,
    fuse_adapters: Callable[[nn.Module], nn.Module] | None = None,
    calibrate_decision: bool = True,
) -> dict[str, Any]:
    """
    Finalize a fine-tuning run (the ``finalize`` step of ``bundles/shpeft_cls/configs/train.json``).

    1. The final weights: ``best_checkpoint`` (the best validation epoch) when given, else ``network`` as trained.
    2. The stock network (``fuse_adapters``, then every :class:`~medfm_ops.peft.LoRALinear` fused) and its state dict.
    3. Its delta on ``start.state``; with the masks of ``trainable`` (sparse or whole-tensor selections) every frozen
       weight is checked to be the starting one bit for bit, and the delta is checked to give the state dict back
       bit for bit (``apply_sparse_delta(start.state, delta)``). The delta also lists the trainable entries
       (``trainable_indices``: flat indices per parameter).
    4. ``{ckpt_dir}/model.pt`` (stock state dict), ``sparse_delta.pt`` (``save_delta``), ``network_def.json``
       (network + the task as a one-task class layout), and the scores of that model on ``score_files``.
    5. ``export_dir``: a complete standalone bundle (:py:func:`~medfm_ops.bundle.write_cls_expert_bundle`; MONAI-only
       ``inference.json`` with its input guard in ``scripts/``, metadata, schema, README, LICENSE) with the delta
       beside its ``models/model.pt`` and, for a two-class task, the decision threshold chosen on ``score_files``
       (``calibrate_decision``), checked by :py:func:`~medfm_ops.bundle.verify_bundle` (``verify``), built
       in a staging folder and swapped in as a whole: a fresh folder, so no earlier run's delta or TorchScript stays
       in it, and a failed export leaves the previous one intact. In ``ckpt_dir`` an earlier run's
       ``sparse_delta.pt`` is removed when this run saves none.
    6. ``{ckpt_dir}/training_summary.json``: settings, starting point, trainable count, importance-estimation time
       next to training time, best/last validation metrics and the written model's scores; one log line.

    Args:
        network: the trained network (stock, or wrapped by LoRA adapters).
        start: the starting point (:py:func:`~medfm_ops.networks.retarget_classifier`).
        trainable: a :class:`~medfm_ops.peft.SparseParameters` or :class:`~medfm_ops.peft.TensorSubset` (its
            ``masks()`` name the network's parameters), or any object with ``num_selected``.
        task_table: the data set's task table; ``task`` one of its tasks.
        ckpt_dir: the bundle's ``models`` folder.
        export_dir: where the standalone bundle goes; None for none.
        spatial_size: input size of the model.
        settings: the run's settings (method, budget, ...), recorded in the summary and the exported metadata.
        trainer, evaluator: the training / validation engines (times, epochs, metrics). Defaults to None.
        importance: the importance estimate of a sparse method (its time and batch count). Defaults to None.
        best_checkpoint: a state dict file of the best epoch. Defaults to None (last weights).
        score_files, preprocessing: items and deterministic preprocessing to score the written model on.
        majority: task id -> class of the trivial classifier. Defaults to None.
        device: where to score. Defaults to ``"cpu"``.
        save_delta: write ``sparse_delta.pt``. Defaults to True.
        verify: run the MONAI bundle checks on the exported bundle. Defaults to True.
        fuse_adapters: turns an adapter-wrapped network back into the stock one (the LoRA baseline's
            :py:func:`medfm_ops.finetune.fuse_lora`). Defaults to None (no wrapper).
        calibrate_decision: give the exported bundle of a two-class task the decision threshold chosen on the
            task's ``score_files`` (the run's validation split; :func:`~medfm_ops.bundle.calibrate_when_binary`),
            recorded as the summary's ``decision``. Defaults to True.

    Returns:
        the summary written.

    Raises:
        FileNotFoundError: when ``best_checkpoint`` is given but missing (the run never validated).
        ValueError: when a frozen weight changed (from :py:func:`~medfm_ops.peft.sparse_delta`).
    """
    save_delta, verify = _flag(save_delta, "save_delta"), _flag(verify, "verify_export")
    ckpt = Path(ckpt_dir)
    stock = _final_network(network, best_checkpoint, fuse_adapters)
    tuned = {k: v.detach().cpu().clone() for k, v in stock.state_dict().items()}
    delta = _checked_delta(start, tuned, trainable)
    tid = task_table.task_id_of(task)
    one_task = task_table.one_task_table(tid)
    atomic_torch_save(tuned, ckpt / "model.pt")
    if save_delta:
        atomic_torch_save(delta, ckpt / "sparse_delta.pt")
    for stale in ([] if save_delta else ["sparse_delta.pt"]) + list(_NOT_WRITTEN_HERE):
        if (ckpt / stale).is_file():  # an earlier run's file must not sit beside this run's model
            logger.info(f"removing {ckpt / stale}: an earlier run's file that this run does not write")
            (ckpt / stale).unlink()
    save_network_spec(ckpt, start.network_def, one_task, spatial_size=spatial_size)
    scores = None
    if score_files:
        rows = score_classifier(stock, score_files, preprocessing, task_table, device, majority=majority)
        scores = next(r for r in rows if r["task"] == task)
    num_weights = sum(p.numel() for p in stock.parameters())
    count = int(trainable.num_selected)
    summary: dict[str, Any] = {
        "task": task, "classes": task_table.class_names[tid], "settings": dict(settings), "start": start.info(),
        "trainable": {"count": count, "of_weights": num_weights, "fraction": count / num_weights, "repr": repr(trainable)},
        "importance_estimation": None if importance is None else
        {"seconds": importance.seconds, "batches": importance.num_batches, "variant": importance.variant},
        "train_seconds": trainer.state.times.get("COMPLETED") if trainer is not None else None,
        "epochs": trainer.state.epoch if trainer is not None else None,
        "iterations": trainer.state.iteration if trainer is not None else None,
        "final_model": "best" if best_checkpoint is not None else "last",
        "delta": {"changed_entries": delta["num_changed"], "tensors": len(delta["tensors"]),
                  "bytes": (ckpt / "sparse_delta.pt").stat().st_size if save_delta else None,
                  "base_fingerprint": delta["base_fingerprint"]},
        "scores": scores,
    }  # fmt: skip
    if evaluator is not None:
        summary.update(
            best_metric=getattr(evaluator.state, "best_metric", None),
            best_metric_epoch=getattr(evaluator.state, "best_metric_epoch", None),
            last_metrics={k: v for k, v in evaluator.state.metrics.items() if isinstance(v, (int, float))},
        )
    if export_dir is not None:  # a fresh bundle, staged and checked, then swapped in as a whole
        with staged_directory(export_dir) as stage:
            _export(stage, start, tuned, task_table, tid, spatial_size, summary)
            if save_delta:
                shutil.copyfile(ckpt / "sparse_delta.pt", stage / "models" / "sparse_delta.pt")
            if calibrate_decision and score_files:
                from .cls_calibration import calibrate_when_binary

                own = [f for f in score_files if f["task"] == task]
                summary["decision"] = calibrate_when_binary(stage, own, verify=False)
            if verify:
                from .verify import verify_bundle

                verify_bundle(stage)
        summary["export_dir"] = str(Path(export_dir))
    atomic_write_text(ckpt / "training_summary.json", json.dumps(summary, indent=2, default=float))
    logger.info(summary_line(summary))
    return summary


def _final_network(
    network: nn.Module, best_checkpoint: str | os.PathLike | None, fuse_adapters: Callable | None
) -> nn.Module:
    """The stock network of the final weights (``best_checkpoint`` loaded into ``network`` when given)."""
    if best_checkpoint is not None:
        if not os.path.isfile(best_checkpoint):
            raise FileNotFoundError(f"no checkpoint at {best_checkpoint}: the run never validated (val_interval > epochs?).")
        state = torch.load(best_checkpoint, map_location="cpu", weights_only=True)
        state = state["model"] if isinstance(state.get("model"), dict) else state
        getattr(network, "module", network).load_state_dict(state)
    network = getattr(network, "module", network)
    return fuse_linear_lora(fuse_adapters(network) if fuse_adapters is not None else network).cpu().eval()


def _checked_delta(start: StartingClassifier, tuned: dict[str, torch.Tensor], trainable: Any) -> dict[str, Any]:
    """The delta of ``tuned`` on ``start.state``, frozen entries checked against ``trainable``'s masks, the delta
    checked to give ``tuned`` back bit for bit, and the trainable entries listed (``trainable_indices``)."""
    if set(tuned) != set(start.state):
        diff = sorted(set(tuned) ^ set(start.state))[:5]
        raise ValueError(f"the merged network's weights {diff} differ from the starting network's.")
    masks = {k: v.cpu() for k, v in trainable.masks().items()} if hasattr(trainable, "masks") else None
    if masks is not None and not set(masks) <= set(tuned):
        masks = None  # adapters: the masks name adapter parameters, not the merged network's
    delta = sparse_delta(start.state, tuned, masks)
    rebuilt = apply_sparse_delta(start.state, delta)
    if any(not _bits_equal(rebuilt[k], tuned[k]) for k in tuned):  # pragma: no cover - by construction
        raise RuntimeError("the delta does not give the fine-tuned weights back.")
    if masks is not None:
        delta["trainable_indices"] = {n: torch.nonzero(m.reshape(-1)).flatten() for n, m in masks.items() if bool(m.any())}
    return delta


def _export(
    out_dir: str | os.PathLike, start: StartingClassifier, tuned: dict[str, torch.Tensor], task_table: TaskTable,
    tid: int, spatial_size: Sequence[int], summary: Mapping[str, Any],
) -> Path:
    """The complete standalone bundle of the fine-tuned model (see :py:func:`write_cls_expert_bundle`)."""
    target = str(start.network_def["_target_"])
    trained = summary["trainable"]
    return write_cls_expert_bundle(
        out_dir, start.network_def, tuned, task_table.task_names[tid], task_table.class_names[tid], spatial_size,
        modality=task_table.modalities[tid],
        description=(f"{target} fine-tuned on {task_table.task_names[tid]} ({summary['settings'].get('method', '?')}: "
                     f"{trained['count']:,} of {trained['of_weights']:,} weights trained) from {start.pretrained.path}; "
                     f"input resized to {list(spatial_size)} and z-score normalised per image."),
        extra_metadata={"medfm_finetuning": {"settings": summary["settings"], "start": summary["start"],
                                             "trainable": trained["count"], "scores": summary["scores"]}},
        required_packages={"medfm_ops": _version("medfm_ops")} if target.startswith("medfm_ops") else None,
    )  # fmt: skip


def summary_line(summary: Mapping[str, Any]) -> str:
    """One log line of a run summary: trainable count, estimation time next to training time, scores."""
    est = summary["importance_estimation"]
    est = f"{est['seconds']:.1f} s ({est['batches']} batches)" if est else "none"
    t = summary["trainable"]
    line = (f"{summary['settings'].get('method', '?')} on {summary['task']}: {t['count']:,} trainable of "
            f"{t['of_weights']:,} weights; importance estimation {est}, training {summary['train_seconds'] or 0:.1f} s")
    s = summary["scores"]
    if s:
        line += (f"; F1 {s['f1']:.4f}, accuracy {s['accuracy']:.4f} (majority class {s['majority_accuracy']:.4f}), "
                 f"balanced accuracy {s['balanced_accuracy']:.4f}, AUC {s['auc']:.4f}")
    return line
