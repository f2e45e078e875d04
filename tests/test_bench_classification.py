# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""benchmarks/classification.py without training: argument checks, the run plan (rd rows' own exports, the CKA
ablation, the leave-one-task-out teachers cached once per task, every row's carved validation split), the carved
datalist, and the results page from a fake record set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import classification as bench
from benchmarks.common import carve_validation_datalist

TASKS = ["adrenalmnist3d", "vesselmnist3d"]


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown rows"):
        bench.run(rows="rd,nope", work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="val_fraction"):
        bench.run(rows="rd", val_fraction=1.0, work_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="MedMNIST files not found"):
        bench.run(rows="rd", data_dir=str(tmp_path / "none"), work_dir=str(tmp_path))


def test_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "_datalists", lambda work, data, budget, loto, teacher_data=None: {
        "both": "both.json", **{f"without_{t}": f"without_{t}.json" for t in loto}})  # fmt: skip
    data = {t: f"{t}.npz" for t in TASKS}
    budget = {"epochs": 1, "foundation_epochs": 1, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": 4,
              "val_fraction": 0.2}  # fmt: skip
    plan = bench._runs(["rd", "rd_no_cka", "rd_loto", "reprogram_loto"], [0, 1], tmp_path, data, budget)
    loto = [r for r in plan if r["row"] == "foundation_loto"]
    assert sorted(r["task"] for r in loto) == TASKS  # once per target task, not per seed
    for r in loto:
        assert r["overrides"]["exclude_tasks"] == [r["task"]] and r["overrides"]["datalist"] == f"without_{r['task']}.json"
    by = {(r["row"], r["seed"], r["task"]): r for r in plan}
    for seed in (0, 1):
        for t in TASKS:
            ov = by[("rd_loto", seed, t)]["overrides"]
            assert ov["leave_task_out"] is True and ov["teacher_path"] == str(tmp_path / f"foundation_without_{t}")
            assert by[("rd_loto", seed, t)]["after"] == f"without_{t}"
            cache = by[("reprogram_loto", seed, t)]["overrides"]["teacher_feature_cache"]
            assert cache.startswith(str(tmp_path / f"foundation_without_{t}"))
            assert by[("rd_no_cka", seed, t)]["overrides"]["gamma"] == 0.0
            rd = by[("rd", seed, t)]
            # one teacher, trained once, for every seed
            assert "gamma" not in rd["overrides"] and rd["overrides"]["teacher_path"] == str(tmp_path / "foundation")
            assert rd["overrides"]["verify_export"] is False and rd["after"] == "foundation"
    assert [r["dir"] for r in plan if r["row"] == "foundation"] == [str(tmp_path / "foundation")]
    teachers = ("foundation", "foundation_loto")
    for r in plan:  # no augmentation anywhere by default
        assert r["overrides"]["train#random_transforms"] == []
    augmented = bench._runs(["rd", "rd_loto"], [0], tmp_path, data, {**budget, "teacher_augmentation": True})
    for r in augmented:  # --teacher_augmentation: the teachers keep their bundle's own transforms, no student does
        assert ("train#random_transforms" in r["overrides"]) == (r["row"] not in teachers), r["row"]
    for r in plan:  # every run selects its model on its own carved split, validated after every epoch
        assert r["overrides"]["val_interval"] == 1 and r["overrides"]["datalist"].endswith(".json")
    # scoring reads the shipped val split: the carved datalist override is dropped
    parser = bench._parser(by[("rd", 0, TASKS[0])], shipped_val=True)
    assert parser["datalist"] != "both.json" and bench._parser(by[("rd", 0, TASKS[0])])["datalist"] == "both.json"


def test_lr_grid_plan_and_choice(tmp_path, monkeypatch):
    """The first seed trains every row at each LR factor of the bundle's own rate; the best carved-split key metric
    picks the factor every seed trains; early stopping reaches every run."""
    monkeypatch.setattr(bench, "_datalists", lambda work, data, budget, loto, teacher_data=None: {"both": "both.json"})
    data = {t: f"{t}.npz" for t in TASKS}
    budget = {"epochs": 9, "foundation_epochs": 9, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": 4,
              "val_fraction": 0.2, "patience": 3, "lr_factors": [0.5, 2.0]}  # fmt: skip
    grid = bench._runs(["rd", "lorkd"], [0, 1], tmp_path, data, budget)
    rows = [r for r in grid if r["key"] is None]
    assert {r["seed"] for r in rows} == {0}  # the other seeds wait for the choice
    assert all(r["overrides"]["early_stop_patience"] == 3 for r in grid)
    rd0 = {r["lr_factor"]: r for r in rows if r["group"] == f"rd_{TASKS[0]}"}
    assert sorted(rd0) == [0.5, 2.0] and rd0[0.5]["dir"] != rd0[2.0]["dir"]
    assert rd0[2.0]["overrides"]["learning_rate"] == pytest.approx(4 * rd0[0.5]["overrides"]["learning_rate"])
    assert rd0[0.5]["overrides"]["learning_rate"] == pytest.approx(0.5 * bench._bundle_lr(rd0[0.5]["configs"]))
    auc = {0.5: 0.61, 2.0: 0.72}  # the carved-split key metric each run's training summary records
    for r in rows:
        (Path(r["dir"]) / "models").mkdir(parents=True)
        best = auc[r["lr_factor"]] if r["group"].startswith("rd") else 1 - auc[r["lr_factor"]]
        (Path(r["dir"]) / "models" / "training_summary.json").write_text(json.dumps({"best_metric": best}))
    choice = bench._choose_lr(grid)
    assert choice[f"rd_{TASKS[0]}"]["factor"] == 2.0 and choice["lorkd"]["factor"] == 0.5
    final = bench._runs(["rd", "lorkd"], [0, 1], tmp_path, data, budget, {g: c["factor"] for g, c in choice.items()})
    by = {(r["group"], r["seed"]): r for r in final if r["key"] is None}
    assert len(by) == 2 * (len(TASKS) + 1)  # one run per group and seed
    assert by[("lorkd", 1)]["lr_factor"] == 0.5 and by[(f"rd_{TASKS[1]}", 1)]["lr_factor"] == 2.0
    assert by[("lorkd", 0)]["dir"] == next(r["dir"] for r in rows if r["group"] == "lorkd" and r["lr_factor"] == 0.5)


