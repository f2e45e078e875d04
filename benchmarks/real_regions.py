# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""LoRKD segmentation on real data: a foundation over brain MRI (MSD hippocampus) and cardiac MRI (ACDC),
decomposed into real region experts, against the baselines in one harness; writes
``docs/RESULTS_real_regions.md`` + ``.json`` + ``.png``.

    python -m benchmarks.real_regions run [--preset full|smoke] [--seeds 0,1,2] [--rows teacher,stl,mtl,...]
        [--lr_grid 0.001,0.003] [--device cpu|cuda] [--data_root ../shared/data] [--work_dir runs/real_regions]
        [--out docs/RESULTS_real_regions.md] [--jobs 2] [--threads 1]
    python -m benchmarks.real_regions report [--work_dir runs/real_regions] [--out docs/RESULTS_real_regions.md]

What one ``run`` does (every step resumes: a finished run is stored as JSON in its folder and reused while its
settings are unchanged; an interrupted command picks up where it stopped):

1. The datalist of the shipped mapping ``bundles/lorkd_seg/data/real_regions.json`` (``tools/prepare_data.py
   real_regions``; ACDC split by patient, hippocampus by case, seed ``split_seed``), then the preset's subset (the
   first N training cases of each region; validation and test kept whole in ``full``).
2. The teacher: ``foundation_seg`` (train.json + configs/real_regions.json) trained ONCE and reused for every seed
   and row (its own seed is train.json's fixed one).
3. The rows, each ``lorkd_seg`` train.json + real_regions.json + its baseline override: STL (``stl.json``, one
   stock student per region, the same epochs on its region's cases = the LoRKD student's steps on that region),
   MTL (``mtl.json``), MTL-KD (``mtl_kd.json``), LoRKD (train.json), LoRKD* (``lorkd_star.json``), and ``scratch``:
   the stock MONAI UNet of the expert's size from scratch per region, trained by an expert bundle's own
   ``train.json`` (the recipe a site gets; same epochs, the region's cases, no teacher). The learning rate
   of every row is chosen on the VALIDATION split (best ``val_mean_dsc`` of the first seed over ``lr_grid``); the
   other seeds train with it. Nothing is chosen on test. ``--jobs`` runs train at a time, each single-threaded
   (``--threads``; :func:`benchmarks.common.grid_then_seeds`); the teacher trains alone with all the threads.
4. Every model is exported per region as a standalone expert bundle (LoRKD: the fused expert; baselines: the
   stock network with the region's output channels; the teacher: the foundation network the same way) carrying
   the region's preprocessing (spacing, window, intensity), and scored on the region's TEST cases through the
   bundle's own ``inference.json`` (label maps on the input grid), per class: DSC and NSD. NSD tolerance per region
   (``nsd_tolerance_mm``): 1 mm on the 1 mm hippocampus grid; on ACDC 1.5 mm, in mm of the NOMINAL 1.5 x 1.5 x 10 mm
   spacing the files carry (the true spacing is unknown: approximate, as the data README says).
5. The page: per region and class DSC/NSD mean +- std over seeds, train/deploy parameters and GFLOPs (one window),
   wall time per part, machine; the reading under the 2x-spread rule (``benchmarks.learning_curve.compare_over_seeds``).

Presets: ``smoke`` (2 training, 1 validation, 1 test case per region, 1 epoch, one seed, rows teacher/mtl/lorkd (add
``--rows teacher,mtl,lorkd,scratch`` for the scratch row): a few minutes on 2 CPU cores, for checking the harness); ``full`` (40 training cases per region, all validation and
test cases, teacher at most 150 epochs, students and scratch at most 100, validation every 5, each run stopped after 4
validations without a better validation Dice and its best validated model kept, LR grid 1e-3 / 3e-3, seeds 0, 1, 2).
The 3-seed study with 60 / 40 fixed epochs (``--teacher_epochs 60 --epochs 40 --patience 0``) kept its last validated
epochs (not converged): hence the ceilings with early stopping. The page records what ran and how long each part took.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fire

from medfm_ops.bundle import write_expert_bundle
from medfm_ops.data import ensure_mapped_datalist, load_datalist, write_datalist_subset
from medfm_ops.engines import count_flops, count_params
from medfm_ops.finetune.bundle_run import predict_with_bundle
from medfm_ops.finetune.scoring import score_label_maps
from medfm_ops.networks import expert_model_from_spec, export_expert, instantiate, load_expert_state_dict, load_network_spec
from medfm_ops.utils.atomic_io import atomic_write_json, atomic_write_text
from medfm_ops.utils.hashing import file_sha256

from benchmarks.common import child_threads, grid_then_seeds, machine_info, run_logged, split_list
from benchmarks.learning_curve import compare_over_seeds, mean_std
from benchmarks.score_bars import plot_score_bars
from benchmarks.sections import notes_lines, record_with_notes

REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "bundles" / "lorkd_seg" / "data" / "real_regions.json"
#: row name -> (description, lorkd_seg baseline override or None, experts?, deployed as)
ROWS: dict[str, tuple[str, str | None, bool, str]] = {
    "stl": ("STL: one stock student per region, task loss", "stl", False, "one stock network per region"),
    "mtl": ("MTL: one shared stock student (union head), task loss", "mtl", False, "one shared stock network"),
    "mtl_kd": ("MTL-KD: MTL distilled from the teacher", "mtl_kd", False, "one shared stock network"),
    "lorkd": ("LoRKD (lorkd_seg train.json)", None, True, "one fused expert (stock UNet) per region"),
    "lorkd_star": ("LoRKD* (per-region ranks from the warm-up)", "lorkd_star", True,
                   "one fused expert (stock UNet) per region"),
}  # fmt: skip
#: the stock MONAI UNet of the expert's size trained from scratch per region with the exported bundle's own
#: train.json (the recipe a site gets: DiceCE on the region's channels, no teacher), same epochs as the students
SCRATCH = ("scratch", "stock MONAI UNet of the expert's size, from scratch per region, the expert bundle's own "
           "train.json", "one stock network per region")
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"train_cases": 40, "val_cases": None, "test_cases": None, "teacher_epochs": 150, "epochs": 100,
             "val_every": 5, "patience": 4, "warmup_epochs": 2, "lr_grid": [1e-3, 3e-3], "seeds": [0, 1, 2],
             "batch_size": 4, "rows": ["teacher", *ROWS, "scratch"]},
    "smoke": {"train_cases": 2, "val_cases": 1, "test_cases": 1, "teacher_epochs": 1, "epochs": 1, "val_every": 1,
              "patience": 0, "warmup_epochs": 0, "lr_grid": [1e-3], "seeds": [0], "batch_size": 2,
              "rows": ["teacher", "mtl", "lorkd"]},
}  # fmt: skip
NSD_TOLERANCE_MM = {"brain_mri": 1.0, "heart_mri": 1.5}


def _bundle_copy(name: str, dest: Path) -> Path:
    """A copy of ``bundles/<name>`` (configs, data, docs; no models) to train in, so that runs never write into the
    repository and each run's ``models/`` sits in its own bundle root (what the export reads)."""
    if not (dest / "configs").is_dir():
        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(REPO / "bundles" / name, tmp, ignore=shutil.ignore_patterns("models", "eval", "runs"))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    return dest


def _bundle_cmd(bundle: Path, files: list[str], args: dict[str, Any]) -> list[str]:
    configs = [str(bundle / "configs" / f) for f in files]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
           "--bundle_root", str(bundle)]  # fmt: skip
    for k, v in args.items():  # Fire reads Python literals
        cmd += [f"--{k}", repr(v) if isinstance(v, bool) else (v if isinstance(v, str) else json.dumps(v))]
    return cmd


