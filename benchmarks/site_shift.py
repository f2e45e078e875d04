# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The ``acdc_shift`` data set of the site curve (``python -m benchmarks.site_curve run --dataset acdc_shift``): a
cardiac expert fine-tuned at a site whose pathology group its pre-training never saw (``docs/site_curve.md``).

- The saved population split (``benchmarks.site_study.load_or_create_shift_split``) and the pre-training datalist
  through the repository's real-region mapping file :data:`MAPPING` (brain MRI + the heart cases of the pre-training
  groups: ``benchmarks.site_study.build_shift_pretraining_datalist``); ``bundles/foundation_seg`` +
  ``bundles/lorkd_seg`` train on it with their own ``configs/train.json`` + ``configs/real_regions.json``
  (:data:`REAL_CONFIGS`: the regions' preprocessing).
- :func:`export_heart_expert`: the heart expert fused out of the LoRKD student and exported with its region's
  recorded preprocessing (spacing, window, intensity).
- :func:`score_bundle_on_cases`: a written bundle's own ``configs/inference.json`` on the fixed site test set, per
  class, saved beside the bundle and reused while its ``models/model.pt`` is unchanged.
- :func:`population_scores`: those scores per population of the site (a two-group site: how each group shifts
  and is repaired).
- :func:`held_in_cases`: the heart cases the pre-training validated on (patients of the pre-training groups), the
  in-distribution reference that shows how much the BEFORE score drops at the shifted site.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.site_finetune import REPO
from benchmarks.site_study import patients_of
from medfm_ops.utils.atomic_io import atomic_write_json
from medfm_ops.utils.hashing import file_sha256

__all__ = ["HEART", "MAPPING", "REAL_CONFIGS", "describe_split", "export_heart_expert", "held_in_cases",
           "population_scores", "score_bundle_on_cases"]  # fmt: skip

#: the region of the site's classes (right ventricle, myocardium, left ventricle)
HEART = "heart_mri"

#: the repository's real-region mapping file (brain MRI: MSD hippocampus; heart MRI: ACDC)
MAPPING = REPO / "bundles" / "lorkd_seg" / "data" / "real_regions.json"

#: the bundle config that adds the real regions' preprocessing to each ``configs/train.json``
REAL_CONFIGS = ("train.json", "real_regions.json")


def export_heart_expert(lorkd_dir: str | Path, expert_dir: Path) -> str:
    """
    The heart region of a training run (``models/`` of a ``lorkd_seg`` run: its fused expert; of a ``foundation_seg``
    run: the teacher's heart channels) written as a standalone bundle with its region's preprocessing as the run
    recorded it (``models/region_preprocessing.json``: spacing, window, intensity); re-exported only when the run's
    weights changed (stamp ``<expert_dir>.source.json``).

    Raises:
        ValueError: when the run recorded no preprocessing row for :data:`HEART` (a run without
            ``configs/real_regions.json``).
    """
    from medfm_ops.bundle import write_expert_bundle
    from medfm_ops.finetune import load_source

    lorkd = Path(lorkd_dir)
    stamp = expert_dir.parent / f"{expert_dir.name}.source.json"
    source = {"lorkd_sha256": file_sha256(lorkd / "models" / "model.pt"), "region": HEART}
    done = stamp.is_file() and json.loads(stamp.read_text()) == source and (expert_dir / "models" / "model.pt").is_file()
    if done:
        return str(expert_dir)
    table_file = lorkd / "models" / "region_preprocessing.json"
    row = json.loads(table_file.read_text()).get(HEART) if table_file.is_file() else None
    if not row:
        raise ValueError(f"{table_file} records no '{HEART}' preprocessing: train with configs/real_regions.json.")
    src = load_source(lorkd, region=HEART)
    write_expert_bundle(
        expert_dir, src.network_def, src.state_dict, HEART, {i: n for i, n in enumerate(src.class_names, start=1)},
        src.output_channels, spacing=row["spacing"], roi_size=row["window_size"], modality="MR",
        intensity_nonzero=row.get("intensity") == "zscore_nonzero",
    )  # fmt: skip
    atomic_write_json(stamp, source)
    return str(expert_dir)


def held_in_cases(datalist: str | Path, region: str = HEART) -> list[dict[str, str]]:
    """
    The ``validation`` cases of ``region`` in a pre-training ``datalist`` (paths resolved against its folder): cases
    of the populations the pre-training saw, never trained on (they chose its kept epoch, so a score on them is
    slightly favourable). Returns ``[{"image", "label"}]`` in the datalist's order.

    Raises:
        ValueError: when the datalist has no validation case of ``region``.
    """
    from medfm_ops.data import load_datalist

    _, sections = load_datalist(datalist, check_files=False)  # validated, paths resolved
    cases = [{k: c[k] for k in ("image", "label")} for c in sections["validation"] if c["region_name"] == region]
    if not cases:
        raise ValueError(f"{datalist}: no 'validation' case of region '{region}'.")
    return cases


def score_bundle_on_cases(bundle: Path, cases: list[dict], tolerance_mm: float, scores_file: Path) -> dict[str, Any]:
    """
    DSC / NSD per class of ``bundle``'s own ``configs/inference.json`` on ``cases`` (label maps written under
    ``<scores_file stem>_eval/``, then removed), saved to ``scores_file`` with the model's checksum and the cases;
    reused while both are unchanged. Class names: the bundle's ``configs/metadata.json`` ``pred`` channels.

    Returns:
        :func:`medfm_ops.finetune.score_label_maps`'s dict plus ``model_sha256``, ``images``, ``reused``.
    """
    import shutil

    from medfm_ops.finetune import predict_with_bundle, score_label_maps

    sha = file_sha256(bundle / "models" / "model.pt")
    images = [c["image"] for c in cases]
    if scores_file.is_file():
        saved = json.loads(scores_file.read_text())
        if saved.get("model_sha256") == sha and saved.get("images") == images:
            return {**saved, "reused": True}
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    names = [str(channels[k]) for k in sorted(channels, key=int) if int(k) > 0]
    out = scores_file.parent / f"{scores_file.stem}_eval"
    preds = predict_with_bundle(bundle, images, out)
    result = score_label_maps(preds, [c["label"] for c in cases], names, tolerance_mm)
    shutil.rmtree(out, ignore_errors=True)
    result = {**result, "model_sha256": sha, "images": images, "tolerance_mm": float(tolerance_mm)}
    atomic_write_json(scores_file, result)
    return {**result, "reused": False}


def population_scores(scores: dict[str, Any], cases: list[dict]) -> dict[str, dict[str, float]]:
    """
    Mean DSC / NSD per population of ``cases`` from :func:`score_bundle_on_cases`'s per-case scores (each case's mean
    over classes, then the mean over the population's cases).

    Args:
        scores: ``{"cases": [{"label", "dsc": [per class], "nsd": [per class]}, ...]}``.
        cases: the scored cases, each with ``label`` and ``population`` (a site split's part).

    Returns:
        ``{population: {"dsc", "nsd", "num_cases"}}`` in the order the populations first appear in ``cases``.

    Raises:
        ValueError: when a scored case is not among ``cases`` (the scores belong to another set).
    """
    population = {str(c["label"]): str(c["population"]) for c in cases}
    sums: dict[str, list[float]] = {p: [0.0, 0.0, 0] for p in dict.fromkeys(population.values())}
    for case in scores["cases"]:
        if case["label"] not in population:
            raise ValueError(f"scored case {case['label']} is not one of the {len(cases)} cases given.")
        acc = sums[population[case["label"]]]
        acc[0] += sum(case["dsc"]) / len(case["dsc"])
        acc[1] += sum(case["nsd"]) / len(case["nsd"])
        acc[2] += 1
    return {p: {"dsc": d / n, "nsd": s / n, "num_cases": n} for p, (d, s, n) in sums.items() if n}


def describe_split(study: dict[str, Any]) -> dict[str, Any]:
    """The split's settings and patient counts for the curve summary."""
    return {"split_file": study["split_file"], "held_out": study["held_out"], "seed": study["seed"],
            "num_test": study["num_test"], "num_validation": study["num_validation"],
            **{f"num_{p}_patients": len(patients_of(study[p])) for p in ("pretraining", "site_test",
                                                                           "site_validation", "site_pool")},
            "num_site_test_cases": len(study["site_test"]), "dataset_dir": study["dataset_dir"]}  # fmt: skip