def test_carve_validation_datalist(tmp_path):
    items = [{"image": f"img{i}.npz", "task": t, "label": i % 2} for t in TASKS for i in range(20)]
    shipped = [{"image": "val.npz", "task": TASKS[0], "label": 0}]
    src = tmp_path / "src.json"
    src.write_text(json.dumps({"tasks": [], "training": items, "validation": shipped}))
    out = json.loads(carve_validation_datalist(src, tmp_path / "carved.json", 0.2).read_text())
    train, val = out["training"], out["validation"]
    assert len(train) + len(val) == len(items) and len(val) == 8  # 2 per (task, label) of 10
    key = lambda i: (i["task"], i["image"])  # noqa: E731
    assert not {key(i) for i in train} & {key(i) for i in val}
    assert {(i["task"], i["label"]) for i in val} == {(t, c) for t in TASKS for c in (0, 1)}
    assert all(Path(i["image"]).is_absolute() for i in train + val)
    assert out["shipped_validation"][0]["image"] == str(tmp_path / "val.npz")
    again = json.loads(carve_validation_datalist(src, tmp_path / "carved2.json", 0.2).read_text())
    assert again["validation"] == val  # one fixed draw for every row and seed
    with pytest.raises(ValueError, match="fraction"):
        carve_validation_datalist(src, tmp_path / "x.json", 0.0)


def _scores(auc: float, ba: float) -> dict:
    return {"n": 10, "auc": auc, "balanced_accuracy": ba, "f1": 0.5, "accuracy": 0.7, "majority_accuracy": 0.75,
            "majority_balanced_accuracy": 0.5, "verdict": "working" if ba > 0.55 else "not working"}  # fmt: skip


