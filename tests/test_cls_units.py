# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Classification building blocks: CKA properties, alpha/beta schedule, fused expert == routed model (float64),
frozen teacher, metrics, bad inputs, real MedMNIST files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medfm_ops.data import (
    CheckClsItemd,
    ClsItemError,
    TaskTable,
    LoadClsImaged,
    NpzReadError,
    VolumeShapeError,
    ensure_cls_dataset,
    generate_cls_task,
    read_medmnist_split,
)
from medfm_ops.engines import LinearDecayHandler, TaskLossAdapter, TaskPrepareBatch
from medfm_ops.losses import CKALoss, LoRKDClsLoss, RDLoss, linear_cka, linear_decay, task_cross_entropy
from medfm_ops.metrics import binary_auc, classification_scores, task_score_rows, working_verdict
from medfm_ops.networks import (
    ReprogrammedStudent,
    TaskHeadNetwork,
    TeacherFeatures,
    build_cls_network,
    eks_layers,
    export_cls_expert,
    freeze,
    load_rd_student,
    to_experts,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TABLE = TaskTable.from_tasks([
    {"name": "a", "task_id": 0, "labels": {"0": "n", "1": "p"}},
    {"name": "b", "task_id": 1, "labels": {"0": "x", "1": "y", "2": "z"}},
])  # fmt: skip


def test_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    assert CKALoss()(x, x).abs() < 1e-12
    assert abs(float(linear_cka(x, 3.5 * x @ q)) - 1.0) < 1e-10  # orthogonal + isotropic scaling
    y = torch.randn(16, 24, generator=g, dtype=torch.float64)  # another width
    assert 0.0 <= float(linear_cka(x, y)) < 0.9
    with pytest.raises(ValueError, match="same N"):
        linear_cka(x, y[:5])


def test_alpha_beta_schedule_values():
    assert [linear_decay(e, 5) for e in (1, 3, 5)] == [1.0, 0.5, 0.0]
    loss = RDLoss()
    handler = LinearDecayHandler(loss)

    class _E:  # the handler reads only engine.state
        class state:  # noqa: N801
            epoch, max_epochs = 3, 5

    handler(_E)
    assert loss.alpha == loss.beta == 0.5
    with pytest.raises(AttributeError, match="delta"):
        LinearDecayHandler(loss, names=("delta",))


def _model(name="resnet_tiny"):
    torch.manual_seed(0)
    model = TaskHeadNetwork(to_experts(build_cls_network(name, 2), 2, ranks=4), TABLE.task_num_classes)
    with torch.no_grad():
        for _, layer in eks_layers(model):
            for b in layer.lora_B:
                b.normal_(std=0.1)  # non-zero experts: fusion is tested for real
    return model.double().eval()


@pytest.mark.parametrize("name", ["resnet_tiny", "shufflenetv2", "mobilenet"])
def test_fused_expert_equals_routed_model_float64(name):
    model = _model(name)
    x = torch.randn(3, 1, 16, 16, 16, dtype=torch.float64)
    for t in (0, 1):
        routed = model(x, torch.full((3,), t))[:, : TABLE.num_classes_of(t)]
        fused = export_cls_expert(model, t).double().eval()(x)
        assert torch.allclose(routed, fused, atol=1e-10), (name, t)
    assert not torch.allclose(export_cls_expert(model, 0).double().eval()(x)[:, :2], model(x, torch.ones(3))[:, :2])


def test_teacher_gets_no_gradient_and_never_changes():
    teacher = freeze(build_cls_network("resnet_tiny", 5))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    tf = TeacherFeatures(teacher)
    student = ReprogrammedStudent(build_cls_network("resnet_tiny", 2), tf.feature_dim)
    opt = torch.optim.AdamW(student.parameters(), lr=0.1)
    prep = TaskPrepareBatch(teacher=tf, route=False, targets_as_dict=True, return_features=True, pass_teacher_features=True)
    loss = TaskLossAdapter(RDLoss())
    batch = {"image": torch.randn(4, 1, 16, 16, 16), "label": torch.tensor([0, 1, 0, 1]), "task_id": torch.zeros(4, dtype=torch.long)}
    for _ in range(2):
        tf.train()
        image, targets, args, kw = prep(batch)
        assert not targets["teacher_features"].requires_grad
        value = loss(student(image, *args, **kw), targets)
        opt.zero_grad()
        value.backward()
        opt.step()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    stock = load_rd_student(build_cls_network("resnet_tiny", 2), student.state_dict()).eval()
    assert torch.allclose(stock(batch["image"]), student.eval()(batch["image"]), atol=1e-6)


def test_task_cross_entropy_ignores_other_tasks_classes():
    logits = torch.tensor([[2.0, 1.0, 50.0], [0.0, 1.0, 2.0]])
    ce = task_cross_entropy(logits, torch.tensor([0, 2]), torch.tensor([0, 1]), [2, 3])
    assert torch.allclose(ce[0], torch.nn.functional.cross_entropy(logits[:1, :2], torch.tensor([0])))
    loss = LoRKDClsLoss(teacher_dim=6, student_dim=4, num_classes=[2, 3], beta=1.0)
    with pytest.raises(ValueError, match="teacher_features"):
        loss(logits, torch.randn(2, 4), torch.tensor([0, 2]), torch.tensor([0, 1]))


def test_scores_and_majority():
    y = np.array([0, 0, 0, 1])
    perfect = np.eye(2)[y]
    s = classification_scores(perfect, y)
    assert s["accuracy"] == s["balanced_accuracy"] == s["auc"] == s["f1"] == 1.0 and s["majority_accuracy"] == 0.75
    trivial = classification_scores(np.tile([0.9, 0.1], (4, 1)), y)  # always the majority class
    assert trivial["accuracy"] == 0.75 and trivial["balanced_accuracy"] == 0.5 and trivial["auc"] == 0.5
    assert binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75


def test_majority_level_balanced_accuracy_reads_not_working_whatever_the_auc():
    y = np.array([0, 0, 0, 1])
    ranked = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # perfect ranking, always predicts class 0
    s = classification_scores(ranked, y)
    assert s["auc"] == 1.0 and s["balanced_accuracy"] == s["majority_balanced_accuracy"] == 0.5
    assert working_verdict(s) == "not working" and working_verdict(classification_scores(np.eye(2)[y], y)) == "working"
    assert working_verdict({"balanced_accuracy": 0.59, "majority_balanced_accuracy": 0.5}) == "not working"
    assert working_verdict({"balanced_accuracy": 0.45, "majority_balanced_accuracy": 1 / 3}) == "working"  # 3 classes
    probs = [np.eye(2)[k] for k in y] + [r for r in ranked]
    rows = task_score_rows(probs, list(y) * 2, [0] * 4 + [1] * 4, {0: "good", 1: "majority"})
    assert [r["verdict"] for r in rows] == ["working", "not working", "not working on 1 of 2 tasks"]
    assert rows[-1]["balanced_accuracy"] == 0.75 and rows[-1]["auc"] == 1.0


def test_bad_inputs_stop_naming_the_item(tmp_path):
    check = CheckClsItemd(TABLE)
    with pytest.raises(ClsItemError, match=r"case7.nii.gz.*unknown task 'c'"):
        check({"image": "case7.nii.gz", "task": "c", "label": 0})
    with pytest.raises(ClsItemError, match=r"case8.nii.gz.*label 2 is outside task 'a'"):
        check({"image": "case8.nii.gz", "task": "a", "label": 2})
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(NpzReadError, match="corrupt.npz"):
        LoadClsImaged()({"image": str(bad), "array": "train_images", "index": 0})
    flat = tmp_path / "flat.npz"
    np.savez(flat, train_images=np.zeros((2, 16, 16), np.float32))
    with pytest.raises(VolumeShapeError, match=r"flat.npz\[train_images\]\[1\].*3D volume"):
        LoadClsImaged()({"image": str(flat), "array": "train_images", "index": 1})
    with pytest.raises(NpzReadError, match="index 5 out of range"):
        LoadClsImaged()({"image": str(flat), "array": "train_images", "index": 5})


def test_synthetic_generator_is_deterministic_with_all_classes():
    a, ya = generate_cls_task("blobs_mr", 12, 16, seed=3)
    b, yb = generate_cls_task("blobs_mr", 12, 16, seed=3)
    assert np.array_equal(a, b) and np.array_equal(ya, yb) and set(ya.tolist()) == {0, 1, 2, 3}


def test_real_medmnist_files_read_and_mix_with_synthetic(tmp_path):
    adrenal, vessel = DATA / "adrenalmnist3d" / "adrenalmnist3d.npz", DATA / "vesselmnist3d" / "vesselmnist3d.npz"
    missing = [str(p) for p in (adrenal, vessel) if not p.is_file()]
    assert not missing, f"real MedMNIST files missing: {missing} (expected ../shared/data, see its README.md)"
    images, labels = read_medmnist_split(vessel, "val")
    assert images.shape == (191, 28, 28, 28) and abs(labels.mean() - 0.115) < 0.01
    path = ensure_cls_dataset(tmp_path, synthetic={"size": 16, "train_cases": 4, "val_cases": 2, "tasks": ["lesion_ct"]},
                              real_tasks={"adrenalmnist3d": str(adrenal)}, real_limit=3)  # fmt: skip
    from medfm_ops.data import load_cls_datalist

    table, sections = load_cls_datalist(path)
    assert table.task_names == {0: "lesion_ct", 1: "adrenalmnist3d"} and table.offset_of(1) == 2
    item = LoadClsImaged()(sections["validation"][-1])
    assert item["image"].shape == (1, 28, 28, 28) and item["global_label"] in (2, 3)


def test_leave_one_task_out_datalist(tmp_path):
    """exclude_tasks drops the target task (real or synthetic) from a foundation's datalist; a name that is not
    among the selected tasks stops with an error instead of silently leaving the target in."""
    from medfm_ops.data import load_cls_datalist

    adrenal, vessel = DATA / "adrenalmnist3d" / "adrenalmnist3d.npz", DATA / "vesselmnist3d" / "vesselmnist3d.npz"
    real = {"adrenalmnist3d": str(adrenal), "vesselmnist3d": str(vessel)}
    syn = {"size": 16, "train_cases": 4, "val_cases": 2, "tasks": ["lesion_ct", "shape_ct"]}
    full = load_cls_datalist(ensure_cls_dataset(tmp_path, synthetic=syn, real_tasks=real, real_limit=3))
    loto = load_cls_datalist(ensure_cls_dataset(tmp_path, synthetic=syn, real_tasks=real, real_limit=3, exclude_tasks=["adrenalmnist3d"]))
    assert list(full[0].task_names.values()) == ["lesion_ct", "shape_ct", "adrenalmnist3d", "vesselmnist3d"]
    assert list(loto[0].task_names.values()) == ["lesion_ct", "shape_ct", "vesselmnist3d"]
    for sec in ("training", "validation"):
        assert {f["task"] for f in loto[1][sec]} == {"lesion_ct", "shape_ct", "vesselmnist3d"}
        assert len(loto[1][sec]) == len(full[1][sec]) - 3
    no_shape = load_cls_datalist(ensure_cls_dataset(tmp_path, synthetic=syn, exclude_tasks=["shape_ct"]))
    assert list(no_shape[0].task_names.values()) == ["lesion_ct"]
    with pytest.raises(ValueError, match=r"exclude_tasks: \['adrenal'\] are not among the selected tasks"):
        ensure_cls_dataset(tmp_path, synthetic=syn, real_tasks=real, exclude_tasks=["adrenal"])
