# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The machine a result was measured on (recorded with timings in summaries and benchmark reports)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["BENCH_REEXEC_FLAG", "machine_info"]

#: set (to "1") by a benchmark that re-executed itself to set ``GLIBC_TUNABLES`` (``benchmarks/common.py``)
BENCH_REEXEC_FLAG = "MEDFM_BENCH_REEXEC"


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
        "glibc_tunables_set_by_bench": os.environ.get(BENCH_REEXEC_FLAG) == "1",
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