def test_write_results(tmp_path):
    machine = {"cpu_model": "cpu", "usable_cores": 2, "logical_cores": 2, "torch": "2", "torch_threads": 1, "gpu": None,
               "glibc_tunables": "x", "load_average_1min": 1.0}  # fmt: skip
    records = []
    for seed, ba in ((0, 0.7), (1, 0.5)):
        records.append({"row": "foundation", "seed": seed, "task": None, "seconds": 60, "bundle_scores": {},
                        "scores": {t: _scores(0.8, 0.8) for t in TASKS}, "train_params": 1e6, "deploy_params": 1e6,
                        "deploy_flops": 1e7})  # fmt: skip
        for t in TASKS:  # rd: the exported bundle's scores are the ones reported
            decision = {"rule": "threshold", "threshold": 0.2 + seed / 10}
            records.append({"row": "rd_loto", "seed": seed, "task": t, "seconds": 30,
                            "scores": {t: {**_scores(0.123, 0.123), "decision": {"threshold": 0.21 + seed / 10}}},
                            "argmax_scores": {t: _scores(0.123, 0.5 + seed / 100)},
                            "bundle_scores": {t: {**_scores(0.6 + seed / 10, ba), "decision": decision}},
                            "train_params": 1e5, "deploy_params": 1e5, "deploy_flops": 1e6})  # fmt: skip
    meta = {"command": "python -m benchmarks.classification run --rows rd_loto", "date": "now", "seconds": 90,
            "seeds": [0, 1], "tasks": TASKS, "data_dir": "d", "load_start": 1.0, "machine": machine, "work_dir": "w",
            "latency_repeats": 2, "jobs": 1, "budget": {"epochs": 1, "foundation_epochs": 1, "lorkd_warmup_epochs": 0,
                                                         "batch_size": 2, "limit": 4, "val_fraction": 0.2}}  # fmt: skip
    text = bench.write_results(tmp_path / "r.md", {"meta": meta, "records": records, "rows": ["foundation", "rd_loto"]})
    assert (tmp_path / "r.md").read_text() == text
    assert f"{TASKS[0]}: AUC | bal. acc. (majority 0.500) | F1 | accuracy (majority 0.750) | verdict" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {bench.ROWS['rd_loto'].description} |"))
    assert "0.650 ± 0.050" in row and "0.123" not in row  # the bundle scores, mean ± std over seeds
    assert row.count("working 1/2") == 2 and "**0.650 ± 0.050**" in row
    assert "carved from train" in text and "foundation_without_<task>" in text and "--exclude_tasks" in text
    # the decision section: the bundles' thresholds (mean ± std), the argmax balanced accuracy next to the threshold's
    row = next(line for line in text.split("## Decision threshold")[1].splitlines() if line.startswith(f"| {bench.ROWS['rd_loto'].description} |"))
    assert row.count("0.250 ± 0.050") == 2 and row.count("0.505 ± 0.005") == 2 and row.count("0.600 ± 0.100") == 2
    assert "largest difference between the decision threshold the export wrote into the bundle and the one chosen in-process on the same carved split: 1.00e-02" in " ".join(text.split())
    assert "## Screening point" not in text  # records scored before the screening point: no section
    for r in records:  # then: each run's shipped-val sensitivity and specificity at its carved-split screening threshold
        for t, v in r["scores"].items():
            v["screening"] = {"threshold": 0.1, "sensitivity": 0.8 + r["seed"] / 10, "specificity": 0.5}
    text = bench.write_results(tmp_path / "r.md", {"meta": meta, "records": records, "rows": ["foundation", "rd_loto"]})
    row = next(line for line in text.split("## Screening point")[1].splitlines() if line.startswith(f"| {bench.ROWS['rd_loto'].description} |"))
    assert row.count("0.850 ± 0.050 | 0.500 ± 0.000") == 2
    (tmp_path / "r.json").write_text(json.dumps({"meta": meta, "records": records, "rows": ["foundation", "rd_loto"]}))
    (tmp_path / "notes.md").write_text("What the numbers say:\n\n- the teacher is no better.\n")
    bench.report(str(tmp_path / "r.md"), notes=str(tmp_path / "notes.md"))
    (tmp_path / "notes.md").unlink()  # stored in the JSON: a later report keeps them
    bench.report(str(tmp_path / "r.md"))
    assert "> - the teacher is no better." in (tmp_path / "r.md").read_text()


def test_verdict_cell():
    from benchmarks.common import verdict_cell

    assert verdict_cell(["working", "working"]) == "working"
    assert verdict_cell(["not working", "not working"]) == "not working"
    assert verdict_cell(["working", "not working", "working"]) == "working 2/3" and verdict_cell([]) == "-"


def test_best_on_validation_skips_runs_without_a_score():
    from benchmarks.common import best_on_validation

    assert best_on_validation({"0.001": 0.61, "0.003": 0.64, "0.01": float("nan")}) == "0.003"
    assert best_on_validation({1e-3: None, 3e-3: 0.2}) == 3e-3  # never validated: the lowest
    assert best_on_validation({"a": 0.5, "b": 0.5}) == "a"  # ties: the first key
    with pytest.raises(ValueError, match="no scores"):
        best_on_validation({})


def test_an_interrupted_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """A run killed after a training-state checkpoint continues from it (same settings), its log appended; other
    settings never continue it (the stale checkpoint is removed), and a complete run is reused."""
    import benchmarks.common as common

    config = tmp_path / "train.json"
    config.write_text("{}")
    calls = []

    def fake_run(cmd, log, cwd=None, append=False, **_):
        calls.append((cmd, append))
        models = tmp_path / "run" / "models"
        if len(calls) == 1:  # killed after epoch 3
            (models / "train_state_checkpoint_epoch=3.pt").write_bytes(b"state")
            raise RuntimeError("killed")
        (models / "model.pt").write_bytes(b"model")
        (models / "training_summary.json").write_text(json.dumps({"epochs": 9, "best_metric_epoch": 7}))
        return 1.0

    monkeypatch.setattr(common, "run_logged", fake_run)
    run = {"dir": str(tmp_path / "run"), "overrides": {"epochs": 9}, "teacher": False, "configs": [str(config)],
           "seed": 0}  # fmt: skip
    with pytest.raises(RuntimeError, match="killed"):
        bench._train(run, reuse=True)
    assert "--resume_from" not in calls[0][0] and not calls[0][1]
    record, reused = bench._train(run, reuse=True)
    cmd, append = calls[1]
    assert cmd[cmd.index("--resume_from") + 1].endswith("train_state_checkpoint_epoch=3.pt") and append
    assert not reused and record["epochs_trained"] == 9
    assert bench._train(run, reuse=True)[1] and len(calls) == 2  # complete: reused, not trained again
    (tmp_path / "run" / "models" / "train_state_checkpoint_epoch=3.pt").write_bytes(b"state")
    bench._train({**run, "overrides": {"epochs": 12}}, reuse=True)  # other settings: from the start
    assert "--resume_from" not in calls[2][0] and not calls[2][1]
    assert not list((tmp_path / "run" / "models").glob("train_state_checkpoint_epoch=*.pt"))


