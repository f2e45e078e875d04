# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Before/after tables of a site fine-tuning and the text that goes into the written bundle (README, changelog)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from medfm_ops.metrics import format_markdown

__all__ = ["COLUMNS", "comparison_rows", "changelog_entry", "readme_section", "bump_version", "regression_note"]

COLUMNS = ["stage", "class", "n", "dsc", "dsc_std", "nsd", "nsd_std"]


def comparison_rows(stages: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per-class rows plus a ``mean`` row for every stage (``{"before": score, "after": score}`` in order)."""
    rows = []
    for stage, result in stages.items():
        for r in result["table"]:
            rows.append({"stage": stage, "class": r["class"], "n": r["n"], "dsc": r["dsc_mean"],
                         "dsc_std": r["dsc_std"], "nsd": r["nsd_mean"], "nsd_std": r["nsd_std"]})  # fmt: skip
        n = max((r["n"] for r in result["table"]), default=0)
        rows.append({"stage": stage, "class": "mean", "n": n, "dsc": result["mean_dsc"], "dsc_std": None,
                     "nsd": result["mean_nsd"], "nsd_std": None})  # fmt: skip
    return rows


def bump_version(version: str) -> str:
    """Next minor version of ``major.minor.patch`` (``"0.1.0"`` -> ``"0.2.0"``); ``"0.1.0"`` for anything else."""
    parts = str(version).split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return f"{parts[0]}.{int(parts[1]) + 1}.0"
    return "0.1.0"


def changelog_entry(summary: Mapping[str, Any]) -> str:
    """One changelog line: source bundle and version, data set, mode, epochs and the before/after scores."""
    src = summary["source"]
    b, a = summary["before"], summary["after"]
    dsc, nsd = (f"{b['mean_dsc']:.4f} -> ", f"{b['mean_nsd']:.4f} -> ") if b else ("", "")
    return (
        f"site fine-tuning ({summary['mode']}, init {summary['init']}, {summary['epochs']} epochs) of "
        f"'{src['name']}' {src['version']} on '{summary['dataset']['name']}' "
        f"({summary['split']['num_training_used']} training / {summary['split']['num_validation_used']} validation "
        f"cases): validation DSC {dsc}{a['mean_dsc']:.4f}, NSD ({summary['nsd_tolerance_mm']} mm) "
        f"{nsd}{a['mean_nsd']:.4f}"
    )


def regression_note(summary: Mapping[str, Any]) -> str | None:
    """
    A warning when fine-tuning LOWERED the validation mean DSC below the starting bundle's, else None.

    A site with few cases of data the starting point already covers can end below where it started (measured on the
    hippocampus site curve, ``docs/site_curve.md``); the written bundle is still the fine-tuned one, and the site
    decides which of the two to serve.
    """
    b, a = summary.get("before"), summary["after"]
    if not b or a["mean_dsc"] >= b["mean_dsc"]:
        return None
    src = summary["source"]
    return (
        f"Fine-tuning LOWERED the validation mean DSC from {b['mean_dsc']:.4f} to {a['mean_dsc']:.4f} (NSD "
        f"{b['mean_nsd']:.4f} -> {a['mean_nsd']:.4f}): the starting bundle '{src['name']}' {src['version']} "
        f"({src['path']}) scores higher on these {summary['split']['num_validation_used']} validation cases. "
        "Consider serving it instead, or fine-tuning with more cases, fewer epochs or a parameter-efficient mode "
        "(lora, sparse)."
    )


def _split_origin(split: Mapping[str, Any]) -> str:
    if split.get("origin") == "explicit":
        return "explicit case lists" + (f", {json.dumps(split['info'])}" if split.get("info") else "")
    return f"seed {split['seed']}, validation fraction {split['val_split']}"


def _stages(summary: Mapping[str, Any]) -> str:
    if summary["before"]:
        return "before and after fine-tuning"
    return "after fine-tuning (the starting point was not scored here: `score_before` false)"


def _rate_choice(summary: Mapping[str, Any]) -> str:
    grid = summary.get("learning_rate_grid")
    if not grid:
        return ""
    scores = ", ".join(f"{rate}: {entry['mean_dsc']:.4f}" for rate, entry in grid.items())
    return (f"\nThe learning rate was chosen on the validation cases from {len(grid)} rates, each trained from the same "
            f"start (validation mean DSC of each run's bundle: {scores}).\n")


def readme_section(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> str:
    """The ``## Site fine-tuning`` section of the written bundle's README."""
    src, split = summary["source"], summary["split"]
    head = summary["head"]
    note = regression_note(summary)
    warning = f"\n**Warning.** {note}\n" if note else ""
    classes = "\n".join(
        f"| {i} | {c['site_class']} | {c['region_class']} | {c['output_channel']} |"
        for i, c in enumerate(head["classes"], start=1)
    )
    return f"""## Site fine-tuning
This bundle is `{src['name']}` version {src['version']} ({src['path']}) fine-tuned at a site with medfm
(`tools/finetune_site.py`), mode `{summary['mode']}`, init `{summary['init']}`, {summary['epochs']} epochs
(batch {summary['train_settings']['batch_size']}, learning rate {summary['train_settings']['learning_rate']}, AdamW,
cosine schedule), on {summary['device']} in {summary['train_seconds']:.0f} s of training.
{_rate_choice(summary)}
Data: `{summary['dataset']['dir']}`; split saved in `docs/split.json` ({_split_origin(split)}):
{split['num_training_used']} of {split['num_training_total']} training and
{split['num_validation_used']} of {split['num_validation_total']} validation cases used.

Head `{head['mode']}` (site class -> source class -> network channel):

| site label | site class | source class | output channel |
| --- | --- | --- | --- |
{classes}

Validation scores of this bundle's own `configs/inference.json` (label maps written on each image's grid, scored
against the site's label files; NSD tolerance {summary['nsd_tolerance_mm']} mm), {_stages(summary)};
mean and standard deviation over cases:

{format_markdown(rows, COLUMNS)}
{warning}"""
