# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Small pieces the classification bundles' configs name by ``_target_`` instead of writing ``$`` expressions
(issue 20: configs are data): datalist sections, paths, and what the training handlers log.

Each is a plain function or a small callable class, used as e.g.::

    "train_files": {"_target_": "medfm_ops.bundle.cls_config_components.datalist_section",
                    "content": "@datalist_content", "section": "training", "tasks": "@task"}
    "output_transform": {"_target_": "medfm_ops.bundle.cls_config_components.loss_value", "_mode_": "callable"}
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from medfm_ops.networks.spec import save_trained_network_spec  # noqa: F401 (its former home)

__all__ = [
    "path_in",
    "sibling_path",
    "log_repr",
    "datalist_task_table",
    "datalist_section",
    "loss_value",
    "LossWithComponents",
    "save_trained_network_spec",
]


def path_in(root: str | os.PathLike, name: str, child: str | None = None) -> str:
    """``os.path.join(root, name[, child])`` with keyword arguments a config can give."""
    return os.path.join(str(root), str(name), *([str(child)] if child is not None else []))


def sibling_path(path: str | os.PathLike, name: str, child: str | None = None) -> str:
    """``name`` (``/child``) next to ``path``: ``os.path.join(dirname(abspath(path)), name[, child])``, e.g. the
    ``foundation_cls`` bundle beside this one, or ``export/<task>`` beside the ``models`` folder."""
    return path_in(os.path.dirname(os.path.abspath(str(path))), name, child)


def log_repr(value: Any, logger: str = "medfm") -> str:
    """Log ``repr(value)`` at INFO level on ``logger`` (a run's starting point, its trainable set) and return it."""
    import logging

    text = repr(value)
    logging.getLogger(logger).info(text)
    return text


def datalist_task_table(content: tuple[Any, Mapping[str, list]]) -> Any:
    """The task table of :func:`~medfm_ops.data.load_cls_datalist`'s ``(task_table, sections)``."""
    return content[0]


def datalist_section(
    content: tuple[Any, Mapping[str, list]], section: str, tasks: str | Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """
    The items of one section of a loaded classification datalist, optionally only those of some tasks.

    Args:
        content: ``(task_table, sections)`` from :func:`~medfm_ops.data.load_cls_datalist`.
        section: ``"training"``, ``"validation"`` or ``"test"``.
        tasks: a task name, a list of names, or None (every task). Defaults to None.

    Raises:
        KeyError: for a section the datalist does not have (naming the ones it has).
        ValueError: when a named task has no item in the section (a typo, or a task the datalist lacks).
    """
    sections = content[1]
    if section not in sections:
        raise KeyError(f"the datalist has no '{section}' section; it has {sorted(sections)}.")
    items = sections[section]
    if tasks is None:
        return list(items)
    wanted = [tasks] if isinstance(tasks, str) else list(tasks)
    out = [f for f in items if f["task"] in wanted]
    missing = [t for t in wanted if not any(f["task"] == t for f in out)]
    if missing:
        raise ValueError(
            f"no '{section}' item of task(s) {missing} in the datalist; its tasks are "
            f"{sorted({f['task'] for f in items})}."
        )
    return out


def loss_value(output: Mapping[str, Any]) -> dict[str, float]:
    """``{"loss": float}`` of an engine's output dict (the ``output_transform`` of Stats/TensorBoard handlers)."""
    return {"loss": float(output["loss"].item() if hasattr(output["loss"], "item") else output["loss"])}


class LossWithComponents:
    """
    ``output_transform`` of the epoch summary: the loss and every term the loss recorded in ``last_components``
    (e.g. ``ce``, ``kd``; RD's ``ce_s``, ``ce_t``, ``kl``, ``cka`` and their weights).

    Args:
        loss: the training loss (an object with ``last_components``, e.g. :class:`~medfm_ops.engines.TaskLossAdapter`).
    """

    def __init__(self, loss: Any) -> None:
        self.loss = loss

    def __call__(self, output: Mapping[str, Any]) -> dict[str, float]:
        return {**loss_value(output), **dict(getattr(self.loss, "last_components", {}) or {})}


