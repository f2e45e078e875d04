# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Data-efficiency curve at a clinical site, from starting points trained with real MRI; writes a section of
``docs/RESULTS.md`` and ``docs/site_curve.png``.

    python -m benchmarks.site_curve run                             # the whole study (~60-90 min on 2 CPU cores)
    python -m benchmarks.site_curve run --budget_epochs 10,60       # plus the budget study (expert_full, N=all)
    python -m benchmarks.site_curve report                          # section + plot again from saved summaries
    python -m benchmarks.site_curve run --dataset acdc_shift        # the population-shift study on ACDC (~1.8 h)
    python -m benchmarks.site_curve report --dataset acdc_shift
    python -m benchmarks.site_curve run --dataset acdc_shift --held_out arv --num_test 5 --num_validation 2 \
        --sizes 2,5,all                                             # the one-group site (its own section)

One tool, two data sets (``--dataset``, table :data:`DATASETS`): ``hippocampus`` (below) and ``acdc_shift``
(a cardiac expert fine-tuned at a site whose pathology group its pre-training never saw; the differences are listed
after the stages and in ``docs/site_curve.md``).

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

``acdc_shift`` (``benchmarks/site_shift.py``): stage 1 is ``benchmarks.site_study.load_or_create_shift_split`` (the
``--held_out`` pathology groups are the site, split BY PATIENT into ``--num_test`` fixed test patients,
``--num_validation`` validation patients and a pool; the other groups may pre-train); stage 2 trains on the
repository's real-region mapping file (brain MRI + the pre-training groups' heart MRI) with each bundle's
``configs/real_regions.json`` (region-wise preprocessing) and exports the heart expert with its region's spacing
and window; stage 3 draws N site PATIENTS (both frames), selects each run's kept epoch on the validation patients,
gives ``scratch`` its own converged budget (``--scratch_steps``, ``--scratch_validations``: the best of many
validations = early stopping on the validation patients), and scores every written bundle's own inference.json on
the fixed site test set, per class; BEFORE = the exported expert on the same test set.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fire

from benchmarks.common import best_on_validation, child_threads, repo_path, select_rows
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
from benchmarks.sections import notes_lines, regenerate_lines, write_markdown_section
from benchmarks.site_shift import (
    HEART,
    MAPPING,
    REAL_CONFIGS,
    describe_split,
    export_heart_expert,
    held_in_cases,
    population_scores,
    score_bundle_on_cases,
)
from benchmarks.site_study import (
    build_pretraining_datalist,
    build_shift_pretraining_datalist,
    load_or_create_shift_split,
    load_or_create_study_split,
    patients_of,
    write_draw_split,
    write_patient_draw_split,
)
from medfm_ops.bundle_paths import default_cache_dir
from medfm_ops.data import ensure_synthetic_dataset
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.hashing import file_sha256

SECTION = "site-curve"
ROW_NAMES = [r[0] for r in ROWS]

#: the data sets of the curve and their defaults (``None`` arguments of :func:`run` take these)
DATASETS = {
    "hippocampus": {"dataset_dir": "../shared/data/msd_hippocampus", "work_dir": "runs/site_curve",
                    "plot": "docs/site_curve.png", "section": SECTION, "sizes": "5,10,20,all", "num_validation": 30,
                    "patch_size": (32, 48, 32), "spacing": None, "pretrain_patch": (32, 32, 32),
                    "nsd_tolerance_mm": 1.0, "teacher_epochs": 40, "student_epochs": 40, "pretrain_val_interval": 10,
                    "pretrain_patience": 0, "brain_cases": None, "lr_grid": None},
    "acdc_shift": {"dataset_dir": "../shared/data/acdc", "work_dir": "runs/site_curve_acdc_shift",
                   "plot": "docs/site_curve_acdc_shift.png", "section": "site-curve-acdc-shift", "sizes": "2,5,10,all",
                   "num_validation": 4, "patch_size": (96, 96, 8), "spacing": (1.5, 1.5, 10.0), "pretrain_patch": None,
                   "nsd_tolerance_mm": 1.5, "teacher_epochs": 150, "student_epochs": 100, "pretrain_val_interval": 5,
                   "pretrain_patience": 4, "brain_cases": 40, "lr_grid": "0.0002,0.002"},
}  # fmt: skip


#: the acdc_shift site of the defaults (pathology groups); a study of another site gets names of its own
#: (:func:`site_names`), so that it never overwrites the default study's section, plot or runs
DEFAULT_SITE = ("arv", "minf")


def site_names(defaults: dict[str, Any], held_out: list[str]) -> dict[str, Any]:
    """``defaults`` (acdc_shift's) with the work folder, plot and section of the site ``held_out``: the defaults' own
    for :data:`DEFAULT_SITE`, else suffixed with the groups (``--held_out arv``: ``runs/site_curve_acdc_shift_arv``,
    ``docs/site_curve_acdc_shift_arv.png``, section ``site-curve-acdc-shift-arv``)."""
    groups = sorted(dict.fromkeys(str(h) for h in held_out))
    if groups == sorted(DEFAULT_SITE):
        return defaults
    tag = "_".join(groups)
    plot = Path(defaults["plot"])
    return {**defaults, "work_dir": f"{defaults['work_dir']}_{tag}",
            "section": f"{defaults['section']}-{tag}".replace("_", "-"), "plot": str(plot.with_name(f"{plot.stem}_{tag}.png"))}


