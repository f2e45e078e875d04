# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Validation curves read back from TensorBoard event files (benchmarks.training_curves)."""

from __future__ import annotations

import os
import time

import pytest
from torch.utils.tensorboard import SummaryWriter

from benchmarks.training_curves import plot_training_curves, read_scalar


def _write(log_dir, points: dict[int, float], tag: str = "auc/a") -> None:
    w = SummaryWriter(log_dir=str(log_dir))
    for step, value in points.items():
        w.add_scalar(tag, value, step)
    w.add_scalar("loss", 1.0, 1)
    w.close()


def test_read_scalar_merges_a_resumed_run_later_file_wins(tmp_path):
    _write(tmp_path, {1: 0.6, 2: 0.7, 3: 0.65})
    first = next(tmp_path.glob("events.out.tfevents.*"))
    old = time.time() - 100
    os.utime(first, (old, old))  # the first run's file is older
    time.sleep(0.01)
    _write(tmp_path, {3: 0.75, 4: 0.8})  # resumed from epoch 2: epoch 3 again
    assert read_scalar(tmp_path, "auc/a") == [(1, pytest.approx(0.6)), (2, pytest.approx(0.7)),
                                              (3, pytest.approx(0.75)), (4, pytest.approx(0.8))]  # fmt: skip
    assert read_scalar(tmp_path, "auc/missing") == []


def test_read_scalar_names_a_folder_without_events(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TensorBoard event file"):
        read_scalar(tmp_path, "auc/a")


def test_plot_training_curves_writes_a_png_and_refuses_empty_panels(tmp_path):
    out = plot_training_curves(tmp_path / "c.png", {"a": {"x": [(1, 0.5), (2, 0.7)], "y": [(1, float("nan"))]}})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="panel 'b' has no finite point"):
        plot_training_curves(tmp_path / "d.png", {"b": {"x": [(1, float("nan"))]}})
    with pytest.raises(ValueError, match="at least one panel"):
        plot_training_curves(tmp_path / "e.png", {})