def _stored(path: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    if path.is_file():
        record = json.loads(path.read_text())
        if record.get("settings") == settings:
            return record
    return None


def train_run(bundle_name: str, run_dir: Path, files: list[str], args: dict[str, Any], settings: dict[str, Any]) -> dict:
    """Train one bundle run in ``run_dir`` (a copy of the bundle), or reuse the stored one with the same settings.
    Returns ``{"settings", "train_seconds", "val_mean_dsc", "reused"}``."""
    stamp = run_dir / "run.json"
    old = _stored(stamp, settings)
    if old is not None and (run_dir / "models" / "model.pt").is_file():
        print(f"  reusing {run_dir}", flush=True)
        return {**old, "reused": True}
    bundle = _bundle_copy(bundle_name, run_dir)
    shutil.rmtree(bundle / "models", ignore_errors=True)
    seconds = run_logged(_bundle_cmd(bundle, files, args), run_dir / "train.log", cwd=REPO, glibc_tunables=True)
    summary = json.loads((bundle / "models" / "training_summary.json").read_text())
    record = {"settings": settings, "train_seconds": seconds, "val_mean_dsc": summary.get("best_metric"),
              "best_epoch": summary.get("best_metric_epoch"), "epochs": summary.get("epochs"),
              "val_metrics": summary.get("last_metrics", {})}  # fmt: skip
    atomic_write_json(stamp, record)
    return {**record, "reused": False}


def _region_model(models: Path, task: int, experts: bool) -> tuple[dict, dict, Any, Any]:
    """(stock network_def, its state dict for region ``task``, the deployed module, the trained module)."""
    spec = load_network_spec(models)
    if experts:
        trained = expert_model_from_spec(spec)
        load_expert_state_dict(trained, models / "model.pt")
        deployed = export_expert(trained, task)
    else:
        trained = deployed = instantiate(dict(spec["network_def"]))
        deployed.load_state_dict(_plain_state(models / "model.pt"))
    return spec["network_def"], deployed.state_dict(), deployed, trained


def _plain_state(path: Path) -> dict:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("model", state) if isinstance(state, dict) and "model" in state else state


def score_run(run_dir: Path, experts: bool, table: Any, prep: dict[str, Any], test: list[dict], regions: list[str],
              settings: dict[str, Any], device: str) -> dict[str, Any]:
    """Export every region of the run's model as a standalone bundle and score it on the region's test cases
    through its own ``inference.json`` (stored in ``run_dir/scores.json``; reused while ``settings`` hold)."""
    stamp = run_dir / "scores.json"
    old = _stored(stamp, settings)
    if old is not None:
        return old
    start = time.perf_counter()
    out: dict[str, Any] = {"settings": settings, "regions": {}}
    for name in regions:
        task = table.task_id_of(name)
        net_def, state, deployed, trained = _region_model(run_dir / "models", task, experts)
        row = prep[name]
        bundle = write_expert_bundle(
            run_dir / "export" / name, net_def, state, region_name=name,
            label_names={i: c for i, c in enumerate(table.class_names[task], start=1)},
            output_channels=table.channels_of(task), spacing=row["spacing"], roi_size=row["window_size"],
            modality="MR", intensity_nonzero=row.get("intensity") == "zscore_nonzero",
        )  # fmt: skip
        out["regions"][name] = _bundle_scores(bundle, name, table, prep, test, run_dir / "predictions" / name,
                                              deployed, trained, device)  # fmt: skip
    out["score_seconds"] = time.perf_counter() - start
    atomic_write_json(stamp, out)
    return out


def _bundle_scores(bundle: Path, name: str, table: Any, prep: dict[str, Any], test: list[dict], pred_dir: Path,
                   deployed: Any, trained: Any, device: str) -> dict[str, Any]:
    """Region ``name``'s scores of an expert bundle on the region's test cases through its own ``inference.json``
    (DSC / NSD per class), with the deployed network's parameters and GFLOPs (one window) and the trained one's
    parameters."""
    task = table.task_id_of(name)
    cases = [c for c in test if int(c["region"]) == task]
    preds = predict_with_bundle(bundle, [c["image"] for c in cases], pred_dir, device=device)
    scores = score_label_maps(preds, [c["label"] for c in cases], table.class_names[task],
                              NSD_TOLERANCE_MM.get(name, 1.0))  # fmt: skip
    window = (1, 1, *prep[name]["window_size"])
    return {"classes": scores["table"], "mean_dsc": scores["mean_dsc"], "mean_nsd": scores["mean_nsd"],
            "n_test": len(cases), "nsd_tolerance_mm": NSD_TOLERANCE_MM.get(name, 1.0),
            "deploy_params": count_params(deployed), "deploy_gflops": count_flops(deployed, window) / 1e9,
            "train_params": count_params(trained)}  # fmt: skip


def run(
    preset: str = "full",
    seeds: str | tuple | None = None,
    single_seed: bool = False,
    rows: str | tuple | None = None,
    lr_grid: str | tuple | None = None,
    train_cases: int | None = None,
    epochs: int | None = None,
    teacher_epochs: int | None = None,
    patience: int | None = None,
    device: str = "cpu",
    data_root: str | None = None,
    split_seed: int = 0,
    work_dir: str = "runs/real_regions",
    out: str = "docs/RESULTS_real_regions.md",
    jobs: int = 2,
    threads: int | None = 1,
) -> str:
    """
    Build the data, train the teacher (once) and the rows, export and score every model on test; write ``out``
    (markdown), ``.json`` and ``.png`` beside it. Resumes: finished runs and scores are reused.

    Args:
        preset: ``full`` or ``smoke`` (see the module docstring). Defaults to ``full``.
        seeds: training seeds (comma-separated). Defaults to the preset's.
        single_seed: only the first seed. Defaults to False.
        rows: subset of ``teacher`` and :data:`ROWS` names. Defaults to the preset's.
        lr_grid: learning rates tried on the first seed, chosen on validation. Defaults to the preset's.
        train_cases: training cases per region (the first N of the split). Defaults to the preset's.
        epochs: student epochs. Defaults to the preset's.
        teacher_epochs: teacher epochs. Defaults to the preset's.
        patience: every run (teacher, rows, scratch) stops after this many validations without a better validation
            Dice (``early_stop_patience``; the epochs are then ceilings); 0 trains every epoch. Defaults to the preset's.
        device: ``cpu`` or ``cuda`` (``cuda:0``). Defaults to ``cpu``.
        data_root: folder holding ``msd_hippocampus/`` and ``acdc/``. Defaults to the mapping's (``../shared/data``).
        split_seed: seed of the train / val / test split. Defaults to 0.
        work_dir: runs, exports, logs. Defaults to ``runs/real_regions``.
        out: the results page. Defaults to ``docs/RESULTS_real_regions.md``.
        jobs: training runs at a time after the teacher (each its own process). Defaults to 2 (one per core of a
            2-core machine); the teacher trains alone with ``threads * jobs`` threads.
        threads: ``OMP_NUM_THREADS`` of every training process; None or 0 leaves it as it is (torch then uses every
            core in each process). Defaults to 1. Not part of the reuse stamps (results change by float rounding).

    Raises:
        ValueError: on an unknown preset or row or ``jobs < 1``; FileNotFoundError when the data are missing.
    """
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    start = time.perf_counter()
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {list(PRESETS)}.")
    p = dict(PRESETS[preset])
    for key, value in (("train_cases", train_cases), ("epochs", epochs), ("teacher_epochs", teacher_epochs),
                       ("patience", patience)):
        if value is not None:
            p[key] = int(value)
    p["seeds"] = [int(s) for s in split_list(seeds)] if seeds is not None else p["seeds"]
    p["seeds"] = p["seeds"][:1] if single_seed else p["seeds"]
    p["lr_grid"] = [float(x) for x in split_list(lr_grid)] if lr_grid is not None else p["lr_grid"]
    p["rows"] = split_list(rows) if rows is not None else p["rows"]
    unknown = sorted(set(p["rows"]) - {"teacher", *ROWS, "scratch"})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {['teacher', *ROWS, 'scratch']}.")
    if "lorkd_star" in p["rows"] and p["warmup_epochs"] < 1:
        raise ValueError("LoRKD* needs a warm-up epoch (its ranks come from it): use a preset with warmup_epochs >= 1.")
    work = (REPO / work_dir).resolve() if not Path(work_dir).is_absolute() else Path(work_dir)
    dev = "$torch.device('cuda:0')" if device.startswith("cuda") else "$torch.device('cpu')"
    times: dict[str, float] = {}

    # 1. data
    t0 = time.perf_counter()
    full = ensure_mapped_datalist(MAPPING, work / "data", seed=split_seed, data_root=data_root)
    subset = write_datalist_subset(full, work / "data" / f"{preset}_{p['train_cases']}.json",
                                   {"training": p["train_cases"], "validation": p["val_cases"],
                                    "test": p["test_cases"]})  # fmt: skip
    table, sections = load_datalist(subset)
    regions = [table.region_names[t] for t in table.task_ids]
    data_sha = file_sha256(subset)
    times["data"] = time.perf_counter() - t0
    common = {"datalist": subset, "batch_size": p["batch_size"], "num_workers": 0, "device": dev,
              "data_cache": str(work / "cache")}  # fmt: skip

    # 2. teacher, once
    t0 = time.perf_counter()
    teacher_dir = work / "teacher"
    stop = {"early_stop_patience": p["patience"]} if p["patience"] else {}  # absent: the runs of earlier presets
    t_args = {**common, "epochs": p["teacher_epochs"], "val_interval": p["val_every"], **stop}
    with child_threads(threads, alone_for=jobs):  # alone: every core
        teacher = train_run("foundation_seg", teacher_dir, ["train.json", "real_regions.json"], t_args,
                            {"args": t_args, "data": data_sha, "configs": _digest("foundation_seg", [])})
    teacher_sha = file_sha256(teacher_dir / "models" / "model.pt")
    prep = json.loads((teacher_dir / "models" / "region_preprocessing.json").read_text())
    times["teacher_train"] = time.perf_counter() - t0

    test = sections.get("test", [])
    results: dict[str, Any] = {}
    if "teacher" in p["rows"]:
        t0 = time.perf_counter()
        s = score_run(teacher_dir, False, table, prep, test, regions, {"model": teacher_sha, "data": data_sha}, device)
        results["teacher"] = {"description": "foundation_seg (teacher), trained once", "deployed_as":
                              "the foundation network per region", "lr": None, "lr_grid": {},
                              "seeds": [{"seed": None, **s, "train_seconds": teacher["train_seconds"],
                                         "best_epochs": [teacher.get("best_epoch")]}]}
        times["teacher_score"] = time.perf_counter() - t0

    # 3. training, ``jobs`` runs at a time: every row's first seed over the LR grid (chosen on VALIDATION), then its
    # other seeds at the chosen rate
    t0 = time.perf_counter()
    row_names = [r for r in ROWS if r in p["rows"]] + (["scratch"] if "scratch" in p["rows"] else [])
    units = {row: regions if row == "scratch" or ROWS[row][1] == "stl" else [None] for row in row_names}
    scratch_net = _scratch_network(table) if "scratch" in row_names else None

    def train_unit(row: str, lr: float, seed: int, region: str | None) -> tuple[Path, dict]:
        if row == "scratch":
            return _scratch_train(work, table, sections, prep, p, device, data_sha, scratch_net, region, lr, seed)
        _, override, experts, _ = ROWS[row]
        files = ["train.json", "real_regions.json", *([f"baselines/{override}.json"] if override else [])]
        args = {**common, "epochs": p["epochs"], "val_interval": p["val_every"], **stop,
                "teacher_path": str(teacher_dir), **({"warmup_epochs": p["warmup_epochs"]} if experts else {}),
                "learning_rate": lr, "seed": seed, **({"region": region} if region else {})}  # fmt: skip
        run_dir = work / row / f"lr{lr:g}" / f"seed{seed}" / (region or "all")
        settings = {"args": args, "teacher": teacher_sha, "data": data_sha, "configs": _digest("lorkd_seg", files)}
        return run_dir, train_run("lorkd_seg", run_dir, files, args, settings)

    with child_threads(threads):
        trained = grid_then_seeds(row_names, units, p["lr_grid"], p["seeds"], train_unit,
                                  lambda run: run[1]["val_mean_dsc"], jobs=jobs)  # fmt: skip
    times["rows_train"] = time.perf_counter() - t0

    # 4. every model exported per region and scored on test through its own inference.json, ``jobs`` at a time
    t0 = time.perf_counter()

    def score_unit(row: str, run_dir: Path) -> dict[str, Any]:
        if row == "scratch":
            return _scratch_scores(run_dir, table, prep, test, scratch_net, data_sha, device)
        mine = [run_dir.name] if ROWS[row][1] == "stl" else regions
        return score_run(run_dir, ROWS[row][2], table, prep, test, mine,
                         {"model": file_sha256(run_dir / "models" / "model.pt"), "data": data_sha}, device)

    units_to_score = [(row, run_dir) for row in row_names for seed in p["seeds"]
                      for run_dir, _ in trained[row]["runs"][seed]]  # fmt: skip
    with child_threads(threads), ThreadPoolExecutor(max_workers=int(jobs)) as pool:
        scores = dict(zip(units_to_score, pool.map(lambda unit: score_unit(*unit), units_to_score)))
    for row in row_names:
        got = trained[row]
        per_seed = []
        for seed in p["seeds"]:
            runs = got["runs"][seed]
            scored: dict[str, Any] = {"regions": {}, "train_seconds": 0.0, "score_seconds": 0.0,
                                      "best_epochs": [rec.get("best_epoch") for _, rec in runs]}  # fmt: skip
            for run_dir, rec in runs:
                s = scores[(row, run_dir)]
                scored["regions"].update(s["regions"])
                scored["train_seconds"] += rec["train_seconds"]
                scored["score_seconds"] += s["score_seconds"]
            per_seed.append({"seed": seed, **scored})
        description, deployed = (SCRATCH[1], SCRATCH[2]) if row == "scratch" else (ROWS[row][0], ROWS[row][3])
        results[row] = {"description": description, "deployed_as": deployed, "lr": got["lr"],
                        "lr_grid": {f"{lr:g}": v for lr, v in got["val"].items()}, "seeds": per_seed}  # fmt: skip
        print(f"  {row}: lr {got['lr']:g} (val {got['val'][got['lr']]:.4f})", flush=True)
    times["rows_score"] = time.perf_counter() - t0

    record = {
        "command": "python -m benchmarks.real_regions run" + (f" --preset {preset}" if preset != "full" else "")
        + "".join(f" --{k} {_arg(v)}" for k, v in (("seeds", seeds), ("rows", rows), ("lr_grid", lr_grid),
                                              ("train_cases", train_cases), ("epochs", epochs),
                                              ("teacher_epochs", teacher_epochs), ("patience", patience),
                                              ("jobs", jobs if int(jobs) != 2 else None),
                                              ("threads", threads if threads != 1 else None),
                                              ("device", device if device != "cpu"
                                                                                   else None)) if v is not None)
        + (" --single_seed" if single_seed else ""),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": time.perf_counter() - start,
        "part_seconds": times,
        "machine": machine_info(device if device.startswith("cuda") else "cpu"),
        "settings": {**p, "split_seed": split_seed, "jobs": int(jobs), "threads": threads,
                     "datalist": os.path.relpath(subset, REPO),
                     "regions": regions, "preprocessing": prep, "nsd_tolerance_mm": NSD_TOLERANCE_MM,
                     "n_cases": {s: {r: sum(1 for i in items if table.region_names[int(i["region"])] == r)
                                     for r in regions} for s, items in sections.items()}},  # fmt: skip
        "results": results,
    }
    out_path = (REPO / out) if not Path(out).is_absolute() else Path(out)
    atomic_write_json(out_path.with_suffix(".json"), record)
    return _write(out_path, record)


def _arg(value: Any) -> str:
    """A command-line value as typed (Fire turns ``a,b`` into a tuple)."""
    return ",".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


def _scratch_network(table: Any) -> dict[str, Any]:
    """The scratch row's network: the stock MONAI UNet of the expert's size (lorkd_seg's network config)."""
    from medfm_ops.bundle_paths import bundle_network_config

    return bundle_network_config(REPO / "bundles" / "lorkd_seg" / "configs" / "train.json",
                                 num_classes=table.num_classes)  # fmt: skip


def _region_cases(sections: dict, section: str, task: int) -> list[dict[str, str]]:
    return [{"image": c["image"], "label": c["label"]} for c in sections.get(section, []) if int(c["region"]) == task]


def _scratch_train(work: Path, table: Any, sections: dict, prep: dict, p: dict, device: str, data_sha: str,
                   net_def: dict, name: str, lr: float, seed: int) -> tuple[Path, dict]:
    """One scratch run of region ``name``: a freshly initialised stock UNet of the expert's size written as an expert
    bundle and trained by that bundle's own train.json on the region's training cases; its validation Dice (the LR
    choice) from the same bundle's inference.json. Reused while its settings hold."""
    import torch

    task, row = table.task_id_of(name), prep[name]
    run_dir = work / "scratch" / f"lr{lr:g}" / f"seed{seed}" / name
    args = {"train_datalist": _region_cases(sections, "training", task),
            "val_datalist": _region_cases(sections, "validation", task),
            "pretrained": False, "epochs": p["epochs"], "val_interval": p["val_every"], "learning_rate": lr,
            **({"early_stop_patience": p["patience"]} if p["patience"] else {}),
            "seed": seed, "batch_size": p["batch_size"], "num_workers": 0,
            "device": "$torch.device('cuda:0')" if device.startswith("cuda") else "$torch.device('cpu')"}  # fmt: skip
    settings = {"args": args, "data": data_sha, "net": net_def, "row": row}
    stamp = run_dir / "run.json"
    old = _stored(stamp, settings)
    if old is not None:
        return run_dir, {**old, "best_epoch": kept_epoch(run_dir / "train.log"), "reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    torch.manual_seed(seed)
    bundle = write_expert_bundle(
        run_dir / "bundle", net_def, instantiate(dict(net_def)).state_dict(), region_name=name,
        label_names={i: c for i, c in enumerate(table.class_names[task], start=1)},
        output_channels=table.channels_of(task), spacing=row["spacing"], roi_size=row["window_size"],
        modality="MR", intensity_nonzero=row.get("intensity") == "zscore_nonzero",
    )  # fmt: skip
    seconds = run_logged(_bundle_cmd(bundle, ["train.json"], args), run_dir / "train.log", cwd=REPO,
                         glibc_tunables=True)  # fmt: skip
    val = args["val_datalist"]
    preds = predict_with_bundle(bundle, [c["image"] for c in val], run_dir / "val_predictions", device=device)
    val_dsc = score_label_maps(preds, [c["label"] for c in val], table.class_names[task],
                               NSD_TOLERANCE_MM.get(name, 1.0))["mean_dsc"]  # fmt: skip
    record = {"settings": settings, "train_seconds": seconds, "val_mean_dsc": val_dsc}
    atomic_write_json(stamp, record)
    return run_dir, {**record, "best_epoch": kept_epoch(run_dir / "train.log"), "reused": False}


def _scratch_scores(run_dir: Path, table: Any, prep: dict, test: list[dict], net_def: dict, data_sha: str,
                    device: str) -> dict[str, Any]:
    """A scratch run's bundle on its region's test cases through its own inference.json (stored in
    ``run_dir/scores.json``; reused while the model and data are unchanged)."""
    name = run_dir.name
    stamp = run_dir / "scores.json"
    settings = {"model": file_sha256(run_dir / "bundle" / "models" / "model.pt"), "data": data_sha}
    stored = _stored(stamp, settings)
    if stored is not None:
        return stored
    t0 = time.perf_counter()
    net = instantiate(dict(net_def))
    entry = _bundle_scores(run_dir / "bundle", name, table, prep, test, run_dir / "predictions", net, net, device)
    s = {"settings": settings, "score_seconds": time.perf_counter() - t0, "regions": {name: entry}}
    atomic_write_json(stamp, s)
    return s


def kept_epoch(log: Path) -> int | None:
    """The epoch whose model a stock bundle's training kept (its ``val_mean_dice`` key metric), from the last
    "Key metric: val_mean_dice best value: ... at epoch: N" line MONAI logs; None when it never validated."""
    found = re.findall(r"Key metric: val_mean_dice best value: \S+ at epoch: (\d+)", log.read_text(errors="replace")) \
        if log.is_file() else []
    return int(found[-1]) if found else None


def _digest(bundle: str, files: list[str]) -> str:
    import hashlib

    paths = [REPO / "bundles" / bundle / "configs" / f for f in (files or ["train.json", "real_regions.json"])]
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in paths)).hexdigest()[:16]


