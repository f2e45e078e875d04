# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""On-disk cache of a frozen teacher's outputs per training item, refused when the teacher or the settings change."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from medfm_ops.utils.atomic_io import atomic_torch_save

__all__ = ["TeacherFeatureCache", "teacher_cache_settings", "weights_digest"]

logger = logging.getLogger("medfm.train")


def weights_digest(net: nn.Module) -> str:
    """SHA-256 of a network's state dict (names, shapes, dtypes and values): the identity of a teacher's weights."""
    digest = hashlib.sha256()
    for name, value in sorted(net.state_dict().items()):
        t = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class TeacherFeatureCache:
    """
    Teacher outputs ``(logits, features)`` per item name (``file.npz[array][index]``), kept in memory and, with a
    ``path``, saved there (atomically) after every epoch that added entries (:meth:`attach`) and read back by the next
    run, or by another run with the same teacher and settings (runs may share one file). Only valid without random
    augmentation (the teacher must see the same input every time): the bundles switch augmentation off with it.

    A cache file is used only when it was written for the same teacher weights (:func:`weights_digest`) and the same
    ``settings``, and when the first fully cached batch, recomputed by the teacher, equals its cached entries
    (``atol``); otherwise it is refused: a warning says why, the entries are dropped and recomputed, and the file is
    replaced at the next save. ``refused`` holds the reason (None when the file was used or there was none).

    Args:
        path: cache file (e.g. ``{bundle}/models/teacher_features.pt``). Defaults to None (memory only).
        settings: what else the features depend on, JSON-serialisable (e.g. ``{"spatial_size": [28, 28, 28]}``).
            Defaults to none.
        atol: tolerance of the first-batch check. Defaults to 1e-4.

    Example::

        cache = TeacherFeatureCache("models/teacher_features.pt", settings={"spatial_size": [28, 28, 28]})
        prepare_batch = TaskPrepareBatch(teacher=teacher, cache=cache, targets_as_dict=True)
        cache.attach(trainer)
    """

    def __init__(
        self, path: str | os.PathLike | None = None, settings: Mapping[str, Any] | None = None, atol: float = 1e-4
    ) -> None:
        self.path = Path(path) if path else None
        self.settings = json.loads(json.dumps(dict(settings or {}), sort_keys=True, default=str))
        self.atol = float(atol)
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.refused: str | None = None
        self._stored: dict[str, Any] | None = None
        self._fingerprint: dict[str, Any] | None = None
        self._checked = False
        self._dirty = False
        if self.path is not None and self.path.is_file():
            self._read()

    def _read(self) -> None:
        try:
            raw = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, or not written by this class
            return self._refuse(f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        if not isinstance(raw, dict) or "entries" not in raw or "fingerprint" not in raw:
            return self._refuse("it was written by an older version (no fingerprint)")
        self._stored = raw["fingerprint"]
        self.entries = {k: (v[0], v[1]) for k, v in raw["entries"].items()}

    def _refuse(self, why: str) -> None:
        self.refused = why
        logger.warning(f"teacher feature cache {self.path}: not used, {why}; the features are recomputed.")
        self.entries, self._dirty = {}, True

    def _check_fingerprint(self, teacher: nn.Module) -> None:
        self._fingerprint = {"teacher": weights_digest(teacher), "settings": self.settings}
        stored, self._stored = self._stored, None
        if stored is None or stored == self._fingerprint:
            return
        changed = [k for k in ("teacher", "settings") if stored.get(k) != self._fingerprint[k]]
        detail = f" ({stored.get('settings')} -> {self.settings})" if "settings" in changed else ""
        self._refuse(f"it was written for another {' and '.join(changed)}{detail}")

    def __call__(self, names: Sequence[str], image: torch.Tensor, teacher: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if self._fingerprint is None:
            self._check_fingerprint(teacher)
        if names and len(names) == image.shape[0] and all(n in self.entries for n in names):
            logits, feats = zip(*(self.entries[n] for n in names))
            cached = torch.stack(logits).to(image.device), torch.stack(feats).to(image.device)
            if self._checked:
                return cached
            self._checked = True
            fresh = teacher(image)
            if all(torch.allclose(c, f, rtol=0.0, atol=self.atol) for c, f in zip(cached, fresh)):
                return cached
            worst = max(float((c - f).abs().max()) for c, f in zip(cached, fresh))
            self._refuse(f"its entries differ from the teacher's outputs on the first batch (max |diff| {worst:.3g})")
        logits, feats = teacher(image)
        if len(names) == image.shape[0] and len(set(names)) == len(names):
            plain = [t.as_tensor() if hasattr(t, "as_tensor") else t for t in (logits, feats)]  # no MetaTensor on disk
            for n, lo, fe in zip(names, plain[0].detach().cpu(), plain[1].detach().cpu()):
                self.entries[n] = (lo.clone(), fe.clone())
            self._dirty = True
        return logits, feats

    def save(self, engine: Engine | None = None) -> None:
        """Write the entries (and the fingerprint) when some were added since the last save."""
        if self.path is None or not self._dirty or self._fingerprint is None:
            return
        entries = {k: list(v) for k, v in self.entries.items()}
        atomic_torch_save({"fingerprint": self._fingerprint, "entries": entries}, self.path)
        self._dirty = False

    def attach(self, engine: Engine) -> None:
        """Save after every epoch of ``engine``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)


def teacher_cache_settings(
    spatial_size: Sequence[int],
    teacher_images: Mapping[str, Any] | None = None,
    teacher_spatial_size: Sequence[int] | None = None,
) -> dict[str, Any]:
    """
    The run settings a :class:`TeacherFeatureCache` records and checks (its ``settings``): the students' input size and,
    when the teacher reads its own files, those files and the teacher's input size (one definition for every bundle
    that caches a teacher: rd_cls, lorkd_cls).
    """
    settings: dict[str, Any] = {"spatial_size": spatial_size}
    if teacher_images:
        settings.update(teacher_images=teacher_images, teacher_spatial_size=teacher_spatial_size)
    return settings
