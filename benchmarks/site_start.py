# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Which bundle should a site start from? Site fine-tuning of the real-data brain expert, of the synthetic-only brain
expert and a stock UNet from scratch on hippocampus cases that no starting point saw; writes
``docs/RESULTS_site_start.md`` (+ ``.json``).

    python -m benchmarks.real_regions run --preset full --single_seed --rows teacher,lorkd   # the real-data expert
    python -m benchmarks.site_start run

Rows (each a ``tools/finetune_site.py`` run writing a complete site bundle; each scored on the SITE TEST cases through
that bundle's own ``configs/inference.json``):

- ``real_expert``: the brain expert fused out of the LoRKD student of the real brain + heart MRI study
  (``benchmarks.real_regions``, seed 0, exported by it), fine-tuned with the DEFAULT site settings (the README's
  command: no budget flags).
- ``synthetic_expert``: the brain expert fused out of ``bundles/lorkd_seg`` trained on the synthetic default data
  (the README's earlier starting point; trained here when missing, ``benchmarks.site_finetune.ensure_pretrained``),
  fine-tuned with the same default settings.
- ``scratch``: the expert's stock UNet with random weights, trained at its own budget (``scratch_epochs``, validation
  every ``scratch_val_interval``, the best kept): what a site gets by training its own model.

Site cases: the MSD hippocampus cases that the real-data study's datalist neither trains nor validates on
(:py:func:`medfm_ops.finetune.write_unseen_split`), drawn once (``split_seed``): ``num_training`` to train,
``num_validation`` to choose the kept epoch, ``num_test`` to report (never used for a choice). The synthetic data hold
no MSD case, so no row saw a site case before. Every row runs once per seed; the table gives mean ± std over seeds.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fire
from monai import __version__ as _monai_version

from benchmarks.common import REPO, machine_info, repo_path, run_record, select_rows, split_list
from benchmarks.learning_curve import compare_over_seeds, mean_std
from benchmarks.sections import regenerate_lines
from benchmarks.site_finetune import FINETUNE, ensure_pretrained, export_brain_expert, run_or_reuse
from medfm_ops.data import read_msd_dataset
from medfm_ops.finetune import SiteFinetuneSettings, write_unseen_split
from medfm_ops.finetune.bundle_run import predict_with_bundle
from medfm_ops.finetune.scoring import score_label_maps
from medfm_ops.utils.atomic_io import atomic_write_json, atomic_write_text
from medfm_ops.utils.hashing import file_sha256

#: the real-data study's seed-0 LoRKD run (its LR chosen on validation) and datalist
REAL_RUNS = "runs/real_regions"
#: (row, description)
ROWS = (
    ("real_expert", "LoRKD brain expert of the real brain + heart MRI student, fine-tuned (default site settings)"),
    ("synthetic_expert", "LoRKD brain expert of the synthetic-data student, fine-tuned (default site settings)"),
    ("scratch", "stock UNet of the expert's size from scratch (its own budget, best validation epoch kept)"),
)


def real_expert_bundle(real_runs: str | os.PathLike = REAL_RUNS) -> tuple[Path, Path]:
    """The exported brain expert of the real-data study's seed-0 LoRKD run whose learning rate scored best on
    VALIDATION (the study's own rule), and the datalist that run trained on."""
    work = repo_path(real_runs)
    runs = [r for r in (work / "lorkd").glob("lr*/seed0/all")
            if (r / "run.json").is_file() and (r / "export" / "brain_mri" / "models" / "model.pt").is_file()]
    if not runs:
        raise FileNotFoundError(
            f"{work}: no exported brain expert of the LoRKD row; run `python -m benchmarks.real_regions run --preset "
            "full --single_seed --rows teacher,lorkd` first."
        )
    best = max(runs, key=lambda r: json.loads((r / "run.json").read_text())["val_mean_dsc"] or 0.0)
    datalists = sorted((work / "data").glob("full_*.json"))
    if not datalists:
        raise FileNotFoundError(f"{work / 'data'}: no datalist of the real-data study (full_*.json).")
    return best / "export" / "brain_mri", datalists[0]


def run(
    dataset_dir: str = "../shared/data/msd_hippocampus",
    work_dir: str = "runs/site_start",
    results: str = "docs/RESULTS_site_start.md",
    real_runs: str = REAL_RUNS,
    num_training: int = 50,
    num_validation: int = 20,
    num_test: int = 40,
    split_seed: int = 0,
    seeds: str | tuple = "0,1,2",
    rows: str | tuple | None = None,
    scratch_epochs: int = 240,
    scratch_val_interval: int = 10,
) -> str:
    """
    Run every row once per seed (finished runs are reused) and write ``results``.

    Args:
        dataset_dir: the MSD hippocampus folder (the site's data).
        work_dir: outputs: ``split.json``, one site bundle per row and seed, their test predictions.
        results: the page to write (and ``.json`` beside it).
        real_runs: the work folder of ``benchmarks.real_regions`` (its exported seed-0 brain expert and datalist).
        num_training, num_validation, num_test: site cases to train on, to choose the kept epoch on, to report on.
        split_seed: seed of the draw of the site cases.
        seeds: training seeds (comma-separated).
        rows: a subset of the rows. Defaults to all.
        scratch_epochs, scratch_val_interval: the from-scratch row's budget (no early stopping: every epoch trains).
    """
    start = time.perf_counter()
    work, data = repo_path(work_dir), repo_path(dataset_dir)
    wanted = select_rows(rows, [r[0] for r in ROWS])
    seed_list = [int(s) for s in split_list(seeds)]
    real_expert, real_datalist = real_expert_bundle(real_runs)
    split = write_unseen_split(data, real_datalist, work / "split.json", num_validation, num_training, split_seed)
    used = {Path(c["image"]).resolve() for part in ("training", "validation") for c in split[part]}
    _, cases, _ = read_msd_dataset(data)
    seen = {Path(item["image"]).resolve() for item in _datalist_items(real_datalist)}
    test = [c for c in cases if Path(c["image"]).resolve() not in used | seen]
    test = test[: int(num_test)]
    if len(test) < int(num_test):
        raise ValueError(f"{data}: only {len(test)} unseen case(s) left for the site test set, {num_test} asked.")

    sources: dict[str, tuple[Path, list[str]]] = {"real_expert": (real_expert, [])}
    if "synthetic_expert" in wanted:
        pretrained = ensure_pretrained(work / "synthetic")
        synthetic = work / "synthetic" / "expert_bundle"
        export_brain_expert(pretrained["lorkd_seg"]["path"], synthetic)
        sources["synthetic_expert"] = (synthetic, [])
    sources["scratch"] = (real_expert, ["--init", "scratch", "--epochs", str(scratch_epochs), "--val_interval",
                                        str(scratch_val_interval), "--early_stop_patience", "0"])  # fmt: skip
    class_names = split["label_names"]
    names = [class_names[k] for k in sorted(class_names, key=int) if int(k) > 0] if isinstance(class_names, dict) else list(class_names)
    out_rows = []
    for row, description in ROWS:
        if row not in wanted:
            continue
        source, extra = sources[row]
        runs = []
        for seed in seed_list:
            out = work / f"{row}_seed{seed}"
            cmd = [sys.executable, str(FINETUNE), "--expert_bundle", str(source), "--dataset_dir", str(data),
                   "--output_dir", str(out), "--split_file", str(work / "split.json"), "--seed", str(seed), *extra,
                   "--verify", "false", "--progress", "false"]  # fmt: skip
            settings = {"train": _effective(extra, seed), "init": "scratch" if "scratch" in extra else "pretrained",
                        "split": file_sha256(work / "split.json"),
                        "source": file_sha256(source / "models" / "model.pt")}  # fmt: skip
            _adopt(out, settings)
            result = run_or_reuse(cmd, out, settings)
            scores = _test_scores(out, test, names, settings)
            summary = result["summary"]
            print(f"  {row} seed {seed}: site val DSC {summary['before']['mean_dsc']:.4f} -> "
                  f"{summary['after']['mean_dsc']:.4f}; site test DSC {scores['mean_dsc']:.4f}",
                  flush=True)  # fmt: skip
            runs.append({"seed": seed, "seconds": result["seconds"], "cpu_seconds": result["cpu_seconds"],
                         "train_seconds": summary["train_seconds"], "epochs": summary["epochs"],
                         "epochs_trained": summary.get("epochs_trained", summary["epochs"]),
                         "kept_epoch": (summary.get("best_validation") or {}).get("epoch"),
                         "trainable": summary["parameters"]["trainable"], "head": summary["head"]["mode"],
                         "val_before": summary["before"]["mean_dsc"], "val_after": summary["after"]["mean_dsc"],
                         "test": scores})  # fmt: skip
        out_rows.append({"name": row, "description": description, "source": os.path.relpath(source, REPO),
                         "runs": runs})  # fmt: skip
    before = {}
    for row in ("real_expert", "synthetic_expert"):
        if row in sources:
            before[row] = _test_scores(sources[row][0], test, names, {"model": file_sha256(sources[row][0] / "models" / "model.pt")},
                                       work / f"before_{row}")  # fmt: skip
    command = ["python -m benchmarks.site_start run"] + [
        f"--{k} {v}" for k, v in (("num_training", num_training), ("num_validation", num_validation),
                                  ("num_test", num_test), ("seeds", ",".join(map(str, seed_list))),
                                  ("scratch_epochs", scratch_epochs), ("scratch_val_interval", scratch_val_interval))
    ] + ([f"--real_runs {real_runs}"] if real_runs != REAL_RUNS else [])  # fmt: skip
    record = {**run_record(command, start), "machine": {**machine_info("cpu"), "monai": _monai_version}, "rows": out_rows,
              "before": before,
              "defaults": SiteFinetuneSettings().train_settings(),
              "split": {"file": os.path.relpath(work / "split.json", REPO), "training": len(split["training"]),
                        "validation": len(split["validation"]), "test": len(test), "info": split["info"]},
              "real_datalist": f"{real_runs}/data/{real_datalist.name}", "classes": names}  # fmt: skip
    out = repo_path(results)
    atomic_write_json(out.with_suffix(".json"), record)
    return report(str(out.with_suffix(".json")), results)


def _effective(extra: list[str], seed: int) -> dict[str, Any]:
    """The training settings a run with the flags ``extra`` gets (the defaults of ``SiteFinetuneSettings`` with the
    budget flags applied): a changed default makes a new run."""
    flags = dict(zip(extra[::2], extra[1::2]))
    values = {k: int(flags[f"--{k}"]) for k in ("epochs", "val_interval", "early_stop_patience") if f"--{k}" in flags}
    return SiteFinetuneSettings(seed=seed, **values).train_settings()


def _adopt(out: Path, settings: dict[str, Any]) -> None:
    """Stamp a finished site bundle for reuse when the settings it RECORDED (``docs/finetune_summary.json``: training
    settings, init, split file, source weights) are ``settings`` (a bundle written before early stopping existed
    recorded no ``early_stop_patience``: it trained every epoch, i.e. 0)."""
    summary_file, stamp = out / "docs" / "finetune_summary.json", out.parent / f"{out.name}.bench_row.json"
    if not summary_file.is_file() or not stamp.is_file():
        return
    old = json.loads(stamp.read_text())
    if old.get("settings") == settings:
        return
    summary = json.loads(summary_file.read_text())
    recorded = {"early_stop_patience": 0, **summary["train_settings"]}
    same = (recorded == settings["train"] and summary["init"] == settings["init"]
            and old.get("settings", {}).get("split") == settings["split"]
            and old.get("settings", {}).get("source") == settings["source"])  # fmt: skip
    if same:
        atomic_write_json(stamp, {**old, "settings": settings})


def _datalist_items(datalist: Path) -> list[dict]:
    content = json.loads(Path(datalist).read_text())
    return [i for part in ("training", "validation") for i in content.get(part) or []]


def _test_scores(bundle: Path, test: list[dict], names: list[str], settings: dict, folder: Path | None = None) -> dict:
    """The bundle's scores on the site test cases through its own ``inference.json`` (stored, reused while
    ``settings`` and the bundle's weights hold)."""
    folder = folder or Path(bundle)
    stamp = folder.parent / f"{folder.name}.test_scores.json"
    key = {**settings, "model": file_sha256(Path(bundle) / "models" / "model.pt"), "cases": [c["image"] for c in test]}
    if stamp.is_file():
        old = json.loads(stamp.read_text())
        if old.get("key") == key:
            return old["scores"]
    preds = predict_with_bundle(bundle, [c["image"] for c in test], folder.parent / f"{folder.name}.test_predictions")
    s = score_label_maps(preds, [c["label"] for c in test], names, 1.0)
    scores = {"mean_dsc": s["mean_dsc"], "mean_nsd": s["mean_nsd"], "classes": s["table"], "n": len(test)}
    atomic_write_json(stamp, {"key": key, "scores": scores})
    return scores


def _epochs(run: dict) -> str:
    """``trained / kept`` epochs of one run (trained < ceiling: early stopping ended it)."""
    return f"{run.get('epochs_trained', run['epochs'])} / {run['kept_epoch']}"


def report(record: str = "docs/RESULTS_site_start.json", results: str = "docs/RESULTS_site_start.md") -> str:
    """(Re)write the page from the saved record of a ``run``."""
    r = json.loads(repo_path(record).read_text())
    m, sp = r["machine"], r["split"]

    def cell(values: list[float]) -> str:
        mean, std = mean_std([100 * v for v in values])
        return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"

    lines = [
        "# Which bundle should a site start from? (MSD hippocampus, cases no starting point saw)", "",
        f"Generated by `{r['command']}` on {r['date']} ({r['seconds'] / 60:.0f} min for this invocation; reused runs "
        "keep their first wall time). Every score: the written site bundle's own `configs/inference.json` on the "
        f"{sp['test']} site TEST cases (never used for a choice), DSC / NSD % (tolerance 1 mm), mean ± std over seeds "
        f"{', '.join(str(x['seed']) for x in r['rows'][0]['runs'])}.", "",
        "| row | trainable params | epochs: ceiling (trained / kept per seed) | train time (min) | DSC | NSD | "
        + " | ".join(f"DSC {c}" for c in r["classes"]) + " |",
        "| --- | ---: | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in r["classes"]) + " |",
    ]
    for row in r["rows"]:
        runs = row["runs"]
        lines.append(
            f"| {row['name']}: {row['description']} | {runs[0]['trainable']:,} | {runs[0]['epochs']} "
            f"({', '.join(_epochs(x) for x in runs)}) | "
            f"{statistics.fmean(x['train_seconds'] for x in runs) / 60:.1f} | {cell([x['test']['mean_dsc'] for x in runs])} | "
            f"{cell([x['test']['mean_nsd'] for x in runs])} | "
            + " | ".join(cell([next(t['dsc_mean'] for t in x['test']['classes'] if t['class'] == c) for x in runs])
                         for c in r["classes"]) + " |"
        )  # fmt: skip
    lines += ["", "Before fine-tuning (each expert as exported, same test cases; the site classes anterior / posterior "
              "read from the expert's channels by the `auto` head rule):", ""]
    lines += [f"- {name}: DSC {100 * s['mean_dsc']:.1f}, NSD {100 * s['mean_nsd']:.1f}" for name, s in r["before"].items()]
    by = {row["name"]: [x["test"]["mean_dsc"] for x in row["runs"]] for row in r["rows"]}
    lines += ["", "Reading (2x-spread rule: a difference counts when it exceeds twice the larger std over seeds):", ""]
    for a, b in (("real_expert", "scratch"), ("real_expert", "synthetic_expert"), ("synthetic_expert", "scratch")):
        if a in by and b in by:
            diff, spread, verdict = compare_over_seeds([100 * v for v in by[a]], [100 * v for v in by[b]])
            lines.append(f"- {a} vs {b}: {diff:+.2f} DSC points (larger std over seeds {spread:.2f}, so a difference "
                         f"counts beyond {2 * spread:.2f}): {verdict}.")
    lines += [
        "", "## Setup", "",
        f"- Site cases: `{sp['file']}`, {sp['training']} training / {sp['validation']} validation cases drawn (seed "
        f"{sp['info'].get('seed')}) from the MSD hippocampus cases that the real-data study's datalist "
        f"(`{r['real_datalist']}`) neither trains nor validates on ({sp['info'].get('excluded_cases')} cases left out); "
        f"the {sp['test']} test cases are further unseen cases, disjoint from both parts.",
        "- Expert rows: `tools/finetune_site.py --expert_bundle <expert> --dataset_dir <site> --split_file <split>` with "
        "every other setting at its default (`medfm_ops.finetune.SiteFinetuneSettings`: "
        + ", ".join(f"{k} {v}" for k, v in r.get("defaults", {}).items() if k not in ("seed", "val_split")) + "; "
        "full fine-tuning, the best validation epoch kept, the expert's window and spacing); `scratch` with `--epochs` / "
        "`--val_interval` of the command above and every epoch trained (`--early_stop_patience 0`).",
        "- The real-data expert comes from the study's 40 training cases per region (seed 0, 40 epochs, see "
        "`docs/RESULTS_real_regions.md`); the README's real-data commands train on the whole datalist, so a user "
        "following them starts from an expert trained on more cases than this one.",
        f"- Machine: {m.get('cpu_model', '?')}, {m.get('logical_cores', '?')} logical cores, torch {m.get('torch', '?')}, "
        f"MONAI {m.get('monai', '?')}, GPU: {m.get('gpu') or 'none'}; one run at a time at one thread, other jobs "
        "sharing the cores (train times are inflated).",
        "", *regenerate_lines(r["command"]),
    ]
    text = "\n".join(lines)
    atomic_write_text(repo_path(results), text)
    print(text)
    return str(repo_path(results))


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report})