def _values(entry: dict, region: str, key: str, cls: str | None = None) -> list[float]:
    vals = []
    for s in entry["seeds"]:
        r = s["regions"].get(region)
        if r is None:
            continue
        if cls is None:
            vals.append(r[key])
        else:
            vals.append(next(c[f"{key}_mean"] for c in r["classes"] if c["class"] == cls))
    return vals


def _fmt(vals: list[float]) -> str:
    finite = [v for v in vals if v is not None and not math.isnan(v)]
    if not finite:
        return "-"
    m, s = mean_std(finite)
    return f"{100 * m:.1f}" if len(finite) == 1 else f"{100 * m:.1f} ± {100 * s:.1f}"  # one seed: no spread


def markdown(record: dict[str, Any], figure: str) -> str:
    """The results page of ``record`` (what :func:`run` stored as JSON)."""
    st, res = record["settings"], record["results"]
    lines = [
        "# LoRKD segmentation on real data: brain MRI + cardiac MRI",
        "",
        *notes_lines(record.get("notes")),
        f"Regenerate: `{record['command']}` (this page from its JSON: `python -m benchmarks.real_regions report`).",
        f"Run {record['date']}, {record['wall_seconds'] / 60:.1f} min on {record['machine']['cpu_model']} "
        f"({record['machine']['usable_cores']} cores usable, device {record['machine']['device']}, 1-min load "
        f"{record['machine']['load_average_1min']:.1f} at the end: other jobs on the cores inflate wall times)"
        + (f"; after the teacher, {st['jobs']} training run(s) at a time with OMP_NUM_THREADS={st['threads']} each "
           "(a run's own wall time counts the time it shared the cores)." if "jobs" in st else "."),
        "",
        "Data: " + "; ".join(f"{r}: " + ", ".join(f"{s} {n[r]}" for s, n in st["n_cases"].items()) for r in st["regions"])
        + f" (split seed {st['split_seed']}, ACDC by patient; the two real regions only, no synthetic region mixed "
        "in). Preprocessing per region: "
        + "; ".join(f"{r} {v['spacing']} mm, patch/window {v['window_size']}, {v['intensity']}"
                    for r, v in st["preprocessing"].items()) + ".",
        f"NSD tolerance: {st['nsd_tolerance_mm']} mm; on heart_mri in mm of the NOMINAL 1.5 x 1.5 x 10 mm spacing "
        "of the files (approximate).",
        f"Teacher {st['teacher_epochs']} epochs (trained once, reused by every row and seed); students {st['epochs']} "
        f"epochs{_ceiling(st)}, batch {st['batch_size']}, seeds {st['seeds']}; validation every {st.get('val_every', '?')} epochs, "
        "the best validation model kept (model selection on val); learning rate per row chosen on validation from "
        f"{st['lr_grid']}. Scores: each model exported per region as a standalone bundle and run through its own "
        "inference.json on the region's TEST cases.",
        "",
        "| row | lr (val DSC per lr) | " + " | ".join(f"{r} DSC | {r} NSD" for r in st["regions"])
        + " | deploy params (M) | deploy GFLOPs | train s | best val epoch |",
        "| --- | --- | " + " | ".join("--- | ---" for _ in st["regions"]) + " | --- | --- | --- | --- |",
    ]
    for name, e in res.items():
        first = e["seeds"][0]["regions"]
        params = max((r["deploy_params"] for r in first.values()), default=0) / 1e6
        flops = max((r["deploy_gflops"] for r in first.values()), default=0)
        grid = ", ".join(f"{k}: {100 * v:.1f}" for k, v in e["lr_grid"].items()) or "-"
        train_s = statistics.fmean(s["train_seconds"] for s in e["seeds"])
        lines.append(f"| {name} | {e['lr'] if e['lr'] is not None else '-'} ({grid}) | "
                     + " | ".join(f"{_fmt(_values(e, r, 'mean_dsc'))} | {_fmt(_values(e, r, 'mean_nsd'))}"
                                  for r in st["regions"])
                     + f" | {params:.3f} | {flops:.2f} | {train_s:.0f} | {_best_epochs(e)} |")
    lines += ["", "Per class (DSC / NSD, % mean ± std over seeds):", ""]
    for region in st["regions"]:
        classes = [c["class"] for c in next(iter(res.values()))["seeds"][0]["regions"].get(region, {"classes": []})
                   ["classes"]]
        lines += [f"**{region}**", "", "| row | " + " | ".join(classes) + " |",
                  "| --- | " + " | ".join("---" for _ in classes) + " |"]
        for name, e in res.items():
            lines.append(f"| {name} | " + " | ".join(
                f"{_fmt(_values(e, region, 'dsc', c))} / {_fmt(_values(e, region, 'nsd', c))}" for c in classes) + " |")
        lines.append("")
    lines += ["Reading (2x-spread rule: a difference counts when it exceeds twice the larger std over seeds):", ""]
    lines += _reading(res, st["regions"])
    lines += ["", f"![DSC per region]({figure})", "", "Wall time of this invocation per part (s; reused runs count ~0, "
              "each run's own training time is in the table): "
              + ", ".join(f"{k} {v:.0f}" for k, v in record["part_seconds"].items()) + ". Sum of the recorded "
              f"training wall times: {_training_minutes(res):.0f} min (the teacher once, every other row at its chosen "
              "learning rate for every seed; the learning-rate grid's other runs come on top)."]
    return "\n".join(lines) + "\n"