def dataset_defaults(dataset: str) -> dict[str, Any]:
    """The defaults of ``dataset`` (a key of :data:`DATASETS`); a clear error for another name."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {dataset!r}.")
    return DATASETS[dataset]


def _rel(p: str | Path) -> str:
    return os.path.relpath(p, REPO) if os.path.isabs(p) else str(p)


def _list(value: Any) -> list[str]:
    """A comma-separated string, a list/tuple (fire reads ``0,1,2`` as one) or a single value, as strings."""
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    return [str(v).strip() for v in items if str(v).strip()]


def pretraining_recipe(teacher_epochs: int, student_epochs: int, patch_size: Any, val_interval: int,
                       patience: int = 0) -> dict:
    """
    Command-line overrides of ``bundles/foundation_seg`` and ``bundles/lorkd_seg`` ``configs/train.json`` for the
    real-data starting points: epochs, patch (``roi_size``), validation interval, LoRKD warm-up (10% of the student's
    epochs, at least 1: the config's 4 of 40), and the random flips switched off (``flip_prob`` 0, as in the configs'
    ``real_regions.json``): a flip along y or z moves the anterior hippocampus behind the posterior one.
    ``patience`` > 0: the epochs are ceilings, each run stops after ``patience`` validations without a better
    validation Dice (``early_stop_patience``; the best validated model is kept either way).
    """
    recipe = {}
    for name, epochs in (("foundation_seg", teacher_epochs), ("lorkd_seg", student_epochs)):
        epochs = int(epochs)
        interval = math.gcd(epochs, int(val_interval))  # must divide epochs: the last epoch is validated
        roi = {} if patch_size is None else {"roi_size": [int(x) for x in patch_size]}  # None: the configs' own
        recipe[name] = {"epochs": epochs, **roi, "val_interval": interval, "flip_prob": 0.0}
        if name == "lorkd_seg":
            recipe[name]["warmup_epochs"] = max(1, round(0.1 * epochs))
        if int(patience) > 0:
            recipe[name]["early_stop_patience"] = int(patience)
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


def _check_sizes(sizes: list[str], pool_size: int, unit: str) -> None:
    """Every N is ``all`` or a number in ``1..pool_size`` (one clear error naming the bad ones)."""
    bad = [n for n in sizes if str(n).lower() != "all" and not (str(n).isdigit() and 1 <= int(n) <= pool_size)]
    if bad or not sizes:
        raise ValueError(f"sizes {bad or sizes} must be 'all' or numbers of {unit} in 1..{pool_size} (the site pool).")


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
        "epochs_trained": s.get("epochs_trained", s["epochs"]), "patience": int(plan.get("patience", 0)),
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
    dataset: str = "hippocampus",
    dataset_dir: str | None = None,
    work_dir: str | None = None,
    results: str = "docs/RESULTS.md",
    plot: str | None = None,
    num_public: int = 120,
    num_validation: int | None = None,
    split_seed: int = 0,
    sizes: Any = None,
    seeds: Any = "0,1,2",
    rows: Any = None,
    steps: int | None = 150,
    epochs: int | None = None,
    validations: int = 2,
    batch_size: int = 2,
    patch_size: Any = None,
    spacing: Any = None,
    learning_rate: float = 2e-3,
    lr_grid: Any = None,
    teacher_epochs: int | None = None,
    student_epochs: int | None = None,
    pretrain_patch: Any = None,
    pretrain_val_interval: int | None = None,
    pretrain_patience: int | None = None,
    budget_epochs: Any = None,
    budget_val_interval: int = 5,
    held_out: Any = ",".join(DEFAULT_SITE),
    num_test: int = 10,
    scratch_steps: int | None = 3000,
    scratch_validations: int = 30,
    scratch_patience: int = 5,
    brain_cases: int | None = None,
    pretrain_val_patients: int = 6,
    nsd_tolerance_mm: float | None = None,
    threads: int | None = 1,
    jobs: int = 2,
    retrain_pretrained: bool = False,
    reuse_rows: bool = True,
    serve_check: bool = True,
) -> str:
    """
    Run the study (stages in the module docstring) and write the data set's section of ``results`` and ``plot``.

    Args:
        dataset: ``hippocampus`` or ``acdc_shift`` (:data:`DATASETS`: its defaults fill every None argument below).
        dataset_dir: the real MSD-style data set (relative paths: to the repository root).
        work_dir: all outputs: the study split, ``pretraining_data/``, ``pretrained/``, ``expert_bundle/``,
            ``splits/``, ``n<N>/<row>_seed<seed>/`` site bundles (+ ``.log``, ``.bench_row.json``; ``acdc_shift``:
            ``.test_scores.json``), ``budget/``, ``curve_summary.json``.
        results: markdown report; only the data set's section is replaced. Defaults to ``docs/RESULTS.md``.
        plot: PNG of DSC against N.
        num_public, num_validation, split_seed: the study split (hippocampus: 120 public, 30 site validation cases;
            acdc_shift: ``num_validation`` site validation PATIENTS, default 2; seed 0).
        sizes: N values (comma-separated; ``all`` = the whole pool; acdc_shift: patients).
        seeds: training seeds = draw seeds. Defaults to ``0,1,2``.
        rows: subset of the rows (comma-separated). Defaults to all of ``benchmarks/site_finetune.py``'s.
        steps: optimisation steps per run (every row and N); None to use ``epochs``. Defaults to 150.
        epochs: a fixed number of epochs per run instead of ``steps``. Defaults to None.
        validations: validations per run (the best is kept); epochs are rounded up to a multiple. Defaults to 2.
        batch_size, patch_size, spacing, learning_rate: the site budget and grid (patch and spacing: the data set's).
        lr_grid: acdc_shift: learning rates of the pre-trained rows (comma-separated), each run's chosen per row, N and
            seed on the validation patients (the test set stays for reporting). Defaults to the data set's: acdc_shift
            0.0002,0.002 (at 0.002 alone, full fine-tuning with 2 site patients of the two-group site lowered the
            VALIDATION DSC below the exported expert's, 57.4 vs 71.8); hippocampus ``learning_rate`` only (its scores
            are on the validation cases).
            Scratch trains at ``learning_rate`` either way. Runs at ``learning_rate`` keep their folder names.
        teacher_epochs, student_epochs, pretrain_patch, pretrain_val_interval, pretrain_patience: the pre-training
            recipe (:func:`pretraining_recipe`; acdc_shift: no patch override, the regions' patches of
            ``configs/real_regions.json``). Default to the data set's: hippocampus 40 and 40 epochs, validation every
            10, no early stopping; acdc_shift ceilings of 150 and 100 epochs, validation every 5, stop after 4
            validations without a better Dice (as ``benchmarks.real_regions``' full preset: a converged teacher, so
            that BEFORE measures the shift, not an undertrained expert).
        budget_epochs: epochs of the budget study (comma-separated, e.g. ``10,60``); None skips it.
        budget_val_interval: validation interval of the budget study (must divide each of its epochs). Defaults to 5.
        held_out: acdc_shift: the site's pathology groups (comma-separated among dcm, hcm, minf, nor, arv).
            Defaults to ``arv,minf`` (abnormal right ventricle and previous myocardial infarction, 32 patients in the
            shared set: two groups give a pool of 18 site patients, so that N = 10 exists; see docs/site_curve.md).
            Another site writes its own work folder, plot and section (:func:`site_names`).
        num_test: acdc_shift: patients of the fixed site test set. Defaults to 10.
        scratch_steps, scratch_validations, scratch_patience: acdc_shift: the scratch row's own budget: a ceiling of
            steps, validations spread over it, and early stopping on the validation patients after ``scratch_patience``
            validations without a better Dice (0: the whole ceiling; the best validation is kept either way).
            Default to 3000, 30, 5 (at 600 steps and 6 validations, the earlier default, scratch kept its LAST
            validation at N = 5 and 8: it had not converged).
        brain_cases: acdc_shift: hippocampus cases in the pre-training (the brain region, the other task; 0: all
            200). Defaults to 40.
        pretrain_val_patients: acdc_shift: pre-training patients kept for the foundation's validation. Defaults to 6.
        nsd_tolerance_mm: NSD tolerance of the reported scores (acdc_shift: of the test-set scores, in the nominal
            mm of its headers). Defaults to the data set's (1.0; acdc_shift 1.5 = one in-plane voxel).
        threads: ``OMP_NUM_THREADS`` of every child process (pre-training, fine-tuning); None or 0 inherits it
            (torch then uses all cores). Defaults to 1: with ``jobs=2`` both cores work without threads waiting for a
            descheduled sibling, which made two-thread runs 3-7x slower on a machine shared with other jobs. Not part
            of the reuse stamps (results change by float rounding only).
        jobs: site runs (and budget-study runs) run at the same time, each its own process. Defaults to 2 (one per
            core of a 2-core machine). Pre-training runs alone (the student needs the teacher), with ``threads * jobs``
            threads.
        retrain_pretrained: retrain the starting points even when complete ones of the same recipe exist.
        reuse_rows: keep runs with unchanged settings, split and starting weights. Defaults to True.
        serve_check: acdc_shift: serve one written site bundle (the largest N, ``expert_full`` or else the first
            adapted row, the first seed) in a real MONAI Label server on the first site test image
            (:func:`monailabel_check`) and report it.
            Defaults to True.
    """
    stages = _Stages()
    d = dataset_defaults(dataset)
    shift = dataset == "acdc_shift"
    if shift:
        d = site_names(d, _list(held_out))
    given_args = {"dataset_dir": dataset_dir, "work_dir": work_dir, "plot": plot, "sizes": sizes,
                  "num_validation": num_validation, "patch_size": patch_size, "spacing": spacing,
                  "pretrain_patch": pretrain_patch, "nsd_tolerance_mm": nsd_tolerance_mm,
                  "teacher_epochs": teacher_epochs, "student_epochs": student_epochs, "brain_cases": brain_cases,
                  "pretrain_val_interval": pretrain_val_interval, "pretrain_patience": pretrain_patience,
                  "lr_grid": lr_grid}
    (dataset_dir, work_dir, plot, sizes, num_validation, patch_size, spacing, pretrain_patch, nsd_tolerance_mm,
     teacher_epochs, student_epochs, brain_cases, pretrain_val_interval, pretrain_patience, lr_grid) = (
        d[k] if v is None else v for k, v in given_args.items())  # fmt: skip
    brain_cases = None if brain_cases in (0, None) else int(brain_cases)
    patch_size = [int(x) for x in _list(patch_size)]
    spacing = None if spacing is None else [float(x) for x in _list(spacing)]
    pretrain_patch = None if pretrain_patch is None else [int(x) for x in _list(pretrain_patch)]
    work, data = repo_path(work_dir), repo_path(dataset_dir)
    if int(jobs) < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    wanted = select_rows(rows, ROW_NAMES)
    if (steps is None) == (epochs is None):
        raise ValueError(f"give exactly one of steps ({steps}) and epochs ({epochs}).")
    if shift and (scratch_steps is None or int(scratch_steps) < 1 or int(scratch_validations) < 1):
        raise ValueError(f"scratch_steps ({scratch_steps}) and scratch_validations ({scratch_validations}) must be >= 1.")
    if int(scratch_patience) < 0:
        raise ValueError(f"scratch_patience must be >= 0 validations (0: the whole ceiling), got {scratch_patience}.")
    seed_list = [int(s) for s in _list(seeds)]
    size_list = _list(sizes)
    budget_list = [int(e) for e in _list(budget_epochs)] if budget_epochs not in (None, "", False) else []
    bad = [e for e in budget_list if e % int(budget_val_interval)]
    if bad:
        raise ValueError(f"budget_val_interval={budget_val_interval} must divide every budget epoch count, not {bad}.")
    held = _list(held_out)
    rates = [float(x) for x in _list(lr_grid)] if lr_grid not in (None, "", False) else [float(learning_rate)]
    if len(rates) > 1 and not shift:
        raise ValueError("lr_grid needs a test set apart from the validation cases that choose the rate: acdc_shift only.")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(int(threads))  # inherited by every child process
        import torch

        torch.set_num_threads(int(threads))  # this process's own work (acdc_shift: the test-set scoring)

    recipe = pretraining_recipe(teacher_epochs, student_epochs, pretrain_patch, pretrain_val_interval,
                                pretrain_patience)
    before_scores: dict[str, Any] = {}
    if shift:
        study = load_or_create_shift_split(data, work / "population_split.json", held, num_test, num_validation,
                                           split_seed)  # fmt: skip
        pool_size = len(patients_of(study["site_pool"]))
        _check_sizes(size_list, pool_size, "patients")  # before any training
        datalist = build_shift_pretraining_datalist(study, work / "pretraining_data", MAPPING, dataset_key=data.name,
                                                    val_patients=pretrain_val_patients, other_cases=brain_cases,
                                                    seed=split_seed)  # fmt: skip
        stages.done("data")
        with child_threads(threads, alone_for=jobs):  # pre-training runs alone
            pretrained = ensure_pretrained(work, retrain=retrain_pretrained, datalist=datalist, recipe=recipe,
                                           config_files=REAL_CONFIGS)  # fmt: skip
        stages.done("pretraining")
        expert_dir = work / "expert_bundle"
        export_heart_expert(pretrained["lorkd_seg"]["path"], expert_dir)
        before_scores["expert"] = score_bundle_on_cases(expert_dir, study["site_test"], nsd_tolerance_mm,
                                                        work / "expert_bundle.test_scores.json")  # fmt: skip
        teacher_dir = work / "teacher_bundle"  # the teacher's heart channels as a bundle: its BEFORE score too
        export_heart_expert(pretrained["foundation_seg"]["path"], teacher_dir)
        before_scores["teacher"] = score_bundle_on_cases(teacher_dir, study["site_test"], nsd_tolerance_mm,
                                                         work / "teacher_bundle.test_scores.json")  # fmt: skip
        for who, bundle in (("expert", expert_dir), ("teacher", teacher_dir)):  # what the site sees before training
            before_scores[f"{who}_validation"] = score_bundle_on_cases(bundle, study["site_validation"], nsd_tolerance_mm,
                                                                       work / f"{who}_bundle.validation_scores.json")
        held_in = held_in_cases(datalist)  # the pre-training populations: how much BEFORE drops at the site
        for who, bundle in (("expert", expert_dir), ("teacher", teacher_dir)):
            before_scores[f"{who}_held_in"] = score_bundle_on_cases(bundle, held_in, nsd_tolerance_mm,
                                                                    work / f"{who}_bundle.held_in_scores.json")  # fmt: skip
        stages.done("export")
        region = HEART
    else:
        study = load_or_create_study_split(data, work / "study_split.json", num_public, num_validation, split_seed)
        pool_size = len(study["site_pool"])
        _check_sizes(size_list, pool_size, "cases")
        cfg = json.loads((REPO / "bundles" / "foundation_seg" / "configs" / "train.json").read_text())
        base = ensure_synthetic_dataset(Path(default_cache_dir()) / "synthetic", **cfg["synthetic"])
        datalist = build_pretraining_datalist(study, work / "pretraining_data", base, region=REGION)
        stages.done("data")
        with child_threads(threads, alone_for=jobs):  # pre-training runs alone
            pretrained = ensure_pretrained(work, retrain=retrain_pretrained, datalist=datalist, recipe=recipe)
        stages.done("pretraining")
        expert_dir = work / "expert_bundle"
        export_brain_expert(pretrained["lorkd_seg"]["path"], expert_dir)
        stages.done("export")
        region = REGION
    sources = {"expert": (str(expert_dir), None), "teacher": (pretrained["foundation_seg"]["path"], region)}
    sha = {k: file_sha256(Path(p) / "models" / "model.pt") for k, (p, _) in sources.items()}
    scoring_lock = threading.Lock()

    def one_run(row: tuple, n: Any, n_label: str, seed: int, plan: dict, out: Path, before: bool,
                lr: float) -> dict[str, Any]:
        name, _, source, init, mode = row
        split_file = work / "splits" / f"n{n_label}_seed{seed}.json"
        budget = {**plan, "batch_size": batch_size, "patch_size": list(patch_size), "learning_rate": lr}
        path, region = sources[source]
        extra = ["--split_file", str(split_file), "--score_before", str(before and not shift).lower(),
                 "--nsd_tolerance_mm", str(float(nsd_tolerance_mm))]
        if spacing:
            extra += ["--spacing", json.dumps(spacing)]
        cmd = finetune_command(path, region, init, mode, data, out, budget, seed, *extra)
        settings = {"epochs": plan["epochs"], "val_interval": plan["val_interval"], "batch_size": batch_size,
                    "learning_rate": lr, "patch_size": list(patch_size), "mode": mode, "init": init,
                    "seed": seed, "split_sha256": file_sha256(split_file), "source": None if init == "scratch" else sha[source],
                    "score_before": before and not shift, **({"spacing": spacing} if spacing else {}),
                    **({"nsd_tolerance_mm": float(nsd_tolerance_mm)} if float(nsd_tolerance_mm) != 1.0 else {}),
                    **({"patience": int(plan["patience"])} if plan.get("patience") else {}),
                    **(SPARSE_SETTINGS if mode == "sparse" else {})}  # fmt: skip
        result = run_or_reuse(cmd, out, settings, reuse_rows)
        rec = {**_record(name, n_label, seed, plan, result, out), "lr": lr}
        if shift:  # the fixed site test set, through the written bundle's own inference.json (in this process: one
            with scoring_lock:  # at a time, beside the site runs' child processes)
                test = score_bundle_on_cases(out, study["site_test"], nsd_tolerance_mm,
                                             out.parent / f"{out.name}.test_scores.json")  # fmt: skip
            info = result["summary"]["split"]["info"]
            rec.update({"n": info["num_patients"], "num_volumes": result["summary"]["split"]["num_training_used"],
                        "val_dsc": rec["dsc"], "val_nsd": rec["nsd"], "dsc": test["mean_dsc"], "nsd": test["mean_nsd"],
                        "per_class": {t["class"]: {"dsc": t["dsc_mean"], "nsd": t["nsd_mean"]} for t in test["table"]},
                        "per_population": population_scores(test, study["site_test"]),
                        "score_set": "site_test"})  # fmt: skip
        print(f"  N={n_label} {name} lr {lr:g} seed {seed}: DSC {rec['dsc']:.4f}, NSD {rec['nsd']:.4f} "
              f"({(rec['seconds'] or 0) / 60:.1f} min wall, {(rec['cpu_seconds'] or 0) / 60:.1f} min CPU"
              f"{', reused' if rec['reused'] else ''})", flush=True)  # fmt: skip
        return rec

    def run_all(tasks: list[tuple]) -> list[dict[str, Any]]:
        for _, n, n_label, seed, *_ in tasks:  # split files first: parallel runs only read them
            split_file = work / "splits" / f"n{n_label}_seed{seed}.json"
            (write_patient_draw_split if shift else write_draw_split)(study, split_file, n, seed)
        with ThreadPoolExecutor(max_workers=int(jobs)) as pool:  # threads only wait for child processes
            return list(pool.map(lambda task: one_run(*task), tasks))

    tasks = []
    for n in size_list:
        n_label = "all" if str(n).lower() == "all" else str(int(n))
        n_units = pool_size if n_label == "all" else int(n)
        n_cases = 2 * n_units if shift else n_units  # acdc: both frames of every patient
        plan = plan_epochs(n_cases, batch_size, steps, epochs, validations)
        scratch_plan = ({**plan_epochs(n_cases, batch_size, scratch_steps, None, scratch_validations),
                         "patience": int(scratch_patience)} if shift else plan)  # fmt: skip
        for seed in seed_list:
            for row in ROWS:
                for lr in [float(learning_rate)] if row[0] == "scratch" else rates:
                    if row[0] in wanted:  # the starting point is scored once per row: first N, first seed
                        first = n == size_list[0] and seed == seed_list[0] and lr == float(learning_rate)
                        tag = "" if lr == float(learning_rate) else f"_lr{lr:g}"
                        tasks.append((row, n, n_label, seed, scratch_plan if row[0] == "scratch" else plan,
                                      work / f"n{n_label}" / f"{row[0]}{tag}_seed{seed}", first, lr))  # fmt: skip
    records, grid_records = choose_rate_runs(run_all(tasks))
    stages.done("curve")
    expert_full = next(r for r in ROWS if r[0] == "expert_full")
    tasks = []
    for e in budget_list:
        plan = {"epochs": e, "val_interval": int(budget_val_interval),
                "steps": e * math.ceil((2 if shift else 1) * pool_size / batch_size)}  # fmt: skip
        for seed in seed_list:
            tasks.append((expert_full, "all", "all", seed, plan, work / "budget" / f"expert_full_e{e}_seed{seed}", False,
                          float(learning_rate)))
    budget_records = run_all(tasks)
    stages.done("budget")
    serving = None
    if shift and serve_check and records:
        served = next((r for r in ("expert_full", *ROW_NAMES) if r in wanted and r != "scratch"), ROW_NAMES[0])
        n_label = next(r["n_label"] for r in reversed(records))
        chosen = next(r for r in records if r["row"] == served and r["n_label"] == n_label and r["seed"] == seed_list[0])
        serving = monailabel_check(repo_path(chosen["bundle"]), study["site_test"][0]["image"],
                                   work / "monailabel_check")  # fmt: skip
        stages.done("monailabel")

    args = ["python -m benchmarks.site_curve run"] + ([f"--dataset {dataset}"] if dataset != "hippocampus" else [])
    args += [f"--dataset_dir {dataset_dir}", f"--work_dir {work_dir}"]
    defaults = {"results": "docs/RESULTS.md", "plot": d["plot"], "num_public": 120, "num_validation": d["num_validation"],
                "split_seed": 0, "sizes": d["sizes"], "seeds": "0,1,2", "steps": 150, "epochs": None,
                "validations": 2, "batch_size": 2, "patch_size": ",".join(map(str, d["patch_size"])),
                "learning_rate": 2e-3, "lr_grid": d["lr_grid"], "teacher_epochs": d["teacher_epochs"],
                "student_epochs": d["student_epochs"],
                "pretrain_patch": None if d["pretrain_patch"] is None else ",".join(map(str, d["pretrain_patch"])),
                "pretrain_val_interval": d["pretrain_val_interval"], "pretrain_patience": d["pretrain_patience"],
                "budget_epochs": None, "budget_val_interval": 5, "threads": 1, "jobs": 2,
                "nsd_tolerance_mm": d["nsd_tolerance_mm"]}  # fmt: skip
    given = {"results": results, "plot": plot, "num_public": num_public, "num_validation": num_validation,
             "split_seed": split_seed, "sizes": ",".join(size_list), "seeds": ",".join(map(str, seed_list)),
             "steps": steps, "epochs": epochs, "validations": validations, "batch_size": batch_size,
             "patch_size": ",".join(map(str, patch_size)), "learning_rate": learning_rate,
             "lr_grid": ",".join(f"{r:g}" for r in rates) if len(rates) > 1 else None,
             "teacher_epochs": teacher_epochs, "student_epochs": student_epochs,
             "pretrain_patch": None if pretrain_patch is None else ",".join(map(str, pretrain_patch)),
             "pretrain_val_interval": pretrain_val_interval, "pretrain_patience": pretrain_patience,
             "budget_epochs": ",".join(map(str, budget_list)) or None, "budget_val_interval": budget_val_interval,
             "threads": threads, "jobs": jobs, "nsd_tolerance_mm": nsd_tolerance_mm}  # fmt: skip
    if shift:
        defaults.pop("num_public")
        given.pop("num_public")
        defaults |= {"held_out": ",".join(DEFAULT_SITE), "num_test": 10, "scratch_steps": 3000, "scratch_validations": 30,
                     "scratch_patience": 5, "brain_cases": d["brain_cases"], "pretrain_val_patients": 6}  # fmt: skip
        given |= {"held_out": ",".join(held), "num_test": num_test, "scratch_steps": scratch_steps,
                  "scratch_validations": scratch_validations, "scratch_patience": scratch_patience,
                  "brain_cases": brain_cases,
                  "pretrain_val_patients": pretrain_val_patients}  # fmt: skip
    args += [f"--{k} {v}" for k, v in given.items() if v != defaults[k]]
    if rows:
        args.append(f"--rows {','.join(wanted)}")
    if shift:
        study_meta = {"dataset_dir": _rel(study["dataset_dir"]), "study_file": study["split_file"],
                      "seed": study["seed"], **describe_split(study)}  # fmt: skip
        study_meta["dataset_dir"] = _rel(study["dataset_dir"])
    else:
        study_meta = {k: study[k] for k in ("study_file", "seed", "num_public", "num_validation")} | {
            "num_site_pool": len(study["site_pool"]), "dataset_dir": _rel(study["dataset_dir"])}
    meta = {
        "dataset": dataset,
        "section": d["section"],
        "command": " ".join(args),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "stage_seconds": stages.seconds,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", GLIBC_TUNABLES),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "jobs": int(jobs),
        "study": study_meta,
        "pretraining_datalist": _rel(datalist),
        "pretrained": pretrained,
        "expert_bundle": _rel(expert_dir),
        "work_dir": _rel(work),
        "sizes": size_list,
        "seeds": seed_list,
        "rows": [r[0] for r in ROWS if r[0] in wanted],
        "budget": {"steps": steps, "epochs": epochs, "validations": validations, "batch_size": batch_size,
                   "patch_size": list(patch_size), "learning_rate": learning_rate, "lr_grid": rates, "spacing": spacing,
                   **({"scratch_steps": scratch_steps, "scratch_validations": scratch_validations,
                       "scratch_patience": scratch_patience} if shift else {})},
        "budget_study": {"epochs": budget_list, "val_interval": budget_val_interval},
        "nsd_tolerance_mm": nsd_tolerance_mm,
        "before": {k: {"mean_dsc": v["mean_dsc"], "mean_nsd": v["mean_nsd"],
                       "per_class": {t["class"]: {"dsc": t["dsc_mean"], "nsd": t["nsd_mean"]} for t in v["table"]},
                       **({"per_population": population_scores(v, study["site_test"])} if k in ("expert", "teacher")
                          else {})}
                   for k, v in before_scores.items()},
        "results": results,
        "plot": plot,
        **({"monailabel": serving} if serving else {}),
    }  # fmt: skip
    atomic_write_json(work / "curve_summary.json", {"meta": meta, "records": records, "budget_records": budget_records,
                                                    "grid_records": grid_records})  # fmt: skip
    return report(work_dir, results, plot, dataset=dataset)


def choose_rate_runs(runs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """
    One run per row, N and seed: of the runs that differ only in learning rate (``lr``), the one with the best
    validation DSC (``val_dsc``; else ``dsc``, the hippocampus curve's only score, which then has one rate), by
    :func:`benchmarks.common.best_on_validation` (ties: the first rate given).

    Returns:
        ``(chosen, the others)``; each chosen run gains ``lr_val`` (``{rate: validation DSC}``), in the order of
        ``runs``.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["row"], r["n_label"], r["seed"]), []).append(r)
    chosen, others = [], []
    for group in groups.values():
        val = {i: r.get("val_dsc", r["dsc"]) for i, r in enumerate(group)}
        best = best_on_validation(val)
        chosen.append({**group[best], "lr_val": {f"{r['lr']:g}": val[i] for i, r in enumerate(group)}})
        others += [r for i, r in enumerate(group) if i != best]
    return chosen, others


