# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""``benchmarks.common.run_timed``: the one way every benchmark runs a child command into a log."""

from __future__ import annotations

import sys

import pytest

from benchmarks.common import run_logged, run_timed


def test_run_timed_logs_times_and_appends(tmp_path):
    log = tmp_path / "logs" / "train.log"
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2:\n    pass\nprint('first')"
    timed = run_timed([sys.executable, "-c", busy], log, glibc_tunables=True)
    assert log.read_text() == "first\n"
    assert timed["cpu"] >= 0.2 and timed["wall"] >= timed["cpu"] * 0.5  # the child's own CPU time, not this process's
    seconds = run_logged([sys.executable, "-c", "import os; print(os.environ['GLIBC_TUNABLES'] != '')"], log,
                         glibc_tunables=True, append=True)  # fmt: skip
    assert seconds > 0 and log.read_text() == "first\nTrue\n"  # a resumed run's output follows the first one


def test_run_timed_raises_with_the_log_tail(tmp_path):
    log = tmp_path / "failed.log"
    cmd = [sys.executable, "-c", "import sys; print('line 1'); print('the reason'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)exit 3.*line 1\nthe reason"):
        run_timed(cmd, log, tail_lines=2)


def test_grid_then_seeds_chooses_each_rows_rate_on_the_first_seed():
    import threading

    from benchmarks.common import grid_then_seeds

    calls, lock = [], threading.Lock()
    best = {"a": 0.003, "b": 0.001}

    def train(row, lr, seed, unit):
        with lock:
            calls.append((row, lr, seed, unit))
        return {"row": row, "lr": lr, "seed": seed, "unit": unit, "val": 1.0 - abs(lr - best[row])}

    got = grid_then_seeds(["a", "b"], {"a": ["brain", "heart"], "b": [None]}, [0.001, 0.003], [0, 1, 2], train,
                          lambda run: run["val"], jobs=2)  # fmt: skip
    assert got["a"]["lr"] == 0.003 and got["b"]["lr"] == 0.001  # per row, on the first seed's validation
    assert got["a"]["val"] == {0.001: pytest.approx(0.998), 0.003: 1.0}
    assert [r["unit"] for r in got["a"]["runs"][1]] == ["brain", "heart"]  # every unit of the row, in order
    assert {(r["lr"], r["seed"]) for s in (0, 1, 2) for r in got["a"]["runs"][s]} == {(0.003, 0), (0.003, 1), (0.003, 2)}
    # the grid only with the first seed; the other seeds only at the chosen rate: 2 rates x (2 + 1 units) + 2 x 3
    assert len(calls) == 12 and not [c for c in calls if c[2] > 0 and c[1] != best[c[0]]]

    def broken(row, lr, seed, unit):
        raise RuntimeError(f"run {row} {lr} failed")

    with pytest.raises(RuntimeError, match="run a 0.001 failed"):
        grid_then_seeds(["a"], {"a": [None]}, [0.001], [0, 1], broken, lambda run: 0.0, jobs=1)
    with pytest.raises(ValueError, match="need jobs >= 1"):
        grid_then_seeds(["a"], {"a": [None]}, [0.001], [0], train, lambda run: 0.0, jobs=0)


def test_grid_then_seeds_starts_a_rows_seeds_when_its_own_grid_is_done():
    """The first row's grid run waits until the second row's seed-1 run has started: that happens only if the
    second row's later seeds are queued when ITS grid is done, not after the rows before it."""
    import threading

    from benchmarks.common import grid_then_seeds

    started = threading.Event()

    def train(row, lr, seed, unit):
        if row == "fast" and seed == 1:
            started.set()
        if row == "slow" and seed == 0 and not started.wait(timeout=20):
            raise RuntimeError("the fast row's seed 1 never started while the slow row's grid ran")
        return {"val": 0.5}

    got = grid_then_seeds(["slow", "fast"], {"slow": [None], "fast": [None]}, [None], [0, 1], train,
                          lambda run: run["val"], jobs=2)  # fmt: skip
    assert list(got) == ["slow", "fast"] and got["fast"]["lr"] is None and len(got["slow"]["runs"]) == 2
    with pytest.raises(ValueError, match="every row needs a unit"):
        grid_then_seeds(["a"], {"a": []}, [None], [0], train, lambda run: 0.0)


def test_child_threads_sets_and_restores(monkeypatch):
    import os

    from benchmarks.common import child_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with child_threads(2):
        assert os.environ["OMP_NUM_THREADS"] == "2"
        with child_threads(None):  # None: left as it is
            assert os.environ["OMP_NUM_THREADS"] == "2"
        with child_threads(1):
            assert os.environ["OMP_NUM_THREADS"] == "1"
        assert os.environ["OMP_NUM_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in os.environ
    with child_threads(1, alone_for=2):  # a run alone gets the threads of the 2 runs that would share the cores
        assert os.environ["OMP_NUM_THREADS"] == "2"
    with child_threads(None, alone_for=2):  # threads not set: inherited as it is
        assert "OMP_NUM_THREADS" not in os.environ


def test_grid_then_seeds_chooses_on_the_mean_over_grid_seeds():
    """With ``grid_seeds`` 2 the first two seeds train the whole grid and the rate is chosen on their mean: here seed 0
    alone prefers 0.003 (by a hair), the two seeds together prefer 0.001; seed 2 trains the chosen rate only."""
    from benchmarks.common import grid_then_seeds

    val = {(0.001, 0): 0.80, (0.003, 0): 0.81, (0.001, 1): 0.80, (0.003, 1): 0.70}
    calls = []

    def train(row, lr, seed, unit):
        calls.append((lr, seed))
        return {"lr": lr, "seed": seed, "val": val.get((lr, seed), 0.0)}

    one = grid_then_seeds(["a"], {"a": [None]}, [0.001, 0.003], [0, 1, 2], train, lambda r: r["val"], grid_seeds=1)
    assert one["a"]["lr"] == 0.003
    calls.clear()
    two = grid_then_seeds(["a"], {"a": [None]}, [0.001, 0.003], [0, 1, 2], train, lambda r: r["val"], grid_seeds=2)
    assert two["a"]["lr"] == 0.001 and two["a"]["val"] == {0.001: pytest.approx(0.80), 0.003: pytest.approx(0.755)}
    assert sorted(calls) == [(0.001, 0), (0.001, 1), (0.001, 2), (0.003, 0), (0.003, 1)]
    assert {s: [r["lr"] for r in rs] for s, rs in two["a"]["runs"].items()} == {0: [0.001], 1: [0.001], 2: [0.001]}
    with pytest.raises(ValueError, match="grid_seeds"):
        grid_then_seeds(["a"], {"a": [None]}, [0.001], [0], train, lambda r: 0.0, grid_seeds=2)
