# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The data-efficiency study's pieces on tiny data: explicit split files (and a site run trained on exactly one),
the saved public/site split, nested N-case draws, the MSD subset view, merging datalists, the pre-training datalist,
the learning-curve plot, marked report sections, and the tools' budget helpers, run reuse and report section."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from benchmarks import site_curve, site_finetune
from benchmarks.site_study import (
    STUDY_PARTS,
    build_pretraining_datalist,
    draw_training_cases,
    load_or_create_study_split,
    write_draw_split,
)
from benchmarks.learning_curve import compare_over_seeds, mean_std, per_seed_words, plot_learning_curve
from benchmarks.sections import markdown_sections, write_markdown_section
from medfm_ops.data import (
    check_datalist_cases,
    ensure_synthetic_dataset,
    load_datalist,
    merge_datalists,
    read_msd_dataset,
    write_msd_subset,
)
from medfm_ops.finetune import (
    SUMMARY_RELPATH,
    SiteFinetuneSettings,
    finetune_expert,
    load_or_create_split,
    write_split,
    write_unseen_split,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def msd(site_files, tmp_path_factory):
    return site_files.write_msd(tmp_path_factory.mktemp("study") / "msd", n=12)


# -------------------------------------------------------------------------------------------- explicit split files
def test_explicit_split_is_saved_reused_and_never_replaced(msd, tmp_path):
    _, cases, _ = read_msd_dataset(msd)
    path = tmp_path / "split.json"
    first = write_split(msd, path, cases[3:5], cases[:2], info={"num_cases": 2})
    assert first["origin"] == "explicit" and not first["reused"] and first["seed"] is None
    assert [c["image"] for c in first["training"]] == [c["image"] for c in cases[3:5]]  # exactly, in order
    saved = json.loads(path.read_text())
    assert saved["training"][0]["image"] == "imagesTr/case_003.nii.gz" and saved["info"] == {"num_cases": 2}
    again = write_split(msd, path, [{"image": "imagesTr/case_003.nii.gz", "label": "labelsTr/case_003.nii.gz"},
                                    cases[4]], cases[:2], info={"num_cases": 2})  # fmt: skip
    assert again["reused"] and again["training"] == first["training"]
    # a seeded split's settings do not apply to an explicit file
    read = load_or_create_split(msd, path, val_split=0.5, seed=7)
    assert read["origin"] == "explicit" and read["validation"] == first["validation"] and read["reused"]
    with pytest.raises(ValueError, match="never replaced silently"):
        write_split(msd, path, cases[3:6], cases[:2], info={"num_cases": 3})
    with pytest.raises(ValueError, match="more than once"):
        write_split(msd, tmp_path / "b.json", cases[3:5], cases[4:6])
    with pytest.raises(ValueError, match="is not a case of"):
        write_split(msd, tmp_path / "c.json", [{"image": "/elsewhere/x.nii.gz", "label": "/elsewhere/y.nii.gz"}],
                    cases[:1])  # fmt: skip
    with pytest.raises(ValueError, match="'validation' names no cases"):
        write_split(msd, tmp_path / "d.json", cases[3:5], [])
    assert not (tmp_path / "b.json").exists() and not (tmp_path / "c.json").exists()


def test_unseen_split_leaves_out_the_pretraining_cases(msd, tmp_path):
    _, cases, _ = read_msd_dataset(msd)
    datalist = tmp_path / "pretraining.json"
    seen = cases[:4]  # trained or validated on; a test-part case stays available to the site
    datalist.write_text(json.dumps({"training": [{**c, "region": 0} for c in seen[:3]],
                                    "validation": [{**c, "region": 0} for c in seen[3:]],
                                    "test": [{**cases[4], "region": 0}]}))  # fmt: skip
    split = write_unseen_split(msd, datalist, tmp_path / "site.json", num_validation=2, num_training=5, seed=1)
    images = [c["image"] for part in ("training", "validation") for c in split[part]]
    assert len(split["training"]) == 5 and len(split["validation"]) == 2 and len(set(images)) == 7
    assert not {str(Path(c["image"]).resolve()) for c in seen} & {str(Path(i).resolve()) for i in images}
    assert split["info"]["excluded_cases"] == 4 and split["origin"] == "explicit"
    again = write_unseen_split(msd, datalist, tmp_path / "site.json", num_validation=2, num_training=5, seed=1)
    assert again["reused"] and again["training"] == split["training"]
    default = write_unseen_split(msd, datalist, tmp_path / "all.json")  # 20% validation, the rest training
    assert (len(default["validation"]), len(default["training"])) == (2, 6)
    with pytest.raises(ValueError, match="8 of its 12 cases are not in"):
        write_unseen_split(msd, datalist, tmp_path / "big.json", num_validation=4, num_training=5)
    # the CLI of the same function
    out = tmp_path / "cli.json"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "site_split", "--dataset_dir",
                           str(msd), "--datalist", str(datalist), "--out", str(out), "--num_validation", "2"],
                          capture_output=True, text=True, cwd=REPO)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "6 training / 2 validation" in proc.stdout and json.loads(out.read_text())["num_training"] == 6


