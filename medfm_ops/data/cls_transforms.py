# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Transforms of the classification bundles: check an item against the task table, load a volume (NIfTI or npz)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from medfm_ops.data.cls_datalist import ClsItemError, check_cls_item, cls_item_name
from medfm_ops.data.medmnist import NpzReadError, read_npz_array
from medfm_ops.data.task_table import TaskTable
from medfm_ops.data.input_guard import check_shape

__all__ = ["CheckClsItemd", "LoadClsImaged", "VolumeShapeError"]


class VolumeShapeError(ValueError):
    """A loaded volume does not have the expected shape; the message names the item."""


class CheckClsItemd(Transform):
    """
    Check a datalist item against the task table and add ``task_id`` and ``global_label`` (unified-head class).

    Items without ``task`` (inference on unlabelled images) pass unchanged; an item with ``task`` but no ``label``
    gets ``task_id`` only.

    Args:
        task_table: the :class:`~medfm_ops.data.TaskTable` of the data set (or of the trained model).

    Raises:
        ClsItemError: naming the item's image for an unknown task or a label outside the task's classes.
    """

    def __init__(self, task_table: TaskTable) -> None:
        self.table = task_table

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if "task" not in d:
            return d
        if "label" not in d:
            try:
                tid = self.table.task_id_of(d["task"])
            except ValueError as e:
                raise ClsItemError(f"item ({cls_item_name(d)}): {e}") from None
            d.update(task=self.table.task_names[tid], task_id=tid)
            return d
        return check_cls_item(d, self.table)


class LoadClsImaged(MapTransform):
    """
    Load ``d[key]`` as a channel-first float32 :class:`~monai.data.MetaTensor` ``(1, D, H, W)``: a NIfTI file
    (MONAI's ``LoadImage``), or volume ``d["index"]`` of array ``d["array"]`` of an npz file (read once per file).
    The keys ``array``/``index`` are removed (so NIfTI and npz items collate together); the meta data's
    ``filename_or_obj`` names the item (``file.npz[train_images][7]``).

    Args:
        keys: image key(s). Defaults to ``"image"``.
        spatial_dims: expected number of spatial dimensions. Defaults to 3.
        allow_missing_keys: as in MONAI. Defaults to False.

    Raises:
        NpzReadError: for a missing/corrupt npz or array, or an index out of range (naming file, array, index).
        VolumeShapeError: when the volume is not ``spatial_dims``-D (single channel), naming the item.
    """

    def __init__(self, keys: Any = "image", spatial_dims: int = 3, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self._nifti = LoadImage(image_only=True, ensure_channel_first=True)

    def _load(self, d: Mapping, key: Hashable) -> MetaTensor:
        src = str(d[key])
        name = cls_item_name({"image": src, **({"array": d["array"], "index": d["index"]} if "array" in d else {})})
        if src.endswith(".npz"):
            if "array" not in d or "index" not in d:
                raise NpzReadError(f"{name}: an npz image needs 'array' and 'index' entries in the item.")
            arr = read_npz_array(src, d["array"])
            idx = int(d["index"])
            if not 0 <= idx < arr.shape[0]:
                raise NpzReadError(f"{name}: index {idx} out of range for '{d['array']}' with {arr.shape[0]} volumes.")
            vol = np.asarray(arr[idx], dtype=np.float32)[None]
            img = MetaTensor(torch.from_numpy(vol.copy()), meta={"filename_or_obj": name})
        else:
            try:
                img = self._nifti(src)
            except Exception as e:
                raise ValueError(f"{name}: cannot load the image ({type(e).__name__}: {e}).") from e
            img = MetaTensor(torch.as_tensor(img, dtype=torch.float32), meta={**img.meta, "filename_or_obj": name})
        try:
            check_shape(img, name, self.spatial_dims, 1)  # the input guard's check (medfm_ops.data.input_guard)
        except ValueError as e:
            raise VolumeShapeError(str(e)) from None
        return img

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._load(d, key)
        d.pop("array", None)
        d.pop("index", None)
        return d
