# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The input guard of every bundle pipeline: an image file that cannot be read, an image with NaN/inf voxels, the
wrong number of spatial dimensions or the wrong number of channels is refused with an error naming its file; an
empty input folder, an output folder that cannot be written and a non-finite training loss are refused too.

This module imports only the standard library, numpy, torch and MONAI: exported bundles (segmentation and
classification experts, SH-PEFT exports) ship it verbatim as ``scripts/input_guard.py`` so that they run without
medfm installed; a test holds the copies equal to this file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data.image_reader import ImageReader
from monai.transforms import LoadImage, LoadImaged, MapTransform
from monai.utils import ensure_tuple
from monai.utils.enums import PostFix

__all__ = [
    "ImageLoadError",
    "InputGuardd",
    "SafeLoadImage",
    "SafeLoadImaged",
    "check_finite",
    "check_shape",
    "finite_loss",
    "input_name",
    "require_images",
    "require_writable_dir",
]


def input_name(data: Mapping[Hashable, Any], key: Hashable) -> str:
    """The file an input came from (``filename_or_obj`` of its meta data), else its string value, else ``"?"``."""
    meta = getattr(data.get(key), "meta", None) or {}
    if meta.get("filename_or_obj"):
        return str(meta["filename_or_obj"])
    value = data.get(key)
    return str(value) if isinstance(value, (str, os.PathLike)) else "?"


class ImageLoadError(RuntimeError):
    """An image file exists but cannot be read (corrupt, truncated or unsupported)."""


class SafeLoadImage(LoadImage):
    """
    MONAI :py:class:`~monai.transforms.LoadImage` whose failures name the file: a missing file raises
    ``FileNotFoundError``, any reader failure (corrupt or truncated NIfTI, unsupported format) an
    :py:class:`ImageLoadError` with the reader's message; the original exception is chained. Same arguments as
    ``LoadImage``.
    """

    def __call__(self, filename: Sequence[str | os.PathLike] | str | os.PathLike, reader: ImageReader | None = None):
        names = [
            str(Path(f).expanduser()) if self.expanduser else str(f)
            for f in ensure_tuple(filename)
            if isinstance(f, (str, os.PathLike))
        ]
        for name in names:
            if not os.path.exists(name):
                raise FileNotFoundError(f"image file not found: {name}")
        try:
            return super().__call__(filename, reader)
        except Exception as e:
            first = (str(e).strip().splitlines() or [""])[0][:300]
            shown = names[0] if len(names) == 1 else names or filename
            raise ImageLoadError(
                f"cannot read image file {shown} (corrupt, truncated or unsupported?): {type(e).__name__}: {first}"
            ) from e


class SafeLoadImaged(LoadImaged):
    """
    MONAI :py:class:`~monai.transforms.LoadImaged` that loads through :py:class:`SafeLoadImage`, so a missing or
    unreadable file raises one error naming the file (``FileNotFoundError`` / :py:class:`ImageLoadError`).
    Takes exactly ``LoadImaged``'s arguments.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: type[ImageReader] | str | None = None,
        dtype: DtypeLike = np.float32,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = PostFix.meta(),
        overwriting: bool = False,
        image_only: bool = True,
        ensure_channel_first: bool = False,
        simple_keys: bool = False,
        prune_meta_pattern: str | None = None,
        prune_meta_sep: str = ".",
        allow_missing_keys: bool = False,
        expanduser: bool = True,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            keys, reader, dtype, meta_keys, meta_key_postfix, overwriting, image_only, ensure_channel_first,
            simple_keys, prune_meta_pattern, prune_meta_sep, allow_missing_keys, expanduser, *args, **kwargs,
        )  # fmt: skip
        self._loader = SafeLoadImage(
            reader, image_only, dtype, ensure_channel_first, simple_keys, prune_meta_pattern, prune_meta_sep,
            expanduser, *args, **kwargs,
        )  # fmt: skip


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


def require_writable_dir(output_dir: str | os.PathLike) -> str:
    """
    Create ``output_dir`` (parents too) and return it.

    Raises:
        PermissionError: when it cannot be written, naming it and the option to pass.
        OSError: when it cannot be created (e.g. a file is in the way), from ``os.makedirs``, naming the path.
    """
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise PermissionError(
            f"output_dir {str(output_dir)!r} is not writable: pass --output_dir <a writable folder>"
        )
    return str(output_dir)


def finite_loss(output: Any, key: str = "loss", image_key: Hashable = "image") -> float:
    """
    The training loss of one iteration's engine ``output`` (a decollated list of dicts, or one dict), refused when it
    is NaN or infinite. Use it as the ``output_transform`` of the trainer's loss metric, so a diverged run stops at the
    first bad step, before a checkpoint of it is saved.

    Raises:
        FloatingPointError: naming the loss and the files of the batch.
    """
    items = list(output) if isinstance(output, (list, tuple)) else [output]
    loss = float(items[0][key])
    if not math.isfinite(loss):
        names = [input_name(d, image_key) for d in items]
        raise FloatingPointError(
            f"training loss is {loss} on the batch of {names}: training stopped before anything from this step was "
            "saved; check these images for NaN/inf voxels or lower the learning rate"
        )
    return loss