def test_site_run_trains_on_exactly_the_explicit_split_without_before_scores(site_files, msd, tmp_path):
    _, cases, _ = read_msd_dataset(msd)
    split_file = tmp_path / "n3_seed1.json"
    write_split(msd, split_file, cases[5:8], cases[:3], info={"num_cases": 3, "draw_seed": 1})
    out = tmp_path / "site_bundle"
    summary = finetune_expert(site_files.write_expert(tmp_path / "expert"), msd, out, SiteFinetuneSettings(
        seed=1, epochs=1, batch_size=2, split_file=split_file, score_before=False, device="cpu", verify=False,
        progress=False))  # fmt: skip
    s = summary["split"]
    assert s["origin"] == "explicit" and s["seed"] is None and s["info"]["draw_seed"] == 1
    assert s["num_training_used"] == s["num_training_total"] == 3 and s["num_validation_used"] == 3
    assert json.loads((out / "docs" / "split.json").read_text()) == json.loads(split_file.read_text())
    assert summary["best_validation"]["epoch"] == 1 and (out / SUMMARY_RELPATH).is_file()
    readme = (out / "docs" / "README.md").read_text()
    assert "explicit case lists" in readme and "`score_before` false" in readme and "| before" not in readme
    assert summary["before"] is None and "-> " not in json.loads((out / "configs" / "metadata.json").read_text())[
        "changelog"][summary["bundle"]["version"]].split("cases)")[-1]  # fmt: skip


# --------------------------------------------------------------------------------------- study split and draws
def test_study_split_is_saved_disjoint_and_refuses_to_re_split(msd, tmp_path):
    path = tmp_path / "study_split.json"
    study = load_or_create_study_split(msd, path, num_public=5, num_validation=3, seed=2)
    assert [len(study[p]) for p in STUDY_PARTS] == [5, 3, 4] and not study["reused"]
    images = [c["image"] for p in STUDY_PARTS for c in study[p]]
    assert len(set(images)) == 12
    assert load_or_create_study_split(msd, path, num_public=5, num_validation=3, seed=2)["public"] == study["public"]
    other = load_or_create_study_split(msd, tmp_path / "other.json", num_public=5, num_validation=3, seed=3)
    assert other["public"] != study["public"]
    with pytest.raises(ValueError, match="was made with"):
        load_or_create_study_split(msd, path, num_public=6, num_validation=3, seed=2)
    saved = json.loads(path.read_text())
    saved["site_pool"] = saved["site_pool"][1:]  # the data set no longer matches the saved lists
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="data set changed"):
        load_or_create_study_split(msd, path, num_public=5, num_validation=3, seed=2)
    with pytest.raises(ValueError, match="leave site training cases"):
        load_or_create_study_split(msd, tmp_path / "x.json", num_public=9, num_validation=3)


