# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Per-class Dice/NSD in mm, the region-aware Ignite metric, and the report writers."""

from __future__ import annotations

import csv
import os

import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from monai.data import MetaTensor

from medfm_ops.metrics import (
    RegionSegMetrics,
    binary_dice_nsd,
    format_markdown,
    region_metric_output_transform,
    region_summary,
    write_table,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def _cube(shape=(10, 10, 10), start=(3, 3, 3), size=4) -> torch.Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    m[tuple(slice(s, s + size) for s in start[: len(shape)])] = True
    return m


def _shifted(axis: int, shape=(10, 10, 10)) -> torch.Tensor:
    start = [3] * len(shape)
    start[axis] += 1
    return _cube(shape, tuple(start))


# ------------------------------------------------------------------ binary_dice_nsd

PERFECT_CASES = [
    ((10, 10, 10), (1.0, 1.0, 1.0)),
    ((10, 10, 10), (0.7, 1.2, 3.0)),
    ((12, 9), (2.0, 0.5)),
    ((8, 8, 8), None),
]


@pytest.mark.parametrize("shape,spacing", PERFECT_CASES)
def test_perfect_prediction_scores_one(shape, spacing):
    gt = torch.stack([_cube(shape), _cube(shape, (1,) * len(shape), 3)])
    dsc, nsd = binary_dice_nsd(gt.clone(), gt, spacing, tolerance_mm=0.0)
    assert dsc.tolist() == [1.0, 1.0] and nsd.tolist() == [1.0, 1.0]


# A 4^3 cube shifted by one voxel: overlap 3*4*4 = 48 voxels, DSC = 2*48/128 = 0.75 whatever the spacing.
# NSD counts boundary voxels (56 of the 4^3 cube per mask) within tolerance of the other boundary. Along an axis of
# spacing 1 mm every boundary voxel is within 1 mm, NSD = 1. Along an axis of 3 mm the leading face of the
# prediction (16 voxels) and the trailing face of the ground truth (16) are 3 mm away from any boundary voxel of the
# other mask (the other 40 coincide with one or are 1 mm away along an in-plane axis): NSD = 2*40 / (2*56) = 5/7.
# shift axis, spacing, tolerance (mm), expected NSD
SHIFT_CASES = [
    (0, (1.0, 1.0, 1.0), 1.0, 1.0),
    (0, None, 1.0, 1.0),  # voxel units
    (0, (3.0, 1.0, 1.0), 1.0, 5 / 7),
    (0, (1.0, 3.0, 3.0), 1.0, 1.0),
    (1, (3.0, 1.0, 1.0), 1.0, 1.0),
    (2, (1.0, 1.0, 3.0), 1.0, 5 / 7),
    (0, (3.0, 1.0, 1.0), 3.0, 1.0),  # tolerance reaches one 3 mm step
    (0, (3.0, 1.0, 1.0), 2.9, 5 / 7),
]


@pytest.mark.parametrize("axis,spacing,tolerance,expected_nsd", SHIFT_CASES)
def test_shifted_cube_dice_and_anisotropic_nsd(axis, spacing, tolerance, expected_nsd):
    dsc, nsd = binary_dice_nsd(_shifted(axis)[None], _cube()[None], spacing, tolerance)
    assert dsc.item() == pytest.approx(0.75)
    assert nsd.item() == pytest.approx(expected_nsd)


# pred non-empty, gt non-empty -> (DSC, NSD); LoRKD convention for empty ground truth
EMPTY_CASES = [(False, False, 1.0, 1.0), (True, False, 0.0, 0.0), (False, True, 0.0, 0.0)]


@pytest.mark.parametrize("pred_full,gt_full,dsc_expected,nsd_expected", EMPTY_CASES)
def test_empty_ground_truth_convention(pred_full, gt_full, dsc_expected, nsd_expected):
    empty = torch.zeros(8, 8, 8, dtype=torch.bool)
    pred = torch.stack([_cube((8, 8, 8)) if pred_full else empty, _cube((8, 8, 8))])
    gt = torch.stack([_cube((8, 8, 8)) if gt_full else empty, _cube((8, 8, 8))])
    dsc, nsd = binary_dice_nsd(pred, gt, (1.0, 1.0, 2.0))
    assert dsc.tolist() == [dsc_expected, 1.0]
    assert nsd.tolist() == [nsd_expected, 1.0]
    assert not torch.isnan(dsc).any() and not torch.isnan(nsd).any()


def test_per_class_tolerance_and_errors():
    pred = torch.stack([_shifted(0), _shifted(0)])
    gt = torch.stack([_cube(), _cube()])
    _, nsd = binary_dice_nsd(pred, gt, (3.0, 1.0, 1.0), tolerance_mm=[1.0, 3.0])
    assert nsd.tolist() == pytest.approx([5 / 7, 1.0])
    with pytest.raises(ValueError, match="tolerance_mm has 1"):
        binary_dice_nsd(pred, gt, None, [1.0])
    with pytest.raises(ValueError, match="spacing has 2"):
        binary_dice_nsd(pred, gt, (1.0, 1.0))
    with pytest.raises(ValueError, match="differ"):
        binary_dice_nsd(pred, gt[:, :-1])


# ------------------------------------------------------------------ RegionSegMetrics

# Union of 4 channels: abdomen (task 0) = channels 0, 1 (liver, spleen); thorax (task 1) = channel 3 (heart).
REGION_CHANNELS = {0: [0, 1], 1: [3]}
REGION_NAMES = {0: "abdomen", 1: "thorax"}
CLASS_NAMES = {0: ["liver", "spleen"], 1: ["heart"]}
EMPTY = torch.zeros(10, 10, 10, dtype=torch.bool)


def _logits(masks: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(masks).float() * 20 - 10  # +10 inside, -10 outside


def _sample(region, pred_masks, gt_masks, spacing):
    """A decollated MONAI-style sample: (C, *sp) MetaTensors whose affine carries the spacing."""
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    pred = MetaTensor(_logits(pred_masks), affine=affine)
    label = MetaTensor(torch.stack(gt_masks).float(), affine=affine)
    return {"pred": pred, "label": label}, {"region": region, "image": label}


def _batches():
    """Three batches (the last incomplete) with hand-known per-class scores.

    liver: 1.0 (A), 0.0 (C: nothing predicted)      -> DSC 0.5,   NSD 0.5
    spleen: shifted along a 3 mm axis (A), both empty (C) -> DSC 0.875, NSD (5/7 + 1) / 2
    heart: 1.0 (B), shifted along 1 mm (D), 1.0 (E) -> DSC 2.75/3, NSD 1
    """
    garbage = _cube(start=(0, 0, 0), size=6)  # in other regions' channels: must be ignored
    a = _sample(0, [_cube(), _shifted(0), garbage, garbage], [_cube(), _cube(), EMPTY, EMPTY], (3.0, 1.0, 1.0))
    b = _sample(1, [garbage, garbage, EMPTY, _cube()], [EMPTY, EMPTY, EMPTY, _cube()], (1.0, 1.0, 1.0))
    c = _sample(0, [EMPTY, EMPTY, EMPTY, garbage], [_cube(), EMPTY, EMPTY, EMPTY], (1.0, 1.0, 1.0))
    small = (6, 7, 8)  # variable spatial size
    none = [EMPTY[:6, :7, :8]] * 3
    d = _sample(1, none + [_cube(small, (2, 3, 1), 3)], none + [_cube(small, (1, 3, 1), 3)], (1.0, 1.0, 1.0))
    e = _sample(1, [garbage] * 3 + [_cube()], [EMPTY] * 3 + [_cube()], (2.0, 2.0, 2.0))
    return [[a, b], [c, d], [e]]


def _run_engine(metric: RegionSegMetrics, name: str = "val_mean_dice") -> Engine:
    def step(engine, batch):
        outputs, batch_items = zip(*batch)
        engine.state.batch = list(batch_items)  # MONAI keeps the region id only in the (decollated) batch
        return list(outputs)

    engine = Engine(step)
    metric.attach(engine, name)
    engine.run(_batches(), max_epochs=1)
    return engine


def test_region_metric_dsc_only():
    """nsd=False (a training validation that selects on DSC): the same DSC values, no NSD anywhere."""
    full = _run_engine(RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES)).state.metrics
    metric = RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES, nsd=False)
    m = _run_engine(metric).state.metrics
    assert m == {k: v for k, v in full.items() if not k.startswith("nsd/") and k != "mean_nsd"}
    assert len(m) == 6 and all("nsd" not in key for row in metric.table() for key in row)


