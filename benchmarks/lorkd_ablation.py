# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""LoRKD baselines and ablations in one harness: every row is ``bundles/lorkd_seg/configs/train.json`` plus its
override file of ``configs/baselines/`` and/or command-line overrides, trained and then scored by the bundle's own
``evaluate.json`` (region-wise DSC/NSD on the test split); writes ``benchmarks/lorkd_ablation.md`` + ``.json`` and a
PNG figure.

    python -m benchmarks.lorkd_ablation run [--seeds 0,1,2 | --single_seed] [--epochs 8] [--rows lorkd,mtl,...]
        [--datalist path/to/datalist.json] [--teacher bundles/foundation_seg] [--work_dir runs/lorkd_ablation]
        [--out benchmarks/lorkd_ablation.md]
    python -m benchmarks.lorkd_ablation report [--out benchmarks/lorkd_ablation.md]

Rows (:data:`ROWS`): one stock network per region (single-task, task loss only, nnU-Net-like: ``baselines/stl.json
--region R`` for every region R), one shared stock student (multi-task, task loss only: ``mtl.json``), the same
distilled from the teacher (``mtl_kd.json``), LoRKD (train.json as it is: experts on every convolution, decoder at
twice the rank), LoRKD* (``lorkd_star.json``), and LoRKD with ``expert_rank`` 4 / 16, ``beta`` 0 / 1 (train.json's
rank and beta are the LoRKD row) and with the transposed convolutions shared (``expert_transposed`` false, as in the
LoRKD authors' U-Net). Same data, teacher,
epochs, optimiser, augmentation and seeds for every row; validation only after the last epoch (its weights are
scored: nothing is selected on the test split). The single-task networks train for the same number of epochs on
their region's cases only, so the R of them together see the data (and take the steps) of one multi-task run.

Deployment: LoRKD rows ship one fused expert per region (a stock network, W0 + B A); the single-task row one stock
network per region; the multi-task rows one shared stock network. Train params count everything trained (all experts;
the R single-task networks together); FLOPs are per sample of one ``roi_size`` window forward.

Cost (synthetic default set: 36 training cases, 32^3 patches, batch 4, 9 steps per epoch): 10 rows x 3 seeds = 30
trainings (the single-task row as 4 short ones) and their evaluations. The default 8 epochs are chosen for about an
hour on an otherwise idle 2-core CPU (a LoRKD epoch ~10-12 s there, a plain student's ~5-8 s, plus ~30-50 s of process
start, caching and evaluation per run). Measured on a 2-core AMD EPYC shared with other jobs (1-min load average ~4.5):
``--single_seed --epochs 8 --rows stl,mtl,lorkd`` took 14.5 min (stl 324 s, mtl 211 s, lorkd 325 s), i.e. ~50 min per
seed for all rows and ~2.5 h for the default command at that load. ``--single_seed``, ``--epochs``, ``--rows`` trade
it down; finished runs are reused.

Resumable: a run is reused when its settings (arguments, the bundle configs' contents, the datalist's contents) and
the teacher's weights (sha256) are unchanged and its evaluation exists. CPU runs set ``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fire

from benchmarks.common import GLIBC_TUNABLES, REPO, machine_info, repo_path, run_logged, select_rows, split_list
from benchmarks.sections import regenerate_lines
from benchmarks.learning_curve import mean_std
from benchmarks.score_bars import plot_score_bars
from medfm_ops.utils.atomic_io import atomic_write_text
from medfm_ops.utils.hashing import file_sha256

BUNDLE = REPO / "bundles" / "lorkd_seg"
CONFIGS = BUNDLE / "configs"
#: (row name, description, override file of configs/baselines or None, command-line overrides, deployed as)
ROWS: tuple[tuple[str, str, str | None, dict[str, Any], str], ...] = (
    ("stl", "single-task: one stock network per region, task loss", "stl", {}, "one stock network per region"),
    ("mtl", "multi-task: one shared stock student, task loss", "mtl", {}, "one shared stock network"),
    ("mtl_kd", "multi-task KD: the shared student distilled from the teacher", "mtl_kd", {},
     "one shared stock network"),
    ("lorkd", "LoRKD (train.json: rank {expert_rank}, beta {beta})", None, {}, "one fused expert per region"),
    ("lorkd_star", "LoRKD* (per-region ranks from the warm-up)", "lorkd_star", {}, "one fused expert per region"),
    ("lorkd_rank4", "LoRKD, rank 4", None, {"expert_rank": 4}, "one fused expert per region"),
    ("lorkd_rank16", "LoRKD, rank 16", None, {"expert_rank": 16}, "one fused expert per region"),
    ("lorkd_beta0", "LoRKD, beta 0 (no distillation)", None, {"beta": 0.0}, "one fused expert per region"),
    ("lorkd_beta1", "LoRKD, beta 1", None, {"beta": 1.0}, "one fused expert per region"),
    ("lorkd_transposed_shared", "LoRKD, transposed convs shared (the LoRKD authors' U-Net)", None,
     {"expert_transposed": False}, "one fused expert per region"),
)  # fmt: skip
#: evaluate.json's row of each kind of model (see medfm_ops.engines.evaluate_decomposition)
DEPLOY_ROW = {True: "LoRKD experts (fused, one per region)", False: "stock network (no experts)"}
TEACHER_ROW = "Foundation (teacher)"
_DEFAULT_CMD = {"seeds": "0,1,2", "epochs": 8, "teacher": "bundles/foundation_seg", "work_dir": "runs/lorkd_ablation",
                "out": "benchmarks/lorkd_ablation.md"}  # fmt: skip


def _configs_digest(override: str | None) -> str:
    """Hash of the configs a run reads (a changed config invalidates its reused runs)."""
    files = [CONFIGS / "train.json", CONFIGS / "evaluate.json"]
    files += [CONFIGS / "baselines" / f"{override}.json"] if override else []
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()[:16]


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root (GLIBC_TUNABLES set), output to ``log``; raise with its tail on failure."""
    return run_logged(cmd, log, cwd=REPO, glibc_tunables=True)


def _bundle_cmd(files: list[Path], args: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps([str(f) for f in files])]
    for k, v in args.items():  # Fire reads Python literals: True/False, not JSON's true/false
        cmd += [f"--{k}", repr(v) if isinstance(v, bool) else (v if isinstance(v, str) else json.dumps(v))]
    return cmd


def _read_rows(csv_path: Path) -> dict[str, dict[str, Any]]:
    """evaluate.json's ``regions.csv`` as ``{model: {column: float or str}}``."""
    out = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            out[row["model"]] = {k: (v if k == "model" else float(v)) for k, v in row.items()}
    return out


def train_and_evaluate(run_dir: Path, override: str | None, args: dict[str, Any], settings: dict[str, Any],
                       reuse: bool, evaluate_teacher: bool = False) -> dict[str, Any]:
    """
    One bundle training run and its evaluation (``evaluate.json``) in ``run_dir``, or the stored result of an
    identical earlier one (same ``settings``). Returns ``{"rows": regions.csv rows, "train_seconds",
    "eval_seconds", "reused"}``.
    """
    stamp = run_dir / "bench_run.json"
    old = json.loads(stamp.read_text()) if stamp.is_file() else {}
    if reuse and old.get("settings") == settings and (run_dir / "eval" / "regions.csv").is_file():
        print(f"  reusing {run_dir}", flush=True)
        return {**old["result"], "reused": True}
    stamp.unlink(missing_ok=True)
    files = [CONFIGS / "train.json", *([CONFIGS / "baselines" / f"{override}.json"] if override else [])]
    common = {"bundle_root": str(BUNDLE), "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "runs"),
              **args}  # fmt: skip
    train_cmd = _bundle_cmd(files, common)
    eval_cmd = _bundle_cmd([*files, CONFIGS / "evaluate.json"],
                           {**common, "eval_dir": str(run_dir / "eval"), "evaluate_teacher": evaluate_teacher})
    train_seconds = _run(train_cmd, run_dir / "train.log")
    eval_seconds = _run(eval_cmd, run_dir / "evaluate.log")
    result = {"rows": _read_rows(run_dir / "eval" / "regions.csv"), "train_seconds": train_seconds,
              "eval_seconds": eval_seconds, "commands": [shlex.join(train_cmd), shlex.join(eval_cmd)]}  # fmt: skip
    atomic_write_text(stamp, json.dumps({"settings": settings, "result": result}, indent=2))
    return {**result, "reused": False}


def _seed_result(runs: list[dict[str, Any]], regions: list[str], experts: bool) -> dict[str, Any]:
    """Scores and sizes of one row and seed from its run(s) (several for the single-task row: one per region)."""
    rows = [r["rows"][DEPLOY_ROW[experts]] for r in runs]
    scores = {}
    for region in regions:
        found = [(row[f"{region} DSC"], row[f"{region} NSD"]) for row in rows if not math.isnan(row[f"{region} DSC"])]
        scores[region] = {"dsc": found[0][0], "nsd": found[0][1]} if found else {"dsc": math.nan, "nsd": math.nan}
    finite = [s for s in scores.values() if not math.isnan(s["dsc"])]
    out = {
        "regions": scores,
        "mean_dsc": statistics.fmean(s["dsc"] for s in finite) if finite else math.nan,
        "mean_nsd": statistics.fmean(s["nsd"] for s in finite) if finite else math.nan,
        "train_params": sum(row["train params (M)"] for row in rows) * 1e6,  # the single-task networks together
        "deploy_params": rows[0]["deploy params (M)"] * 1e6,
        "train_gflops": rows[0]["train GFLOPs"],
        "deploy_gflops": rows[0]["deploy GFLOPs"],
        "train_seconds": sum(r["train_seconds"] for r in runs),
        "eval_seconds": sum(r["eval_seconds"] for r in runs),
        "reused": all(r["reused"] for r in runs),
    }
    if experts:  # the routed (unfused) model must score as the fused experts
        unfused = [r["rows"]["LoRKD (unfused, routed)"]["mean DSC"] for r in runs]
        out["unfused_mean_dsc"] = statistics.fmean(unfused)
    return out


def run(
    seeds: str | tuple = _DEFAULT_CMD["seeds"],
    single_seed: bool = False,
    epochs: int = _DEFAULT_CMD["epochs"],
    warmup_epochs: int | None = None,
    rows: str | tuple | None = None,
    datalist: str | None = None,
    teacher: str = _DEFAULT_CMD["teacher"],
    work_dir: str = _DEFAULT_CMD["work_dir"],
    out: str = _DEFAULT_CMD["out"],
    reuse_rows: bool = True,
) -> str:
    """
    Train and evaluate the rows for every seed; write ``out`` (markdown), its ``.json`` and ``.png``.

    Args:
        seeds: training seeds (comma-separated or a list): network initialisation, data order, augmentation.
            Defaults to 0, 1, 2.
        single_seed: use only the first of ``seeds``. Defaults to False.
        epochs: training epochs of every run. Defaults to 8 (the whole default command: about an hour on an idle
            2-core CPU, see "Cost" above).
        warmup_epochs: the LoRKD rows' warm-up (frozen experts; LoRKD*'s rank allocation). Defaults to
            ``max(1, epochs // 10)`` (train.json's 4 of 40).
        rows: subset of :data:`ROWS` names. Defaults to all.
        datalist: a multi-region datalist (relative to the repository root or absolute). Defaults to the bundle's
            synthetic default set.
        teacher: the trained teacher bundle (``models/model.pt``). Defaults to ``bundles/foundation_seg``.
        work_dir: per-run bundles outputs and logs. Defaults to ``runs/lorkd_ablation``.
        out: markdown to write (``.json`` and ``.png`` beside it). Defaults to ``benchmarks/lorkd_ablation.md``.
        reuse_rows: reuse a finished run with the same settings and teacher weights. Defaults to True.

    Raises:
        FileNotFoundError: when the teacher or the datalist is missing (the message says how to get a teacher).
        ValueError: for unknown rows, no seed, or ``epochs <= warmup_epochs``.
    """
    from monai.bundle import ConfigParser

    start = time.perf_counter()
    wanted = select_rows(rows, [r[0] for r in ROWS])
    seed_list = [int(s) for s in split_list(seeds)][: 1 if single_seed else None]
    if not seed_list:
        raise ValueError("no seed given (--seeds 0,1,2).")
    warmup = max(1, int(epochs) // 10) if warmup_epochs is None else int(warmup_epochs)
    if int(epochs) <= warmup:
        raise ValueError(f"epochs ({epochs}) must exceed warmup_epochs ({warmup}): the experts would never train.")
    teacher_dir = repo_path(teacher).resolve()
    if not (teacher_dir / "models" / "model.pt").is_file():
        raise FileNotFoundError(
            f"no trained teacher at {teacher_dir / 'models' / 'model.pt'}: train it first, e.g. "
            f"`python -m monai.bundle run --config_file {os.path.relpath(teacher_dir, REPO)}/configs/train.json` "
            "(same data as the rows).")
    data_args: dict[str, Any] = {}
    if datalist:
        if not repo_path(datalist).is_file():
            raise FileNotFoundError(f"datalist {repo_path(datalist)} not found.")
        data_args["datalist"] = str(repo_path(datalist).resolve())
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update({"bundle_root": str(BUNDLE), **data_args})
    for key in ("expert_rank", "beta", "expert_transposed", "seed", "train_regions", "epochs", "warmup_epochs"):
        if key not in parser.get():
            raise KeyError(f"bundles/lorkd_seg/configs/train.json has no '{key}' key: update ROWS / the harness.")
    table = parser.get_parsed_content("region_table")
    regions = [table.region_names[t] for t in table.task_ids]
    datalist_path = Path(parser.get_parsed_content("datalist"))
    shared = {"epochs": int(epochs), "val_interval": int(epochs), "teacher_path": str(teacher_dir), **data_args}
    teacher_sha = file_sha256(teacher_dir / "models" / "model.pt")
    data_sha = file_sha256(datalist_path)
    machine = machine_info("cpu")
    work = repo_path(work_dir)
    results: list[dict[str, Any]] = []
    teacher_row: dict[str, Any] | None = None
    for name, description, override, extra, deployed in ROWS:
        if name not in wanted:
            continue
        experts = override not in ("stl", "mtl", "mtl_kd")
        args = {**shared, **({"warmup_epochs": warmup} if experts else {}), **extra}
        per_seed = []
        for seed in seed_list:
            runs = []
            for region in regions if override == "stl" else [None]:
                run_args = {**args, "seed": seed, **({"region": region} if region else {})}
                with_teacher = name == "lorkd" and seed == seed_list[0]  # the teacher's reference row, once
                settings = {"args": run_args, "override": override, "configs": _configs_digest(override),
                            "teacher_sha256": teacher_sha, "datalist_sha256": data_sha,
                            "evaluate_teacher": with_teacher}  # fmt: skip
                run_dir = work / name / f"seed{seed}" / (region or "")
                runs.append(train_and_evaluate(run_dir, override, run_args, settings, reuse_rows, with_teacher))
                if with_teacher:
                    teacher_row = runs[-1]["rows"].get(TEACHER_ROW)
            per_seed.append({"seed": seed, **_seed_result(runs, regions, experts)})
            r = per_seed[-1]
            print(f"  {name} seed {seed}: mean DSC {r['mean_dsc']:.4f} NSD {r['mean_nsd']:.4f}; "
                  f"{r['train_seconds'] + r['eval_seconds']:.0f} s{' (reused)' if r['reused'] else ''}", flush=True)
        defaults = {"expert_rank": parser["expert_rank"], "beta": parser["beta"]}
        results.append({"name": name, "description": description.format(**defaults), "override": override,
                        "overrides": extra, "deployed_as": deployed, "experts": experts, "seeds": per_seed})

    cmd = ["python -m benchmarks.lorkd_ablation run"]
    given = {"seeds": ",".join(split_list(seeds)), "epochs": int(epochs), "teacher": teacher, "work_dir": work_dir,
             "out": out}  # fmt: skip
    cmd += [f"--{k} {v}" for k, v in given.items() if str(v) != str(_DEFAULT_CMD[k])]
    cmd += ["--single_seed"] if single_seed else []
    cmd += [f"--warmup_epochs {warmup}"] if warmup_epochs is not None else []
    cmd += [f"--rows {','.join(wanted)}"] if rows else []
    cmd += [f"--datalist {datalist}"] if datalist else []
    record = {
        "command": " ".join(cmd),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": time.perf_counter() - start,
        "machine": machine,
        "load_average_end": os.getloadavg()[0],
        "settings": {"epochs": int(epochs), "warmup_epochs": warmup, "seeds": seed_list, "regions": regions,
                     "datalist": os.path.relpath(datalist_path, REPO) if datalist else "synthetic default "
                     f"({parser['synthetic']})", "datalist_sha256": data_sha,
                     "teacher": os.path.relpath(teacher_dir, REPO), "teacher_sha256": teacher_sha,
                     "batch_size": parser["batch_size"], "learning_rate": parser["learning_rate"],
                     "roi_size": parser["roi_size"]},  # fmt: skip
        "work_dir": str(work_dir),
        "teacher_row": teacher_row,
        "rows": results,
    }
    return _write(repo_path(out), record)


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    vals = [scale * v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    mean, std = mean_std(vals)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if len(vals) > 1 else "")


def markdown(record: dict[str, Any], figure_name: str) -> str:
    """The results page of a benchmark record."""
    m, s = record["machine"], record["settings"]
    regions = s["regions"]
    n_seeds = len(s["seeds"])
    lines = [
        "# LoRKD segmentation: baselines and ablations in one harness", "",
        f"Generated by `{record['command']}` on {record['date']} in {record['wall_seconds'] / 60:.1f} min.", "",
        f"- Harness (every row): `bundles/lorkd_seg/configs/train.json` + the row's override, {s['epochs']} epoch(s) "
        f"(LoRKD rows: the first {s['warmup_epochs']} with frozen experts), batch {s['batch_size']}, AdamW lr "
        f"{s['learning_rate']} with cosine decay, patch {'x'.join(map(str, s['roi_size']))}; validation after the last "
        "epoch only, its weights scored by `evaluate.json` on the test split (sliding window).",
        f"- Data: {s['datalist']} (sha256 {s['datalist_sha256'][:12]}); teacher `{s['teacher']}` (sha256 "
        f"{s['teacher_sha256'][:12]}). Seeds {', '.join(map(str, s['seeds']))}: initialisation, data order, "
        "augmentation; scores are mean ± std (population) over seeds, in %.",
        "- Single-task row: one network per region, trained on that region's cases for the same epochs (together they "
        "take the steps of one multi-task run). Train params: everything trained (all experts; the single-task "
        "networks summed). Deploy: what serves one region (see 'deployed as'). GFLOPs: per sample, one window forward.",
        f"- Machine: {m['cpu_model']}, {m['usable_cores']} usable cores ({m['torch_threads']} torch threads), torch "
        f"{m['torch']}, GPU: {m['gpu'] or 'none'}; GLIBC_TUNABLES={m['glibc_tunables'] or GLIBC_TUNABLES} (set for the "
        f"runs); 1-min load average {m['load_average_1min']:.2f} at start, {record['load_average_end']:.2f} at end "
        "(other jobs on these cores inflate wall times).", "",
        "## Region-wise DSC (%)", "",
        "| row | method | " + " | ".join(regions) + " | **mean** |",
        "| --- | --- | " + " | ".join("---:" for _ in regions) + " | ---: |",
    ]  # fmt: skip

    def table(metric: str) -> list[str]:
        out = []
        for r in record["rows"]:
            cells = [_mean_std([x["regions"][g][metric] for x in r["seeds"]]) for g in regions]
            out.append(f"| {r['name']} | {r['description']} | " + " | ".join(cells)
                       + f" | **{_mean_std([x['mean_' + metric] for x in r['seeds']])}** |")
        t = record.get("teacher_row")
        if t:
            key = metric.upper()
            vals = [t[f"{g} {key}"] for g in regions]
            out.append("| teacher | foundation model (reference, one evaluation) | "
                       + " | ".join(_mean_std([v]) for v in vals) + f" | {_mean_std([t['mean ' + key]])} |")
        return out

    lines += table("dsc")
    lines += ["", "## Region-wise NSD (%, 1 mm)", "",
              "| row | method | " + " | ".join(regions) + " | **mean** |",
              "| --- | --- | " + " | ".join("---:" for _ in regions) + " | ---: |"]  # fmt: skip
    lines += table("nsd")
    lines += ["", "## Size and cost", "",
              "| row | deployed as | train params (M) | deploy params (M) | train GFLOPs | deploy GFLOPs | "
              "train + eval (s per seed) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for r in record["rows"]:
        x = r["seeds"][0]
        secs = [y["train_seconds"] + y["eval_seconds"] for y in r["seeds"]]
        lines.append(f"| {r['name']} | {r['deployed_as']} | {x['train_params'] / 1e6:.3f} | "
                     f"{x['deploy_params'] / 1e6:.3f} | {x['train_gflops']:.3f} | {x['deploy_gflops']:.3f} | "
                     f"{_mean_std(secs, 1.0, 0)} |")  # fmt: skip
    lines += ["", f"![mean and region-wise DSC per row, error bars: std over {n_seeds} seed(s)]({figure_name})", "",
              *regenerate_lines(record["command"]),
              f"Per-run outputs (models, logs, `eval/regions.csv`) are under `{record['work_dir']}/<row>/seed<seed>/`; "
              "`python -m benchmarks.lorkd_ablation report` rewrites this page and the figure from the `.json`.", ""]
    return "\n".join(lines)


def _write(out: Path, record: dict[str, Any]) -> str:
    figure = out.with_suffix(".png")
    groups = {
        r["name"]: {**{g: [100 * x["regions"][g]["dsc"] for x in r["seeds"]] for g in record["settings"]["regions"]},
                    "mean": [100 * x["mean_dsc"] for x in r["seeds"]]}
        for r in record["rows"]
    }  # fmt: skip
    teacher = record.get("teacher_row")
    references = {"teacher (mean)": 100 * teacher["mean DSC"]} if teacher else None
    settings = record["settings"]
    title = f"lorkd_seg: {settings['epochs']} epoch(s), {len(settings['seeds'])} seed(s); error bars: std over seeds"
    plot_score_bars(figure, groups, ylabel="DSC (%)", references=references, title=title)
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2, default=float))
    text = markdown(record, figure.name)
    atomic_write_text(out, text)
    print(text)
    return str(out)


def report(out: str = _DEFAULT_CMD["out"]) -> str:
    """(Re)write the markdown and the figure from the ``.json`` beside ``out`` (an earlier ``run``)."""
    path = repo_path(out)
    return _write(path, json.loads(path.with_suffix(".json").read_text()))


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report})
