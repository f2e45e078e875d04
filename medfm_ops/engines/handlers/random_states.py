# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The random number generators of a training run, saved in its checkpoints so that a resumed run continues the
same random sequence (data order, augmentation, dropout) as an uninterrupted one."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable

__all__ = ["RandomStates"]


def _numpy_state(rs: np.random.RandomState) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = rs.get_state()
    return {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def _set_numpy_state(rs: np.random.RandomState, state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    rs.set_state((state["kind"], keys, state["pos"], state["has_gauss"], state["gauss"]))


def _randomizables(obj: Any, seen: set[int], depth: int = 0) -> Iterator[Randomizable]:
    """Every :class:`~monai.transforms.Randomizable` reachable from ``obj`` (a ``Compose`` and the transforms it
    holds, including the array transforms inside dictionary ones), each once, in a fixed order."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, Randomizable):
        yield obj
    if isinstance(obj, (list, tuple)):
        children = list(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("monai", "medfm_ops"):
        children = [v for k, v in sorted(vars(obj).items()) if k != "R"]
    else:
        children = []
    for child in children:
        if isinstance(child, (list, tuple)) or hasattr(child, "__call__"):
            yield from _randomizables(child, seen, depth + 1)


class RandomStates:
    """
    The generators a training run draws from, as one checkpoint entry: Python's ``random``, NumPy's global
    generator, torch's CPU (and CUDA) generators, the private generator of every random transform of the
    trainer's data set (MONAI gives each transform of a ``Compose`` its own ``RandomState``) and the sampler's
    generator when it has one. Saved with the training state, loaded on resume (:func:`medfm_ops.engines.
    resume_training`), a resumed run is bit-exact with an uninterrupted one (same data order, augmentation and
    dropout). Tensors and plain values only, so the checkpoint loads with ``weights_only=True``.

    Args:
        trainer: the training engine; its ``data_loader`` (MONAI trainers) is read when saving and loading.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def _loader_parts(self) -> tuple[list[Randomizable], Any]:
        loader = getattr(self.trainer, "data_loader", None)
        dataset = getattr(loader, "dataset", None)
        transform = getattr(dataset, "transform", None)
        transforms = list(_randomizables(transform, set())) if transform is not None else []
        generator = getattr(getattr(loader, "sampler", None), "generator", None)
        return transforms, generator

    def state_dict(self) -> dict[str, Any]:
        transforms, generator = self._loader_parts()
        version, internal, gauss = random.getstate()
        state: dict[str, Any] = {
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss": gauss},  # fmt: skip
            "numpy": _numpy_state(np.random.mtrand._rand),
            "torch": torch.get_rng_state(),
            "transforms": [_numpy_state(t.R) for t in transforms],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        if isinstance(generator, torch.Generator):
            state["sampler"] = generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """
        Raises:
            ValueError: when the data set's random transforms differ in number from the saved ones (the run's
                configs changed since the checkpoint).
        """
        transforms, generator = self._loader_parts()
        saved = state_dict["transforms"]
        if len(saved) != len(transforms):
            raise ValueError(
                f"the checkpoint holds the states of {len(saved)} random transform(s) but the training data set has "
                f"{len(transforms)}: resume with the configs of the interrupted run."
            )
        py = state_dict["python"]
        random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss"]))
        _set_numpy_state(np.random.mtrand._rand, state_dict["numpy"])
        torch.set_rng_state(state_dict["torch"])
        for t, s in zip(transforms, saved):
            _set_numpy_state(t.R, s)
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])
        if "sampler" in state_dict and isinstance(generator, torch.Generator):
            generator.set_state(state_dict["sampler"])
