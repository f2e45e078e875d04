# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""tools/finetune_site.py: options built from SiteFinetuneSettings (types, booleans, defaults); one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from medfm_ops.finetune import SiteFinetuneSettings

TOOL = Path(__file__).resolve().parents[1] / "tools" / "finetune_site.py"


def _parse(*argv: str) -> SiteFinetuneSettings:
    parser = SiteFinetuneSettings.add_arguments(argparse.ArgumentParser(exit_on_error=False))
    return SiteFinetuneSettings.from_namespace(parser.parse_args(list(argv)))


def test_options_are_the_settings_fields_with_their_defaults():
    assert _parse() == SiteFinetuneSettings()
    got = _parse("--verify", "false", "--progress", "True", "--epochs", "3", "--mode", "lora", "--roi_size",
                 "[32, 48, 32]", "--spacing", "1,1.5,2", "--val_split", "3", "--split_seed", "none")  # fmt: skip
    assert got == dataclasses.replace(SiteFinetuneSettings(), verify=False, progress=True, epochs=3, mode="lora",
                                      roi_size=[32, 48, 32], spacing=[1.0, 1.5, 2.0], val_split=3)  # fmt: skip
    assert isinstance(got.val_split, int) and _parse("--val_split", "0.25").val_split == 0.25


@pytest.mark.parametrize(
    "argv, message",
    [(["--verify", "maybe"], "--verify must be true or false"), (["--epochs", "2.5"], "--epochs must be int"),
     (["--roi_size", "32,x,32"], "--roi_size must be a comma-separated list of int"),
     (["--val_split", "a"], "--val_split must be a number")],
)  # fmt: skip
def test_bad_option_values_are_refused_by_name(argv, message):
    parser = SiteFinetuneSettings.add_arguments(argparse.ArgumentParser(exit_on_error=False))
    with pytest.raises(argparse.ArgumentError, match=message):
        parser.parse_args(argv)


def test_settings_check_names_the_setting():
    with pytest.raises(ValueError, match="val_interval=2 must divide epochs=3"):
        SiteFinetuneSettings(epochs=3, val_interval=2).check()
    with pytest.raises(ValueError, match="mode must be one of"):
        SiteFinetuneSettings(mode="half").check()
    assert SiteFinetuneSettings(seed=3).effective_split_seed == 3
    assert SiteFinetuneSettings(seed=3, split_seed=1).effective_split_seed == 1


def test_help_lists_every_setting_with_its_default():
    res = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for f in dataclasses.fields(SiteFinetuneSettings):
        assert f"--{f.name}" in text
    assert "training epochs (a ceiling with early_stop_patience), written into the new bundle's train.json (default: 100)" in text


def test_bad_input_exits_with_one_line(tmp_path):
    res = subprocess.run(
        [sys.executable, str(TOOL), "--expert_bundle", str(tmp_path / "missing"),
         "--dataset_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"finetune_site: error: source bundle {tmp_path / 'missing'}")
    assert not (tmp_path / "out").exists()
