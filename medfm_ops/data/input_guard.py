# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The input guard of every inference pipeline: an image with NaN/inf voxels, the wrong number of spatial dimensions
or the wrong number of channels is refused with an error naming its file; an empty input folder is refused too.

This module imports only the standard library, torch and MONAI: exported bundles (classification experts, SH-PEFT
exports) ship it verbatim as ``scripts/input_guard.py`` so that they run without medfm installed; a test holds the
copies equal to this file.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

__all__ = ["InputGuardd", "check_finite", "check_shape", "input_name", "require_images"]


def input_name(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """The file an input came from (``filename_or_obj`` of its meta data), else its string value, else ``"?"``."""
    meta = getattr(data.get(key), "meta", None) or {}
    if meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    value = data.get(key)
    return str(value) if isinstance(value, (str, os.PathLike)) else "?"


def check_finite(image: Any, name: str, key: Hashable = "image") -> None:
    """
    Raises:
        ValueError: when the floating tensor ``image`` holds NaN or infinite values, naming ``name`` and the count.
    """
    values = torch.as_tensor(image)
    if values.is_floating_point():
        bad = int((~torch.isfinite(values)).sum())
        if bad:
            raise ValueError(
                f"image {name}: '{key}' has {bad} NaN/inf voxel(s) of {values.numel()}; repair or mask the file "
                "before using it."
            )


def check_shape(image: Any, name: str, spatial_dims: int = 3, channels: int = 1, key: Hashable = "image") -> None:
    """
    Raises:
        ValueError: when the channel-first ``image`` is not a ``spatial_dims``-D volume with ``channels`` channels
            (a 2D slice, a 4D series), naming ``name``, its shape and the expected one.
    """
    shape = tuple(image.shape)
    if len(shape) != spatial_dims + 1 or shape[0] != channels:
        raise ValueError(
            f"image {name}: '{key}' has shape {shape} (channel first), expected "
            f"({channels}, {', '.join(['*'] * spatial_dims)}): a {spatial_dims}D volume with {channels} channel(s)."
        )


class InputGuardd(MapTransform):
    """
    Refuse an input that the network would turn into a meaningless output: NaN/inf voxels (a NaN prediction, or one
    label everywhere after normalisation), the wrong number of spatial dimensions (a 2D slice resized into a volume
    gives a real-looking prediction) or of channels. Place it after loading and ``EnsureChannelFirstd``.

    Args:
        keys: keys of the channel-first images. Defaults to ``"image"``.
        spatial_dims: spatial dimensions the network expects. Defaults to 3.
        channels: channels the network expects. Defaults to 1.
        check_values: check for NaN/inf values. Defaults to True.
        allow_missing_keys: skip missing keys. Defaults to False.

    Raises:
        ValueError: naming the file and what was expected.

    Example::

        Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"), InputGuardd("image")])
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spatial_dims: int = 3,
        channels: int = 1,
        check_values: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims, self.channels, self.check_values = int(spatial_dims), int(channels), bool(check_values)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            name = input_name(d, key)
            check_shape(d[key], name, self.spatial_dims, self.channels, key)
            if self.check_values:
                check_finite(d[key], name, key)
        return d


def require_images(images: Sequence[str], dataset_dir: str) -> list[str]:
    """
    The images to run on, refused when there are none.

    Raises:
        FileNotFoundError: naming ``dataset_dir`` and the option to pass.
    """
    if not images:
        raise FileNotFoundError(
            f"no NIfTI image (*.nii, *.nii.gz) in dataset_dir {str(dataset_dir)!r}: pass --dataset_dir <folder of "
            "images>"
        )
    return list(images)