def _ceiling(settings: dict) -> str:
    """How the epochs were used: ceilings with early stopping, or every epoch trained (records before ``patience``)."""
    n = settings.get("patience") or 0
    return (f" (both ceilings: every run stopped after {n} validations without a better validation Dice)" if n
            else "")


def _best_epochs(entry: dict) -> str:
    """The validation epochs whose model was kept (one per trained network and seed): a best epoch at the end of the
    budget says the row may not have converged."""
    best = [b for s in entry["seeds"] for b in s.get("best_epochs", []) if b is not None]
    return ", ".join(str(b) for b in best) if best else "-"


#: the comparisons of the reading, (row, reference row, label), each made where both rows ran
COMPARISONS = (("lorkd", "mtl", "LoRKD vs MTL"), ("lorkd", "mtl_kd", "LoRKD vs MTL-KD"), ("lorkd", "stl", "LoRKD vs STL"),
               ("lorkd", "scratch", "LoRKD vs scratch UNet"), ("lorkd_star", "lorkd", "LoRKD* vs LoRKD"))  # fmt: skip


def _reading(res: dict, regions: list[str]) -> list[str]:
    out = []
    for region in regions:
        for row, ref, label in COMPARISONS:
            if row not in res or ref not in res:
                continue
            a, b = _values(res[row], region, "mean_dsc"), _values(res[ref], region, "mean_dsc")
            if len(a) > 1 and len(b) > 1:
                diff, spread, verdict = compare_over_seeds(a, b)
                out.append(f"- {region}: {label} {100 * diff:+.1f} DSC points (spread {100 * spread:.1f}): {verdict}.")
            elif a and b:
                out.append(f"- {region}: {label} {100 * (a[0] - b[0]):+.1f} DSC points (one seed: no spread, "
                           "no verdict).")
        for row, label in (("lorkd", "fused LoRKD expert"), ("lorkd_star", "fused LoRKD* expert")):
            if row in res and "teacher" in res:
                a, t = _values(res[row], region, "mean_dsc"), _values(res["teacher"], region, "mean_dsc")
                if a and t:
                    gap = 100 * (statistics.fmean(a) - t[0])
                    out.append(f"- {region}: {label} vs teacher {gap:+.1f} DSC points "
                               f"({'within 1 point or above' if gap >= -1 else 'MORE than 1 point below'}).")
    return out or ["- (no LoRKD / MTL / teacher rows to compare)"]


