# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A run killed after an epoch and resumed from its checkpoint equals the uninterrupted run bit for bit (issue 22,
row 9): the checkpoint carries the random generators (torch, numpy, random, each random transform's, the sampler's)."""

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
