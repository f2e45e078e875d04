# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Engine pieces: routed inference, warm-up / LoRKD* ranks, atomic checkpoints, NaN guard, teacher loading, epoch
summary line, evaluation with the caller's inferer, renamed config keys."""

from __future__ import annotations

import io
import json
import logging
import os

import pytest
import torch
from ignite.engine import Engine, Events
from monai.networks.nets import UNet
from torch import nn

from medfm_ops.engines import (
    AtomicCheckpointSaver,
    EpochSummaryHandler,
    ExpertWarmupHandler,
    LoRKDLossAdapter,
    NonFiniteLossError,
    RegionPrepareBatch,
    TaskPrepareBatch,
    RoutedSlidingWindowInferer,
    TerminalProgressBar,
    resume_training,
)
from medfm_ops.networks import eks_layers, expert_parameters, load_teacher, param_groups, to_experts


def _model(num_tasks=3, ranks=4):
    torch.manual_seed(0)
    model = to_experts(UNet(3, 1, 2, (4, 8), (2,), num_res_units=0), num_tasks, ranks)
    with torch.no_grad():
        for _, layer in eks_layers(model):
            for b in layer.lora_B:
                b.normal_(std=0.1)
    return model.eval()


def test_routed_sliding_window_matches_per_sample_calls():
    model = _model()
    x = torch.randn(3, 1, 24, 20, 16)
    tasks = torch.tensor([2, 0, 1])
    inferer = RoutedSlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=3, overlap=0.25)
    with torch.no_grad():
        out = inferer(x, model, tasks)
        for b in range(3):
            ref = RoutedSlidingWindowInferer(roi_size=(8, 8, 8), sw_batch_size=1, overlap=0.25)(
                x[b : b + 1], lambda w, _t=tasks[b]: model(w, _t.expand(w.shape[0]))
            )
            assert torch.allclose(out[b : b + 1], ref, atol=1e-5)
        # whole-volume window: identical to a direct routed call
        full = RoutedSlidingWindowInferer(roi_size=(24, 20, 16), sw_batch_size=1)(x, model, tasks)
        assert torch.allclose(full, model(x, tasks), atol=1e-5)


def test_prepare_batch_routes_and_builds_targets():
    teacher = nn.Conv3d(1, 2, 1)
    prep = RegionPrepareBatch(channel_mask_fn=lambda r: torch.nn.functional.one_hot(r, 2).bool(), teacher=teacher,
                              targets_as_dict=True)
    batch = {"image": torch.randn(2, 1, 4, 4, 4), "label": torch.zeros(2, 2, 4, 4, 4), "region": torch.tensor([1, 0])}
    image, targets, args, kwargs = prep(batch, "cpu")
    assert torch.equal(args[0], torch.tensor([1, 0])) and kwargs == {}
    assert targets["channel_mask"].tolist() == [[False, True], [True, False]]
    assert not targets["teacher_logits"].requires_grad
    with pytest.raises(KeyError, match="region"):
        prep({"image": batch["image"], "label": batch["label"]}, "cpu")


