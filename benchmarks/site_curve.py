# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Data-efficiency curve at a clinical site, from starting points trained with real MRI; writes a section of
``docs/RESULTS.md`` and ``docs/site_curve.png``.

    python -m benchmarks.site_curve run                             # the whole study (~60-90 min on 2 CPU cores)
    python -m benchmarks.site_curve run --budget_epochs 10,60       # plus the budget study (expert_full, N=all)
    python -m benchmarks.site_curve report                          # section + plot again from saved summaries

Stages (each resumable; see ``docs/site_curve.md``):

1. ``benchmarks.site_study.load_or_create_study_split``: ``--dataset_dir`` split once into ``public`` cases
   (``--num_public``; the foundation may see them) and a disjoint site part: a fixed validation set
   (``--num_validation``) and a training pool. Saved to ``<work_dir>/study_split.json``; reused, never re-made.
2. ``benchmarks.site_study.build_pretraining_datalist``: the synthetic default regions (the bundles' own ``synthetic``
   settings) with the public cases added to ``brain_mri`` (classes anterior, posterior appended; partial labels)
   through the mapping-file converter; ``bundles/foundation_seg`` then ``bundles/lorkd_seg`` train on it with their
   own ``configs/train.json`` and command-line overrides only (:func:`pretraining_recipe`); the brain expert is
   exported as a standalone bundle.
3. The curve: for every N in ``--sizes`` and seed in ``--seeds``, N site training cases drawn from the pool (nested
   per seed: ``benchmarks.site_study.draw_training_cases``), written as an explicit split file, and every row of
   ``benchmarks/site_finetune.py`` (scratch, teacher_full, expert_full, expert_lora, expert_sparse) fine-tuned
   through ``tools/finetune_site.py``: each run writes a complete site bundle scored by its own inference.json.
   Budget per run, the same for every row: ``--steps`` optimisation steps (epochs = steps / steps per epoch for
   that N, rounded up to a multiple of ``--validations``; or a fixed ``--epochs``), ``--batch_size``,
   ``--patch_size``, ``--learning_rate``; the best of ``--validations`` validations is kept.
4. Optional budget study (``--budget_epochs 10,60``): expert_full on N=all for each number of epochs, validated
   every ``--budget_val_interval`` epochs; the table gives the scores, the kept (best) epoch and the time.

A run is reused only when its settings, its split and its starting weights are unchanged (stamp beside it); the
starting points only when the pre-training datalist and recipe are unchanged. CPU runs set ``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fire

from benchmarks.site_finetune import (
    GLIBC_TUNABLES,
    REGION,
    REPO,
    ROWS,
    SPARSE_SETTINGS,
    _mean_std,
    ensure_pretrained,
    export_brain_expert,
    finetune_command,
    run_or_reuse,
)
from benchmarks.learning_curve import compare_over_seeds, plot_learning_curve
from benchmarks.sections import write_markdown_section
from benchmarks.site_study import build_pretraining_datalist, load_or_create_study_split, write_draw_split
from medfm_ops.bundle_paths import default_cache_dir
from medfm_ops.data import ensure_synthetic_dataset
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.hashing import file_sha256

SECTION = "site-curve"
ROW_NAMES = [r[0] for r in ROWS]


def _path(p: str | Path) -> Path:
    return Path(p) if Path(p).is_absolute() else REPO / p


def _rel(p: str | Path) -> str:
    return os.path.relpath(p, REPO) if os.path.isabs(p) else str(p)


