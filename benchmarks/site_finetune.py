# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Site fine-tuning benchmark: one split, one budget, four starting points, several seeds; writes ``docs/RESULTS.md``.

    python -m benchmarks.site_finetune run --dataset_dir ../shared/data/msd_hippocampus

Rows, all through ``tools/finetune_site.py`` (each run writes a complete site bundle, and its scores are those of
that bundle's own ``configs/inference.json``) with the same split, epochs, patch, batch and learning rate: a student
trained from scratch (the expert's stock architecture, random initialisation), the foundation teacher
(``bundles/foundation_seg``, its brain region channels) fine-tuned, and the brain expert fused out of the LoRKD
student (``bundles/lorkd_seg``) fine-tuned in ``full``, ``lora`` and ``sparse`` (SH-PEFT: the 1% most important weights,
importance L2, lambda 1; :data:`SPARSE_SETTINGS`) mode. Every row runs once per training seed
(``--seeds``); the table gives the mean and standard deviation over seeds.

The teacher and LoRKD checkpoints are taken from ``bundles/<name>/models`` when they are complete (``model.pt`` and a
``training_summary.json`` with the config's number of epochs); otherwise they are trained once with the bundles' own
``configs/train.json`` on the synthetic default data into ``<work_dir>/pretrained/<name>`` and reused from there.

CPU runs set ``GLIBC_TUNABLES`` (malloc thresholds) in the child processes: steadier, faster 3D steps at ~1.5x
peak memory (see the CPU performance notes).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import fire

from benchmarks.common import GLIBC_TUNABLES, REPO, repo_path, run_record, run_timed, select_rows
from benchmarks.sections import markdown_sections, regenerate_lines
from medfm_ops.finetune.settings import SiteFinetuneSettings
from medfm_ops.utils.atomic_io import atomic_write_text
from medfm_ops.utils.hashing import file_sha256

FINETUNE = REPO / "tools" / "finetune_site.py"
REGION = "brain_mri"

#: (row name, description, source, init, mode)
ROWS = (
    ("scratch", "student from scratch (expert architecture, random init)", "expert", "scratch", "full"),
    ("teacher_full", "foundation teacher, fine-tuned (all weights)", "teacher", "pretrained", "full"),
    ("expert_full", "LoRKD brain expert, fine-tuned (all weights)", "expert", "pretrained", "full"),
    ("expert_lora", "LoRKD brain expert, LoRA (r=8, fused back)", "expert", "pretrained", "lora"),
    ("expert_sparse", "LoRKD brain expert, SH-PEFT (1% of the weights, L2 importance, lambda 1)", "expert",
     "pretrained", "sparse"),
)

#: SH-PEFT settings of the ``sparse`` rows (passed to tools/finetune_site.py; part of a row's reuse stamp)
SPARSE_SETTINGS = {k: getattr(SiteFinetuneSettings(), k) for k in ("sparse_budget", "sparse_variant", "sparse_lambda")}

REFERENCES = (
    ("nnU-Net", "89.18", "97.92"),
    ("SAT-Nano foundation model, fine-tuned", "86.20", "95.60"),
    ("LoRKD brain expert, fine-tuned (journal version, Table 3)", "87.51-87.90", "-"),
)


def _run_timed(cmd: list[str], log: Path, append: bool = False) -> dict[str, float]:
    """:func:`benchmarks.common.run_timed` from the repository root with :data:`GLIBC_TUNABLES`."""
    return run_timed(cmd, log, cwd=REPO, glibc_tunables=True, append=append)


def _run(cmd: list[str], log: Path) -> float:
    """:func:`_run_timed`'s wall time."""
    return _run_timed(cmd, log)["wall"]


def _config_epochs(name: str) -> int | None:
    value = json.loads((REPO / "bundles" / name / "configs" / "train.json").read_text()).get("epochs")
    return value if isinstance(value, int) else None


def _complete(bundle: Path, name: str, epochs: int | None = None) -> dict[str, Any] | None:
    """The training summary of ``bundle`` when its checkpoint is complete (``epochs``, default the config's, trained,
    or an early stop before them), else None."""
    summary = bundle / "models" / "training_summary.json"
    if not (bundle / "models" / "model.pt").is_file() or not (bundle / "models" / "network_def.json").is_file():
        return None
    info = json.loads(summary.read_text()) if summary.is_file() else {}
    wanted = _config_epochs(name) if epochs is None else int(epochs)
    if wanted is not None and int(info.get("epochs", 0)) < wanted and not info.get("early_stopped"):
        return None
    return info


def ensure_pretrained(
    work_dir: str | Path,
    retrain: bool = False,
    datalist: str | Path | None = None,
    recipe: dict[str, dict[str, Any]] | None = None,
    config_files: tuple[str, ...] = ("train.json",),
) -> dict[str, dict[str, Any]]:
    """
    The teacher (``foundation_seg``) and LoRKD (``lorkd_seg``) bundle directories to start from, trained here when
    missing or incomplete. Returns ``{name: {"path", "summary", "trained_now", "seconds", "recipe"}}``.

    Without ``datalist``/``recipe``: complete checkpoints of ``bundles/<name>/models`` are used when present, else
    the bundles' own ``configs/train.json`` (synthetic default data) trains into ``<work_dir>/pretrained/<name>``.
    With them: ``configs/train.json`` trains on ``datalist`` with the command-line overrides ``recipe[name]``
    (e.g. ``{"epochs": 40, "roi_size": [32, 32, 32]}``; no config copies) into ``<work_dir>/pretrained/<name>``,
    stamped with ``recipe.json`` (checksums of the bundle's train.json, the datalist and the teacher; the overrides):
    reused only when complete and the stamp is unchanged, an interrupted run of the same stamp resumes, a different
    stamp retrains from scratch. ``config_files``: the bundle's config files merged in order (e.g. ``("train.json",
    "real_regions.json")`` for the real regions' preprocessing); checksummed in the stamp.
    """
    custom = datalist is not None or recipe is not None
    out: dict[str, dict[str, Any]] = {}
    teacher_dir = None
    for name in ("foundation_seg", "lorkd_seg"):
        repo_dir, local_dir = REPO / "bundles" / name, Path(work_dir).resolve() / "pretrained" / name
        overrides = dict((recipe or {}).get(name, {}))
        stamp = None
        if custom:
            stamp = {"config_sha256": file_sha256(repo_dir / "configs" / "train.json"),
                     **({"config_files": {f: file_sha256(repo_dir / "configs" / f) for f in config_files}}
                        if tuple(config_files) != ("train.json",) else {}),
                     "datalist": str(datalist) if datalist else None,
                     "datalist_sha256": file_sha256(Path(datalist)) if datalist else None, "overrides": overrides,
                     "teacher_sha256": file_sha256(Path(teacher_dir) / "models" / "model.pt") if teacher_dir else None}  # fmt: skip
        stamp_file = local_dir / "recipe.json"
        same_stamp = stamp is None or (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp)
        epochs = overrides.get("epochs")
        found = None
        if not retrain:
            for candidate in ((local_dir,) if custom else (repo_dir, local_dir)):
                info = _complete(candidate, name, epochs)
                if info is not None and (candidate == repo_dir or same_stamp):
                    found = {"path": str(candidate), "summary": info, "trained_now": False, "seconds": None}
                    break
        if found is None:
            if custom and (retrain or not same_stamp) and local_dir.exists():
                shutil.rmtree(local_dir)  # another recipe (or a forced retrain): never resume or mix with it
            cmd = [
                sys.executable, "-m", "monai.bundle", "run",
                "--config_file", str(repo_dir / "configs" / "train.json") if tuple(config_files) == ("train.json",)
                else json.dumps([str(repo_dir / "configs" / f) for f in config_files]),
                "--bundle_root", str(repo_dir),
                "--ckpt_dir", str(local_dir / "models"),
                "--output_dir", str(local_dir / "runs"),
            ]  # fmt: skip
            if datalist is not None:
                cmd += ["--datalist", str(datalist)]
            for key, value in overrides.items():
                cmd += [f"--{key}", json.dumps(value)]
            if name == "lorkd_seg":
                cmd += ["--teacher_path", str(teacher_dir)]
            states = sorted((local_dir / "models").glob("train_state_checkpoint_epoch=*.pt"), key=os.path.getmtime)
            resuming = bool(states) and not retrain
            if resuming:  # an interrupted earlier run (of the same recipe): continue it, and its log
                cmd += ["--resume_from", str(states[-1])]
            if stamp is not None:
                local_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(stamp_file, json.dumps(stamp, indent=2))
            timed = _run_timed(cmd, local_dir / "train.log", append=resuming)
            found = {"path": str(local_dir), "summary": _complete(local_dir, name, epochs) or {}, "trained_now": True,
                     "seconds": timed["wall"], "cpu_seconds": timed["cpu"]}  # fmt: skip
        found["recipe"] = overrides
        out[name] = found
        if name == "foundation_seg":
            teacher_dir = found["path"]
    return out


def export_brain_expert(lorkd_dir: str | Path, out_dir: str | Path, roi_size=(32, 32, 32)) -> str:
    """Fuse the brain expert out of a LoRKD bundle and write it as a standalone expert bundle (stock UNet)."""
    from medfm_ops.bundle import write_expert_bundle
    from medfm_ops.finetune import load_source

    src = load_source(lorkd_dir, region=REGION)
    write_expert_bundle(
        out_dir, src.network_def, src.state_dict, REGION,
        {i: n for i, n in enumerate(src.class_names, start=1)}, src.output_channels,
        spacing=src.spacing or (1.0, 1.0, 1.0), roi_size=src.roi_size or roi_size, modality="MR",
    )  # fmt: skip
    return str(out_dir)


def finetune_command(
    source: str, region: str | None, init: str, mode: str, dataset: Path, out: Path, budget: dict[str, Any], seed: int,
    *extra: str,
) -> list[str]:
    """The ``tools/finetune_site.py`` command of one run: a row's start (``source``, ``region``, ``init``, ``mode``)
    with the shared ``budget`` (``epochs``, ``val_interval``, ``batch_size``, ``patch_size``, ``learning_rate``; every
    epoch trained unless ``budget["patience"]`` > 0: then the epochs are a ceiling and the run stops after that many
    validations without a better validation Dice), the :data:`SPARSE_SETTINGS` for ``sparse``, then ``extra`` flags
    (e.g. ``--split_file PATH``)."""
    cmd = [
        sys.executable, str(FINETUNE), "--expert_bundle", source, "--dataset_dir", str(dataset),
        "--output_dir", str(out), "--mode", mode, "--init", init, "--epochs", str(budget["epochs"]),
        "--val_interval", str(budget["val_interval"]), "--batch_size", str(budget["batch_size"]),
        "--roi_size", json.dumps(list(budget["patch_size"])), "--learning_rate", str(budget["learning_rate"]),
        "--seed", str(seed), *extra, "--verify", "false", "--progress", "false",
        "--early_stop_patience", str(int(budget.get("patience", 0))),  # 0: every epoch trains; the best is kept
    ]  # fmt: skip
    if region:
        cmd += ["--region", region]
    if mode == "sparse":
        for key, value in SPARSE_SETTINGS.items():
            cmd += [f"--{key}", str(value)]
    return cmd


def run_or_reuse(cmd: list[str], out: Path, settings: dict[str, Any], reuse: bool = True) -> dict[str, Any]:
    """
    Run one fine-tuning ``cmd`` writing the site bundle ``out``, or reuse it: a bundle whose stamp
    (``<out>.bench_row.json``, written after a successful run) holds the same ``settings`` (budget, mode, seed,
    starting-weight checksum, split) is kept. The log goes to ``<out>.log``.

    Returns:
        ``{"summary": the bundle's docs/finetune_summary.json, "seconds": wall time of the run (the original run's
        when reused), "cpu_seconds": its CPU time (None for stamps without it), "reused": bool}``.
    """
    done = out / "docs" / "finetune_summary.json"
    stamp, log = out.parent / f"{out.name}.bench_row.json", out.parent / f"{out.name}.log"
    old = json.loads(stamp.read_text()) if stamp.is_file() and done.is_file() else {}
    reused = bool(reuse and old.get("settings") == settings)  # same budget AND the same starting weights
    if reused:
        print(f"  reusing {out}", flush=True)
        seconds, cpu = old.get("seconds"), old.get("cpu_seconds")
    else:
        timed = _run_timed(cmd, log)
        seconds, cpu = timed["wall"], timed["cpu"]
        atomic_write_text(stamp, json.dumps({"settings": settings, "seconds": seconds, "cpu_seconds": cpu}, indent=2))
    return {"summary": json.loads(done.read_text()), "seconds": seconds, "cpu_seconds": cpu, "reused": reused}


def _rel(path: str) -> str:
    return os.path.relpath(path, REPO) if os.path.isabs(path) else path


def _cell(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _minutes(s: float | None) -> str:
    return "-" if s is None else f"{s / 60:.1f}"


def _mean_std(values: list[float]) -> str:
    import statistics

    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.2f} ± {100 * statistics.pstdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"


def _sparse_setup(rows: list[dict[str, Any]]) -> list[str]:
    """The setup line of the ``sparse`` rows (none when the table has no such row)."""
    if not any(r["runs"][0]["summary"]["mode"] == "sparse" for r in rows):
        return []
    return [
        f"- SH-PEFT (`sparse`): importance of every weight from one epoch of gradients on the site's training cases "
        f"(variant {SPARSE_SETTINGS['sparse_variant']}), hybrid score I_td + lambda s I_ta (lambda "
        f"{SPARSE_SETTINGS['sparse_lambda']}); the {100 * SPARSE_SETTINGS['sparse_budget']:g}% highest-scoring weights "
        "of the whole network train, the others stay bit for bit the expert's (the bundle's `configs/train_sparse.json` "
        "override; `models/sparse_delta.pt` holds the changed entries). Its trainable-parameter count is the number "
        "of selected weights; the importance estimation time is in each bundle's `docs/finetune_summary.json`."
    ]


def write_results(path: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Render ``docs/RESULTS.md`` from the runs' summaries (``docs/finetune_summary.json`` of each site bundle); the
    file's marked sections written by other tools (``<!-- medfm:KEY:begin -->``, e.g. the site curve) are kept."""
    first = rows[0]["runs"][0]["summary"]
    classes = [r["class"] for r in first["after"]["table"]]
    split = first["split"]
    m = first["machine"]
    settings = first["train_settings"]
    n_seeds = len(rows[0]["runs"])
    lines = [
        "# Results: site fine-tuning on MSD Task04 Hippocampus",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} (sum of the runs' wall times "
        f"{_minutes(sum(run['seconds'] or 0 for r in rows for run in r['runs']))} min; pre-training of the starting "
        "points not included).",
        "",
        "Every run writes a complete site bundle; its scores are those of that bundle's own `configs/inference.json`"
        " (label maps written on each validation image's own grid, scored against the site's label files): the "
        "scores a user of the bundle gets. Mean over the two foreground classes of the per-case Dice (DSC, %) and "
        f"normalised surface Dice (NSD, %, tolerance {first['nsd_tolerance_mm']} mm, spacing from the NIfTI "
        f"headers) on the validation cases, BEFORE and AFTER fine-tuning; mean ± standard deviation over "
        f"{n_seeds} training seed(s) ({', '.join(str(s) for s in meta['seeds'])}), same split for all.",
        "",
        "| row | start | mode | head | trainable params | deployed model.pt (MB) | epochs | train wall time (min) | "
        "DSC before | NSD before | DSC after | NSD after | " + " | ".join(f"DSC {c} | NSD {c}" for c in classes) + " |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        + " | ".join("---: | ---:" for _ in classes) + " |",
    ]
    for r in rows:
        runs = [run["summary"] for run in r["runs"]]
        s = runs[0]
        per_class = {c: [next(t for t in x["after"]["table"] if t["class"] == c) for x in runs] for c in classes}
        lines.append(
            f"| {r['name']} | {r['description']} | {s['mode']} | {s['head']['mode']} ({s['head']['out_channels']} out) | "
            f"{s['parameters']['trainable']:,} | {r['model_mb']:.2f} | {s['epochs']} | "
            f"{_minutes(sum(x['train_seconds'] for x in runs) / len(runs))} | "
            f"{_mean_std([x['before']['mean_dsc'] for x in runs])} | {_mean_std([x['before']['mean_nsd'] for x in runs])} | "
            f"**{_mean_std([x['after']['mean_dsc'] for x in runs])}** | **{_mean_std([x['after']['mean_nsd'] for x in runs])}** | "
            + " | ".join(f"{_mean_std([t['dsc_mean'] for t in per_class[c]])} | {_mean_std([t['nsd_mean'] for t in per_class[c]])}"
                         for c in classes)
            + " |"
        )
    pre = meta["pretrained"]
    lines += [
        "",
        "## Setup",
        "",
        f"- Data: `{_rel(first['dataset']['dir'])}` (MSD Task04 Hippocampus, 200 of the 260 public training cases, mono-modal "
        "MRI, 1 mm isotropic, ~35x50x36 voxels, labels anterior / posterior).",
        f"- Split: {split['num_training_total']} training / {split['num_validation_total']} validation cases, seed "
        f"{split['seed']}, saved to `{meta['split_file']}` (paths relative to the data set; reused by every row and by "
        "later runs). All rows train on all training cases and are scored on all validation cases.",
        f"- Budget per run (identical): {first['epochs']} epochs, batch {settings['batch_size']}, random "
        f"{'x'.join(map(str, first['roi_size']))} patches (the volumes are ~35x50x36: a patch covers most of one), "
        f"AdamW lr {settings['learning_rate']} with cosine decay, DiceCE (sigmoid) on the site channels, validation "
        f"every {settings['val_interval']} epoch(s) with sliding windows of the patch size (the same window the "
        "written bundle's inference.json uses); the best validation epoch is kept. Resampling to "
        f"{first['spacing']} mm (the data's native 1 mm grid).",
        "- Head (`auto`, rule in docs/site_finetuning.md): "
        + "; ".join(
            f"{r['name']}: " + ", ".join(
                f"{c['site_class']} <- {c['region_class']} (channel {c['source_channel']})"
                for c in r["summary"]["head"]["classes"]
            ) + f" [{r['summary']['head']['mode']}, {r['summary']['head']['out_channels']} outputs]"
            for r in [{"name": x["name"], "summary": x["runs"][0]["summary"]} for x in rows]
        )
        + ".",
        "- LoRA: one rank-8 adapter (alpha 16) per convolution (EKS with one expert), backbone frozen, fused into "
        "the stock UNet after training (the bundle's `configs/train_lora.json` override; the fusion is exact up to "
        "float rounding, tested in tests/test_finetune.py).",
        *_sparse_setup(rows),
        f"- Starting points: teacher `{_rel(pre['foundation_seg']['path'])}` (MONAI UNet (32, 64, 128, 256), 2 residual "
        f"units; {pre['foundation_seg']['summary'].get('epochs', '?')} epochs on the synthetic multi-region set"
        f"{', trained by this run' if pre['foundation_seg']['trained_now'] else ''}); brain expert fused from "
        f"`{_rel(pre['lorkd_seg']['path'])}` (LoRKD student UNet (16, 32, 64, 128), 1 residual unit; "
        f"{pre['lorkd_seg']['summary'].get('epochs', '?')} epochs of LoRKD distillation on the synthetic set"
        f"{', trained by this run' if pre['lorkd_seg']['trained_now'] else ''}) and exported as a standalone bundle "
        f"to `{meta['expert_bundle']}`. The synthetic pre-training data have no hippocampus anatomy like MSD's: "
        "these checkpoints are small CPU demonstrations, not foundation models.",
        f"- Machine: {m['cpu_model']}, {m['logical_cores']} logical cores ({m['torch_threads']} torch threads), torch "
        f"{m['torch']}, MONAI {m['monai']}, GPU: {m['gpu'] or 'none'}; GLIBC_TUNABLES={m['glibc_tunables']}. 1-min load "
        f"average at the end of each run: {', '.join(str(run['summary']['machine'].get('load_average_1min')) for r in rows for run in r['runs'])} "
        "(other jobs shared these 2 cores when above ~2: wall times are then inflated).",
        "",
        "## Reading the table",
        "",
        "- One split; the spread is over training seeds only (initialisation of fresh channels, data order, "
        "augmentation), not over splits or data sets: read differences smaller than about two standard deviations "
        "as ties.",
        "- The BEFORE scores of the pre-trained rows are near zero by construction: the starting points were trained "
        "on the synthetic multi-region set (no MSD-like hippocampus images), and no site class name matches a "
        "brain-region class, so anterior/posterior are read from the region's first two channels (ventricles, "
        "hippocampus_left). What pre-training can bring here is the initialisation of the features, which the AFTER "
        "scores at equal budget measure.",
        "- Train wall time includes the validation passes during training; BEFORE/AFTER evaluations, data caching "
        "and the bundle checks are not included (they are in each bundle's `docs/finetune_summary.json`, "
        "`total_seconds`).",
        "",
        "## Published reference points (other splits and budgets: context only)",
        "",
        "| method | DSC | NSD |",
        "| --- | ---: | ---: |",
        *[f"| {a} | {b} | {c} |" for a, b, c in REFERENCES],
        "",
        "These come from other splits and far longer training; the rows above use a CPU budget of minutes per row.",
        "",
        *regenerate_lines(meta["command"]),
        f"Each run's site bundle (configs, `models/model.pt` + `model.ts`, README with the before/after table, "
        f"`docs/finetune_summary.json`) and log are under `{meta['work_dir']}/<row>_seed<seed>/`.",
        "",
    ]
    text = "\n".join(lines)
    kept = markdown_sections(path.read_text()) if path.is_file() else {}  # other tools' sections (site curve)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "".join(f"\n{block}\n" for block in kept.values()))
    return text


def run(
    dataset_dir: str = "../shared/data/msd_hippocampus",
    work_dir: str = "runs/site_finetune_bench",
    results: str = "docs/RESULTS.md",
    epochs: int = 8,
    val_interval: int = 4,
    batch_size: int = 2,
    patch_size: tuple[int, int, int] = (32, 48, 32),
    learning_rate: float = 2e-3,
    seeds: str | tuple[int, ...] = (0, 1, 2),
    split_seed: int = 0,
    rows: str | tuple[str, ...] | None = None,
    retrain_pretrained: bool = False,
    reuse_rows: bool = True,
) -> str:
    """
    Run the benchmark rows (each once per seed) and write ``results``.

    Args:
        dataset_dir: MSD-style data set (relative paths are relative to the repository root).
        work_dir: outputs: ``pretrained/``, ``expert_bundle/``, ``split.json``, one site bundle per row and seed.
        results: markdown file to write. Defaults to ``docs/RESULTS.md``.
        epochs, val_interval, batch_size, patch_size, learning_rate: the shared budget.
        seeds: training seeds (comma-separated or a list). Defaults to 0, 1, 2.
        split_seed: seed of the one split all runs share. Defaults to 0.
        rows: subset of row names (comma-separated or a list). Defaults to all.
        retrain_pretrained: retrain the teacher and LoRKD checkpoints even when complete ones exist.
        reuse_rows: keep a run whose bundle in ``work_dir`` has the same settings and starting weights (an
            interrupted benchmark continues where it stopped). Defaults to True.
    """
    start = time.perf_counter()
    work, data = repo_path(work_dir), repo_path(dataset_dir)
    if not (data / "dataset.json").is_file():
        raise FileNotFoundError(f"{data}: no MSD data set (dataset.json) there; pass --dataset_dir.")
    wanted = select_rows(rows, [r[0] for r in ROWS])
    seed_list = [int(x) for x in (seeds.split(",") if isinstance(seeds, str) else seeds)]

    pretrained = ensure_pretrained(work, retrain=retrain_pretrained)
    expert_dir = work / "expert_bundle"
    export_brain_expert(pretrained["lorkd_seg"]["path"], expert_dir)
    split_file = work / "split.json"
    sources = {"expert": (str(expert_dir), None), "teacher": (pretrained["foundation_seg"]["path"], REGION)}
    budget = {"epochs": epochs, "val_interval": val_interval, "batch_size": batch_size, "patch_size": patch_size,
              "learning_rate": learning_rate}
    out_rows = []
    for name, description, source, init, mode in ROWS:
        if name not in wanted:
            continue
        path, region = sources[source]
        runs = []
        for seed in seed_list:
            out = work / f"{name}_seed{seed}"
            cmd = finetune_command(path, region, init, mode, data, out, budget, seed, "--split_seed", str(split_seed),
                                   "--split_file", str(split_file))  # fmt: skip
            settings = {"epochs": epochs, "val_interval": val_interval, "batch_size": batch_size,
                        "learning_rate": learning_rate, "patch_size": list(patch_size), "mode": mode, "init": init,
                        "seed": seed, "split_seed": split_seed,
                        "source": None if init == "scratch" else file_sha256(Path(path) / "models" / "model.pt"),
                        **(SPARSE_SETTINGS if mode == "sparse" else {})}  # fmt: skip
            if not split_file.is_file() and runs:
                raise RuntimeError(f"{split_file} was not written by the first run.")
            result = run_or_reuse(cmd, out, settings, reuse_rows)
            if not split_file.is_file():  # the first run made the split: every later run reuses it
                shutil.copyfile(out / "docs" / "split.json", split_file)
            summary, seconds = result["summary"], result["seconds"]
            print(f"  {name} seed {seed}: DSC {summary['before']['mean_dsc']:.4f} -> {summary['after']['mean_dsc']:.4f}, "
                  f"NSD {summary['before']['mean_nsd']:.4f} -> {summary['after']['mean_nsd']:.4f} "
                  f"({(seconds or 0) / 60:.1f} min)", flush=True)  # fmt: skip
            runs.append({"seed": seed, "summary": summary, "seconds": seconds})
        model_mb = (work / f"{name}_seed{seed_list[0]}" / "models" / "model.pt").stat().st_size / 2**20
        out_rows.append({"name": name, "description": description, "runs": runs, "model_mb": model_mb})

    args = ["python -m benchmarks.site_finetune run", f"--dataset_dir {dataset_dir}", f"--epochs {epochs}",
            f"--val_interval {val_interval}", f"--batch_size {batch_size}",
            f"--patch_size '[{','.join(map(str, patch_size))}]'", f"--learning_rate {learning_rate}",
            f"--seeds {','.join(map(str, seed_list))}", f"--split_seed {split_seed}"]  # fmt: skip
    if rows:
        args.append(f"--rows {','.join(wanted)}")
    meta = {
        **run_record(args, start),
        "pretrained": pretrained,
        "split_file": os.path.relpath(split_file, REPO),
        "expert_bundle": os.path.relpath(expert_dir, REPO),
        "work_dir": os.path.relpath(work, REPO),
        "seeds": seed_list,
    }
    (work / "bench_summary.json").write_text(json.dumps({"meta": meta, "rows": out_rows}, indent=2, default=str))
    return report(work_dir, results)


def report(work_dir: str = "runs/site_finetune_bench", results: str = "docs/RESULTS.md") -> str:
    """(Re)write ``results`` from ``<work_dir>/bench_summary.json`` of an earlier ``run``."""
    work = repo_path(work_dir)
    saved = json.loads((work / "bench_summary.json").read_text())
    out = repo_path(results)
    text = write_results(out, saved["rows"], saved["meta"])
    print(text)
    return str(out)


if __name__ == "__main__":
    fire.Fire({"run": run, "report": report, "ensure_pretrained": ensure_pretrained, "export_brain_expert": export_brain_expert})
