# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""benchmarks/site_start.py without training: the page from a stored record, the starting expert's lookup, and
reuse decided on the settings a site bundle recorded."""

from __future__ import annotations

import json

import pytest

from benchmarks import site_start


def _run(seed: int, dsc: float, epochs: int, trained: int, kept: int) -> dict:
    classes = [{"class": c, "dsc_mean": dsc + 0.01 * i, "nsd_mean": dsc} for i, c in enumerate(("anterior", "posterior"))]
    return {"seed": seed, "seconds": 60.0, "cpu_seconds": 50.0, "train_seconds": 60.0, "epochs": epochs,
            "epochs_trained": trained, "kept_epoch": kept, "trainable": 1000, "head": "keep", "val_before": 0.8,
            "val_after": 0.85, "test": {"mean_dsc": dsc, "mean_nsd": dsc, "classes": classes, "n": 4}}  # fmt: skip


def test_page_from_a_record(tmp_path):
    record = {"command": "python -m benchmarks.site_start run", "date": "today", "seconds": 120.0,
              "machine": {"cpu_model": "cpu", "logical_cores": 2, "torch": "2", "monai": "1", "gpu": None},
              "rows": [{"name": "real_expert", "description": "expert", "source": "e",
                        "runs": [_run(s, 0.86 + 0.002 * s, 100, 70 + s, 50 + s) for s in range(3)]},
                       {"name": "scratch", "description": "scratch", "source": "e",
                        "runs": [_run(s, 0.85 + 0.001 * s, 240, 240, 150) for s in range(3)]}],
              "before": {"real_expert": {"mean_dsc": 0.83, "mean_nsd": 0.87}},
              "defaults": {"epochs": 100, "val_interval": 1, "early_stop_patience": 20, "seed": 0},
              "split": {"file": "split.json", "training": 50, "validation": 20, "test": 4,
                        "info": {"seed": 0, "excluded_cases": 60}},
              "real_datalist": "runs/real_regions/data/full_40.json", "classes": ["anterior", "posterior"]}  # fmt: skip
    (tmp_path / "page.json").write_text(json.dumps(record))
    site_start.report(str(tmp_path / "page.json"), str(tmp_path / "page.md"))
    text = (tmp_path / "page.md").read_text()
    assert "| 100 (70 / 50, 71 / 51, 72 / 52) |" in text  # early stopping visible: trained below the ceiling
    assert "real_expert vs scratch: +1.10 DSC points" in text and ": above." in text
    assert "- real_expert: DSC 83.0, NSD 87.0" in text and "early_stop_patience 20" in text and "seed 0;" not in text


def test_missing_real_data_expert_says_which_command_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="benchmarks.real_regions run"):
        site_start.real_expert_bundle(tmp_path)


def test_reuse_by_recorded_settings(tmp_path):
    out = tmp_path / "scratch_seed0"
    (out / "docs").mkdir(parents=True)
    recorded = {"epochs": 240, "val_interval": 10, "batch_size": 4, "learning_rate": 0.001, "weight_decay": 1e-05,
                "seed": 0, "val_split": 0.2}  # written before early stopping existed: it trained every epoch
    (out / "docs" / "finetune_summary.json").write_text(json.dumps({"train_settings": recorded, "init": "scratch"}))
    stamp = tmp_path / "scratch_seed0.bench_row.json"
    stamp.write_text(json.dumps({"settings": {"extra": [], "split": "s", "source": "w"}, "seconds": 1.0}))
    extra = ["--init", "scratch", "--epochs", "240", "--val_interval", "10", "--early_stop_patience", "0"]
    settings = {"train": site_start._effective(extra, 0), "init": "scratch", "split": "s", "source": "w"}
    site_start._adopt(out, settings)
    assert json.loads(stamp.read_text())["settings"] == settings
    other = {**settings, "train": site_start._effective(extra[:6], 0)}  # the default patience: not what it ran
    site_start._adopt(out, other)
    assert json.loads(stamp.read_text())["settings"] == settings
