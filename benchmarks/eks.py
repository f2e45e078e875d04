# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Benchmark mixed-task EKS execution against shared weights, loops and a LoRA side branch.

    python -m benchmarks.eks run --out_dir benchmarks/ [--device auto|cpu|cuda] [--tasks 1,4,8] \
        [--batches 2,4,8] [--size 32] [--channels 32] [--rank 8] [--repeats 10] [--warmup 2] [--threads 0] [--quick]

Writes ``eks_bench.md`` and ``eks_bench.json`` into ``out_dir``.

Workload: a UNet-like 3D stack of five 3x3x3 convolutions, each followed by InstanceNorm (affine) and LeakyReLU
(MONAI ``Convolution`` blocks), on an input of ``C`` channels and ``S^3`` voxels (defaults ``C=32, S=32``)::

    x (C, S^3) -> conv C->C -> h1 -> conv C->2C stride 2 (S/2) -> conv 2C->2C -> nearest upsample x2
      -> conv 2C->C -> + h1 (skip) -> conv C->C -> out (C, S^3)

Strategies (same weights; the expert of sample ``b`` is task ``b mod T``, i.e. mixed tasks round-robin):

- ``plain``: the stack with ``nn.Conv3d`` (shared weights, no experts): the baseline of every ratio.
- ``eks_grouped``: :func:`~medfm_ops.networks.to_experts`, ``execution="grouped"`` (one grouped conv, groups = B).
- ``eks_per_task``: the same model, ``execution="per_task"`` (one conv per task sub-batch).
- ``per_sample``: one conv per sample with its fused kernel ``W0 + delta W_t`` (kernel computed once per task).
- ``lora``: ``conv(x, W0)`` plus, per task sub-batch, a rank-``r`` side branch: a 3x3x3 conv to ``r`` channels then a
  1x1x1 conv to ``C_out`` (scaled by ``alpha / r``), added back to the sub-batch's rows.
- ``auto`` (only where ``eks_grouped`` is slower than ``eks_per_task``): the mode
  :func:`~medfm_ops.networks.select_execution` picks for that configuration, shown with the main measurement of
  that mode.

Every step: forward (``fwd``), or forward + backward of ``mean(out^2)`` into all parameters (``fwd+bwd``, a
training step without the optimizer). The strategies of one (T, batch) configuration are timed in turns, rotating
the order each round, after ``warmup`` untimed steps each; the median and inter-quartile range over ``repeats`` are
reported with ratios of medians to ``plain``. The EKS factors are set from the LoRA factors
(``A = A'.reshape(r k, C_in k^2)``, ``B = B' (x) I_k``), so all strategies compute the same function: the bench
checks every one against per-task fused networks (:func:`~medfm_ops.networks.export_expert`) in float32.

On CPU, glibc's malloc returning big buffers to the kernel after every step makes 3D steps slow and noisy; the
script re-executes itself with ``GLIBC_TUNABLES`` set as recommended (unless already set) and records the value.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import machine_info, reexec_with_glibc_tunables

if __name__ == "__main__":  # before torch is loaded: re-exec costs little
    reexec_with_glibc_tunables("bench_eks")

import fire  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from monai.networks.blocks import Convolution  # noqa: E402
from torch import nn  # noqa: E402

from medfm_ops.layers import EKSConv  # noqa: E402
from medfm_ops.networks import (  # noqa: E402
    ExpertNetwork,
    TaskRouting,
    eks_layers,
    export_expert,
    select_execution,
    set_execution,
    to_experts,
)

STRATEGIES = ("plain", "eks_grouped", "eks_per_task", "per_sample", "lora")
PHASES = ("fwd", "fwd+bwd")
TARGETS = {"cpu": 1.15, "cuda": 1.3}  # EKS T=8 fwd+bwd time / plain time


