# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Grad-CAM panels and CKA matrices: shapes, ranges, CKA of a feature set with itself = 1, valid PNG files."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch

from medfm_ops.networks import build_cls_network, freeze
from medfm_ops.visualize import cka_matrix, gradcam_panel, gradcam_volume, tile_grid, write_matrix_png, write_png


def _read_png(path):
    """(width, height, pixels) of an 8-bit RGB PNG with one IDAT chunk and filter type 0 (what write_png writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = {}, 8
    while i < len(data):
        n, kind = struct.unpack(">I4s", data[i : i + 8])
        body = data[i + 8 : i + 8 + n]
        assert struct.unpack(">I", data[i + 8 + n : i + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = body
        i += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert not raw[:, 0].any()
    return w, h, raw[:, 1:].reshape(h, w, 3)


def test_png_round_trip_and_grid(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    w, h, px = _read_png(write_png(tmp_path / "a.png", rgb))
    assert (w, h) == (7, 5) and np.array_equal(px, rgb)
    grid = tile_grid([[rgb, rgb], [rgb]], pad=1, scale=2)
    assert grid.shape == (1 + 2 * (10 + 1), 1 + 2 * (14 + 1), 3)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "b.png", rgb.astype(float))


def test_gradcam_volume_and_panel(tmp_path):
    torch.manual_seed(0)
    net = freeze(build_cls_network("resnet_tiny", 3))  # a frozen model: the helper works on a copy
    x = torch.randn(1, 1, 12, 12, 12)
    cam = gradcam_volume(net, x, class_idx=2, target_layer="layer3")
    assert cam.shape == (12, 12, 12) and np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    with pytest.raises(ValueError, match="target_layer 'layer9'"):
        gradcam_volume(net, x, 0, "layer9")
    with pytest.raises(ValueError, match="class_idx 3"):
        gradcam_volume(net, x, 3, "layer3")
    with pytest.raises(ValueError, match="batch of one"):
        gradcam_volume(net, x[0], 0, "layer3")
    maps = [{"foundation": cam, "expert": 1 - cam}] * 2
    w, h, px = _read_png(gradcam_panel(tmp_path / "panel.png", [x[0], x[0, 0]], maps, scale=2))
    assert (w, h) == (2 + 9 * (24 + 2), 2 + 2 * (24 + 2))  # 3 grey + 2 models x 3 slices, 2 rows
    with pytest.raises(ValueError, match="same models"):
        gradcam_panel(tmp_path / "bad.png", [x[0], x[0]], [maps[0], {"expert": cam}])


def test_cka_matrix_self_is_one_and_invariances(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=g)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    names, m = cka_matrix({"a": x, "a rotated and scaled": 3.0 * x @ q, "b": torch.randn(20, 16, generator=g)})
    assert names == ["a", "a rotated and scaled", "b"]
    assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T) and np.isfinite(m).all()
    assert abs(m[0, 1] - 1.0) < 1e-10 and 0.0 <= m[0, 2] < 0.9
    w, h, _ = _read_png(write_matrix_png(tmp_path / "cka.png", m, cell=10))
    assert (w, h) == (2 + 3 * 12, 2 + 3 * 12)
    with pytest.raises(ValueError, match="same N"):
        cka_matrix({"a": x, "b": x[:5]})
