# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The ensemble teacher: one network whose logits are the mean of its members', written and read as a teacher."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from medfm_ops.data import TaskTable
from medfm_ops.networks import EnsembleClassifier, TeacherFeatures, load_teacher, write_ensemble_teacher
from medfm_ops.networks.spec import instantiate, save_network_spec

SIZE = [8, 8, 8]
TASKS = [{"name": "a", "task_id": 0, "labels": {"0": "no", "1": "yes"}},
         {"name": "b", "task_id": 1, "labels": {"0": "x", "1": "y", "2": "z"}}]  # fmt: skip


def _def(width: int = 4) -> dict:
    return {"_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1],
            "block_inplanes": [width, width, 2 * width, 2 * width], "spatial_dims": 3, "n_input_channels": 1,
            "conv1_t_size": 3, "conv1_t_stride": 1, "num_classes": 3}  # fmt: skip


def _member(folder, seed: int, size=SIZE, width: int = 4):
    torch.manual_seed(seed)
    net = instantiate(_def(width)).eval()
    (folder / "models").mkdir(parents=True)
    torch.save(net.state_dict(), folder / "models" / "model.pt")
    save_network_spec(folder / "models", _def(width), TaskTable.from_tasks(TASKS), spatial_size=size)
    return folder, net


def test_ensemble_is_the_mean_of_its_members_logits():
    torch.manual_seed(0)
    nets = [instantiate(_def(w)).eval() for w in (4, 8, 4)]  # members of different widths
    x = torch.randn(3, 1, *SIZE)
    with torch.no_grad():
        expected = torch.stack([n(x) for n in nets]).mean(0)
        single = nets[0](x)
        ens = EnsembleClassifier(nets).eval()
        got = ens(x)
    assert got.shape == (3, 3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, single, atol=1e-3)  # not one member's logits
    assert ens.fc.in_features == 8 + 16 + 8  # the last stage widths 2 * width
    with pytest.raises(ValueError, match="distinct networks"):
        EnsembleClassifier([nets[0], nets[0]])


def test_written_ensemble_is_read_as_a_teacher(tmp_path):
    members = [_member(tmp_path / f"m{i}", seed=i) for i in range(3)]
    out = write_ensemble_teacher([m for m, _ in members], tmp_path / "ens")
    teacher = load_teacher(out, region_table=TaskTable.from_tasks(TASKS))  # the members' table is recorded
    x = torch.randn(2, 1, *SIZE)
    with torch.no_grad():
        expected = torch.stack([n(x) for _, n in members]).mean(0)
    torch.testing.assert_close(teacher(x), expected, atol=1e-5, rtol=1e-5)
    logits, feats = TeacherFeatures(teacher)(x)  # the concatenated member features are the teacher's features
    assert feats.shape == (2, 3 * 8)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    spec = json.loads((out / "models" / "network_def.json").read_text())
    assert spec["spatial_size"] == SIZE and spec["network_def"]["_target_"].endswith("EnsembleClassifier")
    record = json.loads((out / "models" / "ensemble_members.json").read_text())
    assert [m["path"] for m in record["members"]] == [str((tmp_path / f"m{i}").resolve()) for i in range(3)]


def test_ensemble_refuses_members_that_do_not_fit(tmp_path):
    a, _ = _member(tmp_path / "a", 0)
    b, _ = _member(tmp_path / "b", 1, size=[16, 16, 16])
    with pytest.raises(ValueError, match=r"b records spatial_size \[16, 16, 16\]"):
        write_ensemble_teacher([a, b], tmp_path / "ens")
    with pytest.raises(ValueError, match="at least two member folders"):
        write_ensemble_teacher([a], tmp_path / "ens")
    with pytest.raises(FileNotFoundError, match="no models/model.pt"):
        write_ensemble_teacher([a, tmp_path / "missing"], tmp_path / "ens")
    assert not (tmp_path / "ens").exists()


class _ScaledAfterHead(nn.Module):
    """A classifier whose last nn.Linear is followed by another operation (cannot be averaged through its head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Flatten(), nn.Linear(8**3, 4)), nn.Linear(4, 3)

    def forward(self, x):
        return 2.0 * self.head(self.body(x)) + 1.0


def test_ensemble_refuses_a_member_whose_head_is_not_last(tmp_path, monkeypatch):
    import medfm_ops.networks.teacher as teacher_module

    a, _ = _member(tmp_path / "a", 0)
    b, _ = _member(tmp_path / "b", 1)
    monkeypatch.setattr(teacher_module, "_instantiate", lambda d: _ScaledAfterHead())
    monkeypatch.setattr(teacher_module, "_load_into", lambda net, sd, path: None)
    with pytest.raises(ValueError, match="not its last operation"):
        write_ensemble_teacher([a, b], tmp_path / "ens")
