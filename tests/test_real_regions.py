# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The real two-region setting (brain MRI: MSD hippocampus, heart MRI: ACDC) end to end on a few real cases:
datalist builder (split by patient, partial labels, class channels), region-wise preprocessing carried into the
exported expert bundles, and a short real-data training that moves the experts and keeps fused == routed.

The data are required: the tests FAIL (never skip) with a message saying where they looked. Override the location
with ``MEDFM_SHARED_DATA`` (the folder holding ``msd_hippocampus/`` and ``acdc/``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run

from medfm_ops.data import (
    RegionLabelToChannelsd,
    ensure_mapped_datalist,
    load_datalist,
    write_datalist_subset,
)
from medfm_ops.engines import RegionSlidingWindowInferer
from medfm_ops.finetune.bundle_run import predict_with_bundle
from medfm_ops.finetune.scoring import score_label_maps
from medfm_ops.networks import (
    eks_layers,
    expert_model_from_spec,
    export_expert,
    load_expert_state_dict,
    load_network_spec,
)
from medfm_ops.bundle import export_lorkd_expert

REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "bundles" / "lorkd_seg" / "data" / "real_regions.json"
#: small networks for the short run (the shipped configs' architecture, fewer channels), written into the copies'
#: train.json (a run records its network_config as the file says it)
TINY_NET = {"channels": [4, 8, 16, 32], "strides": [2, 2, 2], "num_res_units": 1}


def shared_data() -> Path:
    root = Path(os.environ.get("MEDFM_SHARED_DATA", REPO.parent / "shared" / "data"))
    for name in ("msd_hippocampus", "acdc"):
        assert (root / name / "dataset.json").is_file(), (
            f"real data set not found at {root / name} (expected dataset.json, imagesTr/, labelsTr/); set "
            "MEDFM_SHARED_DATA to the folder holding msd_hippocampus/ and acdc/."
        )
    return root


@pytest.fixture(scope="module")
def real_datalist(tmp_path_factory) -> str:
    return ensure_mapped_datalist(MAPPING, tmp_path_factory.mktemp("real") / "real_regions", seed=0,
                                  data_root=shared_data())


def test_real_datalist_split_by_patient_and_class_channels(real_datalist, tmp_path):
    table, sections = load_datalist(real_datalist)
    assert table.region_names == {0: "brain_mri", 1: "heart_mri"}
    assert table.class_names[1] == ["right_ventricle", "myocardium", "left_ventricle"]
    assert table.channels_of(0) == [0, 1] and table.channels_of(1) == [2, 3, 4]
    # ACDC: every patient (both frames) on one side of the split; 50 / 10 / 20 patients
    owner: dict[str, set] = {}
    for section, items in sections.items():
        for item in items:
            if item["region"] == 1:
                assert item["group"] == Path(item["image"]).name.split("_")[0]
                owner.setdefault(item["group"], set()).add(section)
    assert len(owner) == 80 and all(len(s) == 1 for s in owner.values()), "a patient on two sides of the split"
    per = {s: sum(1 for g, v in owner.items() if s in v) for s in ("training", "validation", "test")}
    assert per == {"training": 50, "validation": 10, "test": 20}
    assert all(sum(1 for i in sections[s] if i["region"] == 1) == 2 * n for s, n in per.items())
    # hippocampus: per-case split 140 / 20 / 40; the split (seed, fractions, group pattern) is recorded
    assert [sum(1 for i in sections[s] if i["region"] == 0) for s in ("training", "validation", "test")] == [140, 20,
                                                                                                               40]
    raw = json.loads(Path(real_datalist).read_text())
    acdc = next(d for d in raw["datasets"] if d["name"] == "acdc")
    assert acdc["split"]["seed"] == 0 and acdc["split"]["group_pattern"] and acdc["split"]["num_test_groups"] == 20
    # reused when nothing changed, rebuilt (another split) with another seed
    stamp = os.stat(real_datalist).st_mtime_ns
    assert ensure_mapped_datalist(MAPPING, Path(real_datalist).parent, seed=0, data_root=shared_data()) == real_datalist
    assert os.stat(real_datalist).st_mtime_ns == stamp
    other = ensure_mapped_datalist(MAPPING, tmp_path, seed=1, data_root=shared_data())
    test0 = {i["image"] for i in sections["test"]}
    test1 = {i["image"] for i in load_datalist(other)[1]["test"]}
    assert test0 != test1


def test_real_labels_to_class_channels(real_datalist):
    """A few real cases of each set: region-local labels land in the region's union channels, the others stay 0."""
    table, sections = load_datalist(real_datalist)
    to_channels = RegionLabelToChannelsd("label", region_table=table)
    for region in (0, 1):
        for item in [i for i in sections["training"] if i["region"] == region][:2]:
            label = np.asarray(nib.load(item["label"]).dataobj)
            out = to_channels({"label": torch.as_tensor(label)[None].float(), "region": region,
                               "annotated": item["annotated"]})
            channels = out["label"]
            assert channels.shape[0] == table.num_classes
            for k, c in enumerate(table.channels_of(region), start=1):
                assert torch.equal(channels[c].bool(), torch.as_tensor(label == k)), (item["label"], k)
            others = [c for c in range(table.num_classes) if c not in table.channels_of(region)]
            assert not channels[others].any()
            assert out["channel_mask"].tolist() == table.annotated_channel_mask(region).tolist()


@pytest.fixture(scope="module")
def trained(real_datalist, tmp_path_factory):
    """foundation_seg then lorkd_seg (tiny networks, 1 epoch each) on 3 + 3 real training cases, with the shipped
    real-data override (its region-wise preprocessing)."""
    root = tmp_path_factory.mktemp("real_run")
    for name in ("foundation_seg", "lorkd_seg"):
        shutil.copytree(REPO / "bundles" / name, root / name, ignore=shutil.ignore_patterns("models", "eval", "runs"))
        train = root / name / "configs" / "train.json"
        cfg = json.loads(train.read_text())
        cfg["network_config"].update(TINY_NET)
        train.write_text(json.dumps(cfg, indent=4))
    tiny = write_datalist_subset(real_datalist, root / "tiny.json", {"training": 3, "validation": 1, "test": 2})
    common = {"datalist": tiny, "epochs": 1, "val_interval": 1, "batch_size": 2, "num_workers": 0,
              "data_cache": str(root / "cache"), "device": "$torch.device('cpu')"}
    for name, extra in (("foundation_seg", {}), ("lorkd_seg", {"warmup_epochs": 0})):
        bundle = root / name
        bundle_run(config_file=[str(bundle / "configs" / "train.json"), str(bundle / "configs" / "real_regions.json")],
                   bundle_root=str(bundle), **common, **extra)
    return root, tiny


def test_short_real_training_moves_experts_and_fused_equals_routed(trained):
    root, tiny = trained
    models = root / "lorkd_seg" / "models"
    recorded = json.loads((models / "region_preprocessing.json").read_text())
    assert recorded["heart_mri"]["patch_size"] == [96, 96, 8] and recorded["brain_mri"]["spacing"] == [1.0, 1.0, 1.0]
    model = expert_model_from_spec(load_network_spec(models))
    load_expert_state_dict(model, models / "model.pt")
    model.eval()
    # the experts moved: B_t starts at zero, so a non-zero B_t of every task is what training wrote
    for task in (0, 1):
        b_max = max(float(layer.lora_B[task].detach().abs().max()) for _, layer in eks_layers(model))
        assert b_max > 0, f"expert {task} did not move (every B_{task} still zero)"
    x = torch.randn(2, 1, 96, 96, 8)
    for task in (0, 1):
        fused = export_expert(model, task).eval()
        with torch.no_grad():
            routed = model(x, torch.full((2,), task, dtype=torch.long))
            plain = fused(x)
        torch.testing.assert_close(plain, routed, rtol=1e-4, atol=1e-4)


def test_exported_expert_bundle_scores_as_in_process(trained, tmp_path):
    """The exported bundle's own inference.json (its recorded spacing, window, intensity) gives the label maps and
    scores of the same fused weights run in process with the training preprocessing and the region's window."""
    root, tiny = trained
    table, sections = load_datalist(tiny)
    parser = ConfigParser()
    parser.read_config([str(root / "lorkd_seg" / "configs" / "train.json"),
                        str(root / "lorkd_seg" / "configs" / "real_regions.json")])
    parser.update({"bundle_root": str(root / "lorkd_seg"), "datalist": tiny, "data_cache": str(root / "cache"),
                   "device": "$torch.device('cpu')"})
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    prep_table = parser.get_parsed_content("preprocessing_table")
    models = root / "lorkd_seg" / "models"
    model = expert_model_from_spec(load_network_spec(models))
    load_expert_state_dict(model, models / "model.pt")
    for region, name in table.region_names.items():
        out = export_lorkd_expert(root / "lorkd_seg", tmp_path / name, region=name, datalist=tiny)
        infer = json.loads((out / "configs" / "inference.json").read_text())
        row = prep_table.of(region)
        assert infer["spacing"] == list(row.spacing) and infer["roi_size"] == list(row.window_size)
        assert infer["intensity_nonzero"] is row.intensity_nonzero
        cases = [i for i in sections["test"] if i["region"] == region]
        preds = predict_with_bundle(out, [c["image"] for c in cases], tmp_path / f"{name}_pred", device="cpu")
        by_bundle = score_label_maps(preds, [c["label"] for c in cases], table.class_names[region])
        # in process: the same fused weights, the training preprocessing, the region's window, the label rule
        fused = export_expert(model, region).eval()
        inferer = RegionSlidingWindowInferer(prep_table, sw_batch_size=1, overlap=0.25, mode="gaussian")
        in_process = []
        for case, pred_file in zip(cases, preds):
            d = preprocessing(dict(case))
            with torch.no_grad():
                logits = inferer(d["image"][None], fused)[0]
            scores = torch.cat([torch.zeros_like(logits[:1]), logits[table.channels_of(region)]])
            label_map = scores.argmax(0).numpy()
            written = np.asarray(nib.load(str(pred_file)).dataobj)
            assert label_map.shape == written.shape, (case["image"], label_map.shape, written.shape)
            assert (label_map == written).mean() > 0.9999, case["image"]
            in_process.append(label_map)
        for i, (case, label_map) in enumerate(zip(cases, in_process)):
            ref = nib.load(case["label"])
            img = nib.Nifti1Image(label_map.astype(np.uint8), ref.affine, ref.header)
            nib.save(img, tmp_path / f"{name}_{i}_inproc.nii.gz")
        by_process = score_label_maps([tmp_path / f"{name}_{i}_inproc.nii.gz" for i in range(len(cases))],
                                      [c["label"] for c in cases], table.class_names[region])
        assert by_bundle["mean_dsc"] == pytest.approx(by_process["mean_dsc"], abs=1e-4)
        assert by_bundle["mean_nsd"] == pytest.approx(by_process["mean_nsd"], abs=1e-4)