def monailabel_check(bundle: Path, image: str, work: Path) -> dict[str, Any]:
    """``tools/monailabel_check.py check`` on ``bundle`` and ``image`` (a real MONAI Label server, its own
    environment): its ``report.json`` (label names, grid, agreement with the offline ``inference.json``, ``passed``)
    plus the bundle and image paths relative to the repository. A failed check is reported, not raised."""
    shutil.rmtree(work, ignore_errors=True)
    res = subprocess.run([sys.executable, str(REPO / "tools" / "monailabel_check.py"), "check", "--bundle", str(bundle),
                          "--image", str(image), "--work_dir", str(work)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=3600)  # fmt: skip
    report_file = work / "report.json"
    if not report_file.is_file():
        return {"passed": False, "bundle": _rel(bundle), "image": _rel(image), "error": (res.stderr or res.stdout)[-2000:]}
    return {**json.loads(report_file.read_text()), "bundle": _rel(bundle), "image": _rel(image)}


def _serving_line(serving: dict[str, Any] | None) -> list[str]:
    """The MONAI Label check of the section (absent in records made before it)."""
    if not serving:
        return ["- MONAI Label: not checked in this run (`--serve_check true`)."]
    if "error" in serving:
        return [f"- MONAI Label: the check of `{serving['bundle']}` did not run: {serving['error'].splitlines()[-1]}"]
    names = "the site bundle's classes" if serving["labels_match"] else "NOT the site bundle's classes"
    grid = serving["affine_match"] and serving["shape"] == serving["input_shape"]
    return [f"- MONAI Label (`tools/monailabel_check.py`: a real MONAI Label server, its stock `monaibundle` app): "
            f"`{serving['bundle']}` served as written, on the site test image `{Path(serving['image']).name}`: labels "
            f"{serving['server_labels']} ({names}), label map {'x'.join(map(str, serving['shape']))} "
            f"{'on' if grid else 'NOT on'} the input grid, labels present {serving['labels_present']}, voxel "
            f"agreement with the bundle's offline inference.json {serving['agreement']:.4f}: "
            f"{'passed' if serving['passed'] else 'FAILED'}."]


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


def _class_grids(records: list[dict], rows: list[str], sizes: list[str], key: str) -> list[str]:
    """One table per class of ``records[*]["per_class"]``: ``key`` (dsc or nsd) per row and N."""
    lines = []
    for cls in records[0]["per_class"]:
        view = [{**r, key: r["per_class"][cls][key]} for r in records]
        lines += [f"{cls}:", "", *_grid(view, rows, sizes, key), ""]
    return lines


def write_section(summary: dict[str, Any], results: Path, plot: Path) -> str:
    """The data set's section of ``results`` (``site-curve``, or ``meta["section"]``) and the plot, from a
    ``curve_summary.json`` dict."""
    if summary["meta"].get("dataset") == "acdc_shift":
        return write_shift_section(summary, results, plot)
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
            + _resumed_note(pre[name]["summary"], bool(pre[name]["seconds"]))
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
        *regenerate_lines(meta["command"], "### Regenerate"),
        f"Site bundles (README with the before/after table, `docs/finetune_summary.json`, `docs/split.json`) and logs: "
        f"`{meta['work_dir']}/n<N>/<row>_seed<seed>/`; all numbers: `{meta['work_dir']}/curve_summary.json`.",
    ]
    text = "\n".join(lines)
    write_markdown_section(results, SECTION, text)
    return text


