# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""benchmarks/real_regions.py: argument checks and the results page from a stored record (no training)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("real_regions_bench", REPO / "benchmarks" / "real_regions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _region(dsc: float, classes: list[str]) -> dict:
    return {"classes": [{"class": c, "dsc_mean": dsc + 0.01 * i, "nsd_mean": dsc, "n": 2} for i, c in
                        enumerate(classes)],
            "mean_dsc": dsc, "mean_nsd": dsc, "n_test": 2, "nsd_tolerance_mm": 1.0, "deploy_params": 1000,
            "deploy_gflops": 0.5, "train_params": 2000}


def _record(lorkd: list[float], mtl: list[float], teacher: float) -> dict:
    classes = {"brain_mri": ["a", "p"], "heart_mri": ["rv", "myo", "lv"]}

    def row(values, lr):
        return {"description": "x", "deployed_as": "y", "lr": lr, "lr_grid": {} if lr is None else {"0.001": 0.5},
                "seeds": [{"seed": i, "train_seconds": 10.0,
                           "regions": {r: _region(v, c) for r, c in classes.items()}} for i, v in enumerate(values)]}

    return {"command": "python -m benchmarks.real_regions run", "date": "d", "wall_seconds": 60.0,
            "part_seconds": {"data": 1.0, "teacher_train": 20.0},
            "machine": {"cpu_model": "cpu", "usable_cores": 2, "device": "cpu", "load_average_1min": 1.0},
            "settings": {"regions": list(classes), "n_cases": {"test": {"brain_mri": 2, "heart_mri": 2}},
                         "split_seed": 0, "preprocessing": {"brain_mri": {"spacing": [1, 1, 1], "window_size": [8] * 3,
                                                                          "intensity": "zscore"}},
                         "nsd_tolerance_mm": {"brain_mri": 1.0}, "teacher_epochs": 1, "epochs": 1, "batch_size": 2,
                         "seeds": [0, 1, 2], "lr_grid": [0.001], "patience": 4},
            "results": {"teacher": row([teacher], None), "mtl": row(mtl, 0.001), "lorkd": row(lorkd, 0.001)}}


def test_page_reads_by_the_spread_rule(bench, tmp_path):
    out = tmp_path / "page.md"
    (tmp_path / "page.json").write_text(json.dumps(_record([0.80, 0.81, 0.82], [0.70, 0.71, 0.72], 0.815)))
    bench.report(str(out))
    text = out.read_text()
    assert "| lorkd | 0.001" in text and "81.0 ± 0.8" in text
    assert "brain_mri: LoRKD vs MTL +10.0 DSC points (spread 0.8): above." in text
    assert "fused LoRKD expert vs teacher -0.5 DSC points (within 1 point or above)" in text
    assert "LoRKD vs STL" not in text  # a comparison only where both rows ran
    assert "every run stopped after 4 validations without a better validation Dice" in text
    assert "Sum of the recorded training wall times: 1 min" in text  # 7 runs x 10 s
    assert (tmp_path / "page.png").stat().st_size > 0
    # a tie when the difference is inside twice the spread; more than 1 point below the teacher is said
    (tmp_path / "page.json").write_text(json.dumps(_record([0.70, 0.75, 0.80], [0.69, 0.74, 0.79], 0.9)))
    text = Path(bench.report(str(out))).read_text()
    assert ": tie." in text and "MORE than 1 point below" in text


def test_notes_are_stored_and_kept_by_later_reports(bench, tmp_path):
    out = tmp_path / "page.md"
    (tmp_path / "page.json").write_text(json.dumps(_record([0.80, 0.81, 0.82], [0.70, 0.71, 0.72], 0.815)))
    (tmp_path / "notes.md").write_text("What the numbers say:\n\n- LoRKD above MTL.\n")
    bench.report(str(out), notes=str(tmp_path / "notes.md"))
    assert json.loads((tmp_path / "page.json").read_text())["notes"].startswith("What the numbers say")
    (tmp_path / "notes.md").unlink()
    text = Path(bench.report(str(out))).read_text()  # a later report without --notes keeps them
    assert "> What the numbers say:\n>\n> - LoRKD above MTL.\n" in text
    assert text.index("> - LoRKD above MTL.") < text.index("| row | lr")


def test_bad_arguments_fail_before_any_work(bench, tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        bench.run(preset="huge", work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown rows"):
        bench.run(preset="smoke", rows="lorkd,nnunet", work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="warm-up"):
        bench.run(preset="smoke", rows="lorkd_star", work_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_kept_epoch_of_a_stock_bundle_log(bench, tmp_path):
    log = tmp_path / "train.log"
    log.write_text("INFO - Key metric: val_mean_dice best value: 0.61 at epoch: 5\n"
                   "INFO - Key metric: train_loss best value: 0.3 at epoch: 10\n"
                   "INFO - Key metric: val_mean_dice best value: 0.7 at epoch: 35\n")  # fmt: skip
    assert bench.kept_epoch(log) == 35
    assert bench.kept_epoch(tmp_path / "missing.log") is None
