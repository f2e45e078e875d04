# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Dictionary transforms for multi-region segmentation data and the standard preprocessing pipeline."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from medfm_ops.data.input_guard import ImageLoadError, SafeLoadImage, SafeLoadImaged, check_finite, check_shape
from medfm_ops.data.task_table import TaskTable

__all__ = [
    "CheckFinited",
    "CheckInputShaped",
    "CheckImageLabelShaped",
    "ImageLoadError",
    "RegionLabelToChannelsd",
    "SafeLoadImage",
    "SafeLoadImaged",
    "case_name",
]


def case_name(data: Mapping[Hashable, Any], keys: Sequence[Hashable] = ("image", "label")) -> str:
    """
    Name of the case held in ``data`` for error messages: the ``filename_or_obj`` meta of the first MetaTensor
    under ``keys``, else the first string/path value under ``keys``, else ``"<unnamed case>"``.
    """
    for key in keys:
        meta = getattr(data.get(key), "meta", None) or {}
        if meta.get("filename_or_obj"):
            return str(meta["filename_or_obj"])
    for key in keys:
        if isinstance(data.get(key), (str, os.PathLike)):
            return str(data[key])
    return "<unnamed case>"


class CheckFinited(MapTransform):
    """
    Refuse an image holding NaN or infinite values (they would turn the whole volume into one label after
    normalisation).

    Args:
        keys: keys of the tensors to check. Defaults to ``"image"``.
        allow_missing_keys: skip missing keys. Defaults to False.

    Raises:
        ValueError: naming the case, the key and the number of non-finite voxels.
    """

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_finite(d[key], case_name(d, [key]), key)  # the input guard's check (medfm_ops.data.input_guard)
        return d


