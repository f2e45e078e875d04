# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A trained network's literal description (``network_def`` + class layout), saved next to its weights."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from medfm_ops.layers import ExpertSettings
from medfm_ops.utils.atomic_io import atomic_write_text
from medfm_ops.utils.json_file import read_json_object

__all__ = [
    "save_trained_network_spec",
    "instantiate",
    "save_network_spec",
    "load_network_spec",
    "recorded_spatial_size",
    "check_same_tasks",
    "check_trained_tasks",
    "saved_task_entries",
    "expert_model_from_spec",
    "trained_expert_settings",
    "SPEC_FILENAME",
    "LEGACY_EXPERT_SETTINGS",
]

#: written into a bundle's ``models/`` folder by its training config
SPEC_FILENAME = "network_def.json"

#: the key of the class layout (the task table's entries) in a spec, and its name before segmentation regions and
#: classification tasks were both saved as tasks (still read)
TASKS_KEY, LEGACY_TASKS_KEY = "tasks", "regions"

#: :func:`~medfm_ops.networks.to_experts` settings of models trained before specs recorded them (lorkd_seg < 0.3.0)
LEGACY_EXPERT_SETTINGS: dict[str, Any] = ExpertSettings(ranks=8, alpha=16.0, convert_transposed=False,
                                                        scaling="rank").to_record()  # fmt: skip


def instantiate(network_def: dict[str, Any]) -> nn.Module:
    """Build a network from a MONAI bundle config dict with ``_target_`` (literal values, no references)."""
    from monai.bundle import ConfigParser

    if not isinstance(network_def, dict) or "_target_" not in network_def:
        raise ValueError(f"network_def must be a dict with a '_target_' key, got {network_def!r}.")
    return ConfigParser({"network_def": network_def}).get_parsed_content("network_def")


def save_network_spec(
    ckpt_dir: str | os.PathLike,
    network_def: dict[str, Any],
    task_table: Any = None,
    experts: ExpertSettings | Mapping[str, Any] | None = None,
    spatial_size: Sequence[int] | None = None,
) -> Path:
    """
    Write ``{ckpt_dir}/network_def.json`` = ``{"network_def": ..., "tasks": [...], "experts": {...},
    "spatial_size": [...]}`` atomically,
    so the weights in ``ckpt_dir`` can be rebuilt without the training data or config (teacher loading, expert
    export, inference, site fine-tuning).

    Args:
        ckpt_dir: the folder of the weights.
        network_def: literal config of the stock backbone (``_target_`` and values).
        task_table: the class layout (:class:`~medfm_ops.data.TaskTable`, segmentation or classification), saved
            as its entries ``[{"name", "task_id", "labels"}]``. Defaults to None.
        experts: the :class:`~medfm_ops.layers.ExpertSettings` that built the trained model, or the keyword
            arguments of :func:`~medfm_ops.networks.to_experts` holding them (base ``ranks``, ``alpha``,
            ``convert_transposed``, ``rank_multipliers``, ``scaling``); recorded complete, the defaults written
            out, so that export and inference never depend on a later change of a default. Defaults to None (no
            experts).
        spatial_size: the input size ``(H, W, D)`` the weights were trained at (read back by
            :func:`recorded_spatial_size`, e.g. as a teacher's input size). Defaults to None (not recorded).
    """
    instantiate(network_def)  # fail now, not at load time, on a config that cannot be built
    content: dict[str, Any] = {"network_def": network_def}
    if task_table is not None:
        content[TASKS_KEY] = task_table.to_entries()
    if experts is not None:
        settings = experts if isinstance(experts, ExpertSettings) else ExpertSettings.from_record(experts, "experts")
        content["experts"] = settings.to_record()
    if spatial_size is not None:
        content["spatial_size"] = [int(v) for v in spatial_size]
    path = Path(ckpt_dir) / SPEC_FILENAME
    atomic_write_text(path, json.dumps(content, indent=2))
    return path


def load_network_spec(path: str | os.PathLike) -> dict[str, Any]:
    """
    Read a spec written by :func:`save_network_spec` (a file, or a directory holding ``network_def.json``); the
    class layout of a spec written before it was saved under ``"tasks"`` (``"regions"``) is returned as ``"tasks"``.
    """
    path = Path(path)
    if path.is_dir():
        path = path / SPEC_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"no network description at {path} (written by the bundle's training run).")
    content = read_json_object(path, "network description")
    if "network_def" not in content:
        raise ValueError(f"{path}: missing the 'network_def' entry.")
    if TASKS_KEY not in content and LEGACY_TASKS_KEY in content:
        content[TASKS_KEY] = content.pop(LEGACY_TASKS_KEY)
    return content


def recorded_spatial_size(path: str | os.PathLike) -> list[int] | None:
    """
    The input size a network was trained at, as its spec records it (``"spatial_size"`` of the ``network_def.json``
    of a bundle folder, its ``models`` folder, or the file itself); None when the spec is older and records none.

    Raises:
        FileNotFoundError: when there is no ``network_def.json`` there.
        ValueError: when the recorded size is not a list of positive integers.
    """
    path = Path(path)
    if path.is_dir() and not (path / SPEC_FILENAME).is_file() and (path / "models" / SPEC_FILENAME).is_file():
        path = path / "models"
    size = load_network_spec(path).get("spatial_size")
    if size is None:
        return None
    if not isinstance(size, list) or not size or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"{path}: 'spatial_size' must be a list of positive integers, got {size!r}.")
    return list(size)