def _list(value: Any) -> list[str]:
    """A comma-separated string, a list/tuple (fire reads ``0,1,2`` as one) or a single value, as strings."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def pretraining_recipe(teacher_epochs: int, student_epochs: int, patch_size: Any, val_interval: int) -> dict:
    """
    Command-line overrides of ``bundles/foundation_seg`` and ``bundles/lorkd_seg`` ``configs/train.json`` for the
    real-data starting points: epochs, patch (``roi_size``), validation interval, LoRKD warm-up (10% of the student's
    epochs, at least 1: the config's 4 of 40), and the random flips of ``train#random_transforms`` switched off (their
    indices read from the config): a flip along y or z moves the anterior hippocampus behind the posterior one.
    """
    recipe = {}
    for name, epochs in (("foundation_seg", teacher_epochs), ("lorkd_seg", student_epochs)):
        epochs = int(epochs)
        interval = math.gcd(epochs, int(val_interval))  # must divide epochs: the last epoch is validated
        cfg = json.loads((REPO / "bundles" / name / "configs" / "train.json").read_text())
        flips = {f"train#random_transforms#{i}#prob": 0.0 for i, t in enumerate(cfg["train"]["random_transforms"])
                 if t.get("_target_") == "RandFlipd"}  # fmt: skip
        recipe[name] = {"epochs": epochs, "roi_size": [int(x) for x in patch_size], "val_interval": interval, **flips}
        if name == "lorkd_seg":
            recipe[name]["warmup_epochs"] = max(1, round(0.1 * epochs))
    return recipe


def plan_epochs(num_cases: int, batch_size: int, steps: int | None, epochs: int | None, validations: int) -> dict:
    """Epochs and validation interval of one run: ``epochs`` as given, or enough epochs for ``steps`` optimisation
    steps at this N (rounded up to a multiple of ``validations``). Returns ``{"epochs", "val_interval", "steps"}``."""
    per_epoch = math.ceil(num_cases / batch_size)
    if epochs is None:
        epochs = math.ceil(int(steps) / per_epoch)
    epochs = max(int(validations), int(epochs))
    epochs = math.ceil(epochs / int(validations)) * int(validations)
    return {"epochs": epochs, "val_interval": epochs // int(validations), "steps": epochs * per_epoch}


class _Stages:
    """Wall time of each stage of a run (seconds)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._t
        self._t = now


def _record(row: str, n_label: str, seed: int, plan: dict, result: dict, out: Path) -> dict[str, Any]:
    s = result["summary"]
    delta = out / "models" / "sparse_delta.pt"
    return {
        "row": row, "n": s["split"]["num_training_used"], "n_label": n_label, "seed": seed,
        "epochs": s["epochs"], "val_interval": s["train_settings"]["val_interval"], "steps": plan["steps"],
        "dsc": s["after"]["mean_dsc"], "nsd": s["after"]["mean_nsd"],
        "dsc_before": (s["before"] or {}).get("mean_dsc"), "nsd_before": (s["before"] or {}).get("mean_nsd"),
        "per_class": {t["class"]: {"dsc": t["dsc_mean"], "nsd": t["nsd_mean"]} for t in s["after"]["table"]},
        "best_epoch": (s.get("best_validation") or {}).get("epoch"),
        "trainable": s["parameters"]["trainable"], "total_params": s["parameters"]["total"],
        "model_mb": (out / "models" / "model.pt").stat().st_size / 2**20,
        "delta_mb": delta.stat().st_size / 2**20 if delta.is_file() else None,
        "head": f"{s['head']['mode']} ({s['head']['out_channels']} out)",
        "train_seconds": s["train_seconds"], "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
        "reused": result["reused"],
        "load_average_1min": s["machine"].get("load_average_1min"), "machine": s["machine"],
        "bundle": _rel(out),
    }  # fmt: skip


