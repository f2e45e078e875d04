# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""benchmarks/shpeft.py without training: argument checks, the rows (rank-1 LoRA beside LoRA), the starting points
(foundation_cls with the small network as its network_config; leave-one-task-out per target task, reused), and the
results page from a fake record set."""

from __future__ import annotations

import json

import pytest

from benchmarks import shpeft as bench

TASKS = ["adrenalmnist3d", "vesselmnist3d"]


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="unknown rows"):
        bench.run(rows="shpeft,nope", work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="val_fraction"):
        bench.run(val_fraction=0.0, work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="leave_task_out"):
        bench.run(leave_task_out=True, pretrained="bundles/foundation_cls", work_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown task"):
        bench.run(tasks="nope", work_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_dir"):
        bench.run(data_dir=str(tmp_path / "none"), work_dir=str(tmp_path))


def test_rows_name_existing_override_files():
    names = [r[0] for r in bench.ROWS]
    assert names.index("lora_r1") == names.index("lora") + 1
    for _, _, override, _ in bench.ROWS:
        if override:
            assert (bench.BUNDLE / "configs" / "baselines" / f"{override}.json").is_file(), override


def test_starting_points(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, log):
        calls.append(cmd)
        out = log.parent
        (out / "models").mkdir(parents=True, exist_ok=True)
        (out / "models" / "model.pt").write_bytes(b"x")
        return 1.0

    monkeypatch.setattr(bench, "_run", fake_run)
    plain = bench.ensure_pretrained(tmp_path, 2)
    ov = json.loads((plain.parent.parent / "overrides.json").read_text())
    assert ov["network_config"] == bench.SMALL_NETWORK and "network_def" not in ov and "exclude_tasks" not in ov
    assert ov["network_config"]["_target_"] == "medfm_ops.networks.network_config"
    files = json.loads(calls[0][calls[0].index("--config_file") + 1])
    assert files[0].endswith("foundation_cls/configs/train.json") and files[1].endswith("overrides.json")
    real = {t: f"{t}.npz" for t in TASKS}
    loto = bench.ensure_pretrained(tmp_path, 2, without=TASKS[0], real_tasks=real, limit=8)
    assert loto.parent.parent.name == f"pretrained_without_{TASKS[0]}" and loto != plain
    ov = json.loads((loto.parent.parent / "overrides.json").read_text())
    assert ov["exclude_tasks"] == [TASKS[0]] and ov["real_tasks"] == real and ov["real_limit"] == 8
    assert len(calls) == 2
    bench.ensure_pretrained(tmp_path, 2, without=TASKS[0], real_tasks=real, limit=8)  # cached once per task
    assert len(calls) == 2
    bench.ensure_pretrained(tmp_path, 3, without=TASKS[0], real_tasks=real, limit=8)  # another recipe: retrained
    assert len(calls) == 3


def _run(seed: int, auc: float, ba: float) -> dict:
    scores = {"n": 10, "auc": auc, "balanced_accuracy": ba, "majority_balanced_accuracy": 0.5, "f1": 0.4,
              "accuracy": 0.7, "majority_accuracy": 0.8}  # fmt: skip
    return {"seed": seed, "seconds": 10.0, "scores": scores, "in_process_scores": scores,
            "trainable": {"count": 1000, "fraction": 0.01}, "importance_estimation": None, "train_seconds": 5.0,
            "settings": {}}  # fmt: skip


def test_write_results(tmp_path):
    machine = {"cpu_model": "cpu", "usable_cores": 2, "logical_cores": 2, "torch": "2", "torch_threads": 1, "gpu": None,
               "glibc_tunables": "x", "load_average_1min": 1.0}  # fmt: skip
    lora = [_run(0, 0.70, 0.70), _run(1, 0.72, 0.52)]
    for run, t in zip(lora, (0.1, 0.3)):  # the exports' decision records: a threshold each
        run["scores"] = {**run["scores"], "decision": {"rule": "threshold", "threshold": t}}
    rows = [{"name": "lora", "description": "LoRA r 8", "runs": lora},
            {"name": "lora_r1", "description": "LoRA r 1", "runs": [_run(0, 0.61, 0.65), _run(1, 0.63, 0.66)]}]
    record = {"command": "python -m benchmarks.shpeft run --leave_task_out true", "date": "now", "seconds": 60,
              "total_run_seconds": 40, "machine": machine, "load_average_end": 1.0, "work_dir": "w",
              "pretrained": {"path": "p", "sha256": "0" * 64, "network": "ResNet", "trained_here": True,
                             "pretrain_epochs": 2, "num_weights": 10, "leave_task_out": True,
                             "per_task": {TASKS[0]: {"path": "w/pretrained_without_adrenalmnist3d/models/model.pt",
                                                     "sha256": "1" * 64}}},
              "settings": {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "weight_decay": 1e-4,
                           "spatial_size": [28, 28, 28], "sparse_num_batches": 1, "seeds": [0, 1], "limit": 8,
                           "tasks": [TASKS[0]], "jobs": 1, "threads": 1, "val_fraction": 0.2, "leave_task_out": True},
              "tasks": {TASKS[0]: rows}}  # fmt: skip
    text = bench.write_results(tmp_path / "r.md", record)
    assert (tmp_path / "r.md").read_text() == text
    assert "| AUC | bal. acc | majority bal. acc | F1 | acc | majority acc | verdict |" in text
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| lora")}
    assert "**71.00 ± 1.00**" in lines["| lora"] and "working 1/2" in lines["| lora"]
    assert "**62.00 ± 1.00**" in lines["| lora_r1"] and "| working |" in lines["| lora_r1"]
    assert "| 0.200 ± 0.100 |" in lines["| lora"] and "| argmax |" in lines["| lora_r1"]  # threshold column
    assert "LEAVE-ONE-TASK-OUT" in text and "pretrained_without_adrenalmnist3d" in text
    assert "carved from train" in text and "--final_model best" in text
    chosen = {"lr_grid": [1e-3, 1e-2], "lr_choice": {f"{TASKS[0]}/lora": {"grid": {"0.001": 0.7, "0.01": 0.6}, "lr": 1e-3}}}
    one = bench.write_results(tmp_path / "r1.md", {**record, "settings": {**record["settings"], **chosen}})
    assert "chosen with the first seed on the carved split" in one and "mean over the first" not in one
    two = bench.write_results(tmp_path / "r2.md", {**record, "settings": {**record["settings"], **chosen, "lr_choice_seeds": 2}})
    assert "chosen with the mean over the first 2 seeds on the carved split" in two
    assert "Chosen with the mean over the first 2 seeds on the carved validation split" in two


def test_reading_says_when_a_score_is_undefined():
    """A split with one class has no AUC (NaN): the reading says so instead of failing (tiny --limit runs)."""
    nan = float("nan")
    rows = [{"name": "shpeft", "runs": [_run(0, nan, 0.5), _run(1, nan, 0.5)]},
            {"name": "full", "runs": [_run(0, nan, 0.5), _run(1, nan, 0.5)]},
            {"name": "bitfit", "runs": [_run(0, 0.7, 0.5), _run(1, 0.72, 0.5)]}]  # fmt: skip
    lines = bench._reading(rows)
    assert "- F1: tie: full (+0.0), bitfit (+0.0)." in lines and "- AUC: undefined: full, bitfit." in lines


def test_reading_states_the_full_fine_tuning_target():
    """The page says whether SH-PEFT's mean AUC is within 1 point of full fine-tuning's, and by how much."""
    rows = [{"name": "shpeft", "runs": [_run(0, 0.80, 0.6), _run(1, 0.82, 0.6)]},
            {"name": "full", "runs": [_run(0, 0.83, 0.6), _run(1, 0.83, 0.6)]}]  # fmt: skip
    target = ("- Target (`shpeft` within 1 AUC point of `full`): 81.0 vs 83.0, -2.0 points: NOT met (per seed: above on "
              "0 of 2 seeds, mean difference -2.0 (from -3.0 to -1.0)).")  # fmt: skip
    assert bench._reading(rows)[-1] == target
    rows[1]["runs"] = [_run(0, 0.815, 0.6), _run(1, 0.815, 0.6)]
    assert bench._reading(rows)[-1].endswith("81.0 vs 81.5, -0.5 points: met (per seed: above on 1 of 2 seeds, mean "
                                             "difference -0.5 (from -1.5 to +0.5)).")  # fmt: skip
    assert bench._target_line(rows[:1]) == []
    # a variant with the same budget and another way to the mask (the head warm-up) is held to the same target
    rows.append({"name": "shpeft_head_warmup", "runs": [_run(0, 0.83, 0.6), _run(1, 0.82, 0.6)]})
    assert [line.split(" (per seed")[0] for line in bench._reading(rows)[-2:]] == [
        "- Target (`shpeft` within 1 AUC point of `full`): 81.0 vs 81.5, -0.5 points: met",
        "- Target (`shpeft_head_warmup` within 1 AUC point of `full`): 82.5 vs 81.5, +1.0 points: met",
    ]
    rows[0]["runs"] = rows[0]["runs"][:1]  # one seed: no per-seed description
    assert bench._target_line(rows) == ["- Target (`shpeft` within 1 AUC point of `full`): 80.0 vs 81.5, -1.5 points: NOT met."]


def test_mask_layout_section(tmp_path):
    """Where each mask row's trainable weights sit, per top-level module, next to the network's own shares."""
    import torch

    delta = {"format": "medfm-sparse-delta/1", "tensors": {}, "trainable_indices": {
        "conv1.weight": torch.arange(3), "layer4.0.conv1.weight": torch.arange(6), "fc.weight": torch.arange(1)}}
    torch.save(delta, tmp_path / "sparse_delta.pt")
    layout = bench.mask_layout(bench.read_mask(tmp_path / "sparse_delta.pt"))
    assert layout == {"conv1": 3, "layer4": 6, "fc": 1}
    assert bench.read_mask(tmp_path / "none.pt") is None and bench.mask_layout(None) is None  # full FT, LoRA: no mask
    net = torch.nn.Sequential()
    net.add_module("conv1", torch.nn.Conv3d(1, 2, 1, bias=False))  # 2 weights
    net.add_module("layer4", torch.nn.Conv3d(2, 3, 1, bias=False))  # 6
    net.add_module("fc", torch.nn.Linear(2, 1))  # 3
    from medfm_ops.peft import weights_per_top_level_module

    weights = weights_per_top_level_module(net.named_parameters())
    assert weights == {"conv1": 2, "layer4": 6, "fc": 3}
    record = {"network_layout": weights, "tasks": {TASKS[0]: [
        {"name": "shpeft", "runs": [{"mask_layout": layout}]}, {"name": "full", "runs": [{"mask_layout": None}]}]}}
    text = "\n".join(bench._layout_lines(record))
    assert "| share of the network's weights | 18.2 | 54.5 | 27.3 |" in text
    assert "| shpeft | 30.0 | 60.0 | 10.0 |" in text and "| full |" not in text
    assert bench._layout_lines({"tasks": {}}) == []  # a page written before the section existed


def test_mask_kinds_section(tmp_path):
    """Which kinds of tensors each mask trains and how many spatial filters it reaches, against a random mask."""
    import torch

    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv3d(2, 4, 3))  # spatial kernels 4 x 2 x 27 = 216 (4 filters of fan-in 54), bias 4
    net.add_module("down", torch.nn.Conv3d(4, 4, 1, bias=False))  # pointwise 16
    net.add_module("bn", torch.nn.BatchNorm3d(4))  # norm scales 4, biases 4
    net.add_module("fc", torch.nn.Linear(4, 2))  # linear 8, biases 2
    kinds = bench.network_kinds({n: list(p.shape) for n, p in net.named_parameters()})
    assert kinds["weights"] == {"spatial kernels": 216, "pointwise kernels": 16, "linear": 8, "norm scales": 4, "biases": 10}
    assert kinds["spatial"] == [[4, 54]]
    shapes = {n: {"shape": list(p.shape)} for n, p in net.named_parameters()}
    # two weights of filter 0 and one of filter 3 of the spatial kernel, all of the shortcut, one norm scale
    delta = {"tensors": shapes, "trainable_indices": {"conv.weight": torch.tensor([0, 5, 3 * 54 + 1]),
                                                      "down.weight": torch.arange(16), "bn.weight": torch.tensor([2])}}
    torch.save(delta, tmp_path / "sparse_delta.pt")
    mk = bench.mask_kinds(bench.read_mask(tmp_path / "sparse_delta.pt"))
    assert mk == {"kinds": {"spatial kernels": 3, "pointwise kernels": 16, "linear": 0, "norm scales": 1, "biases": 0},
                  "spatial_filters_touched": 2}
    assert bench.mask_kinds(None) is None
    assert bench._random_filters([[4, 54]], 1.0) == 4 and bench._random_filters([[4, 54]], 0.0) == 0
    record = {"network_kinds": kinds, "tasks": {TASKS[0]: [{"name": "shpeft", "runs": [{"mask_kinds": mk}]},
                                                           {"name": "full", "runs": [{"mask_kinds": None}]}]}}
    text = "\n".join(bench._kind_lines(record))
    assert "| all | share of the network's weights | 85.0 | 6.3 | 3.1 | 1.6 | 3.9 | | |" in text
    expected = 4 * (1 - (1 - 20 / 254) ** 54)
    assert f"| {TASKS[0]} | shpeft | 15.0 | 80.0 | 0.0 | 5.0 | 0.0 | 2 | {expected:.0f} |" in text
    assert "| full |" not in text and bench._kind_lines({"tasks": {}}) == []


def test_masks_adds_the_kinds_of_an_existing_pages_first_seed_masks(tmp_path, monkeypatch):
    import types

    import torch

    import medfm_ops.networks as networks

    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Linear(2, 2))
    monkeypatch.setattr(networks, "load_pretrained_classifier", lambda path: types.SimpleNamespace(network_def={}))
    monkeypatch.setattr(networks, "instantiate", lambda config: net)
    monkeypatch.setattr(bench, "write_results", lambda path, record: "page")
    shapes = {n: {"shape": list(p.shape)} for n, p in net.named_parameters()}
    run_dir = tmp_path / "w" / TASKS[0] / "shpeft" / "lr0.01" / "seed0"
    (run_dir / "models").mkdir(parents=True)
    torch.save({"tensors": shapes, "trainable_indices": {"0.weight": torch.tensor([0, 30])}},
               run_dir / "models" / "sparse_delta.pt")  # fmt: skip
    (tmp_path / "w" / TASKS[0] / "full" / "lr0.001" / "seed0").mkdir(parents=True)  # no mask
    runs = lambda lr: [{"seed": 0, "learning_rate": lr}, {"seed": 1, "learning_rate": lr}]  # noqa: E731
    record = {"pretrained": {"path": str(tmp_path / "p")}, "work_dir": str(tmp_path / "w"),
              "settings": {"lr_grid": [0.001, 0.01]},
              "tasks": {TASKS[0]: [{"name": "shpeft", "runs": runs(0.01)}, {"name": "full", "runs": runs(0.001)}]}}
    (tmp_path / "r.json").write_text(json.dumps(record))
    bench.masks(str(tmp_path / "r.md"))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["network_kinds"]["spatial"] == [[2, 27]]
    shpeft, full = (r["runs"] for r in saved["tasks"][TASKS[0]])
    assert shpeft[0]["mask_kinds"]["kinds"]["spatial kernels"] == 2 and shpeft[0]["mask_kinds"]["spatial_filters_touched"] == 2
    assert "mask_kinds" not in shpeft[1] and full[0]["mask_kinds"] is None
    record["tasks"][TASKS[0]][0]["runs"] = runs(0.003)  # a run folder that is gone
    (tmp_path / "r.json").write_text(json.dumps(record))
    with pytest.raises(FileNotFoundError, match="shpeft"):
        bench.masks(str(tmp_path / "r.md"))