def _shift_lines(before: dict[str, Any]) -> list[str]:
    """The same bundles on the pre-training populations' held-in cases and the drop to the site test set (per
    class): the size of the shift as the starting points see it. Empty without held-in scores."""
    out = []
    for who, what in (("expert", "heart expert"), ("teacher", "teacher")):
        held, site = before.get(f"{who}_held_in"), before.get(who)
        if not held or not site:
            continue
        drops = ", ".join(f"{c} {100 * (v['dsc'] - site['per_class'][c]['dsc']):+.1f}"
                          for c, v in held["per_class"].items() if c in site["per_class"])
        out.append(f"- {what} on the pre-training populations' held-in cases: DSC {100 * held['mean_dsc']:.2f}, NSD "
                   f"{100 * held['mean_nsd']:.2f}; held-in minus site test: {100 * (held['mean_dsc'] - site['mean_dsc']):+.1f}"
                   f" DSC points (per class: {drops}).")
    if out:
        out = ["**The shift, as the starting points see it** (held-in cases: the heart patients of the pre-training "
               "groups that the pre-training validated on, never trained on; they chose its kept epoch, so these "
               "scores are slightly favourable):", "", *out, ""]
    return out


def _population_lines(meta: dict[str, Any], records: list[dict], rows: list[str], sizes: list[str]) -> list[str]:
    """BEFORE and AFTER (smallest and largest N) per population of the site test set: how each held-out group shifts
    and is repaired. Empty for a one-group site or records made before per-population scores."""
    expert = meta["before"].get("expert") or {}
    pops = list(expert.get("per_population", {}))
    if len(pops) < 2 or not all("per_population" in r for r in records):
        return []
    ends = list(dict.fromkeys([sizes[0], sizes[-1]]))
    head = "| row | " + " | ".join(f"{p}: N={n}" for p in pops for n in ends) + " |"
    lines = ["**By population of the site test set** (DSC %; mean over the population's test volumes, each the mean "
             "over the three classes; BEFORE = as exported):", "", head,
             "| --- | " + " | ".join("---:" for _ in pops for _ in ends) + " |"]  # fmt: skip
    for who in ("expert", "teacher"):
        b = (meta["before"].get(who) or {}).get("per_population", {})
        if b:
            lines.append(f"| BEFORE {who} | " + " | ".join(f"{100 * b[p]['dsc']:.2f}" for p in pops for _ in ends) + " |")
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(
            _mean_std([r["per_population"][p]["dsc"] for r in _by(records, row, n)]) for p in pops for n in ends)
            + " |")  # fmt: skip
    counts = ", ".join(f"{p} {expert['per_population'][p]['num_cases']}" for p in pops)
    return [*lines, "", f"Test volumes per population: {counts}.", ""]