def saved_task_entries(spec: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """
    The class layout saved in a spec (its task entries ``[{"name", "task_id", "labels"}]``): ``"tasks"``, or the
    ``"regions"`` of specs written before both kinds were saved as tasks; None when it records none.
    """
    entries = spec.get(TASKS_KEY)
    return spec.get(LEGACY_TASKS_KEY) if entries is None else entries


def check_same_tasks(spec: Mapping[str, Any], task_table: Any, what: str, hint: str | None = None) -> None:
    """
    Raise when the class layout saved in ``spec`` differs from ``task_table`` (same tasks, task ids and label
    names); nothing to check when either is missing.

    Args:
        spec: a spec dict (:func:`load_network_spec`).
        task_table: a :class:`~medfm_ops.data.TaskTable`, or None.
        what: what was trained on the saved layout, named in the message (e.g. ``"teacher bundles/x"``).
        hint: what to do about a difference. Defaults to training on the same datalist.

    Raises:
        ValueError: naming ``what``, both layouts and ``hint``.
    """
    saved = saved_task_entries(spec)
    if saved is None or task_table is None:
        return
    current = task_table.to_entries()
    norm = lambda rs: [(r["name"], int(r["task_id"]), {str(k): v for k, v in r["labels"].items()}) for r in rs]  # noqa: E731
    if norm(saved) != norm(current):
        raise ValueError(
            f"{what} was trained on another class layout: tasks {[r['name'] for r in saved]} with labels "
            f"{[r['labels'] for r in saved]} vs {[r['name'] for r in current]} with {[r['labels'] for r in current]}"
            f" here. {hint or 'Train it on the same datalist (or the same task table).'}"
        )


def check_trained_tasks(ckpt_dir: str | os.PathLike, task_table: Any) -> None:
    """
    Check that an inference config's class layout (its ``regions`` or ``tasks``) is the one the weights in
    ``ckpt_dir`` were trained with (``network_def.json`` written by the training run). Nothing to check before
    training.

    Raises:
        ValueError: when they differ; the message gives both layouts and the option that reads the trained layout.
    """
    path = Path(ckpt_dir) / SPEC_FILENAME
    if not path.is_file():
        return
    raw = read_json_object(path, "network description")
    saved_key = TASKS_KEY if TASKS_KEY in raw else LEGACY_TASKS_KEY
    key = task_table.conventions.entries_key
    hint = f'Pass --{key} "%{path}#{saved_key}" (or edit \'{key}\' in configs/inference.json).'
    check_same_tasks(raw, task_table, f"the model in {ckpt_dir}", hint=hint)


def expert_model_from_spec(spec: str | os.PathLike | Mapping[str, Any], num_tasks: int | None = None) -> nn.Module:
    """
    The untrained :class:`~medfm_ops.networks.ExpertNetwork` of the same architecture as a trained LoRKD model: its
    backbone ``network_def`` converted with the ``experts`` settings its training run recorded
    (:data:`LEGACY_EXPERT_SETTINGS` for older specs). Load the weights with
    :func:`~medfm_ops.networks.load_expert_state_dict` (it applies LoRKD* ranks from the checkpoint).

    Args:
        spec: a spec dict, or a file/folder holding ``network_def.json``.
        num_tasks: number of experts. Defaults to the number of tasks in the spec.
    """
    from medfm_ops.networks.experts import to_experts

    spec = spec if isinstance(spec, Mapping) else load_network_spec(spec)
    if num_tasks is None:
        if not saved_task_entries(spec):
            raise ValueError("the network description lists no tasks: pass num_tasks.")
        num_tasks = len(saved_task_entries(spec))
    return to_experts(instantiate(spec["network_def"]), num_tasks, copy_net=False, **trained_expert_settings(spec))


def trained_expert_settings(spec: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """
    The keyword arguments of :func:`~medfm_ops.networks.to_experts` that a LoRKD training run recorded in its spec
    (``experts``; missing keys take the :class:`~medfm_ops.layers.ExpertSettings` defaults), or
    :data:`LEGACY_EXPERT_SETTINGS` for specs written before they were recorded.

    Args:
        spec: a spec dict, or a file/folder holding ``network_def.json``.

    Raises:
        ValueError: when the recorded settings hold an unknown key.
    """
    source = "network_def.json experts" if isinstance(spec, Mapping) else f"{spec} experts"
    spec = spec if isinstance(spec, Mapping) else load_network_spec(spec)
    return ExpertSettings.from_record(spec.get("experts") or LEGACY_EXPERT_SETTINGS, source).to_experts_kwargs()


def save_trained_network_spec(
    ckpt_dir: str | os.PathLike,
    network_config: Mapping[str, Any],
    network: Any,
    task_table: Any = None,
    experts: Mapping[str, Any] | None = None,
    spatial_size: Sequence[int] | None = None,
) -> str:
    """
    Record the run's network as data (``{ckpt_dir}/network_def.json``, :func:`save_network_spec`) from the config's
    literal ``network_config`` (:func:`~medfm_ops.networks.network_config`), after checking that it builds the same
    parameter shapes as ``network``, the stock network the run trains (it would not if ``network_def`` were replaced
    without ``network_config``). A bundle config names it by ``_target_``: no config reads its own file again.

    Raises:
        ValueError: when the shapes differ.
    """
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    if shapes(instantiate(dict(network_config))) != shapes(network):
        raise ValueError(
            "network_config does not build the network this run trains: change 'network_config' (the recorded "
            "network), not 'network_def' (built from it)."
        )
    spec = save_network_spec(ckpt_dir, dict(network_config), task_table, experts=experts, spatial_size=spatial_size)
    return str(spec)