def _training_minutes(res: dict) -> float:
    """Sum of the recorded training wall times (the teacher once; every other row at its chosen learning rate, every
    seed): the grid's other learning rates are not in the record."""
    return sum(s["train_seconds"] for e in res.values() for s in e["seeds"]) / 60


def _write(out: Path, record: dict[str, Any]) -> str:
    figure = out.with_suffix(".png")
    groups = {name: {r: [100 * v for v in _values(e, r, "mean_dsc")] for r in record["settings"]["regions"]}
              for name, e in record["results"].items()}  # fmt: skip
    if any(v for g in groups.values() for v in g.values()):
        plot_score_bars(figure, groups, ylabel="test DSC (%)", title="Real regions: test DSC per region")
    text = markdown(record, figure.name)
    atomic_write_text(out, text)
    print(f"wrote {out}, {out.with_suffix('.json')}, {figure}", flush=True)
    return str(out)


def report(out: str = "docs/RESULTS_real_regions.md", notes: str | None = None) -> str:
    """Rewrite the page (and its PNG) from its stored JSON.

    Args:
        out: the page; its JSON is the same path with ``.json``.
        notes: a Markdown file of what the numbers say, written after reading them: stored in the JSON (key
            ``notes``, kept by later ``report`` calls) and shown above the tables.
    """
    path = (REPO / out) if not Path(out).is_absolute() else Path(out)
    return _write(path, record_with_notes(path.with_suffix(".json"), notes))


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report})