def run(
    dataset_dir: str = "../shared/data/msd_hippocampus",
    work_dir: str = "runs/site_curve",
    results: str = "docs/RESULTS.md",
    plot: str = "docs/site_curve.png",
    num_public: int = 120,
    num_validation: int = 30,
    split_seed: int = 0,
    sizes: Any = "5,10,20,all",
    seeds: Any = "0,1,2",
    rows: Any = None,
    steps: int | None = 150,
    epochs: int | None = None,
    validations: int = 2,
    batch_size: int = 2,
    patch_size: Any = (32, 48, 32),
    learning_rate: float = 2e-3,
    teacher_epochs: int = 40,
    student_epochs: int = 40,
    pretrain_patch: Any = (32, 32, 32),
    pretrain_val_interval: int = 10,
    budget_epochs: Any = None,
    budget_val_interval: int = 5,
    threads: int | None = 1,
    jobs: int = 2,
    retrain_pretrained: bool = False,
    reuse_rows: bool = True,
) -> str:
    """
    Run the study (stages in the module docstring) and write the ``site-curve`` section of ``results`` and ``plot``.

    Args:
        dataset_dir: the real MSD-style data set (relative paths: to the repository root).
        work_dir: all outputs: ``study_split.json``, ``pretraining_data/``, ``pretrained/``, ``expert_bundle/``,
            ``splits/``, ``n<N>/<row>_seed<seed>/`` site bundles (+ ``.log``, ``.bench_row.json``), ``budget/``,
            ``curve_summary.json``.
        results: markdown report; only its ``site-curve`` section is replaced. Defaults to ``docs/RESULTS.md``.
        plot: PNG of DSC against N. Defaults to ``docs/site_curve.png``.
        num_public, num_validation, split_seed: the study split (120 public, 30 site validation, seed 0).
        sizes: N values (comma-separated; ``all`` = the whole pool). Defaults to ``5,10,20,all``.
        seeds: training seeds = case-draw seeds. Defaults to ``0,1,2``.
        rows: subset of the rows (comma-separated). Defaults to all of ``benchmarks/site_finetune.py``'s.
        steps: optimisation steps per run (every row and N); None to use ``epochs``. Defaults to 150.
        epochs: a fixed number of epochs per run instead of ``steps``. Defaults to None.
        validations: validations per run (the best is kept); epochs are rounded up to a multiple. Defaults to 2.
        batch_size, patch_size, learning_rate: the site budget. Default to 2, (32, 48, 32), 2e-3.
        teacher_epochs, student_epochs, pretrain_patch, pretrain_val_interval: the pre-training recipe
            (:func:`pretraining_recipe`). Default to 40, 40, (32, 32, 32), 10.
        budget_epochs: epochs of the budget study (comma-separated, e.g. ``10,60``); None skips it.
        budget_val_interval: validation interval of the budget study (must divide each of its epochs). Defaults to 5.
        threads: ``OMP_NUM_THREADS`` of every child process (pre-training, fine-tuning); None or 0 inherits it
            (torch then uses all cores). Defaults to 1: with ``jobs=2`` both cores work without threads waiting for a
            descheduled sibling, which made two-thread runs 3-7x slower on a machine shared with other jobs. Not part
            of the reuse stamps (results change by float rounding only).
        jobs: site runs (and budget-study runs) run at the same time, each its own process. Defaults to 2 (one per
            core of a 2-core machine). Pre-training runs alone (the student needs the teacher).
        retrain_pretrained: retrain the starting points even when complete ones of the same recipe exist.
        reuse_rows: keep runs with unchanged settings, split and starting weights. Defaults to True.
    """
    stages = _Stages()
    work, data = _path(work_dir), _path(dataset_dir)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(int(threads))  # inherited by every child process
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    wanted = _list(rows) if rows else list(ROW_NAMES)
    unknown = sorted(set(wanted) - set(ROW_NAMES))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {ROW_NAMES}.")
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps ({steps}) and epochs ({epochs}).")
    seed_list = [int(s) for s in _list(seeds)]
    size_list = _list(sizes)
    budget_list = [int(e) for e in _list(budget_epochs)] if budget_epochs not in (None, "", False) else []
    bad = [e for e in budget_list if e % int(budget_val_interval)]
    if bad:
        raise ValueError(f"budget_val_interval={budget_val_interval} must divide every budget epoch count, not {bad}.")

    study = load_or_create_study_split(data, work / "study_split.json", num_public, num_validation, split_seed)
    cfg = json.loads((REPO / "bundles" / "foundation_seg" / "configs" / "train.json").read_text())
    base = ensure_synthetic_dataset(Path(default_cache_dir()) / "synthetic", **cfg["synthetic"])
    datalist = build_pretraining_datalist(study, work / "pretraining_data", base, region=REGION)
    stages.done("data")
    recipe = pretraining_recipe(teacher_epochs, student_epochs, pretrain_patch, pretrain_val_interval)
    pretrained = ensure_pretrained(work, retrain=retrain_pretrained, datalist=datalist, recipe=recipe)
    stages.done("pretraining")
    expert_dir = work / "expert_bundle"
    export_brain_expert(pretrained["lorkd_seg"]["path"], expert_dir)
    stages.done("export")
    sources = {"expert": (str(expert_dir), None), "teacher": (pretrained["foundation_seg"]["path"], REGION)}
    sha = {k: file_sha256(Path(p) / "models" / "model.pt") for k, (p, _) in sources.items()}

    def one_run(row: tuple, n: Any, n_label: str, seed: int, plan: dict, out: Path, before: bool) -> dict[str, Any]:
        name, _, source, init, mode = row
        split_file = work / "splits" / f"n{n_label}_seed{seed}.json"
        budget = {**plan, "batch_size": batch_size, "patch_size": list(patch_size), "learning_rate": learning_rate}
        path, region = sources[source]
        cmd = finetune_command(path, region, init, mode, data, out, budget, seed, "--split_file", str(split_file),
                               "--score_before", str(before).lower())  # fmt: skip
        settings = {"epochs": plan["epochs"], "val_interval": plan["val_interval"], "batch_size": batch_size,
                    "learning_rate": learning_rate, "patch_size": list(patch_size), "mode": mode, "init": init,
                    "seed": seed, "split_sha256": file_sha256(split_file), "source": None if init == "scratch" else sha[source],
                    "score_before": before, **(SPARSE_SETTINGS if mode == "sparse" else {})}  # fmt: skip
        result = run_or_reuse(cmd, out, settings, reuse_rows)
        rec = _record(name, n_label, seed, plan, result, out)
        print(f"  N={n_label} {name} seed {seed}: DSC {rec['dsc']:.4f}, NSD {rec['nsd']:.4f} "
              f"({(rec['seconds'] or 0) / 60:.1f} min wall, {(rec['cpu_seconds'] or 0) / 60:.1f} min CPU"
              f"{', reused' if rec['reused'] else ''})", flush=True)  # fmt: skip
        return rec

    def run_all(tasks: list[tuple]) -> list[dict[str, Any]]:
        for _, n, n_label, seed, *_ in tasks:  # split files first: parallel runs only read them
            write_draw_split(study, work / "splits" / f"n{n_label}_seed{seed}.json", n, seed)
        with ThreadPoolExecutor(max_workers=int(jobs)) as pool:  # threads only wait for child processes
            return list(pool.map(lambda task: one_run(*task), tasks))

    tasks = []
    for n in size_list:
        n_label = "all" if str(n).lower() == "all" else str(int(n))
        n_cases = len(study["site_pool"]) if n_label == "all" else int(n)
        plan = plan_epochs(n_cases, batch_size, steps, epochs, validations)
        for seed in seed_list:
            for row in ROWS:
                if row[0] in wanted:  # the starting point is scored once per row: first N, first seed
                    first = n == size_list[0] and seed == seed_list[0]
                    tasks.append((row, n, n_label, seed, plan, work / f"n{n_label}" / f"{row[0]}_seed{seed}", first))
    records = run_all(tasks)
    stages.done("curve")
    expert_full = next(r for r in ROWS if r[0] == "expert_full")
    tasks = []
    for e in budget_list:
        plan = {"epochs": e, "val_interval": int(budget_val_interval),
                "steps": e * math.ceil(len(study["site_pool"]) / batch_size)}  # fmt: skip
        for seed in seed_list:
            tasks.append((expert_full, "all", "all", seed, plan, work / "budget" / f"expert_full_e{e}_seed{seed}", False))
    budget_records = run_all(tasks)
    stages.done("budget")

    args = ["python -m benchmarks.site_curve run", f"--dataset_dir {dataset_dir}", f"--work_dir {work_dir}"]
    defaults = {"results": "docs/RESULTS.md", "plot": "docs/site_curve.png", "num_public": 120, "num_validation": 30,
                "split_seed": 0, "sizes": "5,10,20,all", "seeds": "0,1,2", "steps": 150, "epochs": None,
                "validations": 2, "batch_size": 2, "patch_size": "32,48,32", "learning_rate": 2e-3,
                "teacher_epochs": 40, "student_epochs": 40, "pretrain_patch": "32,32,32", "pretrain_val_interval": 10,
                "budget_epochs": None, "budget_val_interval": 5, "threads": 1, "jobs": 2}  # fmt: skip
    given = {"results": results, "plot": plot, "num_public": num_public, "num_validation": num_validation,
             "split_seed": split_seed, "sizes": ",".join(size_list), "seeds": ",".join(map(str, seed_list)),
             "steps": steps, "epochs": epochs, "validations": validations, "batch_size": batch_size,
             "patch_size": ",".join(map(str, patch_size)), "learning_rate": learning_rate,
             "teacher_epochs": teacher_epochs, "student_epochs": student_epochs,
             "pretrain_patch": ",".join(map(str, pretrain_patch)), "pretrain_val_interval": pretrain_val_interval,
             "budget_epochs": ",".join(map(str, budget_list)) or None, "budget_val_interval": budget_val_interval,
             "threads": threads, "jobs": jobs}  # fmt: skip
    args += [f"--{k} {v}" for k, v in given.items() if v != defaults[k]]
    if rows:
        args.append(f"--rows {','.join(wanted)}")
    meta = {
        "command": " ".join(args),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "stage_seconds": stages.seconds,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "jobs": int(jobs),
        "study": {k: study[k] for k in ("study_file", "seed", "num_public", "num_validation")}
        | {"num_site_pool": len(study["site_pool"]), "dataset_dir": _rel(study["dataset_dir"])},
        "pretraining_datalist": _rel(datalist),
        "pretrained": pretrained,
        "expert_bundle": _rel(expert_dir),
        "work_dir": _rel(work),
        "sizes": size_list,
        "seeds": seed_list,
        "rows": [r[0] for r in ROWS if r[0] in wanted],
        "budget": {"steps": steps, "epochs": epochs, "validations": validations, "batch_size": batch_size,
                   "patch_size": list(patch_size), "learning_rate": learning_rate},
        "budget_study": {"epochs": budget_list, "val_interval": budget_val_interval},
        "results": results,
        "plot": plot,
    }  # fmt: skip
    atomic_write_json(work / "curve_summary.json", {"meta": meta, "records": records, "budget_records": budget_records})
    return report(work_dir, results, plot)