# ---------------------------------------------------------------------------------------------------- workload
class UNetLikeStack(nn.Module):
    """Five 3x3x3 conv + InstanceNorm + LeakyReLU blocks with one down/up step and a skip (see module docstring).

    Args:
        spatial_dims: number of spatial dimensions.
        channels: channels ``C`` of input and output (the inner stage has ``2C``).
    """

    def __init__(self, spatial_dims: int = 3, channels: int = 32) -> None:
        super().__init__()
        c, c2 = channels, 2 * channels

        def block(cin: int, cout: int, strides: int = 1) -> Convolution:
            return Convolution(spatial_dims, cin, cout, strides=strides, kernel_size=3,
                               act=("leakyrelu", {"negative_slope": 0.01}), norm=("instance", {"affine": True}))

        self.enc = block(c, c)
        self.down = block(c, c2, strides=2)
        self.mid = block(c2, c2)
        self.up = block(c2, c)
        self.out = block(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.enc(x)
        h = self.mid(self.down(h1))
        h = F.interpolate(h, size=h1.shape[2:], mode="nearest")
        return self.out(self.up(h) + h1)


def _conv_fn(layer: EKSConv):
    return getattr(F, f"conv{layer.spatial_dims}d")


class PerSampleConv(nn.Module):
    """One convolution per sample with its fused kernel (the naive loop), using the wrapped EKS layer's factors."""

    def __init__(self, eks: EKSConv) -> None:
        super().__init__()
        self.eks = eks

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        e, ids = self.eks, task_ids
        if ids is None:
            return e(x, None)
        ids = ids.tolist()
        kernels = {t: e.expert_weight(t) for t in set(ids)}
        conv = _conv_fn(e)
        outs = [conv(x[b : b + 1], kernels[t], e.bias, e.stride, e.padding, e.dilation) for b, t in enumerate(ids)]
        return torch.cat(outs)


class LoRABranchConv(nn.Module):
    """``conv(x, W0)`` plus a per-task low-rank side branch ``(alpha/r) conv1x1(conv_k(x, A'_t), B'_t)``.

    ``down[t]`` has shape ``(r, C_in, *k)``, ``up[t]`` ``(C_out, r, 1, ..., 1)``. The wrapped EKS layer provides
    ``W0`` and bias; its own expert factors are dropped (rank 0) so that they cost nothing.
    """

    def __init__(self, eks: EKSConv, down: list[torch.Tensor], up: list[torch.Tensor], alpha: float) -> None:
        super().__init__()
        self.rank = down[0].shape[0]
        self.scale = alpha / self.rank
        eks.set_ranks(0)
        self.eks = eks
        self.down = nn.ParameterList([nn.Parameter(d.clone()) for d in down])
        self.up = nn.ParameterList([nn.Parameter(u.clone()) for u in up])

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        e, ids = self.eks, task_ids
        conv = _conv_fn(e)
        out = conv(x, e.weight, e.bias, e.stride, e.padding, e.dilation)
        if ids is None:
            return out
        for t in torch.unique(ids).tolist():
            idx = torch.nonzero(ids == t, as_tuple=False).view(-1)
            low = conv(x.index_select(0, idx), self.down[t], None, e.stride, e.padding, e.dilation)
            out = out.index_add(0, idx, conv(low, self.up[t]) * self.scale)
        return out


class RoutedStack(nn.Module):
    """A network whose :class:`PerSampleConv` / :class:`LoRABranchConv` layers get the batch's task ids for one
    forward call through a :class:`~medfm_ops.networks.TaskRouting`, as ``ExpertNetwork`` does for EKS layers."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        layers = (m for m in self.net.modules() if isinstance(m, (PerSampleConv, LoRABranchConv)))
        with TaskRouting(layers, task_ids):
            return self.net(x)


def _replace_eks(model: ExpertNetwork, make) -> RoutedStack:
    net = copy.deepcopy(model.net)
    for name, layer in list(eks_layers(net)):
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, make(name, layer))
    return RoutedStack(net)


def build_models(base: nn.Module, num_tasks: int, rank: int, alpha: float, seed: int) -> dict[str, nn.Module]:
    """``{"plain", "eks", "per_sample", "lora"}`` computing the same function (``plain``: the W0 backbone)."""
    gen = torch.Generator().manual_seed(seed)
    eks = to_experts(base, num_tasks=num_tasks, ranks=rank, alpha=alpha)
    factors = {}
    for name, layer in eks_layers(eks.net):
        k = layer.kernel_size
        fan_in = layer.in_channels * math.prod(k)
        down = [torch.randn(rank, layer.in_channels, *k, generator=gen) / fan_in**0.5 for _ in range(num_tasks)]
        up = [torch.randn(layer.out_channels, rank, *(1,) * len(k), generator=gen) * 0.1 for _ in range(num_tasks)]
        factors[name] = (down, up)
        eye = torch.eye(k[0])
        with torch.no_grad():  # the same delta W_t in the EKS (loralib) factorisation
            for t in range(num_tasks):
                layer.lora_A[t].copy_(down[t].reshape(rank * k[0], -1))
                layer.lora_B[t].copy_(torch.kron(up[t].view(layer.out_channels, rank), eye))
    per_sample = _replace_eks(eks, lambda name, layer: PerSampleConv(layer))
    lora = _replace_eks(eks, lambda name, layer: LoRABranchConv(layer, *factors[name], alpha))
    return {"plain": base, "eks": eks, "per_sample": per_sample, "lora": lora}


def _runner(models: dict[str, nn.Module], strategy: str, x: torch.Tensor, ids: torch.Tensor):
    if strategy == "plain":
        return lambda: models["plain"](x)
    if strategy in ("eks_grouped", "eks_per_task"):
        mode = strategy[len("eks_") :]

        def run():
            set_execution(models["eks"], mode)
            return models["eks"](x, ids)

        return run
    return lambda: models[strategy](x, ids)


# ---------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn, backward: bool) -> None:
    if backward:
        fn().float().square().mean().backward()
    else:
        with torch.no_grad():
            fn()


def time_strategies(
    fns: dict, params: dict, device: torch.device, backward: bool, repeats: int, warmup: int
) -> dict[str, list[float]]:
    """Per-step times (ms) of every strategy, timed in rotating turns after ``warmup`` untimed steps each."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            _step(fns[name], backward)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for p in params[name]:
                p.grad = None
            _sync(device)
            start = time.perf_counter()
            _step(fns[name], backward)
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    for name in names:
        for p in params[name]:
            p.grad = None
    return times


_MODEL_OF = {"eks_grouped": "eks", "eks_per_task": "eks"}  # strategy -> model of build_models


def measure_phase(models: dict, params: dict, x: torch.Tensor, ids: torch.Tensor, phase: str, repeats: int,
                  warmup: int) -> tuple[list[dict], dict | None]:
    """Timing rows of every strategy for one phase (plus an ``auto`` row) and the ``select_execution`` record.

    ``select_execution`` runs only for a mixed-task batch where ``eks_grouped`` was slower than ``eks_per_task``.
    """
    backward = phase == "fwd+bwd"
    fns = {s: _runner(models, s, x, ids) for s in STRATEGIES}
    times = time_strategies(fns, params, x.device, backward, repeats, warmup)
    set_execution(models["eks"], "grouped")
    plain = statistics.median(times["plain"])
    rows = {}
    for s in STRATEGIES:
        q1, med, q3 = _quantiles(times[s])
        rows[s] = {"strategy": s, "median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1,
                   "ratio_to_plain": med / plain, "times_ms": times[s]}
    selection = None
    mixed = len(set(ids.tolist())) > 1  # one task only: both EKS modes run the same single conv
    if mixed and rows["eks_grouped"]["median_ms"] > rows["eks_per_task"]["median_ms"]:
        selection = select_execution(models["eks"], x, ids, repeats=max(2, min(repeats, 5)), warmup=1,
                                     backward=backward)
        set_execution(models["eks"], "grouped")
        rows["auto"] = {**rows[f"eks_{selection['chosen']}"], "strategy": "auto", "chosen": selection["chosen"]}
    return list(rows.values()), selection


def _target_row(by_strategy: dict, batch: int, target: float) -> dict:
    g, p = by_strategy["eks_grouped"], by_strategy["eks_per_task"]
    best = g if g["median_ms"] <= p["median_ms"] else p
    return {"batch": batch, "grouped_ratio": g["ratio_to_plain"], "per_task_ratio": p["ratio_to_plain"],
            "per_sample_ratio": by_strategy["per_sample"]["ratio_to_plain"],
            "lora_ratio": by_strategy["lora"]["ratio_to_plain"], "best_mode": best["strategy"][len("eks_") :],
            "best_ratio": best["ratio_to_plain"], "target": target, "pass": best["ratio_to_plain"] <= target}


def _quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, statistics.median(values), q3


# ---------------------------------------------------------------------------------------------------- machine
def _parse_ints(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, str):
        return [int(v) for v in value.replace(" ", "").split(",") if v]
    return [int(v) for v in value]


# ---------------------------------------------------------------------------------------------------- report
def _fmt(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def write_markdown(record: dict, path: Path) -> None:
    m, c = record["machine"], record["config"]
    lines = [
        "# EKS execution benchmark",
        "",
        f"Generated by `{c['command']}` on {record['date']}.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu_model']} ({m['logical_cores']} logical cores, {m['usable_cores']} usable); "
        f"torch {m['torch']} with {m['torch_threads']} threads; Python {m['python']}",
        f"- device: {m['device']}" + (f" ({m['gpu']})" if m["gpu"] else ""),
        f"- GLIBC_TUNABLES: `{m['glibc_tunables']}`"
        + (" (set by this script, which re-executed itself with it)" if m["glibc_tunables_set_by_bench"] else ""),
        f"- 1-min load average: {m['load_start']:.2f} at start, {m['load_end']:.2f} at end "
        "(other processes may share the machine: compare ratios, taken in rotating turns, rather than absolute times)",
        f"- wall time of the benchmark: {record['wall_s']:.0f} s",
        "",
        "## Workload",
        "",
        f"UNet-like 3D stack, input `(B, {c['channels']}, {c['size']}, {c['size']}, {c['size']})`: five 3x3x3 conv + "
        f"InstanceNorm + LeakyReLU blocks ({c['channels']}->{c['channels']} at {c['size']}^3, "
        f"{c['channels']}->{2 * c['channels']} stride 2, {2 * c['channels']}->{2 * c['channels']} at "
        f"{c['size'] // 2}^3, nearest upsample, {2 * c['channels']}->{c['channels']} + skip, "
        f"{c['channels']}->{c['channels']}). Expert rank {c['rank']}, alpha {c['alpha']}; sample b has task b mod T. "
        f"{c['repeats']} timed steps after {c['warmup']} warm-up steps per strategy, float32. Median (IQR) in ms; "
        "ratio = median / median of `plain` in the same configuration. `fwd+bwd` = forward + backward of a scalar "
        "loss into all parameters.",
        "",
        "Strategies: `plain` shared nn.Conv3d; `eks_grouped` EKSConv grouped conv (groups = B); `eks_per_task` EKSConv "
        "per-task sub-batches; `per_sample` one conv per sample with its fused kernel; `lora` W0 conv + per-task "
        "low-rank side branch (3x3x3 conv to r channels, 1x1x1 conv back); `auto` the mode `select_execution` picks "
        "(shown only for mixed-task batches where grouped is slower than per_task; its time is that mode's measurement "
        "above, `select_execution`'s own timings are listed at the end).",
        "",
        "## Training-step target (EKS, T=8, fwd+bwd, vs plain)",
        "",
        f"Target on {m['device']}: the faster EKS mode (what `select_execution` would keep) within "
        f"{TARGETS['cuda' if m['gpu'] else 'cpu']}x of `plain` (CPU <= {TARGETS['cpu']}x, GPU <= {TARGETS['cuda']}x). "
        "Measured ratios of medians; PASS/MISS computed from them. Other strategies for comparison.",
        "",
        "| batch | eks_grouped | eks_per_task | best EKS mode | best ratio | target | result | per_sample | lora |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in record["targets"]:
        lines.append(
            f"| {t['batch']} | {t['grouped_ratio']:.3f} | {t['per_task_ratio']:.3f} | {t['best_mode']} | "
            f"{t['best_ratio']:.3f} | <= {t['target']} | **{'PASS' if t['pass'] else 'MISS'}** | "
            f"{t['per_sample_ratio']:.3f} | {t['lora_ratio']:.3f} |"
        )
    if not record["targets"]:
        lines.append("| - | - | - | - | - | - | not measured (T=8 not in --tasks) | - | - |")
    lines += ["", "## Timings", "",
              "| T | batch | strategy | fwd ms (IQR) | fwd ratio | fwd+bwd ms (IQR) | fwd+bwd ratio |",
              "|---|---|---|---|---|---|---|"]
    rows: dict[tuple, dict] = {}
    for r in record["results"]:
        rows.setdefault((r["num_tasks"], r["batch"], r["strategy"]), {})[r["phase"]] = r
    order = {s: i for i, s in enumerate((*STRATEGIES, "auto"))}
    for key in sorted(rows, key=lambda k: (k[0], k[1], order[k[2]])):
        cells = []
        for phase in PHASES:
            r = rows[key].get(phase)
            if r is None:
                cells += ["-", "-"]
                continue
            label = f" (-> {r['chosen']})" if "chosen" in r else ""
            cells += [f"{_fmt(r['median_ms'])} ({_fmt(r['iqr_ms'])}){label}", f"{r['ratio_to_plain']:.3f}"]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    lines += ["", "## Same output check (float32, forward)", "",
              "Max abs difference to per-task fused networks (`export_expert`) run on each sample; `plain` is compared "
              "with the EKS model called with `task_ids=None` (shared W0).", "",
              "| T | batch | " + " | ".join(STRATEGIES) + " | max abs output |",
              "|---|---|" + "---|" * (len(STRATEGIES) + 1)]
    for e in record["equivalence"]:
        diffs = " | ".join(f"{e['max_abs_diff'][s]:.2e}" for s in STRATEGIES)
        lines.append(f"| {e['num_tasks']} | {e['batch']} | {diffs} | {e['max_abs_output']:.2e} |")
    if record["select_execution"]:
        lines += ["", "## select_execution records", "", "| T | batch | phase | chosen | timings ms |",
                  "|---|---|---|---|---|"]
        for s in record["select_execution"]:
            timings = ", ".join(f"{k} {_fmt(v)}" for k, v in s["timings_ms"].items())
            lines.append(f"| {s['num_tasks']} | {s['batch']} | {s['phase']} | {s['chosen']} | {timings} |")
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------- CLI
def _check_outputs(models: dict, x: torch.Tensor, ids: torch.Tensor) -> dict:
    diffs = {}
    with torch.no_grad():
        ref = torch.cat([export_expert(models["eks"], t)(x[b : b + 1]) for b, t in enumerate(ids.tolist())])
        diffs["plain"] = (models["plain"](x) - models["eks"](x, None)).abs().max().item()
        for s in STRATEGIES[1:]:
            out = _runner(models, s, x, ids)()
            diffs[s] = (out - ref).abs().max().item()
        set_execution(models["eks"], "grouped")
    return {"max_abs_diff": diffs, "max_abs_output": ref.abs().max().item()}


def run(
    out_dir: str = "benchmarks",
    device: str = "auto",
    tasks="1,4,8",
    batches="2,4,8",
    size: int = 32,
    channels: int = 32,
    rank: int = 8,
    alpha: float = 16.0,
    repeats: int = 10,
    warmup: int = 2,
    threads: int = 0,
    quick: bool = False,
    seed: int = 0,
) -> str:
    """Run the benchmark and write ``eks_bench.md`` / ``eks_bench.json`` into ``out_dir``; returns the md path.

    Args:
        out_dir: output folder (created). Defaults to ``benchmarks``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``. Defaults to ``auto``.
        tasks: comma-separated expert counts T. Defaults to ``1,4,8``.
        batches: comma-separated batch sizes. Defaults to ``2,4,8``.
        size: spatial size S (S^3 voxels; even). Defaults to 32.
        channels: stack channels C (inner stage 2C). Defaults to 32.
        rank: expert rank r. Defaults to 8.
        alpha: LoRA scaling numerator. Defaults to 16.
        repeats: timed steps per strategy and phase. Defaults to 10.
        warmup: untimed steps per strategy and phase. Defaults to 2.
        threads: CPU threads of torch (``torch.set_num_threads``); 0 keeps torch's default (all cores). On a
            machine shared with other jobs, 2+ threads can stall at every parallel region. Defaults to 0.
        quick: smoke run (S=8, C=8, T in {1,8}, batch 4, rank 2, 2 repeats, 1 warm-up, 1 thread: tiny convs gain
            nothing from threads and stall on a busy machine). Defaults to False.
        seed: weight seed. Defaults to 0.
    """
    if quick:
        tasks, batches, size, channels, rank, repeats, warmup, threads = "1,8", "4", 8, 8, 2, 2, 1, 1
    tasks, batches = _parse_ints(tasks), _parse_ints(batches)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ValueError(f"device must be auto, cpu or cuda (with CUDA available), got {device!r}.")
    if size < 2 or size % 2:
        raise ValueError(f"size must be an even number >= 2, got {size}.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0: torch's default), got {threads}.")
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    machine = machine_info(dev)
    machine["load_start"] = os.getloadavg()[0]
    command = "python -m benchmarks.eks run " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "benchmarks.eks run"
    print(f"[bench_eks] {machine['cpu_model']} | {machine['device']} {machine['gpu'] or ''} | "
          f"torch {machine['torch']}, "
          f"{machine['torch_threads']} threads | GLIBC_TUNABLES={machine['glibc_tunables']}"
          + (" (set by this script: re-executed itself)" if machine["glibc_tunables_set_by_bench"] else "")
          + f" | load {machine['load_start']:.2f}", flush=True)
    start_wall = time.perf_counter()

    torch.manual_seed(seed)
    base = UNetLikeStack(3, channels).to(dev)
    results, equivalence, selections, targets = [], [], [], []
    for num_tasks in tasks:
        models = build_models(base.cpu(), num_tasks, rank, alpha, seed + num_tasks)
        models = {k: v.to(dev).train() for k, v in models.items()}
        params = {s: list(models[_MODEL_OF.get(s, s)].parameters()) for s in STRATEGIES}
        for batch in batches:
            gen = torch.Generator().manual_seed(seed + 1000 * batch + num_tasks)
            x = torch.randn(batch, channels, size, size, size, generator=gen).to(dev)
            ids = (torch.arange(batch) % num_tasks).to(dev)
            equivalence.append({"num_tasks": num_tasks, "batch": batch, **_check_outputs(models, x, ids)})
            for phase in PHASES:
                rows, selection = measure_phase(models, params, x, ids, phase, repeats, warmup)
                rows = [{"num_tasks": num_tasks, "batch": batch, "phase": phase, **r} for r in rows]
                results += rows
                if selection is not None:
                    selections.append({"num_tasks": num_tasks, "batch": batch, "phase": phase, **selection})
                by_strategy = {r["strategy"]: r for r in rows}
                line = " ".join(f"{s}={by_strategy[s]['median_ms']:.1f}ms({by_strategy[s]['ratio_to_plain']:.2f}x)"
                                for s in STRATEGIES)
                load = os.getloadavg()[0]
                print(f"[bench_eks] T={num_tasks} B={batch} {phase}: {line} | load {load:.2f}", flush=True)
                if num_tasks == 8 and phase == "fwd+bwd":
                    targets.append(_target_row(by_strategy, batch, TARGETS[dev.type]))
            del x
        del models
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    machine["load_end"] = os.getloadavg()[0]
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": time.perf_counter() - start_wall,
        "machine": machine,
        "config": {"command": command, "tasks": tasks, "batches": batches, "size": size, "channels": channels,
                   "rank": rank, "alpha": alpha, "threads": torch.get_num_threads(), "repeats": repeats,
                   "warmup": warmup, "quick": quick, "seed": seed, "dtype": "float32", "strategies": list(STRATEGIES), "phases": list(PHASES)},
        "targets": targets,
        "results": results,
        "equivalence": equivalence,
        "select_execution": selections,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eks_bench.json").write_text(json.dumps(record, indent=1))
    write_markdown(record, out / "eks_bench.md")
    for t in targets:
        print(f"[bench_eks] target EKS T=8 fwd+bwd B={t['batch']}: {t['best_mode']} {t['best_ratio']:.3f}x plain "
              f"(grouped {t['grouped_ratio']:.3f}x) vs <= {t['target']}x: {'PASS' if t['pass'] else 'MISS'}")
    print(f"[bench_eks] wrote {out / 'eks_bench.md'} and {out / 'eks_bench.json'} in {record['wall_s']:.0f} s; "
          f"load {machine['load_start']:.2f} -> {machine['load_end']:.2f}")
    return str(out / "eks_bench.md")


if __name__ == "__main__":
    fire.Fire({"run": run})
