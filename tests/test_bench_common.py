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
