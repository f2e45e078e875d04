# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""benchmarks/lorkd_ablation.py without training: reuse only of identical runs, the single-task row assembled from its
per-region runs, the results page (mean ± std over seeds, machine, command) and its figure; plot_score_bars."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import lorkd_ablation
from benchmarks.score_bars import plot_score_bars

REPO = Path(__file__).resolve().parents[1]
REGIONS = ["brain_mri", "thorax_ct"]


@pytest.fixture(scope="module")
def bench():
    return lorkd_ablation


def _csv_row(model: str, scores: dict[str, float], params: float = 0.6) -> dict:
    row = {"model": model}
    for g in REGIONS:
        row[f"{g} DSC"] = row[f"{g} NSD"] = scores.get(g, math.nan)
    finite = [v for v in scores.values()]
    row["mean DSC"] = row["mean NSD"] = sum(finite) / len(finite)
    row.update({"train params (M)": params, "deploy params (M)": 0.6, "train GFLOPs": 0.5, "deploy GFLOPs": 0.5})
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    path.write_text("\n".join([",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]) + "\n")


def test_runs_are_reused_only_with_identical_settings(bench, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, log):
        calls.append(cmd)
        if "evaluate.json" in cmd[5]:
            _write_csv(tmp_path / "eval" / "regions.csv", [_csv_row("stock network (no experts)", {"thorax_ct": 0.5})])
        return 1.0

    monkeypatch.setattr(bench, "_run", fake_run)
    settings = {"args": {"seed": 0}, "teacher_sha256": "a"}
    first = bench.train_and_evaluate(tmp_path, "mtl", {"seed": 0}, settings, reuse=True)
    assert len(calls) == 2 and not first["reused"] and "--seed" in calls[0] and "--eval_dir" in calls[1]
    again = bench.train_and_evaluate(tmp_path, "mtl", {"seed": 0}, settings, reuse=True)
    assert len(calls) == 2 and again["reused"] and json.dumps(again["rows"]) == json.dumps(first["rows"])
    new_teacher = {**settings, "teacher_sha256": "b"}  # other starting weights: trained again
    bench.train_and_evaluate(tmp_path, "mtl", {"seed": 0}, new_teacher, reuse=True)
    assert len(calls) == 4
    bench.train_and_evaluate(tmp_path, "mtl", {"seed": 0}, new_teacher, reuse=False)
    assert len(calls) == 6


def test_single_task_row_joins_its_per_region_runs(bench):
    runs = [{"rows": {"stock network (no experts)": _csv_row("stock network (no experts)", {g: v})},
             "train_seconds": 10.0, "eval_seconds": 2.0, "reused": False} for g, v in zip(REGIONS, (0.2, 0.6))]
    out = bench._seed_result(runs, REGIONS, experts=False)
    assert out["regions"]["brain_mri"]["dsc"] == 0.2 and out["regions"]["thorax_ct"]["dsc"] == 0.6
    assert out["mean_dsc"] == pytest.approx(0.4) and out["train_seconds"] == 20.0
    assert out["train_params"] == pytest.approx(2 * 0.6e6) and out["deploy_params"] == pytest.approx(0.6e6)


def _record() -> dict:
    def seed(s: int, dsc: float) -> dict:
        return {"seed": s, "regions": {g: {"dsc": dsc, "nsd": dsc / 2} for g in REGIONS}, "mean_dsc": dsc,
                "mean_nsd": dsc / 2, "train_params": 1.2e6, "deploy_params": 0.6e6, "train_gflops": 0.6,
                "deploy_gflops": 0.5, "train_seconds": 30.0, "eval_seconds": 5.0, "reused": False}

    rows = [{"name": n, "description": f"{n} method", "override": None, "overrides": {}, "deployed_as": "x",
             "experts": True, "seeds": [seed(0, d), seed(1, d + 0.1)]} for n, d in (("lorkd", 0.5), ("mtl", 0.3))]
    return {"command": "python -m benchmarks.lorkd_ablation run --epochs 2", "date": "2026-01-01 00:00 UTC",
            "wall_seconds": 600.0, "load_average_end": 1.5,
            "machine": {"cpu_model": "Test CPU", "usable_cores": 2, "torch_threads": 2, "torch": "2.x", "gpu": None,
                        "glibc_tunables": "x", "load_average_1min": 1.0},
            "settings": {"epochs": 2, "warmup_epochs": 1, "seeds": [0, 1], "regions": REGIONS, "datalist": "synthetic",
                         "datalist_sha256": "d" * 64, "teacher": "bundles/foundation_seg", "teacher_sha256": "t" * 64,
                         "batch_size": 4, "learning_rate": 0.001, "roi_size": [32, 32, 32]},
            "work_dir": "runs/x", "teacher_row": _csv_row("Foundation (teacher)", {"brain_mri": 0.7, "thorax_ct": 0.9}),
            "rows": rows}  # fmt: skip


def test_results_page_and_figure(bench, tmp_path):
    out = tmp_path / "ablation.md"
    bench._write(out, _record())
    text = out.read_text()
    assert "| lorkd | lorkd method | 55.0 ± 5.0 | 55.0 ± 5.0 | **55.0 ± 5.0** |" in text
    assert "Test CPU, 2 usable cores" in text and "load average 1.00 at start, 1.50 at end" in text
    assert "python -m benchmarks.lorkd_ablation run --epochs 2" in text and "in 10.0 min" in text
    assert "| teacher |" in text and "![" in text and "(ablation.png)" in text
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "ablation.json").read_text())["rows"][1]["name"] == "mtl"
    (tmp_path / "ablation.png").unlink()
    bench.report(str(out))  # the page and figure again from the .json
    assert (tmp_path / "ablation.png").is_file() and out.read_text() == text


def test_plot_score_bars_skips_missing_values_and_refuses_nothing(tmp_path):
    path = plot_score_bars(tmp_path / "b.png", {"a": {"r1": [1.0, 2.0], "mean": [1.5]}, "b": {"r1": [math.nan]}},
                           references={"teacher": 2.0})
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one group"):
        plot_score_bars(tmp_path / "c.png", {})
    with pytest.raises(ValueError, match="no finite value"):
        plot_score_bars(tmp_path / "c.png", {"a": {"r1": [math.nan]}})