def test_one_prepare_batch_for_both_kinds():
    """The kind sets the label form and the task-id key; the former seg name is the same preparation."""
    torch.manual_seed(0)
    teacher = nn.Conv3d(1, 2, 1)
    mask_fn = lambda r: torch.nn.functional.one_hot(r, 2).bool()  # noqa: E731
    batch = {"image": torch.randn(2, 1, 4, 4, 4), "label": torch.rand(2, 2, 4, 4, 4), "region": torch.tensor([1, 0])}
    old = RegionPrepareBatch(channel_mask_fn=mask_fn, teacher=teacher, targets_as_dict=True)(batch, "cpu")
    new = TaskPrepareBatch("segmentation", channel_mask_fn=mask_fn, teacher=teacher, targets_as_dict=True)(batch, "cpu")
    assert old[1].keys() == new[1].keys() == {"label", "region", "channel_mask", "filenames", "teacher_logits"}
    for k in ("label", "region", "channel_mask", "teacher_logits"):
        assert torch.equal(old[1][k], new[1][k])
    assert torch.equal(new[1]["label"], batch["label"]) and torch.equal(new[2][0], torch.tensor([1, 0]))
    assert torch.allclose(new[1]["teacher_logits"], teacher(batch["image"]))
    with pytest.raises(ValueError, match="of segmentation needs channel_mask_fn"):
        TaskPrepareBatch("segmentation", targets_as_dict=True)
    with pytest.raises(ValueError, match="kind must be one of"):
        TaskPrepareBatch("detection")
    # classification: (B,) class indices, task ids under "task_id", a (logits, features) teacher, head offsets
    feats = lambda x: (x.mean(dim=(2, 3, 4)).repeat(1, 5), x.flatten(1)[:, :3])  # noqa: E731
    cls = {"image": batch["image"], "label": torch.tensor([[1], [0]]), "task_id": torch.tensor([1, 0]),
           "global_label": torch.tensor([3, 0])}  # fmt: skip
    image, targets, args, kw = TaskPrepareBatch(teacher=feats, targets_as_dict=True, task_offsets=[0, 2],
                                                task_num_classes=[2, 3])(cls, "cpu")  # fmt: skip
    assert targets["label"].tolist() == [1, 0] and targets["task_id"].tolist() == [1, 0] and kw == {}
    assert targets["global_label"].tolist() == [3, 0] and torch.equal(targets["teacher_features"], feats(image)[1])
    logits = feats(image)[0]
    assert torch.equal(targets["teacher_task_logits"][0], logits[0, 2:5])
    assert targets["teacher_task_logits"][1, :2].tolist() == logits[1, :2].tolist()
    assert targets["teacher_task_logits"][1, 2] == float("-inf")