def _by(records: list[dict], row: str, n_label: str) -> list[dict]:
    return [r for r in records if r["row"] == row and r["n_label"] == n_label]


def _verdict(records: list[dict], sizes: list[str], rows: list[str]) -> list[str]:
    """One line per pre-trained row at the smallest and the largest N: its DSC against scratch, with the spread."""
    if "scratch" not in rows:
        return ["- No `scratch` row in this run: no comparison against training from scratch."]
    lines = []
    for n in dict.fromkeys([sizes[0], sizes[-1]]):
        base = [r["dsc"] for r in _by(records, "scratch", n)]
        for row in rows:
            mine = [r["dsc"] for r in _by(records, row, n)]
            if row == "scratch" or not mine or not base:
                continue
            diff, spread, verdict = compare_over_seeds([100 * v for v in mine], [100 * v for v in base])
            call = {"above": "beats scratch", "below": "is below scratch",
                    "tie": "ties with scratch (difference within 2 std)"}[verdict]  # fmt: skip
            mb = _by(records, row, n)[0]["model_mb"]
            lines.append(f"- N={n}: {row} {call}: DSC {_mean_std(mine)} vs {_mean_std(base)} ({diff:+.2f} points; "
                         f"largest std over seeds {spread:.2f}; deployed model.pt {mb:.2f} MB).")  # fmt: skip
    return lines


