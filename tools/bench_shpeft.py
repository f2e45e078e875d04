# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""SH-PEFT benchmark: fine-tune one pretrained 3D classifier on the real MedMNIST 3D tasks with SH-PEFT, its
baselines and its ablations; writes ``docs/RESULTS_shpeft.md`` (+ ``.json``).

    python tools/bench_shpeft.py run --pretrained bundles/foundation_cls [--seeds 0,1,2] [--epochs 10]
        [--tasks adrenalmnist3d,vesselmnist3d] [--rows shpeft,full,...] [--limit 64]

Every run is ``bundles/shpeft_cls/configs/train.json`` (plus the row's override file of ``configs/baselines/`` and
its command-line overrides) in a child process, with one shared harness: the same starting checkpoint, train split,
epochs, batch, learning rate, augmentation and 28^3 input; validation only after the last epoch and the LAST weights
kept (``--final_model last``: nothing is selected on the validation split that is scored). Scores on each task's
``val`` split (its ``test`` split is kept aside): F1, accuracy next to the majority-class accuracy (the training
split's most frequent class), balanced accuracy, AUC; mean ± std over seeds; trainable-parameter count; importance
estimation and training wall time (validation excluded: it runs after training).

Rows (:data:`ROWS`): SH-PEFT (hybrid L2, lambda 1, 1% of the backbone weights + the task head), full fine-tuning,
linear probe, BitFit, LoRA (r 8), a random mask, magnitude only, gradient only (L1, L2) at the same 1%, and the
ablations lambda 0.5 / 1.5, budget 0.1% / 5%, hybrid L1.

Cost: every row but the linear probe back-propagates through the whole network; with the foundation ResNet (8.3M
weights, 28^3, batch 16) the full default command (14 rows x 2 tasks x 3 seeds x 10 epochs) takes roughly two days
on 2 CPU cores (about 2.5 s per training step, ~1600 steps per row and seed) and far less on a GPU; ``--rows``,
``--seeds`` and ``--epochs`` trade it down, and finished runs are reused.

Resumable: a run is reused when its settings (all arguments, the bundle configs' contents) and the starting
checkpoint's sha256 are unchanged and its summary exists. CPU runs set ``GLIBC_TUNABLES`` (steadier, faster 3D steps).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import fire

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from medfm_ops.utils.atomic_io import atomic_write_text  # noqa: E402
from medfm_ops.utils.bench import GLIBC_TUNABLES, machine_info, run_logged, split_list  # noqa: E402

BUNDLE = REPO / "bundles" / "shpeft_cls"
#: task -> npz path relative to ``--data_dir`` (see ../shared/data/README.md)
TASK_FILES = {"adrenalmnist3d": "adrenalmnist3d/adrenalmnist3d.npz", "vesselmnist3d": "vesselmnist3d/vesselmnist3d.npz"}

#: (row name, description, override file of configs/baselines or None, command-line overrides)
ROWS: tuple[tuple[str, str, str | None, dict[str, Any]], ...] = (
    ("shpeft", "SH-PEFT: hybrid L2, lambda 1, 1%", None, {}),
    ("full", "full fine-tuning", "full", {}),
    ("linear_probe", "linear probe (head only)", "linear_probe", {}),
    ("bitfit", "BitFit (biases + head)", "bitfit", {}),
    ("lora", "LoRA r 8 (convs / linears) + head, fused", "lora", {}),
    ("random_mask", "random mask, 1%", "random_mask", {}),
    ("magnitude", "magnitude only (I_ta), 1%", "magnitude", {}),
    ("gradient_l1", "gradient only (I_td, L1), 1%", "gradient_l1", {}),
    ("gradient_l2", "gradient only (I_td, L2), 1%", "gradient_l2", {}),
    ("shpeft_lambda0.5", "SH-PEFT, lambda 0.5", None, {"sparse_lambda": 0.5}),
    ("shpeft_lambda1.5", "SH-PEFT, lambda 1.5", None, {"sparse_lambda": 1.5}),
    ("shpeft_budget0.1", "SH-PEFT, budget 0.1%", None, {"sparse_budget": 0.001}),
    ("shpeft_budget5", "SH-PEFT, budget 5%", None, {"sparse_budget": 0.05}),
    ("shpeft_l1", "SH-PEFT, hybrid L1", None, {"sparse_variant": "l1"}),
)
SCORES = (("f1", "F1"), ("accuracy", "acc"), ("majority_accuracy", "majority acc"),
          ("balanced_accuracy", "bal. acc"), ("auc", "AUC"))  # fmt: skip


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _configs_digest() -> str:
    """Hash of the bundle's training configs (a changed config invalidates reused runs)."""
    h = hashlib.sha256()
    for p in sorted([BUNDLE / "configs" / "train.json", *(BUNDLE / "configs" / "baselines").glob("*.json")]):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()[:16]


def _run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` from the repository root (GLIBC_TUNABLES set), output to ``log``; raise with its tail on failure."""
    return run_logged(cmd, log, cwd=REPO, glibc_tunables=True)


def _mean_std(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    vals = [scale * v for v in values if v is not None and v == v]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.fmean(vals):.{digits}f} ± {statistics.pstdev(vals):.{digits}f}"


def write_results(path: Path, record: dict[str, Any]) -> str:
    """Render the markdown results (one table per task) from a benchmark record; returns the text."""
    m, s = record["machine"], record["settings"]
    lines = [
        "# Results: SH-PEFT fine-tuning of a pretrained 3D classifier (MedMNIST v2 3D tasks)", "",
        f"Generated by `{record['command']}` on {record['date']} (sum of the runs' wall times "
        f"{record['total_run_seconds'] / 60:.1f} min).", "",
        f"- Starting checkpoint: `{record['pretrained']['path']}` (sha256 {record['pretrained']['sha256'][:16]}, "
        f"{record['pretrained']['network']}, {record['pretrained']['num_weights']:,} weights); the classifier layer is "
        "re-headed for each task (rows of the task when the checkpoint knows it, else a fresh head with the run's "
        "seed) and always trained; budgets are fractions of the other weights.",
        f"- Harness (every row): `bundles/shpeft_cls/configs/train.json` + the row's override; {s['epochs']} epoch(s), "
        f"batch {s['batch_size']}, AdamW lr {s['learning_rate']} (weight decay {s['weight_decay']}) with cosine decay, "
        f"cross-entropy, flips + small affine augmentation, input {'x'.join(map(str, s['spatial_size']))}; the last "
        "weights are scored (no selection on val). Importance estimation: one epoch of the training split "
        "(random mask and magnitude rows: one batch, for the shapes only).",
        "- Data: train split to train, val split to score (test splits kept aside)"
        + (f"; first {s['limit']} cases of each split only (--limit, a smoke test: the splits are not shuffled, "
           "VesselMNIST3D's train split starts with its positives)" if s.get("limit") else "") + ". Seeds: "
        f"{', '.join(map(str, s['seeds']))} (data order, augmentation, fresh head, random mask).",
        "- Scores: F1 (macro, main), accuracy next to the majority-class accuracy (always predicting the training "
        "split's most frequent class), balanced accuracy, AUC; mean ± std over seeds, in %. Wall times: importance "
        "estimation and training (validation and bundle writing excluded), seconds, mean over seeds.",
        f"- Machine: {m['cpu_model']}, {m['usable_cores']} usable cores ({m['torch_threads']} torch threads), torch "
        f"{m['torch']}, GPU: {m['gpu'] or 'none'}; GLIBC_TUNABLES={m['glibc_tunables'] or GLIBC_TUNABLES} (set for "
        f"the runs); 1-min load average {m['load_average_1min']:.2f} at start, {record['load_average_end']:.2f} at "
        "end (other jobs on these cores inflate wall times).", "",
    ]  # fmt: skip
    for task, rows in record["tasks"].items():
        lines += [f"## {task}", "",
                  "| row | method | trainable params | " + " | ".join(h for _, h in SCORES)
                  + " | estimation (s) | training (s) |",
                  "| --- | --- | ---: | " + " | ".join("---:" for _ in SCORES) + " | ---: | ---: |"]  # fmt: skip
        for r in rows:
            runs = r["runs"]
            est = [(x["importance_estimation"] or {}).get("seconds") for x in runs]
            cells = [_mean_std([x["scores"][k] for x in runs], 100.0) for k, _ in SCORES]
            cells[0] = f"**{cells[0]}**"
            lines.append(
                f"| {r['name']} | {r['description']} | {runs[0]['trainable']['count']:,} "
                f"({100 * runs[0]['trainable']['fraction']:.3g}%) | " + " | ".join(cells)
                + f" | {_mean_std(est, digits=1) if any(e is not None for e in est) else '-'} | "
                f"{_mean_std([x['train_seconds'] for x in runs], digits=1)} |"
            )
        lines.append("")
    lines += ["## Regenerate", "", "```bash", record["command"], "```", "",
              f"Per-run bundles (merged `models/model.pt`, `sparse_delta.pt`, `training_summary.json`) and logs are under "
              f"`{record['work_dir']}/<task>/<row>/seed<seed>/`.", ""]  # fmt: skip
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
    return text


def run(
    pretrained: str = "bundles/foundation_cls",
    pretrained_network_def: str | None = None,
    tasks: str | tuple = ("adrenalmnist3d", "vesselmnist3d"),
    data_dir: str = "../shared/data",
    rows: str | tuple | None = None,
    seeds: str | tuple = (0, 1, 2),
    epochs: int = 10,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    spatial_size: tuple[int, int, int] = (28, 28, 28),
    limit: int | None = None,
    work_dir: str = "runs/shpeft_bench",
    results: str = "docs/RESULTS_shpeft.md",
    reuse_rows: bool = True,
) -> str:
    """
    Run the rows (each task x seed) and write ``results`` and its ``.json``.

    Args:
        pretrained: the starting checkpoint: a trained classifier bundle or a ``model.pt`` (relative to the
            repository root). Defaults to the trained ``bundles/foundation_cls``.
        pretrained_network_def: its network config (JSON file) for a bare ``model.pt``. Defaults to None.
        tasks: MedMNIST 3D tasks (comma-separated or a list), from ``data_dir``.
        data_dir: folder of the real data sets. Defaults to ``../shared/data``.
        rows: subset of :data:`ROWS` names. Defaults to all.
        seeds: training seeds. Defaults to 0, 1, 2.
        epochs, batch_size, learning_rate, weight_decay, spatial_size: the shared harness.
        limit: keep the first ``limit`` cases of each split (quick runs). Defaults to None (all).
        work_dir: per-run outputs and logs. Defaults to ``runs/shpeft_bench``.
        results: markdown to write (``.json`` beside it). Defaults to ``docs/RESULTS_shpeft.md``.
        reuse_rows: reuse a finished run with the same settings and starting checkpoint. Defaults to True.

    Raises:
        FileNotFoundError: when the starting checkpoint or a task's data is missing (the message says how to get it).
        ValueError: for unknown rows or tasks.
    """
    from medfm_ops.networks import instantiate, load_pretrained_classifier

    start = time.perf_counter()
    root = lambda p: Path(p) if Path(p).is_absolute() else REPO / p  # noqa: E731
    pre = load_pretrained_classifier(root(pretrained), root(pretrained_network_def) if pretrained_network_def else None)
    wanted = split_list(rows) if rows else [r[0] for r in ROWS]
    unknown = sorted(set(wanted) - {r[0] for r in ROWS})
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {[r[0] for r in ROWS]}.")
    task_list = split_list(tasks)
    data = root(data_dir).resolve()
    for t in task_list:
        if t not in TASK_FILES:
            raise ValueError(f"unknown task {t!r}; known: {sorted(TASK_FILES)}.")
        if not (data / TASK_FILES[t]).is_file():
            raise FileNotFoundError(f"{data / TASK_FILES[t]} not found: pass --data_dir (see ../shared/data/README.md).")
    seed_list = [int(s) for s in split_list(seeds)]
    work = root(work_dir)
    machine = machine_info("cpu")
    shared = {"epochs": int(epochs), "batch_size": int(batch_size), "learning_rate": float(learning_rate),
              "weight_decay": float(weight_decay), "spatial_size": [int(s) for s in spatial_size]}  # fmt: skip
    digest = _configs_digest()
    out_tasks: dict[str, list[dict[str, Any]]] = {}
    total = 0.0
    for task in task_list:
        out_tasks[task] = []
        for name, description, override, extra in ROWS:
            if name not in wanted:
                continue
            runs = []
            for seed in seed_list:
                run_dir = work / task / name / f"seed{seed}"
                files = [str(BUNDLE / "configs" / "train.json")]
                if override:
                    files.append(str(BUNDLE / "configs" / "baselines" / f"{override}.json"))
                # val_interval > epochs: no validation inside the timed training; the last weights are scored after it
                args = {**shared, "task": task, "seed": seed, "real_tasks": {task: str(data / TASK_FILES[task])},
                        "real_limit": limit, "val_interval": int(epochs) + 1, "final_model": "last",
                        "verify_export": False, **extra}  # fmt: skip
                cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(files),
                       "--bundle_root", str(BUNDLE), "--pretrained", str(root(pretrained)),
                       "--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "runs"),
                       "--export_dir", str(run_dir / "export")]  # fmt: skip
                if pretrained_network_def:
                    cmd += ["--pretrained_network_def", str(root(pretrained_network_def))]
                for k, v in args.items():
                    if v is not None:  # Fire reads Python literals: True/False, not JSON's true/false/null
                        cmd += [f"--{k}", repr(v) if isinstance(v, bool) else json.dumps(v)]
                settings = {"args": args, "override": override, "configs": digest, "pretrained_sha256": pre.sha256}
                stamp, summary_file = run_dir / "bench_run.json", run_dir / "models" / "training_summary.json"
                old = json.loads(stamp.read_text()) if stamp.is_file() and summary_file.is_file() else {}
                if reuse_rows and old.get("settings") == settings:
                    print(f"  {task} {name} seed {seed}: reusing {run_dir}", flush=True)
                    seconds = old["seconds"]
                else:
                    seconds = _run(cmd, run_dir / "run.log")
                    atomic_write_text(stamp, json.dumps({"settings": settings, "seconds": seconds, "command": shlex.join(cmd)}, indent=2))
                total += seconds
                summary = json.loads(summary_file.read_text())
                sc = summary["scores"]
                print(f"  {task} {name} seed {seed}: F1 {sc['f1']:.4f} acc {sc['accuracy']:.4f} (majority "
                      f"{sc['majority_accuracy']:.4f}) AUC {sc['auc']:.4f}; {seconds:.0f} s", flush=True)  # fmt: skip
                runs.append({"seed": seed, "seconds": seconds, **{k: summary[k] for k in (
                    "scores", "trainable", "importance_estimation", "train_seconds", "settings")}})
            out_tasks[task].append({"name": name, "description": description, "runs": runs})

    cmd_line = ["python tools/bench_shpeft.py run", f"--pretrained {pretrained}", f"--tasks {','.join(task_list)}",
                f"--seeds {','.join(map(str, seed_list))}", f"--epochs {epochs}", f"--batch_size {batch_size}",
                f"--learning_rate {learning_rate}"]  # fmt: skip
    if pretrained_network_def:
        cmd_line.append(f"--pretrained_network_def {pretrained_network_def}")
    if rows:
        cmd_line.append(f"--rows {','.join(wanted)}")
    if limit:
        cmd_line.append(f"--limit {limit}")
    if work_dir != "runs/shpeft_bench":
        cmd_line.append(f"--work_dir {work_dir}")
    if results != "docs/RESULTS_shpeft.md":
        cmd_line.append(f"--results {results}")
    record = {
        "command": " ".join(cmd_line),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": time.perf_counter() - start,
        "total_run_seconds": total,
        "machine": machine,
        "load_average_end": os.getloadavg()[0],
        "pretrained": {"path": os.path.relpath(pre.path, REPO), "sha256": pre.sha256,
                       "network": pre.network_def["_target_"],
                       "num_weights": sum(p.numel() for p in instantiate(pre.network_def).parameters())},  # fmt: skip
        "settings": {**shared, "seeds": seed_list, "limit": limit, "tasks": task_list, "configs": digest},
        "work_dir": os.path.relpath(work, REPO),
        "tasks": out_tasks,
    }
    out = root(results)
    atomic_write_text(out.with_suffix(".json"), json.dumps(record, indent=2, default=float))
    text = write_results(out, record)
    print(text)
    return str(out)


def report(results: str = "docs/RESULTS_shpeft.md") -> str:
    """(Re)write the markdown from the ``.json`` beside it (an earlier ``run``)."""
    out = Path(results) if Path(results).is_absolute() else REPO / results
    text = write_results(out, json.loads(out.with_suffix(".json").read_text()))
    print(text)
    return str(out)


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report})