def _rate_text(records: list[dict], budget: dict[str, Any]) -> str:
    """The learning rates of the section: one rate, or the grid of the pre-trained rows and what was chosen."""
    grid = budget.get("lr_grid") or [budget["learning_rate"]]
    if len(grid) < 2:
        return f"lr {budget['learning_rate']}"
    counts: dict[str, dict[str, int]] = {}
    for r in records:
        if r["row"] != "scratch":
            counts.setdefault(r["row"], {}).setdefault(f"{r['lr']:g}", 0)
            counts[r["row"]][f"{r['lr']:g}"] += 1
    chosen = "; ".join(f"{row} " + ", ".join(f"{lr} x{k}" for lr, k in sorted(c.items())) for row, c in counts.items())
    return (f"learning rate of every pre-trained run chosen per row, N and seed on the validation patients from "
            f"{', '.join(f'{g:g}' for g in grid)} (chosen: {chosen}; every run of the grid: `grid_records` in the "
            f"summary), scratch at lr {budget['learning_rate']}")


def _resumed_note(summary: dict[str, Any], timed: bool = True) -> str:
    """For a resumed run, ``" after a resume at epoch 108 (the time counts only the epochs after it)"`` (``timed``:
    its time is shown) or ``"; its training resumed at epoch 108"``; else ``""``."""
    epoch = summary.get("resumed_epoch")
    if not epoch:
        return ""
    return f" after a resume at epoch {epoch} (the time counts only the epochs after it)" if timed else (
        f"; its training resumed at epoch {epoch}")


