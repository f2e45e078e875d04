# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Tests that fail when the LoRKD method is broken, not only when the code crashes: after a short real run of the
bundle the experts trained per region (and only there), the distillation term changes the student's gradient (and
never reaches the teacher), fused experts equal the routed model where training happened and W0 elsewhere; plus the
baselines of configs/baselines run and evaluate through the same bundle. Uses the session's tiny teacher
(``seg_bundles`` in conftest.py); every run writes to its own folder."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from monai.bundle import run as bundle_run
from monai.utils import set_determinism

from medfm_ops.data import TaskTable
from medfm_ops.networks import (
    eks_layers,
    export_expert,
    instantiate,
    load_expert_state_dict,
    load_network_spec,
    load_teacher,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: the tiny synthetic set (also what the session teacher of conftest.py trains on)
TINY = json.loads((REPO / "tests" / "configs" / "tiny_seg.json").read_text())

TRAINED = ("brain_mri", "thorax_ct", "abdomen_ct")  # the short run's regions; pelvis_mr is never trained
ABSENT = "pelvis_mr"
_FACTOR = re.compile(r"^(?P<layer>.+)\.lora_B\.(?P<task>\d+)$")


def _files(root: Path, *names: str) -> list[str]:
    return [str(root / "lorkd_seg" / "configs" / n) for n in names]


def _overrides(root: Path, out: Path, **extra) -> dict:
    return {**TINY, "bundle_root": str(root / "lorkd_seg"), "data_cache": str(root / "cache"),
            "ckpt_dir": str(out / "models"), "output_dir": str(out / "runs"), "eval_dir": str(out / "eval"), **extra}


def _run(root: Path, out: Path, *names: str, **extra) -> None:
    bundle_run(config_file=_files(root, *names), **_overrides(root, out, **extra))


def _parser(root: Path, out: Path, *names: str, **extra) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(_files(root, "train.json", *names))
    parser.update(_overrides(root, out, **extra))
    return parser


@pytest.fixture(scope="module")
def lorkd_run(seg_bundles, tmp_path_factory):
    """A short real run of the default LoRKD train.json on three of the four regions: 1 warm-up epoch (experts
    frozen), then 1 epoch of experts + backbone."""
    out = tmp_path_factory.mktemp("lorkd_method")
    _run(seg_bundles, out, "train.json", epochs=2, warmup_epochs=1, val_interval=2, train_regions=list(TRAINED))
    return seg_bundles, out


def _b_factors(state: dict[str, torch.Tensor], num_tasks: int) -> dict[int, list[torch.Tensor]]:
    """Task -> its B factor in every EKS layer (same layer order for every task)."""
    layers: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _FACTOR.match(key)
        if m:
            layers.setdefault(m["layer"], {})[int(m["task"])] = value
    assert layers and all(sorted(v) == list(range(num_tasks)) for v in layers.values()), "no expert factors saved"
    return {t: [layers[name][t] for name in sorted(layers)] for t in range(num_tasks)}


def test_experts_trained_per_region_and_only_there(lorkd_run):
    root, out = lorkd_run
    table = _parser(root, out).get_parsed_content("region_table")
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    factors = _b_factors(state, table.num_regions)
    trained = [table.task_id_of(n) for n in TRAINED]
    for t in trained:  # every layer's B moved away from its zero initialisation
        dead = [i for i, b in enumerate(factors[t]) if not b.abs().sum() > 0]
        assert not dead, f"region {table.region_names[t]}: B is still zero in {len(dead)} of {len(factors[t])} layers"
    flat = {t: torch.cat([b.flatten() for b in factors[t]]) for t in trained}
    for i in trained:
        for j in trained:
            if i < j:  # separate experts: their updates differ (a shared expert would give equal factors)
                gap = (flat[i] - flat[j]).norm() / min(flat[i].norm(), flat[j].norm())
                assert gap > 0.1, f"experts {i} and {j} are (nearly) equal: relative difference {gap:.2e}"
    absent = table.task_id_of(ABSENT)
    assert all(torch.count_nonzero(b) == 0 for b in factors[absent]), "a region without training cases got an update"


def _region_inputs(parser: ConfigParser, task: int) -> torch.Tensor:
    """The preprocessed test images of region ``task`` as one float64 batch."""
    cases = [f for f in parser.get_parsed_content("datalist_content")[1]["test"] if int(f["region"]) == task]
    pre = parser.get_parsed_content("validate#preprocessing")
    return torch.stack([torch.as_tensor(pre(dict(f))["image"]) for f in cases]).double()


def test_fused_equals_routed_only_where_training_happened(lorkd_run):
    root, out = lorkd_run
    parser = _parser(root, out)
    table = parser.get_parsed_content("region_table")
    model = load_expert_state_dict(parser.get_parsed_content("network"), out / "models" / "model.pt")
    model = model.double().eval()
    backbone = export_expert(model, None).double().eval()
    with torch.no_grad():
        for t, name in table.region_names.items():
            x = _region_inputs(parser, t)
            fused_net = export_expert(model, t).double().eval()
            routed, fused, shared = model(x, torch.full((len(x),), t)), fused_net(x), backbone(x)
            scale = 1.0 + routed.abs().max().item()
            assert (fused - routed).abs().max().item() <= 1e-10 * scale, f"{name}: fused expert != routed model"
            gap = (routed - shared).abs().max().item()
            if name in TRAINED:
                assert gap > 1e-4 * scale, f"{name}: the trained expert changes nothing ({gap:.2e}): delta W lost"
            else:  # B still zero: the fused expert is W0, bit for bit, and so is its output
                for key, value in backbone.state_dict().items():
                    assert torch.equal(fused_net.state_dict()[key], value), f"{name}: {key} differs from W0"
                assert gap <= 1e-10 * scale, f"{name}: an untrained expert changes the output ({gap:.2e})"


def _student_gradient(parser: ConfigParser, loss: torch.nn.Module, batch: dict, state: dict) -> torch.Tensor:
    """One training step's student gradient (float64) through the bundle's own prepare_batch, network and ``loss``."""
    net = parser.get_parsed_content("network")
    net.load_state_dict(state)
    net.double().train().zero_grad(set_to_none=True)
    image, targets, args, kwargs = parser.get_parsed_content("train#prepare_batch")(batch, torch.device("cpu"))
    assert "teacher_logits" in targets and not targets["teacher_logits"].requires_grad
    targets = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in targets.items()}
    loss(net(image.double(), *args, **kwargs), targets).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in net.parameters()])


