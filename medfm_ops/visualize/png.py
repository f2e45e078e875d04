# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Minimal RGB PNG output with the standard library (zlib): a colour map, a tile grid and the file writer."""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medfm_ops.utils.atomic_io import atomic_write

__all__ = ["colormap", "tile_grid", "write_png"]

#: (position, RGB) stops of a blue - cyan - yellow - red colour map (jet-like, dark blue at 0, dark red at 1)
_STOPS = np.array(
    [(0.0, 0, 0, 128), (0.15, 0, 0, 255), (0.4, 0, 255, 255), (0.6, 255, 255, 0), (0.85, 255, 0, 0), (1.0, 128, 0, 0)],
    dtype=float,
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` (clipped; NaN as 0) to ``uint8`` RGB: shape ``(*values.shape, 3)``."""
    v = np.clip(np.nan_to_num(np.asarray(values, dtype=float)), 0.0, 1.0)
    rgb = [np.interp(v, _STOPS[:, 0], _STOPS[:, c]) for c in (1, 2, 3)]
    return np.stack(rgb, axis=-1).round().astype(np.uint8)


def tile_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, scale: int = 1, background: int = 255) -> np.ndarray:
    """
    One ``uint8`` RGB image of ``rows`` of ``(h, w, 3)`` tiles, each enlarged ``scale`` times (nearest) and placed
    top-left in a cell of the largest tile's size, ``pad`` pixels apart.

    Raises:
        ValueError: for no tiles, or a tile that is not ``(h, w, 3)``.
    """
    tiles = [t for r in rows for t in r]
    if not tiles:
        raise ValueError("tile_grid needs at least one tile.")
    for t in tiles:
        if t.ndim != 3 or t.shape[2] != 3:
            raise ValueError(f"tiles must be (h, w, 3) RGB arrays, got shape {t.shape}.")
    ch, cw = max(t.shape[0] for t in tiles) * scale, max(t.shape[1] for t in tiles) * scale
    ncol = max(len(r) for r in rows)
    out = np.full((pad + len(rows) * (ch + pad), pad + ncol * (cw + pad), 3), background, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            big = np.repeat(np.repeat(np.asarray(t, dtype=np.uint8), scale, axis=0), scale, axis=1)
            y, x = pad + i * (ch + pad), pad + j * (cw + pad)
            out[y : y + big.shape[0], x : x + big.shape[1]] = big
    return out


def write_png(path: str | os.PathLike, rgb: np.ndarray) -> Path:
    """
    Write a ``uint8`` ``(H, W, 3)`` array as an 8-bit RGB PNG (atomically; no imaging library needed).

    Raises:
        ValueError: when the array is not ``(H, W, 3)`` ``uint8``.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or not rgb.size:
        raise ValueError(f"write_png expects a non-empty (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}.")
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    with atomic_write(path, "wb") as f:
        f.write(png)
    return Path(path)
