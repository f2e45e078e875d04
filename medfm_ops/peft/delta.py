# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A fine-tuned checkpoint as a sparse delta on its base: the changed entries (indices + values) per tensor."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medfm_ops.utils.atomic_io import atomic_torch_save

__all__ = ["DELTA_FORMAT", "apply_sparse_delta", "sparse_delta", "save_sparse_result", "state_fingerprint"]

#: ``format`` entry of a sparse delta file
DELTA_FORMAT = "medfm-sparse-delta/1"
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so that -0.0 != 0.0 and NaN payloads count), flattened."""
    t = t.detach().reshape(-1)
    if t.dtype == torch.bool:
        return t
    if t.is_complex():
        t = torch.view_as_real(t).reshape(-1)
    return t.view(_INT_OF_SIZE[t.element_size()])


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, shapes, dtypes and bytes (identifies the base a delta applies to)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype};".encode())
        h.update(_bits(t).numpy().tobytes())
    return h.hexdigest()


def sparse_delta(
    base: Mapping[str, torch.Tensor],
    tuned: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """
    The entries of ``tuned`` whose bits differ from ``base``, per tensor: ``{"indices": flat int64, "values"}``.
    :py:func:`apply_sparse_delta` of the result onto ``base`` gives ``tuned`` bit for bit.

    Args:
        base: the starting state dict (e.g. the pretrained ``models/model.pt``).
        tuned: the fine-tuned state dict, same keys, shapes and dtypes.
        masks: the trainable entries of each parameter (``SparseParameters.masks()``); when given, a changed entry
            of a masked tensor outside its mask raises (the frozen weights were modified, or ``base`` is not the
            starting point). Tensors without a mask (buffers such as running statistics) may change anywhere.
            Defaults to None (no check).

    Returns:
        ``{"format", "base_fingerprint", "num_changed", "tensors": {name: {"indices", "values", "shape"}}}``;
        unchanged tensors are left out.

    Raises:
        ValueError: for different keys, shapes or dtypes, or a change outside ``masks``.
    """
    if set(base) != set(tuned):
        diff = sorted(set(base) ^ set(tuned))
        raise ValueError(f"base and tuned state dicts have different keys: {diff[:5]} ({len(diff)}).")
    tensors: dict[str, dict[str, Any]] = {}
    for name in base:
        b, t = base[name].detach().cpu(), tuned[name].detach().cpu()
        if b.shape != t.shape or b.dtype != t.dtype:
            raise ValueError(f"{name!r}: base {tuple(b.shape)} {b.dtype} vs tuned {tuple(t.shape)} {t.dtype}.")
        idx = torch.nonzero(_bits(b) != _bits(t)).flatten()
        if idx.numel() == 0:
            continue
        if masks is not None and name in masks:
            outside = ~masks[name].detach().cpu().reshape(-1)[idx]
            if bool(outside.any()):
                raise ValueError(
                    f"{int(outside.sum())} frozen entries of {name!r} differ from the base (first at flat index "
                    f"{int(idx[outside][0])}): the base is not the starting checkpoint, or frozen weights were written."
                )
        tensors[name] = {"indices": idx, "values": t.reshape(-1)[idx].clone(), "shape": list(t.shape)}
    return {
        "format": DELTA_FORMAT,
        "base_fingerprint": state_fingerprint(base),
        "num_changed": sum(int(d["indices"].numel()) for d in tensors.values()),
        "tensors": tensors,
    }


def apply_sparse_delta(
    base: Mapping[str, torch.Tensor], delta: Mapping[str, Any], check_base: bool = True
) -> dict[str, torch.Tensor]:
    """
    ``base`` with the delta's entries written in (a new state dict; ``base`` is not modified).

    Args:
        base: the state dict the delta was made on.
        delta: from :py:func:`sparse_delta` (or ``torch.load`` of a saved one).
        check_base: refuse a base whose fingerprint differs from the one recorded in the delta. Defaults to True.

    Raises:
        ValueError: for another format, another base, or a tensor the base lacks or has with another shape.

    Example::

        merged = apply_sparse_delta(torch.load("base.pt"), torch.load("models/sparse_delta.pt"))
    """
    if delta.get("format") != DELTA_FORMAT:
        raise ValueError(f"not a sparse delta: format {delta.get('format')!r}, expected {DELTA_FORMAT!r}.")
    if check_base and delta.get("base_fingerprint") != state_fingerprint(base):
        raise ValueError("this delta was made on another base checkpoint (fingerprint differs); pass check_base=False "
                         "to apply it anyway.")  # fmt: skip
    out = {k: v.detach().clone() for k, v in base.items()}
    for name, entry in delta["tensors"].items():
        if name not in out or list(out[name].shape) != list(entry["shape"]):
            raise ValueError(f"the base has no tensor {name!r} of shape {entry['shape']}.")
        flat = out[name].view(-1)
        flat.index_copy_(0, entry["indices"].to(flat.device), entry["values"].to(flat.device, flat.dtype))
    return out


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state["model"] if isinstance(state.get("model"), dict) else state


def save_sparse_result(
    best_checkpoint: str | os.PathLike,
    base_path: str | os.PathLike,
    model_path: str | os.PathLike,
    delta_path: str | os.PathLike,
    masks: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """
    Write a sparse fine-tuning result: the dense, stock state dict to ``model_path`` and its sparse delta on the
    base to ``delta_path`` (both atomically, non-finite weights refused). The delta is checked to reproduce the
    state dict exactly before anything is written. Used as the ``finalize`` step of an expert bundle's
    ``configs/train_sparse.json`` (``base_path`` may equal ``model_path``: the base is read first).

    Args:
        best_checkpoint: the best weights saved during training (a state dict, or ``{"model": state dict}``).
        base_path: the starting weights.
        model_path: where the merged state dict goes (e.g. ``models/model.pt``).
        delta_path: where the delta goes (e.g. ``models/sparse_delta.pt``).
        masks: the trainable entries (``SparseParameters.masks()``), to check that nothing else changed.
            Defaults to None.

    Returns:
        the delta.

    Raises:
        FileNotFoundError: when ``best_checkpoint`` is missing (training never validated).
        ValueError: from :py:func:`sparse_delta` when frozen weights differ from the base.
    """
    if not os.path.isfile(best_checkpoint):
        raise FileNotFoundError(
            f"no checkpoint at {best_checkpoint}: the run never validated (val_interval > epochs?)."
        )
    tuned = {k: v.detach().cpu() for k, v in _load_state(best_checkpoint).items()}
    base = _load_state(base_path)
    if masks is not None:
        masks = {k: v.detach().cpu() for k, v in masks.items()}
    delta = sparse_delta(base, tuned, masks)
    merged = apply_sparse_delta(base, delta)
    if any(not torch.equal(_bits(merged[k]), _bits(tuned[k])) for k in tuned):  # pragma: no cover - by construction
        raise RuntimeError("the sparse delta does not reproduce the tuned weights.")
    atomic_torch_save(delta, Path(delta_path))
    atomic_torch_save(tuned, Path(model_path))
    return delta