def test_draws_are_nested_per_seed_and_differ_between_seeds(msd, tmp_path):
    pool = [{"image": f"i{k}", "label": f"l{k}"} for k in range(20)]
    for seed in (0, 1):
        assert draw_training_cases(pool, 5, seed) == draw_training_cases(pool, 10, seed)[:5]
        assert sorted(c["image"] for c in draw_training_cases(pool, "all", seed)) == sorted(c["image"] for c in pool)
    assert draw_training_cases(pool, 5, 0) != draw_training_cases(pool, 5, 1)
    with pytest.raises(ValueError, match="1..20"):
        draw_training_cases(pool, 21, 0)
    study = load_or_create_study_split(msd, tmp_path / "study.json", num_public=4, num_validation=3)
    split = write_draw_split(study, tmp_path / "n2_seed1.json", 2, 1)
    assert split["validation"] == [{**c, "region": 0} for c in study["site_validation"]]
    assert [c["image"] for c in split["training"]] == [c["image"] for c in draw_training_cases(study["site_pool"], 2, 1)]
    assert split["info"] == {"study_split": "study.json", "num_cases": 2, "all_cases": False, "draw_seed": 1,
                             "draw": "nested"}  # fmt: skip


# ------------------------------------------------------------------------------------ subset view, merge, datalist
def test_msd_subset_view_lists_cases_without_copying(msd, tmp_path):
    _, cases, info = read_msd_dataset(msd)
    path = write_msd_subset(msd, cases[2:5], tmp_path / "view")
    labels, listed, view_info = read_msd_dataset(tmp_path / "view")
    resolved = [{k: str(Path(v).resolve()) for k, v in c.items()} for c in listed]
    assert labels == {"1": "anterior", "2": "posterior"} and resolved == cases[2:5]
    assert view_info["subset_of"] == str(msd.resolve()) and sorted(p.name for p in path.parent.iterdir()) == ["dataset.json"]
    with pytest.raises(ValueError, match="is not a case of"):
        write_msd_subset(msd, [{"image": "imagesTr/nope.nii.gz", "label": "labelsTr/nope.nii.gz"}], tmp_path / "v2")