class CheckInputShaped(MapTransform):
    """
    Check that a channel-first image is a volume of ``spatial_dims`` axes with ``channels`` channels, e.g. refuse a
    2D slice or a 4-channel series given to a 3D single-channel network.

    Args:
        keys: keys to check. Defaults to ``"image"``.
        spatial_dims: number of spatial axes. Defaults to 3.
        channels: number of channels. Defaults to 1.
        allow_missing_keys: skip missing keys. Defaults to False.

    Raises:
        ValueError: naming the case, its shape and the expected one.
    """

    def __init__(
        self, keys: KeysCollection = "image", spatial_dims: int = 3, channels: int = 1, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims, self.channels = int(spatial_dims), int(channels)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            check_shape(d[key], case_name(d, [key]), self.spatial_dims, self.channels, key)  # the input guard's check
        return d


class CheckImageLabelShaped(MapTransform):
    """
    Check that image and label have the same spatial shape (all axes after the channel axis).

    Args:
        image_key: key of the (C, *spatial) image. Defaults to ``"image"``.
        label_key: key of the (C', *spatial) label. Defaults to ``"label"``.
        allow_missing_keys: skip the check when a key is missing. Defaults to False.

    Raises:
        ValueError: when the spatial shapes differ; the message names the case and both shapes.
    """

    def __init__(self, image_key: str = "image", label_key: str = "label", allow_missing_keys: bool = False) -> None:
        super().__init__([image_key, label_key], allow_missing_keys)
        self.image_key, self.label_key = image_key, label_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if len(present) < 2:
            return d
        image, label = d[self.image_key], d[self.label_key]
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise ValueError(
                f"case {case_name(d, [self.image_key, self.label_key])}: image '{self.image_key}' has spatial shape "
                f"{tuple(image.shape[1:])} (full {tuple(image.shape)}) but label '{self.label_key}' has "
                f"{tuple(label.shape[1:])} (full {tuple(label.shape)}); they must match."
            )
        return d


class RegionLabelToChannelsd(MapTransform):
    """
    Region-local integer label (1, *spatial) -> binary label in the union channel layout (C, *spatial), float32,
    plus the (C,) boolean mask of the channels the case annotates.

    Region-local label ``k`` of the item's region (task id under ``region_key``) goes to global channel
    ``region_table.channels_of(task)[k - 1]``; channels of the other regions are zero. A case from a data set that
    annotates only some of its region's classes (partial labels, the item's ``annotated_key`` list of class names)
    may hold only those labels; the mask written under ``mask_key`` is True at exactly the annotated channels, so the
    loss and the metrics ignore the region's other classes for this case (whose voxels are background in its label).
    Without ``annotated_key`` every class of the region is annotated. The ``annotated_key`` entry (a list of strings
    that a DataLoader cannot collate) is removed from the item. MetaTensor meta (affine, pixdim, filename) is kept.

    Args:
        keys: label key(s).
        region_table: the data set's :py:class:`TaskTable`.
        region_key: key of the item's task id (int or scalar tensor). Defaults to ``"region"``.
        image_key: key whose ``filename_or_obj`` names the case in errors. Defaults to ``"image"``.
        annotated_key: key of the class names the case annotates. Defaults to ``"annotated"``.
        mask_key: key of the (C,) bool channel mask written next to the label; None writes none. Defaults to
            ``"channel_mask"``.
        allow_missing_keys: skip missing label keys. Defaults to False.

    Raises:
        KeyError: when the item has no ``region_key``.
        ValueError: on an unknown task id or annotated class, a label with more than one channel, non-integer values,
            or a label value that is not 0 or a label of the classes the case annotates; the message names the case.

    Example::

        t = RegionLabelToChannelsd("label", table)
        out = t({"label": torch.tensor([[[[0, 1], [2, 0]]]]), "region": 1})  # label (num_classes, 1, 2, 2)
        out["channel_mask"]  # (num_classes,) bool, True at region 1's channels
    """

    def __init__(
        self,
        keys: KeysCollection,
        region_table: TaskTable,
        region_key: str = "region",
        image_key: str = "image",
        annotated_key: str = "annotated",
        mask_key: str | None = "channel_mask",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.region_table = region_table
        self.region_key = region_key
        self.image_key = image_key
        self.annotated_key = annotated_key
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        annotated = d.pop(self.annotated_key, None)
        for key in self.key_iterator(d):
            name = case_name(d, [self.image_key, key])
            if self.region_key not in d:
                raise KeyError(f"case {name}: no '{self.region_key}' entry (the item's task id) to place '{key}'.")
            try:
                task = int(torch.as_tensor(d[self.region_key]).item())
                channels = self.region_table.channels_of(task)
                labels = self.region_table.annotated_labels(task, annotated)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(
                    f"case {name}: invalid region {d[self.region_key]!r} or annotated {annotated!r}: {e}"
                ) from e
            d[key] = self._convert(d[key], channels, labels, name, key, task)
            if self.mask_key is not None:
                mask = torch.zeros(self.region_table.num_classes, dtype=torch.bool)
                mask[[channels[k - 1] for k in labels]] = True
                d[self.mask_key] = mask
        return d

    def _convert(
        self, label: Any, channels: list[int], labels: list[int], name: str, key: Hashable, task: int
    ) -> torch.Tensor:
        lab = torch.as_tensor(label)
        if lab.ndim < 2 or lab.shape[0] != 1:
            raise ValueError(
                f"case {name}: '{key}' must be a (1, *spatial) region-local label, got shape {tuple(lab.shape)}."
            )
        values = lab[0]
        if values.is_floating_point() and not torch.equal(values, values.round()):
            raise ValueError(f"case {name}: '{key}' has non-integer values (interpolated label?).")
        n = len(self.region_table.class_names[task])
        vmin, vmax = int(values.min()), int(values.max())
        full = len(labels) == n and vmin >= 0 and vmax <= n  # the common case: no unique() over the volume
        bad = [] if full else sorted(set(torch.unique(values).long().tolist()) - {0, *labels})
        if bad:
            classes = self.region_table.class_names[task]
            allowed = ", ".join(["0=background"] + [f"{k}={classes[k - 1]}" for k in labels])
            partial = "" if len(labels) == n else f" (the case annotates {len(labels)} of its {n} classes)"
            raise ValueError(
                f"case {name}: '{key}' has label value(s) {bad} but region '{self.region_table.task_names[task]}' "
                f"(task {task}) allows {allowed}{partial}."
            )
        out = torch.zeros((self.region_table.num_classes, *values.shape), dtype=torch.float32, device=values.device)
        for k in labels:
            out[channels[k - 1]] = values == k
        if isinstance(label, MetaTensor):
            return MetaTensor(out, meta=dict(label.meta), applied_operations=list(label.applied_operations))
        return out