def write_shift_section(summary: dict[str, Any], results: Path, plot: Path) -> str:
    """The ``site-curve-acdc-shift`` section and plot: the curve on the fixed site test set, per class, with the
    expert's BEFORE scores (as exported) on the same cases."""
    meta, records, budget_records = summary["meta"], summary["records"], summary["budget_records"]
    rows, sizes = meta["rows"], [("all" if str(n).lower() == "all" else str(int(n))) for n in meta["sizes"]]
    st, pre, b, sp = meta["stage_seconds"], meta["pretrained"], meta["budget"], meta["study"]
    n_of = {n: next(r["n"] for r in records if r["n_label"] == n) for n in sizes}
    labels = {n_of[n]: (f"all ({n_of[n]})" if n == "all" else n) for n in sizes}
    curves = {row: {n_of[n]: [100 * r["dsc"] for r in _by(records, row, n)] for n in sizes} for row in rows}
    held = ", ".join(sp["held_out"])
    plot_learning_curve(plot, curves, xlabel="labelled site patients (N, both frames each)",
                        ylabel="site test DSC (%)", title=f"ACDC site = held-out group(s) {held}: "
                        f"{sp['num_site_test_patients']} fixed test patients", x_labels=labels,
                        references={f"BEFORE {who} (as exported)": 100 * meta["before"][who]["mean_dsc"]
                                    for who in ("expert", "teacher") if meta["before"].get(who)})  # fmt: skip
    m = records[0]["machine"]
    loads = [r["load_average_1min"] for r in records + budget_records if r["load_average_1min"] is not None]
    plans = {n: next(r for r in records if r["n_label"] == n and r["row"] != "scratch") for n in sizes if
             any(r["n_label"] == n and r["row"] != "scratch" for r in records)}  # fmt: skip
    scratch = {n: next(r for r in records if r["n_label"] == n and r["row"] == "scratch") for n in sizes if
               any(r["n_label"] == n and r["row"] == "scratch" for r in records)}  # fmt: skip
    tol = meta["nsd_tolerance_mm"]

    def before_line(who: str, what: str) -> str:
        b = meta["before"].get(who)
        if not b:
            return f"- {what}: not scored."
        return (f"- {what}: DSC {100 * b['mean_dsc']:.2f}, NSD {100 * b['mean_nsd']:.2f}; per class "
                + ", ".join(f"{c} DSC {100 * v['dsc']:.2f} / NSD {100 * v['nsd']:.2f}" for c, v in b["per_class"].items()))
    lines = [
        "## Site curve under a population shift: a cardiac expert at a site whose pathology group it never saw",
        "",
        f"Generated by `{meta['command']}` on {meta['date']}; wall time of this invocation "
        f"{sum(st.values()) / 60:.1f} min (data {st.get('data', 0) / 60:.1f}, pre-training "
        f"{st.get('pretraining', 0) / 60:.1f}, export + BEFORE scoring {st.get('export', 0) / 60:.1f}, curve "
        f"{st.get('curve', 0) / 60:.1f}, budget study {st.get('budget', 0) / 60:.1f}, MONAI Label check "
        f"{st.get('monailabel', 0) / 60:.1f}; reused parts count ~0). Sum of "
        f"the site runs' own wall times {sum(r['seconds'] or 0 for r in records) / 60:.1f} min ({len(records)} runs).",
        "",
        *notes_lines(summary.get("notes")),
        "**Does adapting the expert beat training from scratch with few patients of an unseen population?** "
        "(\"beats\": mean DSC difference above twice the larger standard deviation over seeds)",
        "",
        *_verdict(records, sizes, rows),
        "",
        f"![DSC against N]({os.path.relpath(plot, results.parent)})",
        "",
        "**BEFORE** (as exported, never trained on the site's group) on the fixed site test set:",
        "",
        before_line("expert", "heart expert (the starting point of the expert rows)"),
        before_line("teacher", "foundation teacher, heart channels (the starting point of teacher_full)"),
        *[before_line(f"{who}_validation", f"{what} on the {sp['num_site_validation_patients']} site VALIDATION patients "
                      "(what the site sees before fine-tuning; compare the runs' validation DSC in `curve_summary.json`)")
          for who, what in (("expert", "heart expert"), ("teacher", "teacher")) if meta["before"].get(f"{who}_validation")],
        "",
        *_shift_lines(meta["before"]),
        f"**AFTER**: mean ± standard deviation (population, over seeds {', '.join(map(str, meta['seeds']))}) of the "
        f"site test DSC (%, mean over right ventricle, myocardium and left ventricle of the per-case Dice; "
        f"{sp['num_site_test_cases']} volumes of {sp['num_site_test_patients']} patients) of each run's written site "
        "bundle, scored by its own `configs/inference.json`:",
        "",
        *_grid(records, rows, sizes, "dsc"),
        "",
        f"NSD (%, tolerance {tol} mm of the NOMINAL 1.5 x 1.5 x 10 mm spacing: approximate):",
        "",
        *_grid(records, rows, sizes, "nsd"),
        "",
        *_population_lines(meta, records, rows, sizes),
        "Per class, DSC (%):",
        "",
        *_class_grids(records, rows, sizes, "dsc"),
        "Per class, NSD (%):",
        "",
        *_class_grids(records, rows, sizes, "nsd"),
        "Budget of each run and mean time per run, min (training wall / whole run wall / whole run CPU):",
        "",
        "| N (patients) | epochs | validation every | optimisation steps | scratch: ceiling epochs / steps; epochs "
        "trained (kept) per seed | "
        + " | ".join(rows) + " |",
        "| ---: | ---: | ---: | ---: | --- | " + " | ".join("---:" for _ in rows) + " |",
        *[f"| {labels[n_of[n]]} | {plans[n]['epochs'] if n in plans else '-'} | "
          f"{plans[n]['val_interval'] if n in plans else '-'} | {plans[n]['steps'] if n in plans else '-'} | "
          + (f"{scratch[n]['epochs']} / {scratch[n]['steps']}; "
             + ", ".join(f"{r.get('epochs_trained', r['epochs'])} ({r['best_epoch']})" for r in _by(records, "scratch", n))
             if n in scratch else "-")
          + " | " + " | ".join(_times(_by(records, row, n)) for row in rows) + " |" for n in sizes],
        "",
        "### Setup",
        "",
        *_serving_line(meta.get("monailabel")),
        f"- Data: `{sp['dataset_dir']}` (ACDC). Population split saved to `{_rel(sp['split_file'])}` (seed "
        f"{sp['seed']}): the site = held-out pathology group(s) {held} ({sp['num_site_test_patients']} fixed test "
        f"patients, {sp['num_site_validation_patients']} validation patients for model selection, a pool of "
        f"{sp['num_site_pool_patients']} training patients); the {sp['num_pretraining_patients']} patients of the "
        "other groups are the only heart cases pre-training sees. Split by patient (both frames on one side) with "
        "`medfm_ops.data.split_held_out_population`; N patients are drawn from the pool per seed, nested within a "
        "seed (`benchmarks.site_study.write_patient_draw_split`); the seed is also the training seed.",
        f"- Site budget: {'a fixed ' + str(b['epochs']) + ' epochs' if b['epochs'] else str(b['steps']) + ' optimisation steps'} "
        f"per pre-trained row, {b['validations']} validation(s); scratch its own budget: a ceiling of "
        f"{b.get('scratch_steps')} steps with {b.get('scratch_validations')} validations"
        + (f", stopped after {b['scratch_patience']} validations without a better validation Dice"
           if b.get("scratch_patience") else "")
        + " (the best validation is kept: early stopping on the validation patients; epochs trained and kept are in "
        f"the table: a kept last epoch at the ceiling means scratch had not converged). Batch "
        f"{b['batch_size']}, {'x'.join(map(str, b['patch_size']))} patches at {'x'.join(map(str, b['spacing'] or []))} mm "
        f"(the heart region's preprocessing, carried by the exported expert), AdamW with cosine decay, "
        + _rate_text(records, b) + ", DiceCE (sigmoid). LoRA rank 8, alpha 16, fused back. SH-PEFT: "
        f"{100 * SPARSE_SETTINGS['sparse_budget']:g}% of the weights, importance {SPARSE_SETTINGS['sparse_variant']}, "
        f"lambda {SPARSE_SETTINGS['sparse_lambda']}.",
        f"- Starting points, trained on `{meta['pretraining_datalist']}` (the repository's mapping file "
        "`bundles/lorkd_seg/data/real_regions.json` with the held-out patients removed; brain MRI = the other task) "
        "with each bundle's `configs/train.json` + `configs/real_regions.json`: "
        + " ".join(
            f"`bundles/{name}` with `{' '.join(f'--{k} {json.dumps(v)}' for k, v in pre[name]['recipe'].items())}`"
            f" ({pre[name]['summary'].get('epochs', '?')} epoch(s), "
            + (f"{pre[name]['seconds'] / 60:.1f} min wall" if pre[name]["seconds"] else "reused")
            + _resumed_note(pre[name]["summary"], bool(pre[name]["seconds"]))
            + f", best validation mean DSC {pre[name]['summary'].get('best_metric', float('nan')):.3f})."
            for name in ("foundation_seg", "lorkd_seg")
        )
        + f" The heart expert was fused out of the LoRKD student and exported to `{meta['expert_bundle']}`.",
        f"- Machine: {m['cpu_model']}, {m['logical_cores']} logical cores, torch {m['torch']}, MONAI {m['monai']}, GPU: "
        f"{m['gpu'] or 'none'}; OMP_NUM_THREADS={meta.get('omp_num_threads') or 'unset'}, {meta.get('jobs', 1)} site "
        f"run(s) at a time; 1-min load average at the end of the runs: max {max(loads, default=float('nan')):.2f}.",
        f"- Reading: one test set of {sp['num_site_test_patients']} patients; the spread is over patient draws and "
        "training seeds together. Differences smaller than about two standard deviations are ties.",
        "",
        *regenerate_lines(meta["command"], "### Regenerate"),
        f"Site bundles and logs: `{meta['work_dir']}/n<N>/<row>_seed<seed>/` (test scores: "
        f"`<row>_seed<seed>.test_scores.json`); all numbers: `{meta['work_dir']}/curve_summary.json`.",
    ]
    text = "\n".join(lines)
    write_markdown_section(results, meta["section"], text)
    return text


def report(
    work_dir: str | None = None, results: str = "docs/RESULTS.md", plot: str | None = None,
    dataset: str = "hippocampus", notes: str | None = None,
) -> str:
    """(Re)write the data set's section of ``results`` and ``plot`` from ``<work_dir>/curve_summary.json`` (defaults
    of ``dataset``, :data:`DATASETS`). ``notes``: a Markdown file of what the numbers say (acdc_shift), stored in the
    summary (key ``notes``, kept by later ``report`` calls; a new ``run`` drops them) and shown above the verdicts."""
    d = dataset_defaults(dataset)
    work_dir = work_dir or d["work_dir"]
    summary_file = repo_path(work_dir) / "curve_summary.json"
    summary = json.loads(summary_file.read_text())
    plot = plot or summary["meta"].get("plot") or d["plot"]  # the run's own (another site's has its own name)
    if notes is not None:
        summary["notes"] = Path(notes).read_text()
        atomic_write_json(summary_file, summary)
    text = write_section(summary, repo_path(results), repo_path(plot))
    print(text)
    return str(repo_path(results))


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report, "plan_epochs": plan_epochs})
