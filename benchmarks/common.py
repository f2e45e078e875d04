# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Shared pieces of the benchmarks (``python -m benchmarks.<name>``): the repository root, allocator settings, robust
timing, logged child runs, command-line lists; the machine record is :py:func:`medfm_ops.utils.machine.machine_info`
(re-exported here)."""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import subprocess
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

from medfm_ops.utils.machine import BENCH_REEXEC_FLAG, machine_info

__all__ = ["REPO", "GLIBC_TUNABLES", "reexec_with_glibc_tunables", "machine_info", "time_ms", "summarize_ms",
           "run_logged", "run_timed", "split_list", "select_rows", "repo_path", "run_record", "carve_validation_datalist",
           "threshold_cell", "verdict_cell", "best_on_validation", "child_threads", "grid_then_seeds",
           "choice_seeds_words"]  # fmt: skip

#: the repository root (benchmarks run from it: ``python -m benchmarks.<name>``)
REPO = Path(__file__).resolve().parents[1]

#: glibc returns large buffers to the kernel after every call by default, which makes 3D CPU steps slow and noisy
GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"


def reexec_with_glibc_tunables(tag: str) -> None:
    """Re-execute the running command (``python -m benchmarks.<name> ...`` as typed) with :data:`GLIBC_TUNABLES`
    unless set (call before importing torch)."""
    if "GLIBC_TUNABLES" not in os.environ:
        print(f"[{tag}] GLIBC_TUNABLES not set: re-executing with GLIBC_TUNABLES={GLIBC_TUNABLES}", flush=True)
        env = {**os.environ, "GLIBC_TUNABLES": GLIBC_TUNABLES, BENCH_REEXEC_FLAG: "1"}
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


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


def select_rows(
    rows: str | Sequence[str] | None, known: Sequence[str], default: Sequence[str] | None = None
) -> list[str]:
    """
    The rows a benchmark run asks for: ``rows`` as a command-line list (:func:`split_list`), or ``default`` (every
    ``known`` row when None) when ``rows`` is empty.

    Raises:
        ValueError: naming the unknown rows and the known ones.
    """
    wanted = split_list(rows) if rows else list(known if default is None else default)
    unknown = sorted(set(wanted) - set(known))
    if unknown:
        raise ValueError(f"unknown rows {unknown}; known: {list(known)}.")
    return wanted


def repo_path(path: str | os.PathLike) -> Path:
    """``path`` as given when absolute, else relative to the repository root (:data:`REPO`)."""
    return Path(path) if Path(path).is_absolute() else REPO / path


def run_record(command: Sequence[str], start: float) -> dict[str, Any]:
    """The head of a benchmark's saved record: the command that regenerates it (``command`` joined by spaces), the
    date and the seconds since ``start`` (a ``time.perf_counter()`` value)."""
    return {"command": " ".join(command), "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.perf_counter() - start}


def run_timed(
    cmd: list[str],
    log: str | os.PathLike,
    cwd: str | os.PathLike | None = None,
    tail_lines: int = 40,
    glibc_tunables: bool = False,
    append: bool = False,
) -> dict[str, float]:
    """
    Run ``cmd`` (environment inherited, ``PYTHONUNBUFFERED=1``) with stdout and stderr to the file ``log``.

    Args:
        glibc_tunables: set :data:`GLIBC_TUNABLES` in the child unless the environment already sets it (steadier,
            faster 3D steps on CPU). Defaults to False.
        append: add to ``log`` (e.g. a resumed run's) instead of replacing it. Defaults to False.

    Returns:
        ``{"wall": seconds, "cpu": user + system seconds of the child}`` (the child's own CPU time, also when
        several run at once; it depends less on other jobs than the wall time).

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
    with open(log, "a" if append else "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-tail_lines:])
        raise RuntimeError(f"command failed (exit {rc}) after {seconds:.0f} s: {shlex.join(cmd)}\n{tail}")
    return {"wall": seconds, "cpu": usage.ru_utime + usage.ru_stime}


def run_logged(cmd: list[str], log: str | os.PathLike, cwd: str | os.PathLike | None = None, **kwargs: Any) -> float:
    """:func:`run_timed`'s wall time in seconds (same arguments)."""
    return run_timed(cmd, log, cwd=cwd, **kwargs)["wall"]


def _absolute_image(item: dict[str, Any], base: Path) -> dict[str, Any]:
    """The datalist ``item`` with its ``image`` path made absolute (relative paths are relative to ``base``)."""
    image = Path(item["image"])
    return {**item, "image": str(image if image.is_absolute() else (base / image).resolve())}


def _stratified_draw(
    source: Path, fraction: float, seed: int
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """``source``'s content and its ``training`` section split per task and label into ``(drawn, rest)``:
    ``round(fraction * n)`` cases of each group drawn with ``seed`` (at least one where a group has two or more,
    never all of it); image paths made absolute."""
    import json
    import random
    from collections import defaultdict

    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"{source}: the fraction must be in (0, 1), got {fraction}.")
    content = json.loads(source.read_text())
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = defaultdict(list)
    for item in content["training"]:
        groups[(item["task"], item["label"])].append(_absolute_image(item, source.parent))
    per_task: dict[str, int] = defaultdict(int)
    for (task, _), items in groups.items():
        per_task[task] += len(items)
    small = sorted(t for t, n in per_task.items() if n < 2)
    if small:
        raise ValueError(f"{source}: tasks {small} have fewer than 2 training cases.")
    rng = random.Random(int(seed))
    drawn, rest = [], []
    for key in sorted(groups, key=str):
        items = list(groups[key])
        rng.shuffle(items)
        k = min(len(items) - 1, max(1 if len(items) > 1 else 0, round(float(fraction) * len(items))))
        drawn += items[:k]
        rest += items[k:]
    return content, drawn, rest


def _write_if_changed(out: Path, content: dict[str, Any]) -> Path:
    """Write ``content`` as JSON to ``out`` (atomically) unless the file already holds exactly that."""
    import json

    from medfm_ops.utils.atomic_io import atomic_write_text

    text = json.dumps(content, indent=1) + "\n"
    if not out.is_file() or out.read_text() != text:
        atomic_write_text(out, text)
    return out


def carve_validation_datalist(
    source: str | os.PathLike, out: str | os.PathLike, fraction: float = 0.2, seed: int = 0
) -> Path:
    """
    Write ``out``: the classification datalist ``source`` with its ``validation`` section replaced by a split carved
    from its ``training`` section (per task and label, ``round(fraction * n)`` cases, at least one where a group has
    two or more, drawn with ``seed``) and those cases removed from training. The shipped ``validation`` section is
    kept as ``shipped_validation`` for reference; image paths are made absolute. Rows that select their model on
    this file's ``validation`` never see the shipped val split they are scored on. Written atomically, only when
    its content changes.

    Raises:
        ValueError: when ``fraction`` is not in (0, 1) or a task's training section has fewer than 2 cases.
    """
    source = Path(source)
    content, validation, training = _stratified_draw(source, fraction, seed)
    shipped = [_absolute_image(i, source.parent) for i in content["validation"]]
    return _write_if_changed(Path(out), {**content, "training": training, "validation": validation,
                                         "shipped_validation": shipped})  # fmt: skip


def keep_training_fraction(
    source: str | os.PathLike, out: str | os.PathLike, fraction: float, seed: int = 0
) -> Path:
    """
    Write ``out``: the datalist ``source`` (e.g. one written by :func:`carve_validation_datalist`) with only
    ``fraction`` of its ``training`` cases kept (per task and label, ``round(fraction * n)``, at least one where a
    group has two or more, drawn with ``seed``: one fixed draw); every other section unchanged. The label-scarce
    setting of a site that has fewer labelled cases than the data its teacher was trained on. Written atomically,
    only when its content changes.

    Raises:
        ValueError: when ``fraction`` is not in (0, 1) or a task's training section has fewer than 2 cases.
    """
    content, kept, _ = _stratified_draw(Path(source), fraction, seed)
    return _write_if_changed(Path(out), {**content, "training": kept})


def verdict_cell(verdicts: list[str]) -> str:
    """A table cell of per-seed verdicts (``"working"`` / ``"not working"``): the verdict when every seed agrees,
    else ``"working k/n"`` (seeds whose model works); ``"-"`` for none."""
    if not verdicts:
        return "-"
    k = sum(v == "working" for v in verdicts)
    return "working" if k == len(verdicts) else "not working" if k == 0 else f"working {k}/{len(verdicts)}"


def threshold_cell(decisions: list[Mapping[str, Any] | None]) -> str:
    """A table cell of per-seed decision records (a bundle's ``medfm.decision``, or a
    :func:`~medfm_ops.metrics.choose_decision_threshold` dict; None: the argmax): the mean ± std of the thresholds,
    ``"argmax"`` when no seed has one, ``"-"`` for none."""
    if not decisions:
        return "-"
    values = [float(d["threshold"]) for d in decisions if d and d.get("threshold") is not None]
    if not values:
        return "argmax"
    text = f"{statistics.fmean(values):.3f}" + (f" ± {statistics.pstdev(values):.3f}" if len(values) > 1 else "")
    return text + (f" ({len(values)}/{len(decisions)} seeds)" if len(values) < len(decisions) else "")


def best_on_validation(scores: Mapping[Any, float | None]) -> Any:
    """The key (e.g. a learning rate) of the highest validation score, the one rule of every benchmark's grid;
    a None or NaN score (a run that never validated, a NaN AUC) counts as the lowest. Ties: the first key."""
    if not scores:
        raise ValueError("best_on_validation: no scores to choose from.")

    def value(key: Any) -> float:
        v = scores[key]
        return -math.inf if v is None or not math.isfinite(float(v)) else float(v)

    return max(scores, key=value)


@contextlib.contextmanager
def child_threads(threads: int | None, alone_for: int = 1) -> Iterator[None]:
    """``OMP_NUM_THREADS`` of the child processes started inside the block (None or 0: left as it is); the previous
    value is restored after. Several single-threaded runs side by side use a small CPU better than one run with
    several threads whose threads wait for a descheduled sibling. ``alone_for``: a run that trains alone where
    ``alone_for`` runs of ``threads`` would share the cores (e.g. the teacher the students wait for) gets all their
    threads."""
    before = os.environ.get("OMP_NUM_THREADS")
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(int(threads) * int(alone_for))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = before


_Run = TypeVar("_Run")


def choice_seeds_words(grid_seeds: int) -> str:
    """Which seeds chose a learning rate (:func:`grid_then_seeds`' ``grid_seeds``), in a results page's words."""
    return "the first seed" if int(grid_seeds) == 1 else f"the mean over the first {int(grid_seeds)} seeds"


def grid_then_seeds(
    rows: Sequence[str],
    units: Mapping[str, Sequence[Any]],
    lr_grid: Sequence[float | None],
    seeds: Sequence[int],
    train: Callable[[str, float | None, int, Any], _Run],
    validation_score: Callable[[_Run], float | None],
    jobs: int = 1,
    grid_seeds: int = 1,
) -> dict[str, dict[str, Any]]:
    """
    Train every row: its units (e.g. one run per region, or one run) with the first ``grid_seeds`` seeds for every
    learning rate of ``lr_grid``, the rate chosen on validation (:func:`best_on_validation` of the mean
    ``validation_score`` over the units and those seeds; None counts as 0), then the other seeds at the chosen rate.
    ``jobs`` runs at a time (threads that wait on child processes); a row's other seeds start once its own grid is
    done, without waiting for the other rows.

    Args:
        lr_grid: the learning rates tried with the first ``grid_seeds`` seeds; ``[None]``: no grid (``train`` uses its
            own rate).
        train: ``train(row, lr, seed, unit)`` -> one finished run.
        grid_seeds: how many of the first seeds train the whole grid (1: the first seed only; more: a choice less
            exposed to one seed's noise, at that many times the grid's cost).

    Returns:
        ``{row: {"lr": chosen, "val": {lr: mean validation score}, "runs": {seed: [run per unit]}}}``.

    Raises:
        ValueError: on ``jobs < 1``, an empty ``lr_grid`` / ``seeds``, ``grid_seeds`` outside 1..len(seeds) or a row
            without units; whatever ``train`` raises (queued runs are cancelled).
    """
    if int(jobs) < 1 or not lr_grid or not seeds:
        raise ValueError(f"need jobs >= 1 ({jobs}), a learning rate ({list(lr_grid)}) and a seed ({list(seeds)}).")
    if not 1 <= int(grid_seeds) <= len(seeds):
        raise ValueError(f"grid_seeds must be between 1 and the number of seeds ({len(seeds)}), got {grid_seeds}.")
    if any(not units[row] for row in rows):
        raise ValueError(f"every row needs a unit to train: {[row for row in rows if not units[row]]} have none.")
    firsts, others = list(seeds[: int(grid_seeds)]), list(seeds[int(grid_seeds) :])
    pool = ThreadPoolExecutor(max_workers=int(jobs))
    try:
        grid = {row: {lr: {s: [pool.submit(train, row, lr, s, u) for u in units[row]] for s in firsts} for lr in lr_grid}
                for row in rows}  # fmt: skip
        row_of = {f: row for row in rows for per_seed in grid[row].values() for fs in per_seed.values() for f in fs}
        left = {row: sum(1 for f, r in row_of.items() if r == row) for row in rows}
        out: dict[str, dict[str, Any]] = {}
        later: dict[str, dict[int, list[Future]]] = {}
        waiting = set(row_of)
        while waiting:  # a row's other seeds are queued as soon as its own grid is done
            finished, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for future in finished:
                future.result()  # a failed run stops everything
                row = row_of[future]
                left[row] -= 1
                if left[row]:
                    continue
                runs = {lr: {s: [f.result() for f in fs] for s, fs in per_seed.items()} for lr, per_seed in grid[row].items()}
                val = {lr: statistics.fmean(validation_score(r) or 0.0 for rs in per_seed.values() for r in rs)
                       for lr, per_seed in runs.items()}  # fmt: skip
                lr = best_on_validation(val)
                out[row] = {"lr": lr, "val": val, "runs": dict(runs[lr])}
                later[row] = {seed: [pool.submit(train, row, lr, seed, u) for u in units[row]] for seed in others}
        for row in rows:
            out[row]["runs"].update({seed: [f.result() for f in futures] for seed, futures in later[row].items()})
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return {row: out[row] for row in rows}