def test_region_metric_on_engine():
    metric = RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES, tolerance_mm=1.0)
    m = _run_engine(metric).state.metrics
    # DSC of the small shifted 3^3 cube: overlap 2*3*3 = 18, 2*18 / 54 = 2/3
    heart_dsc = (1.0 + 2 / 3 + 1.0) / 3
    expected = {
        "dsc/abdomen/liver": 0.5,
        "nsd/abdomen/liver": 0.5,
        "dsc/abdomen/spleen": 0.875,
        "nsd/abdomen/spleen": (5 / 7 + 1.0) / 2,
        "dsc/thorax/heart": heart_dsc,
        "nsd/thorax/heart": 1.0,
        "dsc/abdomen": (0.5 + 0.875) / 2,
        "nsd/abdomen": (0.5 + (5 / 7 + 1.0) / 2) / 2,
        "dsc/thorax": heart_dsc,
        "nsd/thorax": 1.0,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value), key
    # the key metric is the mean of the region means (not the mean over the 3 classes)
    assert m["val_mean_dice"] == pytest.approx((m["dsc/abdomen"] + m["dsc/thorax"]) / 2)
    assert m["val_mean_dice"] != pytest.approx((0.5 + 0.875 + heart_dsc) / 3)
    assert m["mean_nsd"] == pytest.approx((m["nsd/abdomen"] + m["nsd/thorax"]) / 2)
    assert all(isinstance(v, float) for v in m.values())
    table = metric.table()
    assert [(r["region"], r["class"], r["n"]) for r in table] == [
        ("abdomen", "liver", 2),
        ("abdomen", "spleen", 2),
        ("thorax", "heart", 3),
    ]
    assert table[0]["dsc_std"] == pytest.approx(0.5) and table[2]["nsd_std"] == 0.0
    assert set(table[0]) == {"region", "class", "n", "dsc_mean", "dsc_std", "nsd_mean", "nsd_std"}