def test_prepare_batch_takes_the_per_case_mask_of_partial_labels():
    """The batch's channel_mask (the channels each case's data set annotates) replaces the region mask; it must stay
    inside the case's region."""
    table_mask = lambda r: torch.tensor([[1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)[r]  # noqa: E731
    prep = TaskPrepareBatch("segmentation", channel_mask_fn=table_mask, targets_as_dict=True)
    batch = {"image": torch.randn(2, 1, 4, 4, 4), "label": torch.zeros(2, 4, 4, 4, 4), "region": torch.tensor([0, 1]),
             "channel_mask": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)}
    _, targets, _, _ = prep(batch, "cpu")
    assert targets["channel_mask"].tolist() == [[True, False, True, False], [False, False, False, True]]
    no_mask = {k: v for k, v in batch.items() if k != "channel_mask"}
    assert torch.equal(prep(no_mask, "cpu")[1]["channel_mask"], table_mask(torch.tensor([0, 1])))
    batch["channel_mask"] = torch.tensor([[1, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"outside the region of case\(s\) \[0\] \(regions \[0\]\)"):
        prep(batch, "cpu")
    batch["channel_mask"] = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"shape \(2, 3\), expected \(B, C\) = \(2, 4\)"):
        prep(batch, "cpu")


def _fake_training(handler: ExpertWarmupHandler, loss_adapter, drops_per_region, epochs=3, iters=6):
    """Drive the handler with an ignite engine whose 'loss' per region falls linearly by the given drop."""

    def step(engine, batch):
        it = engine.state.iteration
        n = len(drops_per_region)
        regions = torch.arange(n)
        frac = min(1.0, (it - 1) / (handler.warmup_epochs * iters - 1))
        loss_adapter.loss.last_per_sample_task = torch.tensor([1.0 - d * frac for d in drops_per_region])
        loss_adapter.last_regions = regions
        # the experts are frozen during the warm-up
        assert all(p.requires_grad == handler.done for p in expert_parameters(handler.network))

    engine = Engine(step)
    handler.attach(engine)
    engine.run(range(iters), max_epochs=epochs)
    return engine


def test_warmup_freezes_then_lorkd_star_ranks_and_resume(tmp_path):
    model = _model(num_tasks=3, ranks=8)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3))
    loss = LoRKDLossAdapter()
    handler = ExpertWarmupHandler(model, opt, loss, num_regions=3, warmup_epochs=2, lorkd_star=True, base_rank=8,
                                  min_rank=2, max_rank=32)
    _fake_training(handler, loss, [0.3, 0.2, 0.1])
    # measured drop over the first vs last third of the warm-up is proportional to [0.3, 0.2, 0.1] -> [18, 8, 2]
    assert handler.ranks == [18, 8, 2]
    assert all(layer.ranks == (18, 8, 2) for _, layer in eks_layers(model))
    assert all(p.requires_grad for p in expert_parameters(model))
    ids = {id(p) for p in opt.param_groups[1]["params"]}
    assert ids == {id(p) for p in expert_parameters(model)}, "optimizer re-pointed to the new experts"
    # resume: a fresh model is re-shaped by the handler state before its weights load
    state = {"warmup": handler, "network": model, "optimizer": opt}
    path = tmp_path / "state.pt"
    torch.save({k: v.state_dict() for k, v in state.items()}, path)
    fresh = _model(num_tasks=3, ranks=8)
    fresh_opt = torch.optim.AdamW(param_groups(fresh, lr=1e-3))
    fresh_handler = ExpertWarmupHandler(fresh, fresh_opt, LoRKDLossAdapter(), 3, warmup_epochs=2, lorkd_star=True)
    assert resume_training({"warmup": fresh_handler, "network": fresh, "optimizer": fresh_opt}, str(path))
    assert fresh_handler.done and fresh.ranks == (18, 8, 2)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    with pytest.raises(FileNotFoundError, match="resume_from"):
        resume_training({"network": fresh}, str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    "clip, applied",
    [({}, [50, 2, 0]), ({"min_rank": 2, "max_rank": 32}, [32, 2, 2]), ({"max_rank": 16}, [16, 2, 0])],
)
def test_lorkd_star_applies_the_formula_unless_a_clip_is_asked(clip, applied, caplog, tmp_path):
    """r_i = round_to_even(8 * (dL_i / mean dL)^2) with drops [0.5, 0.1, 0] -> [50, 2, 0]: no clip by default (rank 0:
    that region uses W0 only); a clip is an option; both the formula's and the applied ranks are logged and kept."""
    model = _model(num_tasks=3, ranks=8)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3))
    loss = LoRKDLossAdapter()
    handler = ExpertWarmupHandler(model, opt, loss, num_regions=3, warmup_epochs=2, lorkd_star=True, base_rank=8,
                                  **clip)
    with caplog.at_level(logging.INFO, logger="medfm.warmup"):
        _fake_training(handler, loss, [0.5, 0.1, 0.0])
    assert handler.formula_ranks == [50, 2, 0] and handler.ranks == applied
    assert all(layer.ranks == tuple(applied) for _, layer in eks_layers(model))
    line = next(r.getMessage() for r in caplog.records if "LoRKD*" in r.getMessage())
    assert f"formula ranks [50, 2, 0], applied ranks {applied}" in line
    assert ("no clip" in line) == (not clip)
    x = torch.randn(3, 1, 8, 8, 8)
    assert model(x, torch.tensor([0, 1, 2])).shape == (3, 2, 8, 8, 8)  # a rank-0 expert runs (shared kernel)
    state = handler.state_dict()
    fresh = ExpertWarmupHandler(_model(num_tasks=3, ranks=8), opt, LoRKDLossAdapter(), 3, warmup_epochs=2,
                                lorkd_star=True)
    fresh._repoint_optimizer = lambda: None  # the optimizer belongs to the first model here
    fresh.load_state_dict(state)
    assert fresh.formula_ranks == [50, 2, 0] and fresh.ranks == applied
    fresh.load_state_dict({k: v for k, v in state.items() if k != "formula_ranks"})  # an older checkpoint
    assert fresh.formula_ranks is None and fresh.ranks == applied
    with pytest.raises(ValueError, match="0 <= min_rank <= max_rank"):
        ExpertWarmupHandler(model, opt, loss, 3, lorkd_star=True, min_rank=4, max_rank=2)


def test_warmup_without_lorkd_star_keeps_ranks():
    model = _model(num_tasks=2, ranks=4)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-3))
    loss = LoRKDLossAdapter()
    handler = ExpertWarmupHandler(model, opt, loss, num_regions=2, warmup_epochs=1)
    _fake_training(handler, loss, [0.2, 0.1], epochs=2)
    assert handler.done and handler.ranks is None and model.ranks == (4, 4)
    with pytest.raises(ValueError, match="warmup_epochs"):
        ExpertWarmupHandler(model, opt, loss, 2, warmup_epochs=0, lorkd_star=True)