def test_training_curves_from_the_runs_event_files(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    def run(name, task, aucs):
        w = SummaryWriter(log_dir=str(tmp_path / name / "runs"))
        for t in ([task] if task else TASKS):
            for epoch, v in enumerate(aucs, start=1):
                w.add_scalar(f"auc/{t}", v, epoch)
        w.close()
        return {"row": name.split("_")[0], "seed": 0, "task": task, "dir": str(tmp_path / name)}

    records = [run("foundation", None, [0.7, 0.9, 0.85]), *[run(f"scratch_{t}", t, [0.6, 0.8]) for t in TASKS],
               {"row": "scratch", "seed": 1, "task": TASKS[0], "dir": str(tmp_path / "absent")}]  # other seeds: not drawn
    curves = bench._curves(records, TASKS, tmp_path / "figures" / "c.png")
    assert (tmp_path / "figures" / "c.png").is_file()
    assert set(curves["curves"]) == set(TASKS) and set(curves["curves"][TASKS[1]]) == {"foundation", "scratch"}
    assert [p[0] for p in curves["curves"][TASKS[0]]["foundation"]] == [1, 2, 3]
    lines = bench._curve_lines(curves, ["foundation", "scratch", "rd"])
    row = next(line for line in lines if line.startswith(f"| {TASKS[0]} |"))
    assert "0.900 (epoch 2 of 3)" in row and "0.800 (epoch 2 of 2)" in row and row.endswith("| - |")  # rd: no run


def test_rows_are_queued_as_soon_as_their_own_teacher_is_done():
    import threading

    slow_release, order = threading.Event(), []

    def fake_train(run, reuse):
        if run.get("key") == "slow":
            assert slow_release.wait(10), "a row of the fast teacher never ran while the slow teacher trained"
        if run["dir"] == "fast_row":
            slow_release.set()  # with 2 workers this runs only if no worker blocks on the slow teacher
        order.append(run["dir"])
        return {"dir": run["dir"]}, False

    plan = [{"key": "slow", "dir": "slow", "after": None}, {"key": "fast", "dir": "fast", "after": None},
            {"key": None, "dir": "slow_row", "after": "slow"}, {"key": None, "dir": "fast_row", "after": "fast"}]
    out = bench._train_all(plan, True, jobs=2, train=fake_train)
    assert [o[0]["dir"] for o in out] == ["slow", "fast", "slow_row", "fast_row"]  # results in plan order
    assert order.index("fast_row") < order.index("slow") < order.index("slow_row")

    def failing(run, reuse):
        if run["key"] == "fast":
            raise RuntimeError("teacher failed")
        return {"dir": run["dir"]}, False

    with pytest.raises(RuntimeError, match="teacher failed"):
        bench._train_all(plan, True, jobs=2, train=failing)


def test_augmented_rows(tmp_path, monkeypatch):
    """The ``*_aug`` rows keep their bundle's random transforms and run the teacher online (no feature cache, which
    holds features of un-augmented inputs); the reading compares them with the augmented student from scratch."""
    monkeypatch.setattr(bench, "_datalists", lambda work, data, budget, loto, teacher_data=None: {"both": "both.json"})
    data = {t: f"{t}.npz" for t in TASKS}
    budget = {"epochs": 1, "foundation_epochs": 1, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": 4,
              "val_fraction": 0.2}  # fmt: skip
    plan = bench._runs(["logit_kd", "scratch_aug", "lorkd_aug", "logit_kd_aug", "rd_aug", "stl_kd_aug"], [0], tmp_path,
                       data, budget)  # fmt: skip
    assert next(r for r in plan if r["row"] == "lorkd_aug")["overrides"]["warmup_epochs"] == 0  # as the lorkd row
    for r in (r for r in plan if r["key"] is None):
        ov, augmented = r["overrides"], r["row"].endswith("_aug")
        assert ("train#random_transforms" in ov) != augmented, r["row"]
        assert ov.get("cache_teacher_features", False) != augmented or r["row"] == "scratch_aug", r["row"]
        assert "teacher_feature_cache" not in ov or not augmented
        assert r["teacher"] == (r["row"] != "scratch_aug")  # its reuse stamp follows the teacher's weights
    auc = {("scratch", t): [0.80, 0.81, 0.82] for t in TASKS}
    auc.update({("scratch_aug", t): [0.70, 0.71, 0.72] for t in TASKS})
    auc.update({("logit_kd", t): [0.75, 0.76, 0.77] for t in TASKS})  # below scratch, above scratch_aug
    auc.update({("logit_kd_aug", t): [0.90, 0.91, 0.92] for t in TASKS})
    text = "\n".join(bench._reading(["scratch", "logit_kd", "scratch_aug", "logit_kd_aug"], TASKS,
                                    lambda row, t: auc[(row, t)]))  # fmt: skip
    against = {ref: next(line for line in text.splitlines() if line.startswith(f"- {TASKS[0]}, against "
                                                                                f"{bench.ROWS[ref].description}:"))
               for ref in ("scratch", "scratch_aug")}  # fmt: skip
    assert "below: logit-KD student (-0.050)" in against["scratch"] and "augmented" not in against["scratch"]
    assert "above: logit-KD student, augmented (online teacher) (+0.200)" in against["scratch_aug"]
    assert "logit-KD student (" not in against["scratch_aug"]


def test_lr_choice_on_the_mean_over_seeds(tmp_path, monkeypatch):
    """``lr_choice_seeds`` 2: the first two seeds train the grid and the factor is chosen on their mean carved-split
    AUC (seed 0 alone would pick the other factor); seed 2 waits for the choice."""
    monkeypatch.setattr(bench, "_datalists", lambda work, data, budget, loto, teacher_data=None: {"both": "both.json"})
    data = {t: f"{t}.npz" for t in TASKS}
    budget = {"epochs": 9, "foundation_epochs": 9, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": 4,
              "val_fraction": 0.2, "patience": 3, "lr_factors": [0.5, 2.0], "lr_choice_seeds": 2}  # fmt: skip
    grid = [r for r in bench._runs(["rd"], [0, 1, 2], tmp_path, data, budget) if r["key"] is None]
    assert sorted({r["seed"] for r in grid}) == [0, 1] and len(grid) == 2 * 2 * len(TASKS)
    auc = {(0.5, 0): 0.70, (2.0, 0): 0.71, (0.5, 1): 0.70, (2.0, 1): 0.60}
    for r in grid:
        (Path(r["dir"]) / "models").mkdir(parents=True)
        summary = {"best_metric": auc[(r["lr_factor"], r["seed"])]}
        (Path(r["dir"]) / "models" / "training_summary.json").write_text(json.dumps(summary))
    choice = bench._choose_lr(grid)[f"rd_{TASKS[0]}"]
    assert choice["factor"] == 0.5 and choice["grid"] == {"0.5": pytest.approx(0.70), "2": pytest.approx(0.655)}


def test_few_label_rows(tmp_path, monkeypatch):
    """The ``*_few`` rows train on one fixed stratified quarter of the carved training cases (validated on the whole
    carved split, teacher the foundation trained on every case) and are read against the student from scratch on
    the same cases."""
    items = [{"image": f"img{i}.npz", "task": t, "label": int(i < 8)} for t in TASKS for i in range(40)]
    src = tmp_path / "both_src.json"
    src.write_text(json.dumps({"tasks": [], "training": items, "validation": []}))
    both = carve_validation_datalist(src, tmp_path / "both.json", 0.2)
    monkeypatch.setattr(bench, "_datalists", lambda work, data, budget, loto, teacher_data=None: {"both": str(both)})
    data = {t: f"{t}.npz" for t in TASKS}
    budget = {"epochs": 1, "foundation_epochs": 1, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": 4,
              "val_fraction": 0.2}  # fmt: skip
    plan = bench._runs(["scratch", "scratch_few", "rd_few", "lorkd_few", "logit_kd_aug_few"], [0, 1], tmp_path, data,
                       budget)  # fmt: skip
    lists = {r["row"]: r["overrides"]["datalist"] for r in plan}
    assert lists["scratch"] == lists["foundation"] == str(both)
    assert len({lists[r] for r in ("scratch_few", "rd_few", "lorkd_few", "logit_kd_aug_few")}) == 1
    full, few = json.loads(both.read_text()), json.loads(Path(lists["rd_few"]).read_text())
    assert few["validation"] == full["validation"]  # the same carved split selects every row
    key = lambda i: (i["task"], i["image"])  # noqa: E731
    assert {key(i) for i in few["training"]} < {key(i) for i in full["training"]}
    for t in TASKS:  # a quarter of each task's cases per label: 26 negatives and 6 positives carved -> 6 + 2 (rounded)
        labels = [i["label"] for i in few["training"] if i["task"] == t]
        assert (labels.count(0), labels.count(1)) == (6, 2)
    rd = next(r for r in plan if r["row"] == "rd_few")
    assert rd["overrides"]["teacher_path"] == str(tmp_path / "foundation") and rd["after"] == "foundation"
    assert "rd_few" in bench.EXPORTED_ROWS and "lorkd_few" in bench.LORKD_ROWS and "logit_kd_few" not in bench.EXPORTED_ROWS
    auc = {("scratch", t): [0.80, 0.81, 0.82] for t in TASKS}
    auc.update({("scratch_few", t): [0.60, 0.61, 0.62] for t in TASKS})
    auc.update({("rd_few", t): [0.75, 0.76, 0.77] for t in TASKS})  # below the full-data scratch, above scratch_few
    text = "\n".join(bench._reading(["scratch", "scratch_few", "rd_few"], TASKS, lambda row, t: auc[(row, t)]))
    against = {ref: next(line for line in text.splitlines() if line.startswith(f"- {TASKS[0]}, against "
                                                                                f"{bench.ROWS[ref].description}:"))
               for ref in ("scratch", "scratch_few")}  # fmt: skip
    few_rd = bench.ROWS["rd_few"].description
    assert few_rd == "RD student (deployed; exported bundle), 25% of the cases" and few_rd not in against["scratch"]
    assert f"above: {few_rd} (+0.150)" in against["scratch_few"]
    assert bench.ROWS["rd_few"]._replace(description="", train_fraction=1.0) == bench.ROWS["rd"]._replace(description="")
    second = bench._runs(["rd_few", "rd_few2", "scratch_few2", "rd_few3", "logit_kd_few4"], [0], tmp_path, data, budget)
    lists2 = {r["row"]: r["overrides"]["datalist"] for r in second}
    assert lists2["rd_few"] == lists["rd_few"] and lists2["rd_few2"] == lists2["scratch_few2"] != lists["rd_few"]
    assert len({lists2[r] for r in ("rd_few", "rd_few2", "rd_few3", "logit_kd_few4")}) == 4  # four independent draws
    assert bench._scratch_of("logit_kd_few4") == "scratch_few4" and bench.ROWS["rd_few3"].description.endswith("(draw 2)")
    per_seed = {("scratch_few3", t): {0: 0.70, 1: 0.80, 2: 0.75} for t in TASKS}  # seed-paired description
    per_seed.update({("rd_few3", t): {0: 0.72, 1: 0.79, 2: 0.80} for t in TASKS})
    lines = bench._per_seed_lines(["foundation", "scratch_few3", "rd_few3"], TASKS, lambda row, t: per_seed[(row, t)])
    rd3 = bench.ROWS["rd_few3"].description
    assert f"- {TASKS[0]}, {rd3}: above on 2 of 3 seeds, mean difference +0.020 " \
           "(from -0.010 to +0.050)." in lines
    assert len([x for x in lines if x.startswith("- ")]) == len(TASKS)  # neither the foundation nor scratch itself
    assert bench._per_seed_lines(["scratch_few3", "rd_few"], TASKS, lambda row, t: per_seed[(row, t)]) == []
    other = json.loads(Path(lists2["rd_few2"]).read_text())  # a second, independent draw of the same size per label
    assert other["validation"] == full["validation"] and other["training"] != few["training"]
    assert sorted((i["task"], i["label"]) for i in other["training"]) == sorted((i["task"], i["label"]) for i in few["training"])
    assert bench._scratch_of("rd_few2") == "scratch_few2" and bench._scratch_of("rd_few") == "scratch_few"
    assert bench._title_suffix(["foundation", "scratch_few", "rd_few"]) == ", few labels (25% of the training cases)"
    assert bench._title_suffix(["foundation", "scratch", "rd_few"]) == ""  # a mixed page keeps the plain title


def test_teacher_at_its_own_resolution(tmp_path, monkeypatch):
    """--teacher_resolution 64: the foundation trains on the 64^3 files (stride-2 stem) on the same carved cases, the
    distilling rows' teacher reads them, the student from scratch does not; rows or tasks that cannot are refused."""
    monkeypatch.setattr(bench, "_datalists", lambda work, data, budget, loto, teacher_data=None: {
        "both": "both.json", **({"teacher": "teacher.json"} if teacher_data else {})})  # fmt: skip
    data = {"adrenalmnist3d": "a28.npz"}
    budget = {"epochs": 1, "foundation_epochs": 1, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": 4,
              "val_fraction": 0.2, "teacher_resolution": 64}  # fmt: skip
    plan = bench._runs(["scratch", "rd", "logit_kd", "lorkd", "stl"], [0], tmp_path, data, budget,
                       teacher_data={"adrenalmnist3d": "a64.npz"})  # fmt: skip
    by = {r["row"]: r["overrides"] for r in plan}
    assert by["foundation"]["real_tasks"] == {"adrenalmnist3d": "a64.npz"} and by["foundation"]["datalist"] == "teacher.json"
    assert by["foundation"]["spatial_size"] == [64] * 3 and by["foundation"]["network_config#conv1_t_stride"] == 2
    for row in ("rd", "logit_kd", "lorkd"):
        assert by[row]["teacher_images"] == {"adrenalmnist3d": "a64.npz"} and by[row]["teacher_spatial_size"] == [64] * 3
        assert by[row]["datalist"] == "both.json" and by[row]["cache_teacher_features"] is True
    assert "teacher_images" not in by["scratch"] and "teacher_images" not in by["stl"]
    with pytest.raises(ValueError, match="rows \\['lorkd_aug', 'rd_aug', 'rd_loto'\\] cannot"):
        bench._teacher_files("../shared/data", ["adrenalmnist3d"], ["foundation", "rd", "lorkd", "lorkd_aug", "rd_aug",
                                                                   "rd_loto"], 64)  # fmt: skip
    with pytest.raises(ValueError, match="need one each"):
        bench._teacher_files("../shared/data", ["adrenalmnist3d", "vesselmnist3d"], ["rd"], 64)
    with pytest.raises(ValueError, match="tasks must be among"):
        bench.run(rows="rd", tasks="nope", work_dir=str(tmp_path))


def test_teacher_datalist_holds_the_students_cases(tmp_path):
    """The foundation's 64^3 datalist is carved into exactly the students' cases; other cases are refused."""
    import numpy as np

    def npz(path, labels, size):
        n = len(labels)
        np.savez(path, train_images=np.zeros((n, size, size, size), np.uint8), train_labels=np.asarray(labels)[:, None],
                 val_images=np.zeros((2, size, size, size), np.uint8), val_labels=np.asarray([[0], [1]]))  # fmt: skip
        return str(path)

    labels = [0, 1] * 10
    budget = {"limit": None, "val_fraction": 0.2}
    lists = bench._datalists(tmp_path, {"adrenalmnist3d": npz(tmp_path / "a28.npz", labels, 4)}, budget, [],
                             {"adrenalmnist3d": npz(tmp_path / "a64.npz", labels, 8)})  # fmt: skip
    both, teacher = (json.loads(Path(lists[k]).read_text()) for k in ("both", "teacher"))
    assert [(i["index"], i["label"]) for i in both["validation"]] == [(i["index"], i["label"]) for i in teacher["validation"]]
    assert all(i["image"].endswith("a64.npz") for i in teacher["training"])
    with pytest.raises(ValueError, match="do not hold the cases"):
        bench._datalists(tmp_path / "other", {"adrenalmnist3d": npz(tmp_path / "a28.npz", labels, 4)}, budget, [],
                         {"adrenalmnist3d": npz(tmp_path / "b64.npz", labels[::-1], 8)})  # fmt: skip


def test_page_of_one_task_with_a_teacher_at_64(tmp_path):
    machine = {"cpu_model": "cpu", "usable_cores": 2, "logical_cores": 2, "torch": "2", "torch_threads": 1, "gpu": None,
               "glibc_tunables": "x", "load_average_1min": 1.0}  # fmt: skip
    t = "adrenalmnist3d"
    records = [{"row": "foundation", "seed": 0, "task": None, "seconds": 60, "bundle_scores": {}, "train_params": 1e6,
                "deploy_params": 1e6, "deploy_flops": 1e7, "scores": {t: _scores(0.9, 0.8)}}]  # fmt: skip
    for seed in (0, 1):
        records.append({"row": "logit_kd", "seed": seed, "task": t, "seconds": 30, "bundle_scores": {}, "train_params": 1e5,
                        "deploy_params": 1e5, "deploy_flops": 1e6, "scores": {t: _scores(0.8, 0.7)}})  # fmt: skip
    meta = {"command": "c", "date": "now", "seconds": 90, "seeds": [0, 1], "tasks": [t], "data_dir": "d", "load_start": 1.0,
            "machine": machine, "work_dir": "w", "latency_repeats": 2, "jobs": 1,
            "budget": {"epochs": 1, "foundation_epochs": 1, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": None,
                       "val_fraction": 0.2, "teacher_resolution": 64}}  # fmt: skip
    text = bench.write_results(tmp_path / "r.md", {"meta": meta, "records": records, "rows": ["foundation", "logit_kd"]})
    assert text.startswith("# Results: 3D classification (AdrenalMNIST3D), teacher at 64^3")
    assert "| foundation at 64^3 (AdrenalMNIST3D only) | 0.900 |" in text and "both tasks" not in text
    assert "adrenalmnist3d/adrenalmnist3d_64.npz" in text and "vesselmnist3d" not in text


def test_ensemble_teacher_plan_schedule_and_build(tmp_path, monkeypatch):
    """``--teacher_ensemble 3``: three foundations differing only in their seed (member 0 is the single foundation's
    folder), the teacher built from them once all three are trained, the rows distilling from it; the build is
    reused while the members' weights are unchanged and its time is theirs."""
    import torch
    from monai.bundle import ConfigParser

    from medfm_ops.data import TaskTable
    from medfm_ops.networks import EnsembleClassifier
    from medfm_ops.networks.spec import instantiate, save_network_spec

    monkeypatch.setattr(bench, "_datalists", lambda work, data, budget, loto, teacher_data=None: {"both": "both.json"})
    data = {t: f"{t}.npz" for t in TASKS}
    budget = {"epochs": 1, "foundation_epochs": 1, "lorkd_warmup_epochs": 0, "batch_size": 2, "limit": 4,
              "val_fraction": 0.2, "teacher_ensemble": 3, "foundation_overrides": {"network_config#layers": [1, 1, 1, 1]}}  # fmt: skip
    plan = bench._runs(["scratch", "logit_kd"], [0], tmp_path, data, budget)
    members = [r for r in plan if r["row"] == "foundation_member"]
    assert [(r["overrides"]["seed"], Path(r["dir"]).name) for r in members] == [
        (0, "foundation"), (1, "foundation_seed1"), (2, "foundation_seed2")]  # fmt: skip
    assert all(r["overrides"]["network_config#layers"] == [1, 1, 1, 1] for r in members)
    teacher = next(r for r in plan if r["row"] == "foundation")
    assert teacher["after"] == ["member0", "member1", "member2"] and teacher["dir"] == str(tmp_path / "foundation_ensemble3")
    assert teacher["ensemble"] == [r["dir"] for r in members]
    kd = next(r for r in plan if r["row"] == "logit_kd")
    assert kd["after"] == "foundation" and kd["overrides"]["teacher_path"] == teacher["dir"]
    assert kd["overrides"]["teacher_feature_cache"] == str(tmp_path / "foundation_ensemble3" / "teacher_features.pt")

    order = []  # the teacher waits for all of its members, the rows for the teacher

    def fake_train(run, reuse):
        order.append(run["dir"])
        return {"dir": run["dir"]}, False

    bench._train_all(plan, True, jobs=2, train=fake_train)
    first_use = min(order.index(r["dir"]) for r in plan if r["key"] is None)
    assert max(order.index(r["dir"]) for r in members) < order.index(teacher["dir"]) < first_use

    def failing(run, reuse):
        if run.get("member") == 1:
            raise RuntimeError("member 1 failed")
        return {"dir": run["dir"]}, False

    with pytest.raises(RuntimeError, match="member 1 failed"):
        bench._train_all(plan, True, jobs=2, train=failing)

    # the build: three tiny trained members -> one teacher folder, reused until a member's weights change
    net_def = {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
               "block_inplanes": [4, 4, 8, 8], "spatial_dims": 3, "n_input_channels": 1, "num_classes": 2}  # fmt: skip
    table = TaskTable.from_tasks([{"name": "a", "task_id": 0, "labels": {"0": "no", "1": "yes"}}])
    for k, r in enumerate(members):
        torch.manual_seed(k)
        (Path(r["dir"]) / "models").mkdir(parents=True)
        torch.save(instantiate(net_def).state_dict(), Path(r["dir"]) / "models" / "model.pt")
        save_network_spec(Path(r["dir"]) / "models", net_def, table, spatial_size=[8, 8, 8])
        (Path(r["dir"]) / "bench_run.json").write_text(json.dumps({"seconds": 60.0 * (k + 1), "best_epoch": k}))
    record, reused = bench._train(teacher, reuse=True)
    assert not reused and record["seconds"] == 360.0 and [m["best_epoch"] for m in record["members"]] == [0, 1, 2]
    assert bench._train(teacher, reuse=True)[1] is True
    torch.manual_seed(9)
    torch.save(instantiate(net_def).state_dict(), Path(members[2]["dir"]) / "models" / "model.pt")
    assert bench._train(teacher, reuse=True)[1] is False  # a retrained member: a new ensemble
    # what the page's scoring builds from the run's configs: the members' config three times, loading the weights
    config = {"_target_": "medfm_ops.networks.network_config", "target": net_def["_target_"],
              **{k: v for k, v in net_def.items() if k != "_target_"}}  # as foundation_cls's train.json writes it
    parser = ConfigParser({"network_config": config, "network_def": teacher["overrides"]["network_def"]})
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, EnsembleClassifier) and len(net.members) == 3
    net.load_state_dict(torch.load(Path(teacher["dir"]) / "models" / "model.pt", weights_only=True))