def test_region_metric_batched_dict_json_keys_and_tolerance_map():
    """Batched (decollate=False style) output with an explicit spacing; string keys as read from a JSON config."""
    metric = RegionSegMetrics(
        {"0": [0, 1], "1": [3]},
        {"0": "abdomen", "1": "thorax"},
        {"0": ["liver", "spleen"], "1": ["heart"]},
        tolerance_mm={"spleen": 3.0, "default": 1.0},
    )
    engine = Engine(
        lambda e, b: {
            "pred": _logits([_cube(), _shifted(0), EMPTY, EMPTY])[None].repeat(2, 1, 1, 1, 1),
            "label": torch.stack([_cube(), _cube(), EMPTY, EMPTY]).float()[None].repeat(2, 1, 1, 1, 1),
            "region": torch.tensor([0, 0]),
            "spacing": torch.tensor([[3.0, 1.0, 1.0], [3.0, 1.0, 1.0]]),
        }
    )
    metric.attach(engine, "dice")
    engine.run([0], max_epochs=1)
    m = engine.state.metrics
    assert m["dsc/abdomen/spleen"] == pytest.approx(0.75)
    assert m["nsd/abdomen/spleen"] == pytest.approx(1.0)  # 3 mm tolerance for the spleen only
    assert m["dice"] == pytest.approx(0.875)  # only the abdomen was seen
    assert "dsc/thorax" not in m
    assert metric.table()[0]["n"] == 2


