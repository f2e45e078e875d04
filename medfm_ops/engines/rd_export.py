# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The product of an rd_cls run: its deployed student (stock network + the shared classifier g) recorded in
``models/network_def.json`` and written as a standalone, verified classification bundle of its own task."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


__all__ = ["rd_student_network_def", "student_task_table", "export_rd_student"]

_OUT_KEYS = ("num_classes", "out_channels")


def rd_student_network_def(network_config: Mapping[str, Any], num_classes: int) -> dict[str, Any]:
    """
    The literal config of the deployed student: the student's network config (``_target_`` and literal values) with
    its class count (``num_classes`` / ``out_channels``) set to ``num_classes``.

    Raises:
        ValueError: when the config has no class-count key, or another value is still an expression (``$...`` or
            ``@...``) that a standalone bundle could not resolve.
    """
    net_def = json.loads(json.dumps(dict(network_config)))
    key = next((k for k in _OUT_KEYS if k in net_def), None)
    if key is None:
        raise ValueError(f"the student's network_def has none of {_OUT_KEYS} to set the task's class count: {net_def}.")
    net_def[key] = int(num_classes)
    left = [k for k, v in net_def.items() if isinstance(v, str) and v[:1] in ("$", "@", "%")]
    if left:
        raise ValueError(f"the student's network_def entries {left} are expressions; write them as literal values.")
    return net_def


def student_task_table(task_table: Any, task: str) -> Any:
    """The one-task table of a student trained on ``task`` (task id 0, the task's class names and modality)."""
    return task_table.one_task_table(task)


def export_rd_student(
    network_config: Mapping[str, Any],
    checkpoint: str | os.PathLike,
    task_table: Any,
    task: str,
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    spatial_size: Sequence[int],
    teacher_path: str | os.PathLike | None = None,
    settings: Mapping[str, Any] | None = None,
    verify: bool = True,
    version: str = "0.1.0",
    calibration_items: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """
    Record and export the deployed RD student of a finished rd_cls run.

    1. ``{ckpt_dir}/network_def.json``: the student's stock network config with the task's class count and its
       one-task table (:func:`student_task_table`), so that the bundle's ``inference.json`` rebuilds exactly the
       trained student and names its classes (whatever the task: synthetic or real).
    2. ``out_dir``: a standalone MONAI bundle of the student (stock network + ``g`` as its classifier layer, plain
       state dict, the task's class names, metadata that says what it is and where it came from), written by
       :func:`~medfm_ops.bundle.write_cls_expert_bundle` in a temporary folder next to ``out_dir`` and moved into
       place only when complete (and verified with ``verify``); for a two-class task with ``calibration_items``
       (the run's validation split), with the decision threshold chosen on them
       (:func:`~medfm_ops.bundle.calibrate_cls_bundle`) instead of the argmax.

    Args:
        network_config: the student's literal network config (rd_cls: ``@network_config``, built by
            :func:`~medfm_ops.networks.network_config`).
        checkpoint: the run's best :class:`~medfm_ops.networks.ReprogrammedStudent` state dict (``models/model.pt``).
        task_table: the data set's task table.
        task: the task the student was trained on.
        ckpt_dir: the run's ``models`` folder.
        out_dir: the standalone bundle to write (e.g. ``export/<task>``).
        spatial_size: the training input size.
        teacher_path: the teacher bundle, for the metadata. Defaults to None.
        settings: run settings for the metadata (``medfm_rd``). Defaults to None.
        verify: run :func:`~medfm_ops.bundle.verify_bundle` before moving the bundle into place. Defaults to True.
        version: bundle version. Defaults to ``"0.1.0"`` (its calibration then ``"0.1.1"``).
        calibration_items: labelled validation items of ``task`` (rd_cls: ``@val_files``) to choose the decision
            threshold on (:func:`~medfm_ops.bundle.calibrate_when_binary`). Defaults to None (argmax; also for a task
            of more than two classes or items of one class).

    Returns:
        ``out_dir``.

    Raises:
        FileNotFoundError: when ``checkpoint`` does not exist (the run never validated).
        ValueError: see :func:`rd_student_network_def`; an unknown task.
        BundleCheckError: when ``verify`` fails (``out_dir`` is then left as it was).
    """
    from medfm_ops.bundle import write_cls_expert_bundle
    from medfm_ops.networks.reprogramming import load_rd_student
    from medfm_ops.networks.spec import instantiate, save_network_spec

    table = student_task_table(task_table, task)
    names, modality = table.class_names[0], table.modalities[0]
    net_def = rd_student_network_def(network_config, len(names))
    student = load_rd_student(instantiate(net_def), checkpoint)
    save_network_spec(ckpt_dir, net_def, table, spatial_size=spatial_size)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    description = (
        f"Reprogramming Distillation (RD) student for task {task} ({', '.join(names)}): a stock "
        f"{net_def['_target_']} trained with a frozen foundation teacher"
        f"{f' ({teacher_path})' if teacher_path else ''} reprogrammed to this task and a classifier shared with it; "
        f"deployed alone (no teacher at inference). Input resized to {list(spatial_size)} and z-score normalised per "
        f"image; outputs the probabilities of the {len(names)} classes."
    )
    extra = {"medfm_rd": {"task": task, "teacher": str(teacher_path) if teacher_path else None,
                          "settings": json.loads(json.dumps(dict(settings or {}), default=str))}}  # fmt: skip
    try:
        write_cls_expert_bundle(stage, net_def, student.state_dict(), task, names, spatial_size, modality=modality,
                                version=version, description=description, extra_metadata=extra)  # fmt: skip
        if calibration_items is not None:
            from medfm_ops.bundle import calibrate_when_binary

            calibrate_when_binary(stage, calibration_items, verify=False)
        if verify:
            from medfm_ops.bundle import verify_bundle

            verify_bundle(stage)
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out