def test_screening_point_is_chosen_on_the_carved_split_and_scored_on_the_shipped_split():
    import numpy as np

    class Outputs:  # what _screening_point reads of a classifier_metric: task id -> (probs, labels)
        def __init__(self, p1, labels):
            self.out = {0: (np.stack([1 - np.asarray(p1), np.asarray(p1)], 1), np.asarray(labels))}

        def task_outputs(self):
            return self.out

    carved = Outputs([0.1, 0.2, 0.3, 0.4, 0.35, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99], [0] * 5 + [1] * 7)
    point = bench._screening_point(carved, Outputs([0.1, 0.55, 0.66, 0.3, 0.9], [0, 0, 1, 1, 1]), 0)
    assert point["carved_sensitivity"] >= bench.SCREENING_SENSITIVITY and point["carved_specificity"] == 1.0
    assert 0.4 < point["threshold"] < 0.6  # between the highest negative and the lowest positive of the carved split
    assert point["sensitivity"] == pytest.approx(2 / 3) and point["specificity"] == 0.5  # 0.3 missed, 0.55 a false positive
    assert bench._screening_point(carved, Outputs([0.1, 0.2], [0, 0]), 0) is None  # one class on the shipped split


def test_train_params_count_phi_only_when_the_training_runs_it():
    from monai.networks.nets import ResNet

    from medfm_ops.networks import ReprogrammedStudent

    student = ResNet("basic", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=3, n_input_channels=1, num_classes=2)
    net = ReprogrammedStudent(student, teacher_dim=16)
    phi = sum(p.numel() for p in net.phi.parameters())
    deployed = sum(p.numel() for p in net.export_student().parameters())  # the stock student with g as its head
    assert phi > 0
    assert bench._train_params(net, passes_teacher_features=True) == deployed + phi  # RD trains phi
    assert bench._train_params(net, passes_teacher_features=False) == deployed  # scratch / logit KD never run it