def _datalist(path: Path, regions: list[dict], items: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": path.stem, "regions": regions, "training": items, "validation": items}))
    return path


def test_merge_datalists_keeps_task_ids_values_and_annotations(msd, tmp_path):
    img, lab = str(msd / "imagesTr" / "case_000.nii.gz"), str(msd / "labelsTr" / "case_000.nii.gz")
    base = _datalist(tmp_path / "a" / "base.json", [
        {"name": "brain", "task_id": 0, "labels": {"1": "ventricles", "2": "x"}},
        {"name": "thorax", "task_id": 1, "labels": {"1": "lung"}},
    ], [{"image": img, "label": lab, "region": 0}, {"image": img, "label": lab, "region": 1}])  # fmt: skip
    extra = _datalist(tmp_path / "b" / "extra.json", [
        {"name": "pelvis", "task_id": 0, "labels": {"1": "bladder"}},
        {"name": "brain", "task_id": 1, "labels": {"1": "ventricles", "2": "x", "3": "anterior"}},
    ], [{"image": img, "label": lab, "region": 1, "annotated": ["anterior"], "dataset": "real"},
        {"image": img, "label": lab, "region": 0}])  # fmt: skip
    merged = merge_datalists(base, extra, tmp_path / "c" / "merged.json")
    assert [(r["name"], r["task_id"]) for r in merged["regions"]] == [("brain", 0), ("thorax", 1), ("pelvis", 2)]
    table, sections = load_datalist(tmp_path / "c" / "merged.json")
    assert table.class_names[0] == ["ventricles", "x", "anterior"]
    got = [(i["region"], i["dataset"], i["annotated"]) for i in sections["training"]]
    assert got == [(0, "brain", ["ventricles", "x"]), (1, "thorax", ["lung"]), (0, "real", ["anterior"]),
                   (2, "pelvis", ["bladder"])]  # fmt: skip
    assert not Path(merged["training"][0]["image"]).is_absolute()  # relative to the merged datalist
    with pytest.raises(FileExistsError):
        merge_datalists(base, extra, tmp_path / "c" / "merged.json")
    clash = _datalist(tmp_path / "d" / "clash.json", [{"name": "brain", "task_id": 0, "labels": {"1": "anterior"}}],
                      [{"image": img, "label": lab, "region": 0}])  # fmt: skip
    with pytest.raises(ValueError, match="cannot merge region 'brain'"):
        merge_datalists(base, clash, tmp_path / "d" / "merged.json")


def test_pretraining_datalist_adds_the_public_cases_to_a_base_region(msd, tmp_path):
    study = load_or_create_study_split(msd, tmp_path / "study.json", num_public=6, num_validation=3)
    base = ensure_synthetic_dataset(tmp_path / "synthetic", size=16, cases_per_region=4, regions=["brain_mri",
                                                                                                "pelvis_mr"])  # fmt: skip
    path = build_pretraining_datalist(study, tmp_path / "pre", base, region="brain_mri", val_split=2)
    table, sections = load_datalist(path)
    assert table.region_names == {0: "brain_mri", 1: "pelvis_mr"}
    assert table.class_names[0] == ["ventricles", "hippocampus_left", "hippocampus_right", "anterior", "posterior"]
    real = [i for s in sections.values() for i in s if i["dataset"].endswith("_public")]
    assert len(real) == 6 and sum(i in sections["validation"] for i in real) == 2
    assert all(i["annotated"] == ["anterior", "posterior"] and i["region"] == 0 for i in real)
    assert {Path(i["image"]).name for i in real} == {Path(c["image"]).name for c in study["public"]}
    synthetic_brain = [i for i in sections["training"] if i["region"] == 0 and i not in real]
    assert synthetic_brain and all(i["annotated"] == ["ventricles", "hippocampus_left", "hippocampus_right"]
                                   for i in synthetic_brain)  # fmt: skip
    values = np.unique(np.asarray(nib.load(real[0]["label"]).dataobj))
    assert set(values.tolist()) <= {0, 4, 5} and 4 in values  # anterior/posterior after the base's 3 classes
    check_datalist_cases(sections, source=str(path))  # what the bundles' initialize step runs


# ------------------------------------------------------------------------------------------------ report pieces
def test_compare_over_seeds():
    """Above/below only beyond twice the larger population std of the two rows; a tie otherwise."""
    assert compare_over_seeds([10.0, 12.0], [5.0, 5.0]) == (6.0, 1.0, "above")  # 6 > 2 * 1
    assert compare_over_seeds([5.0, 5.0], [10.0, 12.0]) == (-6.0, 1.0, "below")
    assert compare_over_seeds([6.0, 8.0], [5.0, 5.0])[2] == "tie"  # 2 <= 2 * 1
    assert compare_over_seeds([5.0, 7.0], [5.0, 5.0], factor=1.0)[2] == "tie"  # 1 <= 1 * 1
    assert compare_over_seeds([6.0, 8.0], [5.0, 5.0], factor=1.0)[2] == "above"  # 2 > 1 * 1
    with pytest.raises(ValueError):
        compare_over_seeds([], [1.0])


def test_per_seed_words_pairs_by_seed():
    """Differences by seed (not by position), only over the seeds both rows have with finite scores."""
    ref = {0: 0.5, 1: 0.6, 2: 0.7, 3: float("nan")}
    assert per_seed_words({2: 0.75, 0: 0.6, 3: 0.9}, ref) == "above on 2 of 2 seeds, mean difference +0.075 (from +0.050 to +0.100)"
    assert per_seed_words({0: 0.4, 1: 0.7, 5: 1.0}, ref, scale=100, digits=1) == (
        "above on 1 of 2 seeds, mean difference +0.0 (from -10.0 to +10.0)")  # seed 5 has no reference
    assert per_seed_words({0: 0.9, 4: 0.9}, ref) is None  # one common seed: nothing to describe


def test_learning_curve_plot_and_mean_std(tmp_path):
    assert mean_std([1.0, 3.0]) == (2.0, 1.0)
    path = plot_learning_curve(tmp_path / "curve.png", {"scratch": {5: [40, 50], 10: [60, 62]}, "expert": {5: [70, 71],
                               10: [75, 77]}}, x_labels={10: "all (10)"}, title="t")  # fmt: skip
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24])[0] > 200
    plain = path.read_bytes()
    marked = plot_learning_curve(tmp_path / "ref.png", {"scratch": {5: [40, 50], 10: [60, 62]}, "expert": {5: [70, 71],
                                 10: [75, 77]}}, x_labels={10: "all (10)"}, title="t", references={"before": 66.0})  # fmt: skip
    assert marked.read_bytes() != plain  # the reference line is drawn
    with pytest.raises(ValueError, match="curve 'a', N=5"):
        plot_learning_curve(tmp_path / "bad.png", {"a": {5: []}})
    assert not (tmp_path / "bad.png").exists()