def _times(runs: list[dict]) -> str:
    def mean(key: str) -> str:
        values = [r[key] for r in runs if r.get(key) is not None]
        return f"{statistics.fmean(values) / 60:.1f}" if values else "-"

    return f"{mean('train_seconds')} / {mean('seconds')} / {mean('cpu_seconds')}"


def _grid(records: list[dict], rows: list[str], sizes: list[str], key: str) -> list[str]:
    head = "| row | trainable params | deployed model.pt (MB) | " + " | ".join(f"N={n}" for n in sizes) + " |"
    lines = [head, "| --- | ---: | ---: | " + " | ".join("---:" for _ in sizes) + " |"]
    for row in rows:
        first = next(r for r in records if r["row"] == row)
        size = f"{first['model_mb']:.2f}" + (f" (+{first['delta_mb']:.2f} delta)" if first["delta_mb"] else "")
        cells = [_mean_std([r[key] for r in _by(records, row, n)]) for n in sizes]
        lines.append(f"| {row} | {first['trainable']:,} | {size} | " + " | ".join(cells) + " |")
    return lines


def write_section(summary: dict[str, Any], results: Path, plot: Path) -> str:
    """The ``site-curve`` section of ``results`` and the plot, from a ``curve_summary.json`` dict."""
    meta, records, budget_records = summary["meta"], summary["records"], summary["budget_records"]
    rows, sizes = meta["rows"], [("all" if str(n).lower() == "all" else str(int(n))) for n in meta["sizes"]]
    n_of = {n: next(r["n"] for r in records if r["n_label"] == n) for n in sizes}
    curves = {row: {n_of[n]: [100 * r["dsc"] for r in _by(records, row, n)] for n in sizes} for row in rows}
    labels = {n_of[n]: (f"all ({n_of[n]})" if n == "all" else n) for n in sizes}
    plot_learning_curve(plot, curves, xlabel="labelled training cases at the site (N)", ylabel="validation DSC (%)",
                        title=f"Site fine-tuning on {Path(meta['study']['dataset_dir']).name}: "
                        f"{meta['study']['num_validation']} fixed validation cases", x_labels=labels)  # fmt: skip
    first = records[0]
    m = first["machine"]
    loads = [r["load_average_1min"] for r in records + budget_records if r["load_average_1min"] is not None]
    st, pre, b = meta["stage_seconds"], meta["pretrained"], meta["budget"]
    plans = {n: next(r for r in records if r["n_label"] == n) for n in sizes}
    rel_plot = os.path.relpath(plot, results.parent)
    per_run = statistics.fmean([r["seconds"] or 0 for r in records])
    lines = [
        "## Data-efficiency curve at the site: starting points trained with real MRI",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}; wall time of this invocation "
        f"{sum(st.values()) / 60:.1f} min (data {st.get('data', 0) / 60:.1f}, pre-training "
        f"{st.get('pretraining', 0) / 60:.1f}, export {st.get('export', 0) / 60:.1f}, curve {st.get('curve', 0) / 60:.1f}, "
        f"budget study {st.get('budget', 0) / 60:.1f}; reused parts count ~0). Sum of the site runs' own wall times "
        f"{sum(r['seconds'] or 0 for r in records) / 60:.1f} min ({len(records)} runs, {per_run / 60:.2f} min each on "
        f"average; CPU time {sum(r['cpu_seconds'] or 0 for r in records) / 60:.1f} min).",
        "",
        "**Does the expert beat scratch with few cases?** (\"beats\": mean DSC difference above twice the larger "
        "standard deviation over seeds)",
        "",
        *_verdict(records, sizes, rows),
        "",
        f"![DSC against N]({rel_plot})",
        "",
        f"Mean ± standard deviation (population, over seeds {', '.join(map(str, meta['seeds']))}) of the validation "
        "DSC (%, mean over anterior and posterior of the per-case Dice) of each run's written site bundle, scored by "
        "its own `configs/inference.json`:",
        "",
        *_grid(records, rows, sizes, "dsc"),
        "",
        f"NSD (%, tolerance {1.0} mm):",
        "",
        *_grid(records, rows, sizes, "nsd"),
        "",
        "Before fine-tuning: each starting point's own DSC / NSD on the same validation cases (scored once per row, "
        f"in the N={sizes[0]} seed {meta['seeds'][0]} run; identical for every N and seed except scratch's random "
        "weights):",
        "",
        "| row | DSC before | NSD before |",
        "| --- | ---: | ---: |",
        *[f"| {row} | {_mean_std([r['dsc_before'] for r in records if r['row'] == row and r['dsc_before'] is not None])} "
          f"| {_mean_std([r['nsd_before'] for r in records if r['row'] == row and r['nsd_before'] is not None])} |"
          for row in rows],
        "",
        "Budget of each run (identical for every row at one N) and mean time per run, min (training wall time / "
        "whole run wall time / whole run CPU time: CPU time depends less on other jobs):",
        "",
        "| N | epochs | validation every | optimisation steps | " + " | ".join(rows) + " |",
        "| ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in rows) + " |",
        *[f"| {labels[n_of[n]]} | {plans[n]['epochs']} | {plans[n]['val_interval']} | {plans[n]['steps']} | "
          + " | ".join(_times(_by(records, row, n)) for row in rows) + " |" for n in sizes],
        "",
        "### Setup",
        "",
        f"- Data: `{meta['study']['dataset_dir']}`, split once (seed {meta['study']['seed']}, saved to "
        f"`{_rel(meta['study']['study_file'])}`) into {meta['study']['num_public']} public cases (the starting points "
        f"trained on them) and a disjoint site part: {meta['study']['num_validation']} fixed validation cases (every "
        f"row, N and seed) and a pool of {meta['study']['num_site_pool']} training cases. N cases are drawn from the "
        "pool per seed, NESTED within a seed (N=5 is a subset of N=10, ...; different draws for different seeds: "
        "`benchmarks.site_study.draw_training_cases`), saved as explicit split files under "
        f"`{meta['work_dir']}/splits/`; the seed is also the training seed.",
        f"- Site budget: {'a fixed ' + str(b['epochs']) + ' epochs' if b['epochs'] else str(b['steps']) + ' optimisation steps'} "
        f"per run (epochs per N in the table above, rounded up to a multiple of {b['validations']} validation(s)), "
        f"batch {b['batch_size']}, random {'x'.join(map(str, b['patch_size']))} patches, AdamW lr {b['learning_rate']} "
        "with cosine decay, DiceCE (sigmoid) on the site channels; the best of the validations is kept (the site "
        "template, `docs/site_finetuning.md`). LoRA: rank 8, alpha 16, fused back. SH-PEFT (`expert_sparse`): "
        f"{100 * SPARSE_SETTINGS['sparse_budget']:g}% of the weights, importance {SPARSE_SETTINGS['sparse_variant']}, "
        f"lambda {SPARSE_SETTINGS['sparse_lambda']} (its deployed size adds `models/sparse_delta.pt`).",
        f"- Starting points, trained on `{meta['pretraining_datalist']}` = the synthetic default set (4 regions) + the "
        f"{meta['study']['num_public']} public cases in region `brain_mri` (classes anterior, posterior appended; "
        "partial labels: real cases annotate only those two, synthetic brain cases only theirs), built with "
        "`benchmarks.site_study.build_pretraining_datalist` (MSD subset view + mapping file + `merge_datalists`). "
        + " ".join(
            f"`bundles/{name}` `configs/train.json` with `{' '.join(f'--{k} {json.dumps(v)}' for k, v in pre[name]['recipe'].items())}`"
            f" ({pre[name]['summary'].get('epochs', '?')} epoch(s), "
            + (f"{pre[name]['seconds'] / 60:.1f} min wall / {pre[name].get('cpu_seconds', 0) / 60:.1f} min CPU"
               if pre[name]["seconds"] else "reused: timed in an earlier run")
            + f", best validation mean DSC {pre[name]['summary'].get('best_metric', float('nan')):.3f})."
            for name in ("foundation_seg", "lorkd_seg")
        )
        + f" The brain expert was fused out of the LoRKD student and exported to `{meta['expert_bundle']}`. Heads "
        "(`auto`; the site classes anterior/posterior take the region's classes of the same names): "
        + ", ".join(f"{row} {next(r['head'] for r in records if r['row'] == row)}" for row in rows) + ".",
        f"- Machine: {m['cpu_model']}, {m['logical_cores']} logical cores (torch threads per run: {m['torch_threads']}), torch "
        f"{m['torch']}, MONAI {m['monai']}, GPU: {m['gpu'] or 'none'}; GLIBC_TUNABLES={meta['glibc_tunables']}, "
        f"OMP_NUM_THREADS={meta.get('omp_num_threads') or 'unset'}, {meta.get('jobs', 1)} site run(s) at a time (each "
        "run's wall time then includes sharing the cores with the other). 1-min "
        f"load average at the end of the runs: min {min(loads, default=float('nan')):.2f}, median "
        f"{statistics.median(loads) if loads else float('nan'):.2f}, max {max(loads, default=float('nan')):.2f} (above ~2 "
        "other jobs shared the 2 cores: wall times are then inflated).",
        f"- Reading: one validation set of {meta['study']['num_validation']} cases; the spread is over case draws "
        "and training seeds together. Differences smaller than about two standard deviations are ties.",
    ]
    if budget_records:
        epochs_list = sorted({r["epochs"] for r in budget_records})
        lines += [
            "",
            "### Budget study: how long should a site fine-tune? (expert_full, N=all)",
            "",
            "| epochs | validation every | DSC | NSD | kept (best) epoch per seed | train wall time (min) |",
            "| ---: | ---: | ---: | ---: | --- | ---: |",
            *[f"| {e} | {_by_e[0]['val_interval']} | {_mean_std([r['dsc'] for r in _by_e])} | "
              f"{_mean_std([r['nsd'] for r in _by_e])} | {', '.join(str(r['best_epoch']) for r in _by_e)} | "
              f"{statistics.fmean(r['train_seconds'] for r in _by_e) / 60:.2f} |"
              for e in epochs_list for _by_e in [[r for r in budget_records if r["epochs"] == e]]],
            "",
            "A default is trustworthy when the short budget's DSC is within the seeds' spread of the long one's; the "
            "kept epochs show where the validation score stopped improving (an early-stopping rule on the "
            "validation score would stop there).",
        ]
    lines += [
        "",
        "### Regenerate",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Site bundles (README with the before/after table, `docs/finetune_summary.json`, `docs/split.json`) and logs: "
        f"`{meta['work_dir']}/n<N>/<row>_seed<seed>/`; all numbers: `{meta['work_dir']}/curve_summary.json`.",
    ]
    text = "\n".join(lines)
    write_markdown_section(results, SECTION, text)
    return text


def report(work_dir: str = "runs/site_curve", results: str = "docs/RESULTS.md", plot: str = "docs/site_curve.png"):
    """(Re)write the ``site-curve`` section of ``results`` and ``plot`` from ``<work_dir>/curve_summary.json``."""
    summary = json.loads((_path(work_dir) / "curve_summary.json").read_text())
    text = write_section(summary, _path(results), _path(plot))
    print(text)
    return str(_path(results))


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report, "plan_epochs": plan_epochs})