def test_distillation_changes_the_student_gradient_and_never_the_teacher(seg_bundles, tmp_path):
    parser = _parser(seg_bundles, tmp_path)
    beta = parser["beta"]
    assert beta > 0, "train.json must distill by default (LoRKD's beta = 0.1)"
    losses = {beta: parser.get_parsed_content("loss")}
    losses.update({v: _parser(seg_bundles, tmp_path, beta=v).get_parsed_content("loss") for v in (0.0, 1.0)})
    assert {v: loss.loss.beta for v, loss in losses.items()} == {v: v for v in losses}, "beta does not reach the loss"
    set_determinism(seed=0)
    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    net = parser.get_parsed_content("network")
    for _, layer in eks_layers(net):  # non-zero B: the experts' A factors get gradients too
        for b in layer.lora_B:
            torch.nn.init.normal_(b, std=0.02)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {v: _student_gradient(parser, loss, batch, state) for v, loss in losses.items()}
    teacher = parser.get_parsed_content("teacher")
    assert not any(m.training for m in teacher.modules() if not list(m.children())), "teacher layers in train mode"
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters()), "the teacher got a gradient"
    kd = grads[beta] - grads[0.0]
    assert kd.norm() > 1e-3 * grads[0.0].norm(), "beta > 0 leaves the student's gradient unchanged"
    # the loss is task + beta * KL (Eq. 7): the gradient is affine in beta, so beta scales the KL gradient exactly
    torch.testing.assert_close(kd, beta * (grads[1.0] - grads[0.0]), rtol=1e-6, atol=1e-9 * grads[1.0].abs().max())


