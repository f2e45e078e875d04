# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""tools/finetune_site.py: command-line booleans and the one-line error on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import finetune_site  # noqa: E402


def test_boolean_words_are_read_as_booleans():
    out = finetune_site._booleans({"verify": "false", "progress": "True", "epochs": 3, "mode": "false"})
    assert out == {"verify": False, "progress": True, "epochs": 3, "mode": "false"}  # only bool options change
    with pytest.raises(ValueError, match="--verify must be true or false"):
        finetune_site._booleans({"verify": "maybe"})


def test_bad_input_exits_with_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, str(TOOLS / "finetune_site.py"), "--expert_bundle", str(tmp_path / "missing"),
         "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"finetune_site: error: source bundle {tmp_path / 'missing'}")
    assert not (tmp_path / "out").exists()