def test_nan_loss_names_the_cases():
    adapter = LoRKDLossAdapter()
    pred = torch.full((1, 2, 4, 4, 4), float("nan"))
    targets = {"label": torch.zeros(1, 2, 4, 4, 4), "channel_mask": torch.tensor([[True, False]]),
               "region": torch.tensor([0]), "filenames": ["/data/case_007.nii.gz"]}
    with pytest.raises(NonFiniteLossError, match="case_007"):
        adapter(pred, targets)


class _Exploding(nn.Module):
    def state_dict(self, *a, **k):
        raise RuntimeError("disk full")


def test_atomic_checkpoint_keeps_previous_file(tmp_path):
    net = nn.Linear(2, 2)
    engine = Engine(lambda e, b: None)
    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_final=True, final_filename="model.pt").attach(engine)
    engine.run([0], max_epochs=1)
    good = torch.load(tmp_path / "model.pt", weights_only=True)
    assert torch.equal(good["weight"], net.weight)
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": net, "bad": _Exploding()}, save_final=True,
                                  final_filename="model.pt")
    engine2 = Engine(lambda e, b: None)
    saver.attach(engine2)
    with pytest.raises(RuntimeError, match="disk full"):
        engine2.run([0], max_epochs=1)
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["weight"], good["weight"])
    assert sorted(os.listdir(tmp_path)) == ["model.pt"], "no temporary file left behind"


def test_load_teacher_all_sources(tmp_path):
    net_def = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
               "channels": [4, 8], "strides": [2], "num_res_units": 0}
    torch.manual_seed(1)
    net = UNet(3, 1, 2, (4, 8), (2,), num_res_units=0).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    ref = net(x)
    # a state dict + network config
    torch.save(net.state_dict(), tmp_path / "w.pt")
    t1 = load_teacher(tmp_path / "w.pt", teacher_def=net_def)
    # a bundle directory
    (tmp_path / "b" / "configs").mkdir(parents=True)
    (tmp_path / "b" / "models").mkdir()
    (tmp_path / "b" / "configs" / "inference.json").write_text(json.dumps({"network_def": net_def}))
    torch.save(net.state_dict(), tmp_path / "b" / "models" / "model.pt")
    t2 = load_teacher(tmp_path / "b")
    # a TorchScript file
    torch.jit.save(torch.jit.script(net), str(tmp_path / "t.ts"))
    t3 = load_teacher(tmp_path / "t.ts")
    for t in (t1, t2, t3):
        t.train()  # a teacher ignores train mode
        assert not t.training and not any(p.requires_grad for p in t.parameters())
        out = t(x)
        assert torch.allclose(out, ref, atol=1e-6) and not out.requires_grad
    with pytest.raises(FileNotFoundError, match="foundation_seg"):
        load_teacher(tmp_path / "nope")
    with pytest.raises(ValueError, match="teacher_def"):
        load_teacher(tmp_path / "w.pt")


def test_epoch_summary_is_one_line_per_epoch(caplog):
    net = nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    losses = iter([1.0, 3.0, 0.5, 1.5])
    engine = Engine(lambda e, b: {"loss": torch.tensor(next(losses)), "kl": 0.25})
    EpochSummaryHandler(lambda out: {"loss": out["loss"].item(), "kl": out["kl"]}, optimizer=opt).attach(engine)
    with caplog.at_level(logging.INFO, logger="medfm.train"):
        engine.run([0, 1], max_epochs=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "medfm.train"]
    assert len(lines) == 2, lines
    assert lines[0].startswith("epoch 1/2: loss 2.0000 (kl 0.2500), lr 5.00e-01, ") and lines[0].endswith(" s")
    assert lines[1].startswith("epoch 2/2: loss 1.0000 (kl 0.2500)")


