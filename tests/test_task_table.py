# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""One task table for segmentation regions and classification tasks (the kind sets only the label convention), and
its saved layout: written under "tasks" for both kinds, the former "regions" key still read."""

from __future__ import annotations

import json

import pytest
import torch

from medfm_ops.data import ClsTaskTable, RegionTable, TaskTable
from medfm_ops.networks import (
    check_trained_tasks,
    eks_layers,
    expert_model_from_spec,
    load_network_spec,
    save_network_spec,
    saved_task_entries,
)

SEG = [{"name": "brain", "task_id": 0, "labels": {"0": "background", "1": "ventricles", "2": "hippocampus"}},
       {"name": "thorax", "task_id": 1, "labels": {"1": "lung", "2": "heart", "3": "aorta"}}]  # fmt: skip
CLS = [{"name": "adrenal", "task_id": 0, "labels": {"0": "normal", "1": "mass"}, "modality": "CT"},
       {"name": "vessel", "task_id": 1, "labels": {"0": "vessel", "1": "aneurysm", "2": "other"}}]  # fmt: skip
NETWORK_DEF = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 5,
               "channels": [4, 8], "strides": [2], "num_res_units": 0}  # fmt: skip


def test_one_layout_for_both_kinds():
    seg, cls = TaskTable.from_regions(SEG), TaskTable.from_tasks(CLS)
    assert (seg.kind, seg.first_label, cls.kind, cls.first_label) == ("segmentation", 1, "classification", 0)
    for table in (seg, cls):
        assert table.task_ids == [0, 1] and table.num_tasks == 2
    # seg: background has no channel; cls: every class is a unified-head logit
    assert seg.task_channels == {0: [0, 1], 1: [2, 3, 4]} and seg.num_classes == 5 and seg.offset_of(1) == 2
    assert cls.task_channels == {0: [0, 1], 1: [2, 3, 4]} and cls.num_classes == 5 and cls.offset_of(1) == 2
    assert cls.unified_classes_of(1) == [2, 3, 4] and cls.task_num_classes == [2, 3]
    assert seg.labels_of(0) == {"1": "ventricles", "2": "hippocampus"}
    assert cls.labels_of(1) == {"0": "vessel", "1": "aneurysm", "2": "other"}
    assert seg.annotated_labels(1, ["aorta", "lung"]) == [1, 3] and cls.annotated_labels(1, ["other"]) == [2]
    assert seg.annotated_channel_mask(1, ["heart"]).nonzero().flatten().tolist() == [3]
    assert cls.annotated_channel_mask(1, ["vessel"]).nonzero().flatten().tolist() == [2]
    assert cls.channel_mask(torch.tensor([1, 0])).tolist() == [[False, False, True, True, True],
                                                               [True, True, False, False, False]]  # fmt: skip
    assert cls.modalities == {0: "CT", 1: "unknown"}
    assert cls.to_tasks() == [dict(CLS[0]), {**CLS[1], "modality": "unknown"}]
    without_modality = [{k: v for k, v in e.items() if k != "modality"} for e in CLS]
    assert TaskTable.from_tasks(cls.to_entries()) == TaskTable.from_tasks(without_modality)
    assert TaskTable.from_regions(seg.to_entries()) == seg
    # the items' task-id key follows the kind (seg datalists: "region", cls: "task_id")
    assert seg.cases_of([{"region": 0}, {"region": 1}], "thorax") == [{"region": 1}]
    assert cls.cases_of([{"task_id": 0}, {"task_id": 1}], ["adrenal"]) == [{"task_id": 0}]
    assert cls.task_id_of("vessel") == 1 and cls.task_id_of(0) == 0
    one = cls.one_task_table("vessel")
    assert (one.task_names, one.class_names, one.kind) == ({0: "vessel"}, {0: ["vessel", "aneurysm", "other"]},
                                                           "classification")  # fmt: skip


def test_former_names_are_the_same_table():
    assert RegionTable({0: "a"}, {0: ["x"]}, source="s") == TaskTable({0: "a"}, {0: ["x"]}, source="s")
    old = ClsTaskTable({0: "a"}, {0: ["n", "p"]}, {0: "MR"})
    assert type(old) is TaskTable and old.kind == "classification" and old.modalities == {0: "MR"}
    assert old == TaskTable({0: "a"}, {0: ["n", "p"]}, {0: "MR"}, kind="classification")
    assert RegionTable.from_regions(SEG).region_channels == TaskTable.from_regions(SEG).task_channels


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TaskTable.from_tasks([{**CLS[0], "labels": {"1": "a", "2": "b"}}], source="d.json"),
         r"tasks\[0\] \('adrenal'\) in d\.json: label keys must be 0\.\.n-1 without gaps, got \[1, 2\]"),
        (lambda: TaskTable.from_tasks([{**CLS[0], "labels": {"0": "only"}}], source="d.json"),
         r"task 'adrenal' \(task id 0\) in d\.json needs at least 2 classes"),
        (lambda: TaskTable.from_regions([{**SEG[0], "labels": {"0": "bg"}}], source="d.json"),
         r"region 'brain' \(task id 0\) in d\.json has no classes"),
        (lambda: TaskTable.from_tasks([CLS[0], {**CLS[1], "task_id": "1"}], source="d.json"),
         r"tasks\[1\] \('vessel'\) in d\.json: task_id must be an integer"),
        (lambda: TaskTable.from_tasks([CLS[0], {**CLS[1], "task_id": 3}], source="d.json"),
         r"task ids of the tasks in d\.json must be 0\.\.1 without gaps, got \[0, 3\]"),
        (lambda: TaskTable.from_tasks(CLS, source="d.json").task_id_of("knee"),
         r"unknown task 'knee' in d\.json; known tasks: \['adrenal', 'vessel'\]"),
        (lambda: TaskTable({0: "a"}, {0: ["x"]}, kind="detection"), "kind must be one of"),
    ],
)
def test_errors_name_the_file_and_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("entries, kind", [(SEG, "segmentation"), (CLS, "classification")])
def test_layout_saved_under_tasks_for_both_kinds(tmp_path, entries, kind):
    table = TaskTable.from_entries(entries, kind, source="d.json")
    save_network_spec(tmp_path, NETWORK_DEF, table)
    raw = json.loads((tmp_path / "network_def.json").read_text())
    assert "regions" not in raw and raw["tasks"] == table.to_entries()
    layout = [{k: e[k] for k in ("name", "task_id", "labels")} for e in entries]  # the modality is not saved
    assert TaskTable.from_entries(load_network_spec(tmp_path)["tasks"], kind) == TaskTable.from_entries(layout, kind)
    check_trained_tasks(tmp_path, table)  # the same layout: no error


def test_specs_saved_under_the_old_regions_key_still_load(tmp_path):
    """Runs and exported bundles written before the layout was saved as "tasks" hold it under "regions"."""
    old = {"network_def": NETWORK_DEF, "regions": TaskTable.from_regions(SEG).to_entries()}
    (tmp_path / "network_def.json").write_text(json.dumps(old))
    spec = load_network_spec(tmp_path)
    assert spec["tasks"] == old["regions"] and "regions" not in spec
    assert saved_task_entries(old) == old["regions"] and saved_task_entries({"network_def": {}}) is None
    assert TaskTable.from_regions(spec["tasks"]) == TaskTable.from_regions(SEG)
    assert {m.num_tasks for _, m in eks_layers(expert_model_from_spec(old))} == {2}, "one expert per saved task"
    check_trained_tasks(tmp_path, TaskTable.from_regions(SEG))
    other = TaskTable.from_regions([SEG[1] | {"task_id": 0}, SEG[0] | {"task_id": 1}])
    with pytest.raises(ValueError, match=r"the model in .* was trained on another class layout: tasks \['brain', "
                                         r"'thorax'\].*Pass --regions \".*network_def\.json#regions\""):
        check_trained_tasks(tmp_path, other)
    cls_old = {"network_def": NETWORK_DEF, "regions": TaskTable.from_tasks(CLS).to_entries()}
    (tmp_path / "network_def.json").write_text(json.dumps(cls_old))
    with pytest.raises(ValueError, match=r"Pass --tasks \".*network_def\.json#regions\""):
        check_trained_tasks(tmp_path, TaskTable.from_tasks([CLS[0], {**CLS[1], "labels": {"0": "a", "1": "b"}}]))
    loaded = TaskTable.from_tasks(load_network_spec(tmp_path)["tasks"])
    assert loaded.class_names == TaskTable.from_tasks(CLS).class_names