def test_markdown_sections_are_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\nkept text\n")
    write_markdown_section(path, "site-curve", "## Curve\nv1")
    write_markdown_section(path, "other", "## Other")
    write_markdown_section(path, "site-curve", "## Curve\nv2")
    text = path.read_text()
    assert text.startswith("# Results\n\nkept text\n") and "v1" not in text and text.count("## Curve") == 1
    assert list(markdown_sections(text)) == ["site-curve", "other"] and text.index("v2") < text.index("## Other")
    with pytest.raises(ValueError, match="section key"):
        write_markdown_section(path, "Bad Key", "x")


def test_curve_tool_budget_and_recipe():
    tool = site_curve
    assert tool.plan_epochs(5, 2, 150, None, 2) == {"epochs": 50, "val_interval": 25, "steps": 150}
    assert tool.plan_epochs(50, 2, 150, None, 2) == {"epochs": 6, "val_interval": 3, "steps": 150}
    assert tool.plan_epochs(50, 2, None, 10, 2) == {"epochs": 10, "val_interval": 5, "steps": 250}
    recipe = tool.pretraining_recipe(40, 20, (32, 32, 32), 10)
    assert recipe["foundation_seg"]["flip_prob"] == 0.0 and recipe["lorkd_seg"]["flip_prob"] == 0.0
    for name in ("foundation_seg", "lorkd_seg"):  # flip_prob is what every RandFlipd of the bundle reads
        cfg = json.loads((REPO / "bundles" / name / "configs" / "train.json").read_text())
        flips = [t for t in cfg["train"]["random_transforms"] if t["_target_"] == "RandFlipd"]
        assert flips and all(t["prob"] == "@flip_prob" for t in flips) and cfg["flip_prob"] == 0.2
        real = json.loads((REPO / "bundles" / name / "configs" / "real_regions.json").read_text())
        assert real["flip_prob"] == 0.0  # the real regions' labels depend on orientation
    assert recipe["lorkd_seg"]["warmup_epochs"] == 2 and recipe["lorkd_seg"]["val_interval"] == 10
    assert "early_stop_patience" not in recipe["foundation_seg"]  # fixed epochs unless a patience is given
    stop = tool.pretraining_recipe(150, 100, None, 5, patience=4)
    assert stop["foundation_seg"]["early_stop_patience"] == 4 and stop["lorkd_seg"]["epochs"] == 100
    assert tool.dataset_defaults("acdc_shift")["pretrain_patience"] == 4


