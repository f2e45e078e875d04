# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""What the training handlers log of a step: the loss and the loss adapter's components (configs name it with
``"_mode_": "callable"`` (a partial) instead of a lambda)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["loss_values"]


def loss_values(output: Mapping[str, Any], loss: Any, prefix: str = "", skip: Sequence[str] = ()) -> dict[str, Any]:
    """
    ``{"loss": output["loss"], prefix + name: value, ...}`` for the components ``loss.last_components`` (e.g.
    :class:`~medfm_ops.engines.LoRKDLossAdapter`'s ``task`` / ``kl`` / ``total``) not named in ``skip``.

    Example (a bundle config)::

        "output_transform": {"_target_": "medfm_ops.engines.loss_values", "_mode_": "callable",
                             "loss": "@loss", "prefix": "loss_"}
    """
    value = output["loss"]
    out = {"loss": value.item() if hasattr(value, "item") else float(value)}
    out.update({prefix + k: v for k, v in getattr(loss, "last_components", {}).items() if k not in set(skip)})
    return out
