# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The population-shift site study (``python -m benchmarks.site_curve run --dataset acdc_shift``): the held-out
pathology-group split on the real ACDC files, the patient draws, the curve tool's new options and its section.

The ACDC data are required: the split tests FAIL (never skip) with a message saying where they looked. Override the
location with ``MEDFM_SHARED_DATA`` (the folder holding ``acdc/``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from benchmarks import site_curve
from benchmarks.site_study import (
    ACDC_POPULATIONS,
    build_shift_pretraining_datalist,
    load_or_create_shift_split,
    patients_of,
    write_patient_draw_split,
)
from medfm_ops.data import HOLDOUT_PARTS, case_populations, read_msd_dataset, split_held_out_population

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def acdc() -> Path:
    data = Path(os.environ.get("MEDFM_SHARED_DATA", REPO.parent / "shared" / "data")) / "acdc"
    assert (data / "dataset.json").is_file(), (
        f"real data set not found at {data} (expected dataset.json, imagesTr/, labelsTr/ of ACDC); set "
        "MEDFM_SHARED_DATA to the folder holding acdc/."
    )
    return data


def _number(case: dict) -> int:
    return int(case["group"][len("patient") :])


def test_held_out_group_split_on_real_acdc_is_by_patient_and_disjoint(acdc):
    _, cases, _ = read_msd_dataset(acdc)
    parts = split_held_out_population(cases, r"(patient\d+)_frame", ACDC_POPULATIONS, ["arv"], 5, 2, seed=0)
    assert set(parts) == set(HOLDOUT_PARTS)
    assert sum(len(v) for v in parts.values()) == len(cases)
    patients = {p: set(patients_of(v)) for p, v in parts.items()}
    for a in HOLDOUT_PARTS:  # every patient in exactly one part: both frames on one side
        for b in HOLDOUT_PARTS:
            assert a == b or not patients[a] & patients[b], (a, b)
    for p, v in parts.items():
        assert all(sum(c["group"] == g for c in v) == 2 for g in patients[p]), p  # both frames of each patient
    site = [c for p in ("site_test", "site_validation", "site_pool") for c in parts[p]]
    assert all(81 <= _number(c) <= 100 and c["population"] == "arv" for c in site)
    assert all(not 81 <= _number(c) <= 100 for c in parts["pretraining"])
    assert {"dcm", "hcm", "minf", "nor"} == {c["population"] for c in parts["pretraining"]}
    assert (len(patients["site_test"]), len(patients["site_validation"])) == (5, 2)
    assert len(patients["site_pool"]) == len({c["group"] for c in site}) - 7
    again = split_held_out_population(cases, r"(patient\d+)_frame", ACDC_POPULATIONS, ["arv"], 5, 2, seed=0)
    other = split_held_out_population(cases, r"(patient\d+)_frame", ACDC_POPULATIONS, ["arv"], 5, 2, seed=1)
    assert again == parts and other["site_test"] != parts["site_test"]
    two = split_held_out_population(cases, r"(patient\d+)_frame", ACDC_POPULATIONS, ["arv", "minf"], 5, 2, seed=0)
    assert {c["population"] for c in two["site_pool"]} <= {"arv", "minf"} and len(patients_of(two["site_pool"])) > 20
    with pytest.raises(ValueError, match="held_out must name populations"):
        split_held_out_population(cases, r"(patient\d+)_frame", ACDC_POPULATIONS, ["rv"], 5, 2)
    with pytest.raises(ValueError, match="leave site pool patients"):
        split_held_out_population(cases, r"(patient\d+)_frame", ACDC_POPULATIONS, ["arv"], 10, 10)


def test_population_ranges_are_checked():
    assert case_populations(["patient007", "patient081"], ACDC_POPULATIONS) == ["dcm", "arv"]
    with pytest.raises(ValueError, match="overlap"):
        case_populations(["patient001"], {"a": [1, 20], "b": [20, 40]})
    with pytest.raises(ValueError, match="none of the ranges"):
        case_populations(["patient120"], ACDC_POPULATIONS)
    with pytest.raises(ValueError, match="first <= last"):
        case_populations(["patient001"], {"a": [20, 1]})


def test_shift_split_is_saved_reused_and_draws_whole_patients(acdc, tmp_path):
    file = tmp_path / "population_split.json"
    split = load_or_create_shift_split(acdc, file, ["arv"], 5, 2, seed=0)
    saved = json.loads(file.read_text())
    assert not split["reused"] and saved["held_out"] == ["arv"] and saved["num_site_test_patients"] == 5
    assert all(not Path(c["image"]).is_absolute() for c in saved["site_pool"])
    again = load_or_create_shift_split(acdc, file, ["arv"], 5, 2, seed=0)
    assert again["reused"] and again["site_test"] == split["site_test"] and again["site_pool"] == split["site_pool"]
    with pytest.raises(ValueError, match="was made with"):
        load_or_create_shift_split(acdc, file, ["minf"], 5, 2, seed=0)
    small = write_patient_draw_split(split, tmp_path / "n2.json", 2, seed=1)
    large = write_patient_draw_split(split, tmp_path / "n5.json", 5, seed=1)
    assert small["info"]["patients"] == large["info"]["patients"][:2]  # nested within a seed
    assert len(small["training"]) == 4 and len(large["training"]) == 10  # both frames of every drawn patient
    assert [c["image"] for c in small["validation"]] == [c["image"] for c in split["site_validation"]]
    test_images = {c["image"] for c in split["site_test"]}
    assert not test_images & {c["image"] for c in large["training"] + large["validation"]}
    everyone = write_patient_draw_split(split, tmp_path / "nall.json", "all", seed=0)
    assert everyone["info"]["all_patients"] and len(everyone["training"]) == len(split["site_pool"])


def test_pretraining_datalist_holds_no_site_patient(acdc, tmp_path):
    split = load_or_create_shift_split(acdc, tmp_path / "split.json", ["arv"], 5, 2, seed=0)
    mapping = REPO / "bundles" / "lorkd_seg" / "data" / "real_regions.json"
    datalist = json.loads(build_shift_pretraining_datalist(split, tmp_path / "pre", mapping, other_cases=3).read_text())
    items = datalist["training"] + datalist["validation"]
    heart = [i for i in items if i["region_name"] == "heart_mri"]
    brain = [i for i in items if i["region_name"] == "brain_mri"]
    assert len(brain) == 3 and len(heart) == len(split["pretraining"])
    site_files = {Path(c["image"]).name for p in ("site_test", "site_validation", "site_pool") for c in split[p]}
    assert not site_files & {Path(i["image"]).name for i in heart}
    assert heart[0]["annotated"] == ["right_ventricle", "myocardium", "left_ventricle"]
    val_patients = {i["group"] for i in datalist["validation"] if i["region_name"] == "heart_mri"}
    assert len(val_patients) == 6 and not val_patients & {i["group"] for i in datalist["training"] if "group" in i}


def test_curve_tool_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="dataset must be one of"):
        site_curve.run(dataset="acdc", work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown rows"):
        site_curve.run(dataset="acdc_shift", work_dir=str(tmp_path), rows="scratch,expert_xl")
    with pytest.raises(ValueError, match="unknown rows"):
        site_curve.run(dataset="hippocampus", work_dir=str(tmp_path), rows="expert_xl")
    with pytest.raises(ValueError, match="scratch_steps"):
        site_curve.run(dataset="acdc_shift", work_dir=str(tmp_path), scratch_steps=0)
    with pytest.raises(ValueError, match="must be 'all' or numbers of cases"):
        site_curve._check_sizes(["2", "500"], 50, "cases")
    site_curve._check_sizes(["2", "all"], 8, "patients")
    assert site_curve.dataset_defaults("acdc_shift")["patch_size"] == (96, 96, 8)
    d = site_curve.dataset_defaults("acdc_shift")
    assert site_curve.site_names(d, ["minf", "arv"]) == d  # the default site, in any order: the default names
    one = site_curve.site_names(d, ["arv"])  # another site never overwrites the default study's page or runs
    assert (one["work_dir"], one["plot"], one["section"]) == (
        "runs/site_curve_acdc_shift_arv", "docs/site_curve_acdc_shift_arv.png", "site-curve-acdc-shift-arv")
    recipe = site_curve.pretraining_recipe(4, 4, None, 2)  # acdc_shift: the configs' own region patches
    assert "roi_size" not in recipe["foundation_seg"] and recipe["lorkd_seg"]["epochs"] == 4
    assert not list(tmp_path.iterdir())  # nothing written


def test_shift_section_and_plot_from_a_fake_record_set(tmp_path, fake_curve_record):
    classes = ("right_ventricle", "myocardium", "left_ventricle")

    def rec(row, n, seed, base):
        dsc = base + 0.01 * seed
        return fake_curve_record(row, n, 8, seed, dsc, epochs=20, val_interval=10, steps=40,
                                 per_class={c: {"dsc": dsc - 0.1 * i, "nsd": dsc} for i, c in enumerate(classes)},
                                 best_epoch=20 if row == "scratch" else 10, head="keep (4 out)", val_dsc=0.5)

    records = [rec(row, n, s, base) for n in ("2", "all") for s in (0, 1)
               for row, base in (("scratch", 0.30), ("expert_full", 0.70), ("expert_lora", 0.31))]  # fmt: skip
    meta = {"dataset": "acdc_shift", "section": "site-curve-acdc-shift", "command": "python -m benchmarks.site_curve "
            "run --dataset acdc_shift", "date": "today", "stage_seconds": {"curve": 60.0}, "omp_num_threads": "1",
            "jobs": 2, "study": {"split_file": "/tmp/p.json", "held_out": ["arv"], "seed": 0, "num_test": 5,
            "num_validation": 2, "num_pretraining_patients": 65, "num_site_test_patients": 5,
            "num_site_validation_patients": 2, "num_site_pool_patients": 8, "num_site_test_cases": 10,
            "dataset_dir": "../shared/data/acdc"}, "pretraining_datalist": "d.json", "expert_bundle": "e",
            "work_dir": "w", "sizes": ["2", "all"], "seeds": [0, 1], "rows": ["scratch", "expert_full", "expert_lora"],
            "pretrained": {n: {"recipe": {"epochs": 40}, "summary": {"epochs": 40, "best_metric": 0.7,
                                                                     "resumed_epoch": 30 if n == "foundation_seg" else None},
                               "seconds": 60.0} for n in ("foundation_seg", "lorkd_seg")},
            "budget": {"steps": 40, "epochs": None, "validations": 2, "batch_size": 2, "patch_size": [96, 96, 8],
                       "learning_rate": 0.002, "spacing": [1.5, 1.5, 10.0], "scratch_steps": 600,
                       "scratch_validations": 6}, "nsd_tolerance_mm": 1.5,
            "before": {"expert": {"mean_dsc": 0.55, "mean_nsd": 0.5, "per_class": {c: {"dsc": 0.4, "nsd": 0.4}
                                                                                    for c in classes}},
                       "teacher": {"mean_dsc": 0.6, "mean_nsd": 0.52, "per_class": {c: {"dsc": 0.45, "nsd": 0.3}
                                                                                     for c in classes}},
                       "expert_held_in": {"mean_dsc": 0.75, "mean_nsd": 0.7,
                                          "per_class": {c: {"dsc": 0.5 + 0.1 * i, "nsd": 0.6} for i, c in enumerate(classes)}}}}  # fmt: skip
    results = tmp_path / "docs" / "RESULTS.md"
    results.parent.mkdir()
    results.write_text("# Results\n\nthe hippocampus section\n")
    plot = tmp_path / "docs" / "site_curve_acdc_shift.png"
    text = site_curve.write_section({"meta": meta, "records": records, "budget_records": []}, results, plot)
    assert "- N=2: expert_full beats scratch: DSC 70.50 ± 0.50 vs 30.50 ± 0.50 (+40.00 points" in text
    assert "- N=2: expert_lora ties with scratch" in text
    assert "- heart expert (the starting point of the expert rows): DSC 55.00, NSD 50.00" in text
    assert "right_ventricle DSC 40.00 / NSD 40.00" in text
    assert "- foundation teacher, heart channels (the starting point of teacher_full): DSC 60.00" in text
    assert "right_ventricle DSC 45.00 / NSD 30.00" in text
    assert "Per class, NSD (%):" in text  # per-class NSD tables next to the DSC ones
    # a resumed pre-training says that its wall time counts only the epochs after the resume; the other says nothing
    assert text.count("after a resume at epoch 30 (the time counts only the epochs after it)") == 1
    # the shift as the expert sees it: held-in minus site test, overall and per class; no teacher line without its
    # held-in scores
    assert ("- heart expert on the pre-training populations' held-in cases: DSC 75.00, NSD 70.00; held-in minus site "
            "test: +20.0 DSC points (per class: right_ventricle +10.0, myocardium +20.0, left_ventricle +30.0).") in text
    assert "- teacher on the pre-training" not in text
    noted = site_curve.write_section({"meta": meta, "records": records, "budget_records": [],
                                      "notes": "What it says.\n\nSecond paragraph."}, results, plot)  # fmt: skip
    assert "> What it says.\n>\n> Second paragraph.\n\n**Does adapting" in noted  # report --notes, above the verdicts
    assert "| expert_full | 10 | 1.00 | 70.50 ± 0.50 | 70.50 ± 0.50 |" in text
    assert "left_ventricle:" in text and "| expert_full | 10 | 1.00 | 50.50 ± 0.50 | 50.50 ± 0.50 |" in text
    assert "| 2 | 20 | 10 | 40 | 20 / 40; 20 (20), 20 (20) |" in text  # scratch: its own ceiling, epochs trained (kept)
    written = results.read_text()
    assert written.startswith("# Results\n\nthe hippocampus section\n") and "medfm:site-curve-acdc-shift:begin" in written
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "- MONAI Label: not checked in this run" in text  # a record made without the check says so
    meta["monailabel"] = {"bundle": "runs/x/nall/expert_full_seed0", "image": "/d/acdc/imagesTr/patient090_frame01.nii.gz",
                          "server_labels": {"right_ventricle": 1, "myocardium": 2, "left_ventricle": 3},
                          "labels_match": True, "shape": [154, 224, 10], "input_shape": [154, 224, 10],
                          "affine_match": True, "labels_present": [0, 1, 2, 3], "agreement": 1.0, "passed": True}
    text = site_curve.write_section({"meta": meta, "records": records, "budget_records": []}, results, plot)
    assert ("on the site test image `patient090_frame01.nii.gz`: labels {'right_ventricle': 1, 'myocardium': 2, "
            "'left_ventricle': 3} (the site bundle's classes), label map 154x224x10 on the input grid") in text
    assert "offline inference.json 1.0000: passed." in text
    meta["monailabel"] |= {"labels_match": False, "passed": False}
    text = site_curve.write_section({"meta": meta, "records": records, "budget_records": []}, results, plot)
    assert "(NOT the site bundle's classes)" in text and ": FAILED." in text
    assert "By population" not in text  # a one-group site (or records without per-population scores): no table
    pops = ("arv", "minf")
    meta["before"]["expert"]["per_population"] = {p: {"dsc": 0.4 + 0.2 * i, "nsd": 0.5, "num_cases": 4 + 2 * i}
                                                  for i, p in enumerate(pops)}  # fmt: skip
    for r in records:
        r["per_population"] = {p: {"dsc": r["dsc"] + 0.1 * i, "nsd": r["dsc"], "num_cases": 4 + 2 * i}
                               for i, p in enumerate(pops)}  # fmt: skip
    text = site_curve.write_section({"meta": meta, "records": records, "budget_records": []}, results, plot)
    assert "| row | arv: N=2 | arv: N=all | minf: N=2 | minf: N=all |" in text
    assert "| BEFORE expert | 40.00 | 40.00 | 60.00 | 60.00 |" in text and "BEFORE teacher" not in text
    assert "| expert_full | 70.50 ± 0.50 | 70.50 ± 0.50 | 80.50 ± 0.50 | 80.50 ± 0.50 |" in text
    assert "Test volumes per population: arv 4, minf 6." in text


def test_population_scores_average_each_groups_cases():
    from benchmarks.site_shift import population_scores

    cases = [{"label": "a1", "population": "arv"}, {"label": "m1", "population": "minf"},
             {"label": "a2", "population": "arv"}]  # fmt: skip
    scores = {"cases": [{"label": "a1", "dsc": [0.2, 0.4], "nsd": [1.0, 1.0]},
                        {"label": "m1", "dsc": [0.9, 0.7], "nsd": [0.5, 0.7]},
                        {"label": "a2", "dsc": [0.6, 0.6], "nsd": [0.0, 1.0]}]}  # fmt: skip
    got = population_scores(scores, cases)
    assert list(got) == ["arv", "minf"]
    assert got["arv"]["dsc"] == pytest.approx(0.45) and got["arv"]["nsd"] == pytest.approx(0.75)
    assert got["arv"]["num_cases"] == 2 and got["minf"] == {"dsc": pytest.approx(0.8), "nsd": pytest.approx(0.6),
                                                             "num_cases": 1}  # fmt: skip
    with pytest.raises(ValueError, match="scored case x is not one of the 3 cases"):
        population_scores({"cases": [{"label": "x", "dsc": [1.0], "nsd": [1.0]}]}, cases)


def test_held_in_cases_are_the_regions_validation_cases(tmp_path):
    from benchmarks.site_shift import held_in_cases

    (tmp_path / "d").mkdir()
    datalist = tmp_path / "d" / "datalist.json"
    ids = {"brain_mri": 0, "heart_mri": 1}
    case = lambda name, region: {"image": f"../img/{name}.nii.gz", "label": f"../lab/{name}.nii.gz",  # noqa: E731
                                 "region": ids[region]}  # fmt: skip
    regions = [{"name": "brain_mri", "task_id": 0, "labels": {"1": "anterior"}},
               {"name": "heart_mri", "task_id": 1, "labels": {"1": "right_ventricle"}}]  # fmt: skip
    datalist.write_text(json.dumps({"regions": regions, "training": [case("t", "heart_mri")],
                                    "validation": [case("b", "brain_mri"), case("h1", "heart_mri"),
                                                   case("h2", "heart_mri")]}))  # fmt: skip
    got = held_in_cases(datalist)
    assert [Path(c["image"]).name for c in got] == ["h1.nii.gz", "h2.nii.gz"]  # validation only, this region only
    assert got[0]["label"] == str((tmp_path / "lab" / "h1.nii.gz").resolve())  # resolved against the datalist
    with pytest.raises(ValueError, match="no 'validation' case of region 'liver'"):
        held_in_cases(datalist, region="liver")


def test_scratch_budget_stops_early_the_others_train_their_budget():
    """The scratch row's budget carries a patience (a ceiling + early stopping on the validation patients); the
    pre-trained rows' budgets have none, so every epoch of theirs trains."""
    from benchmarks.site_finetune import finetune_command

    budget = {"epochs": 10, "val_interval": 1, "batch_size": 2, "patch_size": [8, 8, 8], "learning_rate": 1e-3}
    for extra, want in (({"patience": 5}, "5"), ({}, "0")):
        cmd = finetune_command("src", None, "scratch", "full", Path("d"), Path("o"), {**budget, **extra}, 0)
        assert cmd[cmd.index("--early_stop_patience") + 1] == want
    with pytest.raises(ValueError, match="scratch_patience must be >= 0"):
        site_curve.run(dataset="acdc_shift", work_dir="/nonexistent", scratch_patience=-1)


def test_the_rate_of_each_run_is_chosen_on_the_validation_patients():
    def run(row, n, seed, lr, val, test):
        return {"row": row, "n_label": n, "seed": seed, "lr": lr, "val_dsc": val, "dsc": test}

    runs = [run("expert_full", "2", 0, 0.002, 0.60, 0.90), run("expert_full", "2", 0, 0.0002, 0.70, 0.50),
            run("expert_full", "2", 1, 0.002, 0.65, 0.60), run("expert_full", "2", 1, 0.0002, 0.65, 0.70),
            run("scratch", "2", 0, 0.002, 0.40, 0.40)]  # fmt: skip
    chosen, others = site_curve.choose_rate_runs(runs)
    # by validation, never by the test score; a tie keeps the first rate given
    assert [(r["seed"], r["lr"], r["row"]) for r in chosen] == [(0, 0.0002, "expert_full"), (1, 0.002, "expert_full"),
                                                                (0, 0.002, "scratch")]  # fmt: skip
    assert chosen[0]["lr_val"] == {"0.002": 0.60, "0.0002": 0.70} and len(others) == 2
    assert site_curve._rate_text(chosen, {"learning_rate": 0.002, "lr_grid": [0.0002, 0.002]}).startswith(
        "learning rate of every pre-trained run chosen per row, N and seed on the validation patients from 0.0002, "
        "0.002 (chosen: expert_full 0.0002 x1, 0.002 x1;")
    assert site_curve._rate_text(chosen, {"learning_rate": 0.002}) == "lr 0.002"
    with pytest.raises(ValueError, match="lr_grid needs a test set"):
        site_curve.run(dataset="hippocampus", work_dir="/nonexistent", lr_grid="0.001,0.002")