def test_an_early_stopped_pretraining_is_complete(tmp_path):
    """A starting point stopped by patience before its epoch ceiling is complete (reused, not retrained); one that
    stopped before its ceiling for another reason (killed, summary of an older shorter run) is not."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "model.pt").write_bytes(b"x")
    (models / "network_def.json").write_text("{}")
    (models / "training_summary.json").write_text(json.dumps({"epochs": 70, "early_stopped": True}))
    assert site_finetune._complete(tmp_path, "foundation_seg", 150)["epochs"] == 70
    (models / "training_summary.json").write_text(json.dumps({"epochs": 70, "early_stopped": False}))
    assert site_finetune._complete(tmp_path, "foundation_seg", 150) is None
    assert site_finetune._complete(tmp_path, "foundation_seg", 70) is not None


def test_runs_are_reused_only_with_the_same_settings(tmp_path):
    bench = site_finetune
    out = tmp_path / "n5" / "expert_full_seed0"
    write = f"import json, pathlib; p = pathlib.Path({str(out)!r}) / 'docs'; p.mkdir(parents=True, exist_ok=True); " \
            "(p / 'finetune_summary.json').write_text(json.dumps({'status': 'complete'}))"  # fmt: skip
    cmd = [sys.executable, "-c", write]
    first = bench.run_or_reuse(cmd, out, {"epochs": 2, "source": "abc"})
    assert not first["reused"] and first["cpu_seconds"] >= 0 and first["seconds"] > 0
    assert (tmp_path / "n5" / "expert_full_seed0.log").is_file()
    again = bench.run_or_reuse(cmd, out, {"epochs": 2, "source": "abc"})
    assert again["reused"] and again["seconds"] == first["seconds"] and again["summary"] == {"status": "complete"}
    assert not bench.run_or_reuse(cmd, out, {"epochs": 2, "source": "other weights"})["reused"]
    with pytest.raises(RuntimeError, match="exit 3"):
        bench.run_or_reuse([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "bad", {})


def test_curve_section_and_plot_from_a_summary(tmp_path, fake_curve_record):
    tool = site_curve
    records = [
        fake_curve_record(row, n, 50, seed, base + 0.01 * seed + (0.1 if n == "all" else 0), nsd=base,
                          dsc_before=0.1 if seed == 0 else None, nsd_before=0.1 if seed == 0 else None,
                          head="keep (14 out)")
        for n in ("5", "all") for seed in (0, 1) for row, base in (("scratch", 0.4), ("expert_full", 0.8))
    ]  # fmt: skip
    meta = {"command": "python -m benchmarks.site_curve run", "date": "today", "stage_seconds": {"curve": 60.0},
            "glibc_tunables": "x", "omp_num_threads": "1", "jobs": 2,
            "study": {"study_file": "/tmp/s.json", "seed": 0, "num_public": 120, "num_validation": 30,
                      "num_site_pool": 50, "dataset_dir": "../shared/data/msd_hippocampus"},
            "pretraining_datalist": "d.json", "expert_bundle": "e", "work_dir": "w", "sizes": ["5", "all"],
            "seeds": [0, 1], "rows": ["scratch", "expert_full"],
            "pretrained": {n: {"recipe": {"epochs": 40}, "summary": {"epochs": 40, "best_metric": 0.7}, "seconds": 60.0,
                               "cpu_seconds": 60.0} for n in ("foundation_seg", "lorkd_seg")},
            "budget": {"steps": 150, "epochs": None, "validations": 2, "batch_size": 2, "patch_size": [32, 48, 32],
                       "learning_rate": 0.002}}  # fmt: skip
    budget = [dict(records[1], epochs=e, seed=s) for e in (10, 60) for s in (0, 1)]
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nthe other tool's table\n")
    text = tool.write_section({"meta": meta, "records": records, "budget_records": budget}, results,
                              tmp_path / "docs" / "site_curve.png")  # fmt: skip
    assert "- N=5: expert_full beats scratch: DSC 80.50 ± 0.50 vs 40.50 ± 0.50" in text
    assert "| expert_full | 10 | 1.00 | 80.50 ± 0.50 | 90.50 ± 0.50 |" in text and "![DSC against N](site_curve.png)" in text
    assert "| 60 | 3 |" in text and results.read_text().startswith("# Results\n\nthe other tool's table\n")
    assert (tmp_path / "docs" / "site_curve.png").read_bytes()[:4] == b"\x89PNG"