def test_cases_of_selects_regions_and_names_unknown_ones():
    table = TaskTable({0: "brain", 1: "thorax"}, {0: ["a"], 1: ["b", "c"]}, source="dl.json")
    files = [{"region": 0, "i": 0}, {"region": 1, "i": 1}, {"region": 0, "i": 2}]
    assert table.cases_of(files, None) == files
    assert [f["i"] for f in table.cases_of(files, ["brain"])] == [0, 2]
    assert [f["i"] for f in table.cases_of(files, "thorax")] == [1]
    assert table.cases_of([], ["thorax"]) == []
    with pytest.raises(ValueError, match=r"unknown region 'liver' in dl.json; known regions: \['brain', 'thorax'\]"):
        table.cases_of(files, ["liver"])
    with pytest.raises(ValueError, match="at least one region"):
        table.cases_of(files, [])
    with pytest.raises(ValueError, match="no case of regions"):
        table.cases_of(files[:1], ["thorax"])


@pytest.mark.parametrize("name, distilled", [("stl", False), ("mtl", False), ("mtl_kd", True)])
def test_baseline_networks_have_no_experts_and_only_kd_rows_distill(seg_bundles, tmp_path, name, distilled):
    parser = _parser(seg_bundles, tmp_path, f"baselines/{name}.json")
    assert not list(eks_layers(parser.get_parsed_content("network")))
    assert not parser.get_parsed_content("train#prepare_batch").route
    assert not parser.get_parsed_content("validate#prepare_batch").route
    assert (parser.get_parsed_content("teacher") is not None) == distilled
    assert (parser.get_parsed_content("loss").loss.beta > 0) == distilled
    assert parser["warmup_epochs"] == 0


def _lookup(config: dict, key: str):
    node = config
    for part in key.split("#"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


@pytest.mark.parametrize("name", ["stl", "mtl", "mtl_kd", "lorkd_star"])
def test_baseline_overrides_carry_differences_only(name):
    train = json.loads((REPO / "bundles" / "lorkd_seg" / "configs" / "train.json").read_text())
    override = json.loads((REPO / "bundles" / "lorkd_seg" / "configs" / "baselines" / f"{name}.json").read_text())
    for key, value in override.items():
        if key == "region":  # the single-task baseline's own option (--region)
            continue
        assert _lookup(train, key) != value, f"{name}.json repeats train.json's {key}"


@pytest.mark.parametrize(
    "name, extra, scored",
    [
        ("stl", {"region": "thorax_ct"}, ["thorax_ct"]),
        ("mtl_kd", {}, ["brain_mri", "thorax_ct", "abdomen_ct", "pelvis_mr"]),
    ],
)
def test_baselines_train_and_evaluate_as_stock_networks(seg_bundles, tmp_path, name, extra, scored):
    """stl (one region) and mtl_kd (all regions, distilled) run; mtl is mtl_kd without the teacher (checked below)."""
    override = f"baselines/{name}.json"
    parser = _parser(seg_bundles, tmp_path, override, **extra)
    _run(seg_bundles, tmp_path, "train.json", override, epochs=1, val_interval=1, **extra)
    state = torch.load(tmp_path / "models" / "model.pt", map_location="cpu", weights_only=True)
    stock = instantiate(parser.get_parsed_content("network_config"))  # out_channels: the run's num_classes
    stock.load_state_dict(state, strict=True)  # the stock network_def itself: no expert factors, nothing else
    spec = load_network_spec(tmp_path / "models" / "network_def.json")
    assert "experts" not in spec, "a baseline's spec must not describe experts it does not have"
    load_teacher(tmp_path, region_table=parser.get_parsed_content("region_table"))  # a stock network + its weights
    summary = json.loads((tmp_path / "models" / "training_summary.json").read_text())
    validated = sorted(k.split("/")[1] for k in summary["last_metrics"] if k.startswith("dsc/") and k.count("/") == 1)
    assert validated == sorted(scored) and summary["expert_ranks"] is None
    _run(seg_bundles, tmp_path, "train.json", override, "evaluate.json", evaluate_teacher=False, **extra)
    rows = list(csv.DictReader(open(tmp_path / "eval" / "regions.csv")))
    assert [r["model"] for r in rows] == ["stock network (no experts)"]
    for region in ("brain_mri", "thorax_ct", "abdomen_ct", "pelvis_mr"):
        assert math.isnan(float(rows[0][f"{region} DSC"])) == (region not in scored), region
    assert float(rows[0]["train params (M)"]) == float(rows[0]["deploy params (M)"]) > 0
