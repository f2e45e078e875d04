# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Benchmark of the lorkd_seg models: expert-student training step vs the plain student, fused-expert inference vs
the plain network, and parameters/FLOPs of teacher vs expert.

    python -m benchmarks.lorkd run --out_dir benchmarks/ [--device auto|cpu|cuda] [--batch 4] [--roi 32] [--repeats 10]

Writes ``lorkd_bench.md`` and ``lorkd_bench.json``. The networks are read from the bundles' default configs
(``network_def`` of ``bundles/foundation_seg`` (teacher: UNet 32-64-128-256 with 2 residual units) and
``bundles/lorkd_seg`` (student/expert: UNet 16-32-64-128 with 1 residual unit); the expert student is lorkd_seg's
train.json ``network`` itself (its ``to_experts(network_def, ..., **experts)`` call: ``expert_rank`` 8,
``expert_alpha`` 16, decoder x2, transposed convs with experts), with 12 output classes and 4 regions as in the
synthetic default set. A second expert student is the same with ``expert_transposed`` false (transposed convs
shared, the LoRKD authors' layout). Weights are random: timings and sizes do not depend on training. Training step = forward + loss (Dice + BCE on each sample's
region channels + 0.1 KL to the teacher logits) + backward + AdamW step; the batch mixes the 4 regions. The
teacher's forward is timed separately (it is the same for every student). Every configuration is timed in rotating
turns; medians and IQR are reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import REPO, machine_info, reexec_with_glibc_tunables, summarize_ms, time_ms

if __name__ == "__main__":
    reexec_with_glibc_tunables("bench_lorkd")

import datetime  # noqa: E402

import fire  # noqa: E402
import torch  # noqa: E402

from medfm_ops.bundle_paths import bundle_network_config  # noqa: E402
from medfm_ops.engines import count_flops, count_params  # noqa: E402
from medfm_ops.losses import LoRKDSegLoss  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from medfm_ops.networks import (  # noqa: E402
    eks_layers,
    export_expert,
    instantiate,
    param_groups,
)
from medfm_ops.utils.atomic_io import atomic_write_text  # noqa: E402

NUM_CLASSES, REGION_SIZES = 12, (3, 3, 4, 2)
BUNDLES = REPO / "bundles"


def _train_config(bundle: str) -> dict:
    return json.loads((BUNDLES / bundle / "configs" / "train.json").read_text())


def _network(bundle: str) -> torch.nn.Module:
    """The bundle's network (its ``network_config``) with the synthetic default's 12 classes."""
    return instantiate(bundle_network_config(BUNDLES / bundle / "configs" / "train.json", num_classes=NUM_CLASSES))


def _student() -> torch.nn.Module:
    return _network("lorkd_seg")


def _teacher() -> torch.nn.Module:
    return _network("foundation_seg")


def _expert_student(**overrides) -> torch.nn.Module:
    """lorkd_seg's ``network`` (its ``to_experts(...)`` expression) with 4 regions and 12 classes, on CPU, after
    setting the config keys ``overrides`` (e.g. ``expert_transposed=False``)."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "lorkd_seg" / "configs" / "train.json"))
    parser["num_regions"], parser["num_classes"] = len(REGION_SIZES), NUM_CLASSES
    for key, value in overrides.items():
        parser[key] = value
    parser["device"] = "$torch.device('cpu')"
    return parser.get_parsed_content("network")


def _conversion(model: torch.nn.Module) -> dict:
    """What the expert student converts: EKS layers, transposed ones, rank multipliers, scaling."""
    layers = [m for _, m in eks_layers(model)]
    multipliers = sorted({m.rank_multiplier for m in layers})
    return {"eks_layers": len(layers), "transposed": sum(type(m).__name__ == "EKSConvTranspose" for m in layers),
            "by_multiplier": {str(k): sum(m.rank_multiplier == k for m in layers) for k in multipliers},
            "scaling": sorted({m.scaling for m in layers})}


def _mask(regions: torch.Tensor) -> torch.Tensor:
    starts = torch.tensor([0, *torch.tensor(REGION_SIZES).cumsum(0).tolist()])
    mask = torch.zeros(len(regions), NUM_CLASSES, dtype=torch.bool)
    for b, r in enumerate(regions.tolist()):
        mask[b, starts[r] : starts[r + 1]] = True
    return mask


def run(out_dir: str = "benchmarks", device: str = "auto", batch: int = 4, roi: int = 32, repeats: int = 10,
        warmup: int = 2) -> str:
    """Run the benchmark and write the tables; returns the markdown path."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None
    torch.manual_seed(0)
    record = {"command": " ".join(["python -m benchmarks.lorkd", *sys.argv[1:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
              "machine": machine_info(dev), "batch": batch, "roi": roi, "repeats": repeats}
    x = torch.randn(batch, 1, roi, roi, roi, device=dev)
    regions = torch.arange(batch, device=dev) % len(REGION_SIZES)
    mask = _mask(regions.cpu()).to(dev)
    target = (torch.rand(batch, NUM_CLASSES, roi, roi, roi, device=dev) > 0.7).float() * mask[..., None, None, None]
    teacher = _teacher().to(dev).eval()
    with torch.no_grad():
        t_logits = teacher(x)
    plain = _student().to(dev)
    lorkd = _train_config("lorkd_seg")
    record["expert_rank"], record["expert_alpha"] = lorkd["expert_rank"], lorkd["expert_alpha"]
    experts = _expert_student().to(dev)
    shared_t = _expert_student(expert_transposed=False).to(dev)
    record["conversion"] = {"experts": _conversion(experts), "experts_transposed_shared": _conversion(shared_t)}
    loss_fn = LoRKDSegLoss(beta=0.1)
    nets = {"plain": plain, "experts": experts, "experts_transposed_shared": shared_t}
    opts = {k: torch.optim.AdamW(n.parameters() if k == "plain" else param_groups(n, 1e-4), 1e-4)
            for k, n in nets.items()}

    def step(name):
        net, opt = nets[name], opts[name]
        opt.zero_grad(set_to_none=True)
        out = net(x) if name == "plain" else net(x, regions)
        loss_fn(out, target, mask, teacher_logits=t_logits).backward()
        opt.step()

    train = {k: [] for k in nets}
    for _ in range(warmup):
        for name in nets:
            step(name)
    for r in range(repeats):  # rotate the order so that all see the same machine load
        for name in list(nets)[r % 3 :] + list(nets)[: r % 3]:
            train[name] += time_ms(lambda n=name: step(n), 1, 0, sync)
    with torch.no_grad():
        teacher_fwd = time_ms(lambda: teacher(x), repeats, warmup, sync)
    # inference of one region: fused expert (a stock UNet) vs the plain student vs the routed unfused model
    experts.eval()
    fused = export_expert(experts, 1).to(dev).eval()
    plain.eval()
    x1 = x[:1]
    infer = {"plain": [], "fused": [], "unfused": []}
    with torch.no_grad():
        calls = {"plain": lambda: plain(x1), "fused": lambda: fused(x1),
                 "unfused": lambda: experts(x1, torch.ones(1, dtype=torch.long, device=dev))}
        for fn in calls.values():
            time_ms(fn, 0, warmup, sync)
        for r in range(repeats):
            for name in list(calls)[r % 3 :] + list(calls)[: r % 3]:
                infer[name] += time_ms(calls[name], 1, 0, sync)
        max_diff = (fused(x1) - experts(x1, torch.ones(1, dtype=torch.long, device=dev))).abs().max().item()
    shape = (1, 1, roi, roi, roi)
    record["train_step"] = {k: summarize_ms(v) for k, v in train.items()}
    for k in ("experts", "experts_transposed_shared"):
        record["train_step"][f"ratio_{k}_to_plain"] = (
            record["train_step"][k]["median_ms"] / record["train_step"]["plain"]["median_ms"])
        # paired: the configurations of one round ran back to back, so a load burst hits both members of a pair
        paired = summarize_ms([e / p for e, p in zip(train[k], train["plain"])])
        record["train_step"][f"paired_ratio_{k}_to_plain"] = {"median": paired["median_ms"], "q1": paired["q1_ms"],
                                                              "q3": paired["q3_ms"]}
    record["teacher_forward"] = summarize_ms(teacher_fwd)
    record["inference"] = {k: summarize_ms(v) for k, v in infer.items()}
    record["inference"]["ratio_fused_to_plain"] = (
        record["inference"]["fused"]["median_ms"] / record["inference"]["plain"]["median_ms"])
    record["inference"]["max_abs_diff_fused_vs_unfused"] = max_diff
    record["sizes"] = {
        "teacher": {"params": count_params(teacher), "gflops": count_flops(teacher, shape) / 1e9},
        "student_plain": {"params": count_params(plain), "gflops": count_flops(plain, shape) / 1e9},
        "student_experts_training": {"params": count_params(experts),
                                     "gflops": count_flops(experts, shape, torch.ones(1, dtype=torch.long)) / 1e9},
        "student_experts_transposed_shared_training": {
            "params": count_params(shared_t),
            "gflops": count_flops(shared_t, shape, torch.ones(1, dtype=torch.long)) / 1e9,
        },
        "fused_expert": {"params": count_params(fused), "gflops": count_flops(fused, shape) / 1e9},
    }
    record["machine"]["load_average_1min_end"] = machine_info(dev)["load_average_1min"]
    out = Path(out_dir)
    atomic_write_text(out / "lorkd_bench.json", json.dumps(record, indent=2))
    atomic_write_text(out / "lorkd_bench.md", _markdown(record))
    print((out / "lorkd_bench.md").read_text())
    return str(out / "lorkd_bench.md")


def _markdown(r: dict) -> str:
    m, t, i, s = r["machine"], r["train_step"], r["inference"], r["sizes"]
    fmt = lambda d: f"{d['median_ms']:.1f} ({d['q3_ms'] - d['q1_ms']:.1f})"  # noqa: E731

    def pfmt(key: str) -> str:
        p = t.get(f"paired_ratio_{key}_to_plain")
        return f"{p['median']:.3f} ({p['q3'] - p['q1']:.3f})" if p else "-"

    def layers(key: str) -> str:
        c = r.get("conversion", {}).get(key)
        if not c:
            return ""
        by = ", ".join(f"{n} at x{k}" for k, n in c["by_multiplier"].items())
        return f"; {c['eks_layers']} EKS layers ({c['transposed']} transposed; {by}), scaling {'/'.join(c['scaling'])}"

    lines = [
        "# lorkd_seg benchmark", "",
        f"Generated by `{r['command']}` on {r['date']}.", "",
        f"- machine: {m['cpu_model']} ({m['usable_cores']} usable cores), device {m['device']}"
        + (f" ({m['gpu']})" if m["gpu"] else "") + f", torch {m['torch']} with {m['torch_threads']} threads",
        f"- GLIBC_TUNABLES: `{m['glibc_tunables']}`" + (" (set by this script)" if m["glibc_tunables_set_by_bench"] else ""),
        f"- 1-min load average: {m['load_average_1min']:.2f} at start, {m['load_average_1min_end']:.2f} at end",
        f"- batch {r['batch']} (regions mixed round-robin), patch {r['roi']}^3, {r['repeats']} timed repeats; "
        "median (IQR) in ms", "",
        "## Training step (forward + LoRKD loss + backward + AdamW)", "",
        "Ratio to plain: of the medians; paired: median (IQR) of the per-round ratios (the configurations of a round run "
        "back to back, so this one resists load from other processes).", "",
        "| student | ms | ratio to plain | paired ratio |", "|---|---|---|---|",
        f"| plain UNet (no experts) | {fmt(t['plain'])} | 1.000 | 1.000 |",
        f"| EKS experts, lorkd_seg's `network` (4 regions, expert_rank {r.get('expert_rank', 8)}, "
        f"expert_alpha {r.get('expert_alpha', 16)}{layers('experts')}) | {fmt(t['experts'])} | "
        f"{t['ratio_experts_to_plain']:.3f} | {pfmt('experts')} |",
        *([f"| EKS experts, transposed convs shared (`expert_transposed` false)"
           f"{layers('experts_transposed_shared')} | "
           f"{fmt(t['experts_transposed_shared'])} | {t['ratio_experts_transposed_shared_to_plain']:.3f} | "
           f"{pfmt('experts_transposed_shared')} |"]
          if "experts_transposed_shared" in t else []), "",
        f"Teacher forward (the same for every student, not included above): {fmt(r['teacher_forward'])} ms.", "",
        "## Inference of one region (batch 1)", "",
        "| network | ms | ratio to plain |", "|---|---|---|",
        f"| plain student UNet | {fmt(i['plain'])} | 1.000 |",
        f"| fused expert (stock UNet, W0 + B·A) | {fmt(i['fused'])} | {i['ratio_fused_to_plain']:.3f} |",
        f"| unfused EKS model, routed | {fmt(i['unfused'])} | {i['unfused']['median_ms'] / i['plain']['median_ms']:.3f} |",
        "", f"Max abs difference fused vs unfused logits: {i['max_abs_diff_fused_vs_unfused']:.2e}.", "",
        "## Size (per sample, one forward pass)", "", "| network | params (M) | GFLOPs |", "|---|---|---|",
    ]
    for name, d in s.items():
        lines.append(f"| {name} | {d['params'] / 1e6:.3f} | {d['gflops']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    fire.Fire({"run": run})