def test_region_metric_scores_only_the_classes_a_case_annotates():
    """Partial labels: case 1 (a data set without spleen labels) has a wrong spleen prediction against its empty
    spleen channel; it is not scored there. Liver is scored in both; the region mean is over the scored classes."""
    metric = RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES)
    engine = Engine(
        lambda e, b: {
            "pred": torch.stack([_logits([_cube(), _cube(), EMPTY, EMPTY]), _logits([_cube(), _cube(), EMPTY, EMPTY])]),
            "label": torch.stack([torch.stack([_cube(), _cube(), EMPTY, EMPTY]),
                                  torch.stack([_cube(), EMPTY, EMPTY, EMPTY])]).float(),
            "region": torch.tensor([0, 0]),
            "spacing": torch.ones(2, 3),
            "channel_mask": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool),
        }
    )
    metric.attach(engine, "dice")
    engine.run([0], max_epochs=1)
    m = engine.state.metrics
    assert [(r["class"], r["n"]) for r in metric.table()] == [("liver", 2), ("spleen", 1)]
    assert m["dsc/abdomen/spleen"] == 1.0 and m["dsc/abdomen"] == 1.0 and m["dice"] == 1.0
    # without the mask the unannotated spleen channel of case 1 would count as a false positive
    plain = RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES)
    out = engine.state.output
    plain.update((out["pred"], out["label"], out["region"], out["spacing"]))
    assert plain.compute() < 1.0
    # a case annotating none of its region's classes adds no row; a mask of the wrong width is refused
    metric.reset()
    metric.update((out["pred"][:1], out["label"][:1], out["region"][:1], out["spacing"][:1],
                   torch.tensor([[0, 0, 1, 1]], dtype=torch.bool)))
    with pytest.raises(NotComputableError):
        metric.compute()
    with pytest.raises(ValueError, match="channel_mask has 3 channels but y_pred has 4"):
        metric.update((out["pred"][:1], out["label"][:1], out["region"][:1], out["spacing"][:1],
                       torch.ones(1, 3, dtype=torch.bool)))
    decollated = region_metric_output_transform(
        [{"pred": out["pred"][i], "label": out["label"][i], "region": 0, "spacing": torch.ones(3),
          "channel_mask": out["channel_mask"][i]} for i in range(2)]
    )
    assert torch.equal(decollated["channel_mask"], out["channel_mask"])


def test_region_metric_errors():
    metric = RegionSegMetrics(REGION_CHANNELS)
    with pytest.raises(NotComputableError):
        metric.compute()
    logits = torch.zeros(1, 4, 5, 5, 5)
    with pytest.raises(ValueError, match="region id 7"):
        metric.update((logits, logits, torch.tensor([7]), torch.ones(1, 3)))
    with pytest.raises(ValueError, match="uses channel 3"):
        metric.update((logits[:, :2], logits[:, :2], torch.tensor([1]), torch.ones(1, 3)))
    with pytest.raises(ValueError, match="2 unique names"):
        RegionSegMetrics(REGION_CHANNELS, class_names={0: ["liver"]})
    with pytest.raises(ValueError, match="match no class"):
        RegionSegMetrics(REGION_CHANNELS, class_names=CLASS_NAMES, tolerance_mm={"lung": 2.0, "default": 1.0})
    with pytest.raises(ValueError, match="no entry"):
        RegionSegMetrics(REGION_CHANNELS, class_names=CLASS_NAMES, tolerance_mm={"liver": 2.0})
    with pytest.raises(ValueError, match="no voxel spacing"):
        plain = torch.zeros(4, 5, 5, 5)
        region_metric_output_transform([{"pred": plain, "label": plain, "region": 0}])


def test_region_metric_in_monai_supervised_evaluator():
    """The default output transform works with MONAI's evaluator (decollated output, region id in the batch)."""
    from monai.data import DataLoader, Dataset
    from monai.engines import SupervisedEvaluator

    (a, a_batch), (b, b_batch) = _batches()[0]
    data = [
        {"image": a["pred"], "label": a["label"], "region": a_batch["region"]},
        {"image": b["pred"], "label": b["label"], "region": b_batch["region"]},
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=torch.nn.Identity(),  # the "image" holds the logits
        key_val_metric={"val_mean_dice": RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES)},
    )
    evaluator.run()
    m = evaluator.state.metrics
    assert m["dsc/abdomen/spleen"] == pytest.approx(0.75)
    assert m["nsd/abdomen/spleen"] == pytest.approx(5 / 7)  # spacing (3, 1, 1) taken from the affine
    assert m["val_mean_dice"] == pytest.approx(((1.0 + 0.75) / 2 + 1.0) / 2)
    assert evaluator.state.best_metric == pytest.approx(m["val_mean_dice"])


# ------------------------------------------------------------------ report


