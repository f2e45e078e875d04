# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Smoke run of benchmarks/lorkd.py: it writes both tables with measured, positive numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_lorkd_quick(tmp_path):
    env = {**os.environ, "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}  # no re-exec inside the test
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.lorkd", "run", "--out_dir", str(tmp_path), "--batch", "2",
         "--roi", "16", "--repeats", "1", "--warmup", "0", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "lorkd_bench.json").read_text())
    assert record["train_step"]["plain"]["median_ms"] > 0 and record["train_step"]["experts"]["median_ms"] > 0
    assert record["inference"]["max_abs_diff_fused_vs_unfused"] < 1e-4
    sizes = record["sizes"]
    assert sizes["fused_expert"]["params"] == sizes["student_plain"]["params"] < sizes["teacher"]["params"]
    assert sizes["student_experts_training"]["params"] > sizes["student_plain"]["params"]
    md = (tmp_path / "lorkd_bench.md").read_text()
    assert "Training step" in md and record["machine"]["cpu_model"] in md
