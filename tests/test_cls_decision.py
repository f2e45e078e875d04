# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The decision threshold of two-class classifiers: chosen on validation items for the highest balanced accuracy,
applied by the exported bundle's own inference.json (decisions.csv), written into a bundle as a whole."""

from __future__ import annotations

import json
import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medfm_ops.bundle import (
    calibrate_cls_bundle,
    calibrate_when_binary,
    cls_bundle_outputs,
    next_patch_version,
    score_cls_bundle,
    write_cls_expert_bundle,
)
from medfm_ops.bundle.class_decision import ClassDecisiond
from medfm_ops.metrics import (
    choose_decision_threshold,
    classification_scores,
    specificity_sensitivity,
    threshold_decisions,
)

TINY = {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
        "block_inplanes": [4, 4, 8, 8], "spatial_dims": 3, "n_input_channels": 1, "conv1_t_size": 3,
        "conv1_t_stride": 1, "num_classes": 2}  # fmt: skip


def _two(p1):
    p1 = np.asarray(p1, float)
    return np.stack([1 - p1, p1], 1)


def test_threshold_maximises_balanced_accuracy_by_hand():
    # argmax (0.5) calls only the 0.6 case positive: recalls 1 and 1/3; between 0.3 and 0.4 every case is right
    c = choose_decision_threshold(_two([0.1, 0.2, 0.3, 0.4, 0.45, 0.6]), np.array([0, 0, 0, 1, 1, 1]))
    assert c["threshold"] == pytest.approx(0.35)
    assert c["balanced_accuracy"] == pytest.approx(1.0) and c["argmax_balanced_accuracy"] == pytest.approx(2 / 3)
    assert (c["n"], c["positives"]) == (6, 3)
    # an argmax that is already best is kept (of equally good thresholds the one closest to 0.5)
    kept = choose_decision_threshold(_two([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1]))
    assert kept["threshold"] == 0.5 and kept["balanced_accuracy"] == 1.0
    # the best of imperfect thresholds: 0.7 (one positive missed) beats 0.25 (two negatives hit)
    c = choose_decision_threshold(_two([0.1, 0.3, 0.35, 0.6, 0.8, 0.9]), np.array([0, 1, 0, 0, 1, 1]))
    assert c["threshold"] == pytest.approx(0.7) and c["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)


def test_specificity_sensitivity_counts_each_class_recall():
    # 3 negatives (one called positive), 2 positives (one missed)
    spec, sens = specificity_sensitivity(np.array([0, 1, 0, 1, 0]), np.array([0, 0, 0, 1, 1]))
    assert spec == pytest.approx(2 / 3) and sens == pytest.approx(0.5)
    assert specificity_sensitivity(np.array([1, 0]), np.array([1, 0])) == (1.0, 1.0)


def test_screening_threshold_reaches_the_sensitivity_with_the_best_specificity():
    # positives at 0.3, 0.6, 0.9; negatives at 0.1, 0.2, 0.4, 0.5: finding all three positives costs two negatives
    probs, labels = _two([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.9]), np.array([0, 0, 1, 0, 0, 1, 1])
    c = choose_decision_threshold(probs, labels, min_sensitivity=1.0)
    assert c["threshold"] == pytest.approx(0.25) and c["sensitivity"] == 1.0 and c["specificity"] == 0.5
    assert c["criterion"] == "specificity at sensitivity >= 1"
    c = choose_decision_threshold(probs, labels, min_sensitivity=0.6)  # two of three: above 0.5 misses only 0.3
    assert c["threshold"] == pytest.approx(0.5) and c["sensitivity"] == pytest.approx(2 / 3) and c["specificity"] == 1.0
    ba = choose_decision_threshold(probs, labels)
    assert ba["criterion"] == "balanced accuracy" and ba["balanced_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    # every case positive is a candidate: a positive with the smallest probability is still found
    low = choose_decision_threshold(_two([0.05, 0.2, 0.7]), np.array([1, 0, 1]), min_sensitivity=1.0)
    assert 0.0 < low["threshold"] < 0.05 and low["sensitivity"] == 1.0
    with pytest.raises(ValueError, match="min_sensitivity"):
        choose_decision_threshold(probs, labels, min_sensitivity=1.5)
    with pytest.raises(ValueError, match="reaches sensitivity"):  # a positive at probability 0: no threshold in (0, 1)
        choose_decision_threshold(_two([0.0, 0.2, 0.7]), np.array([1, 0, 1]), min_sensitivity=1.0)


def test_threshold_refuses_what_it_cannot_choose_on():
    with pytest.raises(ValueError, match="both classes"):
        choose_decision_threshold(_two([0.2, 0.7]), np.array([1, 1]))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        choose_decision_threshold(np.full((3, 3), 1 / 3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="two-class"):
        threshold_decisions(np.full((3, 3), 1 / 3), 0.4)


def test_decisions_of_the_bundle_transform_equal_the_metric_rule():
    rng = np.random.default_rng(0)
    probs = _two(rng.uniform(size=50))
    for t in (None, 0.5, 0.2, 0.83):
        ours = [int(ClassDecisiond("pred", t)({"pred": torch.as_tensor(p)})["pred_class"][0]) for p in probs]
        assert ours == threshold_decisions(probs, t).tolist(), t
    assert threshold_decisions(probs, 0.5).tolist() == probs.argmax(1).tolist()  # 0.5 is the argmax
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ClassDecisiond("pred", 1.5)
    with pytest.raises(ValueError, match="two class probabilities"):
        ClassDecisiond("pred", 0.3)({"pred": torch.full((3,), 1 / 3)})


def test_scores_at_given_predictions():
    probs, labels = _two([0.1, 0.2, 0.3, 0.4]), np.array([0, 0, 1, 1])
    argmax = classification_scores(probs, labels)
    assert argmax["balanced_accuracy"] == 0.5 and argmax["auc"] == 1.0
    at = classification_scores(probs, labels, predictions=np.array([0, 0, 1, 1]))
    assert at["balanced_accuracy"] == 1.0 and at["accuracy"] == 1.0 and at["auc"] == argmax["auc"]
    with pytest.raises(ValueError, match="predictions"):
        classification_scores(probs, labels, predictions=np.array([0, 2, 1, 1]))


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A two-class bundle of a random tiny ResNet and 14 NIfTI volumes."""
    root = tmp_path_factory.mktemp("decision")
    torch.manual_seed(0)
    from medfm_ops.networks import instantiate

    bundle = write_cls_expert_bundle(root / "bundle", TINY, instantiate(dict(TINY)).state_dict(), "lesion_ct",
                                     ["normal", "lesion"], [12, 12, 12])  # fmt: skip
    rng = np.random.default_rng(1)
    items = []
    for i in range(14):
        path = root / "images" / f"v{i}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(rng.normal(i % 3, 1 + i / 7, size=(10, 10, 10)).astype(np.float32), np.eye(4)), str(path))
        items.append({"image": str(path), "label": 0})
    return bundle, items


def test_calibrated_bundle_decides_at_the_threshold_chosen_on_its_own_outputs(tiny, tmp_path):
    bundle, items = tiny
    probs, decisions = cls_bundle_outputs(bundle, items)
    assert decisions.tolist() == probs.argmax(1).tolist()  # a fresh export: the argmax
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["medfm"]["decision"] == {"rule": "argmax"}
    # labels the argmax gets wrong but a threshold separates: the upper half of the class-1 probabilities
    order = np.argsort(probs[:, 1])
    labelled = [{**it, "label": int(k in order[len(order) // 2 :])} for k, it in enumerate(items)]
    before = _snapshot(bundle)
    choice = calibrate_cls_bundle(bundle, labelled, out_dir=tmp_path / "calibrated", chosen_on="the test's cases")
    assert _snapshot(bundle) == before  # out_dir: the original stays as it was
    assert choice == {**choose_decision_threshold(probs, np.array([it["label"] for it in labelled])), "chosen_on": "the test's cases"}
    assert choice["balanced_accuracy"] == 1.0
    out = tmp_path / "calibrated"
    cfg = json.loads((out / "configs" / "inference.json").read_text())
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert cfg["decision_threshold"] == choice["threshold"]
    assert meta["version"] == "0.1.1" and "0.1.0" in meta["changelog"] and "decision threshold" in meta["changelog"]["0.1.1"]
    assert meta["medfm"]["decision"]["rule"] == "threshold" and meta["medfm"]["decision"]["threshold"] == choice["threshold"]
    assert "decision threshold" in (out / "docs" / "README.md").read_text()
    assert (out / "models" / "model.pt").read_bytes() == (bundle / "models" / "model.pt").read_bytes()
    p2, d2 = cls_bundle_outputs(out, labelled)
    assert np.allclose(p2, probs, atol=1e-6)
    assert d2.tolist() == threshold_decisions(probs, choice["threshold"]).tolist()
    scores = score_cls_bundle(out, labelled)
    assert scores["balanced_accuracy"] == 1.0 and score_cls_bundle(bundle, labelled)["auc"] == scores["auc"]


def test_calibration_that_cannot_apply_leaves_the_bundle_as_it_was(tiny, tmp_path):
    bundle, items = tiny
    before = _snapshot(bundle)
    with pytest.raises(ValueError, match="both classes"):
        calibrate_cls_bundle(bundle, items)  # every label 0
    assert calibrate_when_binary(bundle, items) is None  # the exporters' step: argmax kept, one log line
    assert _snapshot(bundle) == before
    assert next_patch_version("1.2.9") == "1.2.10"
    with pytest.raises(ValueError, match="MAJOR.MINOR.PATCH"):
        next_patch_version("1.2")


def test_calibration_tool_on_a_datalist_section(tiny, tmp_path):
    import runpy

    bundle, items = tiny
    probs, _ = cls_bundle_outputs(bundle, items)
    upper = set(np.argsort(probs[:, 1])[len(items) // 2 :].tolist())
    cases = [{"image": it["image"], "label": int(k in upper), "task": "lesion_ct"} for k, it in enumerate(items)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"tasks": [{"name": "lesion_ct", "task_id": 0, "labels": {"0": "normal", "1": "lesion"}}],
                                    "training": cases[:2], "validation": cases}))  # fmt: skip
    tool = runpy.run_path(str(Path(__file__).resolve().parents[1] / "tools" / "calibrate_cls_bundle.py"))
    choice = tool["calibrate"](str(bundle), str(datalist), out_dir=str(tmp_path / "out"))
    assert choice["balanced_accuracy"] == 1.0 and choice["n"] == len(items) and "'validation' cases" in choice["chosen_on"]
    assert json.loads((tmp_path / "out" / "configs" / "inference.json").read_text())["decision_threshold"] == choice["threshold"]
    screen = tool["calibrate"](str(bundle), str(datalist), out_dir=str(tmp_path / "screen"), min_sensitivity=1.0)
    meta = json.loads((tmp_path / "screen" / "configs" / "metadata.json").read_text())
    assert screen["sensitivity"] == 1.0 and meta["medfm"]["decision"]["criterion"] == "specificity at sensitivity >= 1"
    assert "specificity at sensitivity >= 1" in (tmp_path / "screen" / "docs" / "README.md").read_text()
    with pytest.raises(ValueError, match="no 'validation' item of task"):
        tool["calibrate"](str(bundle), str(datalist), task="other_task")


def test_calibration_inside_the_staging_folder_of_its_own_export(tiny, tmp_path):
    """As save_finetuned_classifier does it: the export is staged, calibrated in its staging folder, then swapped in."""
    import shutil

    from medfm_ops.utils import staged_directory

    bundle, items = tiny
    probs, _ = cls_bundle_outputs(bundle, items)
    upper = set(np.argsort(probs[:, 1])[len(items) // 2 :].tolist())
    labelled = [{**it, "label": int(k in upper)} for k, it in enumerate(items)]
    with staged_directory(tmp_path / "export") as stage:
        shutil.copytree(bundle, stage, dirs_exist_ok=True)
        choice = calibrate_when_binary(stage, labelled, verify=False)
    meta = json.loads((tmp_path / "export" / "configs" / "metadata.json").read_text())
    assert meta["medfm"]["decision"]["threshold"] == choice["threshold"] and meta["version"] == "0.1.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging folder left behind