def test_write_table_csv_and_markdown(tmp_path):
    rows = [
        {"region": "abdomen", "class": "liver", "n": 2, "dsc_mean": 0.5, "nsd_mean": 2 / 3},
        {"region": "abdomen", "class": "spleen|left", "n": 12, "dsc_mean": 0.875, "nsd_mean": 1.0},
        {"region": "thorax", "class": "heart", "n": 3, "dsc_mean": 0.123456789, "nsd_mean": 1.0},
    ]
    csv_path, md_path = tmp_path / "out" / "table.csv", tmp_path / "out" / "table.md"
    write_table(rows, csv_path, md_path)
    assert sorted(os.listdir(tmp_path / "out")) == ["table.csv", "table.md"]  # no temporary file left
    with open(csv_path, newline="") as f:
        read = list(csv.DictReader(f))
    assert [r["class"] for r in read] == ["liver", "spleen|left", "heart"]
    assert float(read[0]["nsd_mean"]) == pytest.approx(2 / 3, abs=1e-15)  # CSV keeps full precision
    lines = md_path.read_text().splitlines()
    assert len({len(line) for line in lines}) == 1  # aligned columns
    assert "0.6667" in lines[2] and "0.1235" in lines[4] and "spleen\\|left" in lines[3]
    assert lines[1].split("|")[3].strip().endswith(":")  # numeric column right-aligned
    # rewriting replaces the file atomically
    write_table(rows[:1], csv_path)
    assert len(csv_path.read_text().splitlines()) == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["table.csv", "table.md"]
    with pytest.raises(ValueError, match="rows is empty"):
        write_table([], csv_path)
    assert format_markdown([], columns=["a"]).startswith("| a")


def test_region_summary():
    rows = [
        {"region": "abdomen", "dsc_mean": 0.5, "nsd_mean": 0.2},
        {"region": "abdomen", "dsc_mean": 1.0, "nsd_mean": 0.4},
        {"region": "thorax", "dsc_mean": 0.8, "nsd_mean": 1.0},
    ]
    summary = region_summary(rows)
    assert [s["region"] for s in summary] == ["abdomen", "thorax", "mean"]
    assert summary[0]["dsc_mean"] == pytest.approx(0.75) and summary[0]["n_classes"] == 2
    assert summary[2]["dsc_mean"] == pytest.approx((0.75 + 0.8) / 2)
    assert summary[2]["nsd_mean"] == pytest.approx((0.3 + 1.0) / 2)
    assert len(region_summary(rows, overall=None)) == 2


def _ddp_worker(local_rank: int, results) -> None:
    import ignite.distributed as idist

    metric = RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES)
    batches = [b for b in _batches() for b in b]  # 5 samples: rank 0 gets 3 (a, c, e), rank 1 gets 2 (b, d)
    for out, batch in batches[idist.get_rank() :: idist.get_world_size()]:
        merged = region_metric_output_transform([{**batch, **out}])
        metric.update(tuple(merged[k] for k in metric.required_output_keys))
    value = metric.compute()
    results[idist.get_rank()] = (value, metric.table())


@pytest.mark.slow
def test_region_metric_gathers_rows_across_processes():
    """Two gloo processes with unequal row counts give the same result as one process over all samples."""
    import ignite.distributed as idist
    import torch.multiprocessing as mp

    single = RegionSegMetrics(REGION_CHANNELS, REGION_NAMES, CLASS_NAMES)
    for out, batch in (b for b in _batches() for b in b):
        merged = region_metric_output_transform([{**batch, **out}])
        single.update(tuple(merged[k] for k in single.required_output_keys))
    expected = single.compute()

    with mp.Manager() as manager:
        results = manager.dict()
        with idist.Parallel(backend="gloo", nproc_per_node=2) as parallel:
            parallel.run(_ddp_worker, results)
        results = dict(results)
    assert sorted(results) == [0, 1]
    for value, table in results.values():
        assert value == pytest.approx(expected)
        keys = [(r["region"], r["class"], r["n"]) for r in table]
        assert keys == [(r["region"], r["class"], r["n"]) for r in single.table()]
        assert [r["nsd_mean"] for r in table] == pytest.approx([r["nsd_mean"] for r in single.table()])
