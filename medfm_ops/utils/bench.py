# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Shared pieces of the ``tools/bench_*.py`` benchmarks: allocator settings, machine record, robust timing."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["GLIBC_TUNABLES", "reexec_with_glibc_tunables", "machine_info", "time_ms", "summarize_ms", "run_logged", "split_list"]

#: glibc returns large buffers to the kernel after every call by default, which makes 3D CPU steps slow and noisy
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
_REEXEC_FLAG = "MEDFM_BENCH_REEXEC"


def reexec_with_glibc_tunables(tag: str) -> None:
    """Re-execute the running script with :data:`GLIBC_TUNABLES` unless set (call before importing torch)."""
    if "GLIBC_TUNABLES" not in os.environ:
        print(f"[{tag}] GLIBC_TUNABLES not set: re-executing with GLIBC_TUNABLES={GLIBC_TUNABLES}", flush=True)
        env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, _REEXEC_FLAG: "1"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def machine_info(device: Any) -> dict[str, Any]:
    """CPU model, cores, torch/python versions, threads, GPU name, allocator settings and the load average."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.device(device)
    return {
        "cpu_model": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "glibc_tunables_set_by_bench": os.environ.get(_REEXEC_FLAG) == "1",
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def time_ms(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Wall times (ms) of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (``sync`` e.g. CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def summarize_ms(times: list[float]) -> dict[str, float]:
    """Median and inter-quartile range."""
    if len(times) == 1:
        return {"median_ms": times[0], "q1_ms": times[0], "q3_ms": times[0]}
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return {"median_ms": statistics.median(times), "q1_ms": q1, "q3_ms": q3}


def split_list(value: str | int | float | tuple | list) -> list[str]:
    """A command-line list: ``"a, b"`` or ``("a", "b")`` (Fire passes either) -> ``["a", "b"]``."""
    if isinstance(value, (list, tuple)):
        return [str(v).strip() for v in value]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def run_logged(
    cmd: list[str],
    log: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    tail_lines: int = 40,
    glibc_tunables: bool = False,
) -> float:
    """
    Run ``cmd`` (environment inherited, ``PYTHONUNBUFFERED=1``) with stdout and stderr to the file ``log``; returns the
    wall time in seconds.

    Args:
        glibc_tunables: set :data:`GLIBC_TUNABLES` in the child unless the environment already sets it (steadier,
            faster 3D steps on CPU). Defaults to False.

    Raises:
        RuntimeError: on a non-zero exit, with the command and the last ``tail_lines`` lines of the log.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}\n  (log: {log})", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if glibc_tunables:
        env.setdefault("GLIBC_TUNABLES", GLIBC_TUNABLES)
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-tail_lines:])
        raise RuntimeError(f"command failed (exit {rc}) after {seconds:.0f} s: {shlex.join(cmd)}\n{tail}")
    return seconds