def test_evaluate_segmentation_uses_the_given_inferer_and_logs_nothing(caplog):
    """The inferer comes from the caller (a bundle's validate#inferer), and no 'best metric' line per call."""
    from monai.data import MetaTensor

    from medfm_ops.data import TaskTable
    from medfm_ops.engines import evaluate_segmentation

    table = TaskTable({0: "a", 1: "b"}, {0: ["x"], 1: ["y", "z"]})
    image = MetaTensor(torch.randn(1, 12, 10, 8), meta={"pixdim": [1.0, 1.0, 1.0, 1.0]})
    label = torch.zeros(3, 12, 10, 8)
    label[0, 2:6, 2:6, 2:6] = 1
    files = [{"image": image, "label": label, "region": torch.tensor(0)}]
    calls = []

    class _Inferer(RoutedSlidingWindowInferer):
        def __call__(self, inputs, network, *args, **kwargs):
            calls.append(tuple(inputs.shape))
            return super().__call__(inputs, network, *args, **kwargs)

    net = nn.Conv3d(1, 3, 1)
    with caplog.at_level(logging.INFO):
        metric = evaluate_segmentation(net, files, None, _Inferer(roi_size=(8, 8, 8)), table, "cpu", route=False)
    assert calls == [(1, 1, 12, 10, 8)]
    assert [r["region"] for r in metric.table()] == ["a"]
    assert not [r for r in caplog.records if "best metric" in r.getMessage() or r.name.startswith("ignite")]


def test_renamed_config_keys_and_bundle_network_config(tmp_path):
    from medfm_ops.bundle_paths import bundle_network_config, reject_renamed_keys

    reject_renamed_keys({"rank": "expert_rank"}, rank=None)  # not set: fine
    with pytest.raises(ValueError, match=r"'rank' is now 'expert_rank' \(--expert_rank 4\)"):
        reject_renamed_keys({"rank": "expert_rank"}, rank=4)
    cfg = tmp_path / "c.json"
    net_config = {"_target_": "medfm_ops.networks.network_config", "target": "torch.nn.Linear", "in_features": 2,
                  "out_features": "@n"}  # fmt: skip
    cfg.write_text(json.dumps({"n": "$len(missing_data)", "network_config": net_config}))
    literal = bundle_network_config(cfg, n=5)  # the value set first: the config's own expression is never run
    assert literal == {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 5}


def test_cache_dir_ignores_an_empty_environment_variable(monkeypatch, tmp_path):
    from medfm_ops.bundle_paths import default_cache_dir

    monkeypatch.setenv("MEDFM_CACHE", str(tmp_path))
    assert default_cache_dir() == str(tmp_path)
    monkeypatch.setenv("MEDFM_CACHE", "")  # not the current directory
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "medfm")


def test_epoch_summary_follows_the_validation_and_quiets_the_engines(caplog):
    """The line is the epoch's last: it carries the validation that a handler attached AFTER it ran (key metric and
    best so far), and Ignite's own per-epoch lines are gone."""
    engine, validator = Engine(lambda e, b: {"loss": torch.tensor(1.0)}), Engine(lambda e, b: None)
    EpochSummaryHandler(validator=validator, metric_names=["val_mean_nsd"]).attach(engine)
    scores = {1: 0.5, 2: 0.4, 4: 0.7}  # no validation at epoch 3

    @engine.on(Events.EPOCH_COMPLETED)
    def validate(e):  # what MONAI's ValidationHandler leaves in the evaluator's state
        if e.state.epoch in scores:
            s = validator.state
            s.epoch, s.key_metric_name = e.state.epoch, "val_mean_dice"
            s.metrics = {"val_mean_dice": scores[e.state.epoch], "val_mean_nsd": 0.25, "other": 1.0}
            if scores[e.state.epoch] > getattr(s, "best_metric", -1):
                s.best_metric, s.best_metric_epoch = scores[e.state.epoch], e.state.epoch

    with caplog.at_level(logging.INFO):
        engine.run([0], max_epochs=4)
    lines = [r.getMessage() for r in caplog.records if r.name == "medfm.train"]
    assert [line.split(" s", 1)[-1] for line in lines] == [
        "; val_mean_dice 0.5000 (best), val_mean_nsd 0.2500",
        "; val_mean_dice 0.4000 (best 0.5000, epoch 1), val_mean_nsd 0.2500",
        "",
        "; val_mean_dice 0.7000 (best), val_mean_nsd 0.2500",
    ], lines
    assert not [r for r in caplog.records if r.name.startswith("ignite")], "Ignite's per-epoch lines are still there"


def test_progress_bar_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((io.StringIO(), False), (Terminal(), True)):
        engine = Engine(lambda e, b: None)
        bar = TerminalProgressBar(stream=stream)
        bar.attach(engine)
        engine.run([0, 1, 2], max_epochs=1)
        assert (bar.bar is not None) == shown and bool(stream.getvalue()) == shown, stream.getvalue()


