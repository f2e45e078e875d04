# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Training-side fault behaviour (issue 22, rows 9-12): a run killed after an epoch and resumed from its checkpoint
equals the uninterrupted run bit for bit (the checkpoint carries the random generators: torch, numpy, random, each
random transform's, the sampler's); the export refusal after a resumed run says what happened; every bad
classification datalist item is reported at once; a budget that selects no weight warns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandLambdad
from monai.utils import set_determinism

from medfm_ops.engines import AtomicCheckpointSaver, resume_training


class _Killed(RuntimeError):
    pass


def _run(ckpt_dir, epochs: int, kill_after: int | None = None, resume_from=None, drop_rng: bool = False):
    """A tiny training run (random flips, noise, a numpy-drawn scale, shuffling, dropout) with the bundles' saver."""
    set_determinism(seed=0)
    rng = np.random.default_rng(0)
    data = [{"image": torch.as_tensor(rng.normal(size=(1, 6, 6, 6)), dtype=torch.float32),
             "label": torch.tensor([float(i % 2)])} for i in range(6)]  # fmt: skip
    transform = Compose([
        RandFlipd("image", prob=0.5, spatial_axis=0),
        RandGaussianNoised("image", prob=0.5, std=0.3),
        RandLambdad("image", func=lambda x: x * float(np.random.uniform(0.5, 1.5)), prob=1.0),
    ])  # fmt: skip
    loader = DataLoader(Dataset(data, transform), batch_size=2, shuffle=True, num_workers=0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(216, 16), torch.nn.Dropout(0.5),
                              torch.nn.Linear(16, 1))  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.005)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader, network=net,
                                optimizer=opt, loss_function=torch.nn.MSELoss(), amp=False)  # fmt: skip
    state = {"network": net, "optimizer": opt, "trainer": trainer}
    saver = AtomicCheckpointSaver(save_dir=str(ckpt_dir), save_dict=state, save_interval=1, n_saved=1,
                                  file_prefix="train_state")  # fmt: skip
    saver.attach(trainer)
    if kill_after is not None:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=kill_after), lambda e: (_ for _ in ()).throw(_Killed()))
    if resume_from is not None:
        if drop_rng:
            ckpt = torch.load(resume_from, weights_only=True)
            del ckpt["rng"]
            torch.save(ckpt, resume_from)
        resume_training(state, resume_from, saver)
    trainer.run()
    return {k: v.clone() for k, v in net.state_dict().items()}, trainer


def test_resumed_run_is_bit_exact(tmp_path):
    uninterrupted, _ = _run(tmp_path / "a", epochs=3)
    with pytest.raises(_Killed):
        _run(tmp_path / "b", epochs=3, kill_after=1)
    ckpt = tmp_path / "b" / "train_state_checkpoint_epoch=1.pt"
    saved = torch.load(ckpt, weights_only=True)  # tensors and plain values only
    assert set(saved["rng"]) >= {"python", "numpy", "torch", "transforms"} and len(saved["rng"]["transforms"]) >= 3
    resumed, trainer = _run(tmp_path / "b", epochs=3, resume_from=ckpt)
    assert trainer.state.epoch == 3 and trainer.state.resumed_epoch == 1
    for k, v in uninterrupted.items():
        assert torch.equal(v, resumed[k]), k  # bit for bit

    # the same resume without the generator states differs: the test would catch their loss
    with pytest.raises(_Killed):
        _run(tmp_path / "c", epochs=3, kill_after=1)
    without, _ = _run(tmp_path / "c", epochs=3, resume_from=tmp_path / "c" / "train_state_checkpoint_epoch=1.pt",
                      drop_rng=True)  # fmt: skip
    assert any(not torch.equal(v, without[k]) for k, v in uninterrupted.items())


# ----------------------------------------------------------------- what an export refusal says after a resumed run
def test_export_refusal_after_a_resumed_run_that_did_not_improve(tmp_path):
    """Row 10: a resumed run that validated but never beat the best score before the interruption keeps the earlier
    model file; the refusal says so (not "it never validated") and the model is untouched."""
    import json
    import os

    from ignite.engine import Engine

    from medfm_ops.bundle.from_lorkd import check_model_is_from_last_run
    from medfm_ops.engines import write_training_summary

    models = tmp_path / "models"
    models.mkdir()
    torch.save({"w": torch.ones(2)}, models / "model.pt")
    os.utime(models / "model.pt", (1, 1))  # written before this run started
    before = (models / "model.pt").read_bytes()
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    evaluator.run([0], max_epochs=1)  # it validated
    evaluator.state.best_metric, evaluator.state.best_metric_epoch = 0.8, 2
    trainer.run([0], max_epochs=4)
    trainer.state.resumed_from, trainer.state.resumed_epoch = str(models / "train_state_checkpoint_epoch=3.pt"), 3
    write_training_summary(models / "training_summary.json", trainer, evaluator, model_path=models / "model.pt")
    summary = json.loads((models / "training_summary.json").read_text())
    assert summary["resumed_epoch"] == 3 and summary["validated_this_run"] and not summary["model_written_by_this_run"]
    with pytest.raises(ValueError) as info:
        check_model_is_from_last_run(models)
    text = str(info.value)
    assert "never validated" not in text and "train_state_checkpoint_epoch=3.pt (epoch 3) validated" in text
    assert "never beat the best score of the epochs before the interruption (epoch 2)" in text
    assert str(models / "model.pt") in text and (models / "model.pt").read_bytes() == before

    summary.update(resumed_from=None, resumed_epoch=None, validated_this_run=False)  # a plain run, no validation
    (models / "training_summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="it never validated in its 4 epoch"):
        check_model_is_from_last_run(models)


# ------------------------------------------------------------------ every bad classification datalist item at once
def test_all_bad_classification_items_are_reported_at_once(tmp_path):
    """Row 11: one error lists every bad item of every section (unknown task, label out of range, missing file)."""
    import json

    from medfm_ops.data import ClsItemError, load_cls_datalist

    (tmp_path / "a.nii.gz").write_bytes(b"x")
    datalist = {"tasks": [{"name": "t", "task_id": 0, "labels": {"0": "no", "1": "yes"}}],
                "training": [{"image": "a.nii.gz", "task": "t", "label": 0},
                             {"image": "b.nii.gz", "task": "t", "label": 5},
                             {"image": "c.nii.gz", "task": "zz", "label": 0}],
                "validation": [{"image": "missing.nii.gz", "task": "t", "label": 1}]}  # fmt: skip
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    with pytest.raises(ClsItemError) as info:
        load_cls_datalist(path)
    text = str(info.value)
    assert f"{path}: 3 bad item(s)" in text
    assert "training[1]" in text and "label 5 is outside" in text and "training[2]" in text and "'zz'" in text
    assert f"validation[0]: image file not found: {tmp_path / 'missing.nii.gz'}" in text


def test_budget_that_selects_no_weight_warns(caplog):
    """Row 12: an SH-PEFT budget that rounds to no weight says that only the head trains."""
    from medfm_ops.peft import budget_count
    from medfm_ops.peft.selection import check_sparse_settings

    with caplog.at_level("WARNING", logger="medfm.peft"):
        assert budget_count(1e-9, 100_000) == 1
    assert "budget 1e-09 of 100,000 weights" in caplog.text and "linear probe in effect" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="medfm.peft"):
        budget_count(0.01, 100_000)
        check_sparse_settings(0.01)  # validating the settings before any work: no weight count yet, no warning
    assert caplog.text == ""