def test_checkpoint_line_only_when_the_best_model_changes(tmp_path, caplog):
    net = nn.Linear(2, 1)
    engine = Engine(lambda e, b: None)
    scores = iter([0.5, 0.4, 0.6, 0.6])

    @engine.on(Events.STARTED)
    def key(e):
        e.state.key_metric_name = "val_mean_dice"

    @engine.on(Events.EPOCH_COMPLETED)
    def metrics(e):
        e.state.metrics = {"val_mean_dice": next(scores)}

    AtomicCheckpointSaver(str(tmp_path), {"model": net}, save_key_metric=True,
                          key_metric_filename="model.pt").attach(engine)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="medfm.checkpoint"):
        engine.run([0], max_epochs=4)
    lines = [r.getMessage() for r in caplog.records if r.name == "medfm.checkpoint"]
    assert lines == [f"best val_mean_dice 0.5000 at epoch 1: saved {tmp_path / 'model.pt'}",
                     f"best val_mean_dice 0.6000 at epoch 3: saved {tmp_path / 'model.pt'}"], lines  # fmt: skip
    assert (tmp_path / "model.pt").is_file()


def test_one_training_summary_for_every_kind_with_the_model_fingerprint(tmp_path):
    """Segmentation and classification runs write the same summary (write_cls_summary is its former name); with
    model_path it names the model this run wrote by its SHA-256, and a model older than the run by None."""
    from medfm_ops.engines import model_fingerprint, write_cls_summary, write_training_summary

    assert write_cls_summary is write_training_summary
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    model = tmp_path / "model.pt"

    @trainer.on(Events.EPOCH_COMPLETED)
    def save(e):
        torch.save({"w": torch.full((2,), float(e.state.epoch))}, model)
        evaluator.state.metrics, evaluator.state.best_metric, evaluator.state.best_metric_epoch = {"acc": 0.5}, 0.5, 1

    trainer.run([0], max_epochs=2)
    write_training_summary(tmp_path / "s.json", trainer, evaluator, model_path=model)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["epochs"] == 2 and summary["last_metrics"] == {"acc": 0.5} and summary["best_metric_epoch"] == 1
    assert summary["model_written_by_this_run"] and summary["model_sha256"] == model_fingerprint(model)
    os.utime(model, (0, 0))  # a model left over from an earlier run
    write_training_summary(tmp_path / "s.json", trainer, evaluator, model_path=model)
    assert json.loads((tmp_path / "s.json").read_text())["model_sha256"] is None


def test_one_loss_adapter_serves_segmentation_and_classification():
    """TaskLossAdapter feeds any loss the entries it names: the LoRKD segmentation loss (through LoRKDLossAdapter)
    gives the loss itself, a classification loss likewise; ClsLossAdapter is its former name."""
    from medfm_ops.engines import ClsLossAdapter, TaskLossAdapter
    from medfm_ops.losses import LoRKDSegLoss, SingleTaskCELoss

    torch.manual_seed(0)
    pred, label = torch.randn(2, 3, 4, 4, 4), (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    mask = torch.tensor([[True, True, False], [False, True, True]])
    seg = LoRKDLossAdapter()
    value = seg(pred, {"label": label, "channel_mask": mask, "region": torch.tensor([0, 1])})
    torch.testing.assert_close(value, LoRKDSegLoss()(pred, label, mask))
    assert seg.last_regions.tolist() == [0, 1]
    logits, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    cls = TaskLossAdapter(SingleTaskCELoss())
    value = cls(logits, {"label": y, "task_id": torch.zeros(4, dtype=torch.long)})
    torch.testing.assert_close(value, SingleTaskCELoss()(logits, y))
    assert ClsLossAdapter is TaskLossAdapter and cls.last_regions.tolist() == [0, 0, 0, 0]
    with pytest.raises(TypeError, match="no input_keys"):
        TaskLossAdapter(nn.MSELoss())
    with pytest.raises(NonFiniteLossError, match=r"case_3.*tasks \[0, 0, 0, 0\]"):
        cls(torch.full((4, 3), float("nan")), {"label": y, "task_id": torch.zeros(4, dtype=torch.long),
                                               "filenames": ["case_3"]})  # fmt: skip
