# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Every command-line script (``tools/``, ``benchmarks/``) answers ``--help`` (exit 0) with its commands, and every
command's page lists each of its options with its default. Run in-process (``runpy``, as ``python script.py``
would) so that the check costs no interpreter start per page; ``test_finetune_cli.py`` runs one in a subprocess."""

from __future__ import annotations

import inspect
import re
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the command-line scripts: ``python tools/<name>.py`` and ``python -m benchmarks.<name>``
SCRIPTS = sorted(p for folder in ("tools", "benchmarks") for p in (ROOT / folder).glob("*.py")
                 if 'if __name__ == "__main__":' in p.read_text())  # fmt: skip


def _run(script: Path, run_name: str) -> dict:
    if script.parent.name == "benchmarks":
        sys.modules.pop(f"benchmarks.{script.stem}", None)  # imported by a sibling: run a fresh copy
        return runpy.run_module(f"benchmarks.{script.stem}", run_name=run_name, alter_sys=run_name == "__main__")
    return runpy.run_path(str(script), run_name=run_name)


def _help(script: Path, argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", [str(script), *argv, "--help"])
    monkeypatch.setenv("GLIBC_TUNABLES", "")  # benchmarks re-execute themselves unless it is set
    monkeypatch.setenv("PAGER", "cat")
    with pytest.raises(SystemExit) as info:
        _run(script, "__main__")
    out = capsys.readouterr()
    assert info.value.code in (0, None), f"{script.name} {' '.join(argv)} --help exited {info.value.code}: {out.err}"
    return out.out + out.err  # fire writes its pages to stderr when not on a terminal


def _commands(page: str) -> list[str]:
    """The sub-commands a fire help page lists (none for a single-command page)."""
    block = re.search(r"COMMANDS\n\s+COMMAND is one of the following:\n(.*?)(?:\n\S|\Z)", page, re.S)
    return re.findall(r"^\s{5,7}(\w+)$", block.group(1), re.M) if block else []


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_help_lists_options_with_defaults(script, capsys, monkeypatch):
    page = _help(script, [], capsys, monkeypatch)
    if page.lstrip().startswith("usage:"):  # argparse: every option but the required ones shows its default
        options = re.findall(r"^\s+(--\w+)", page, re.M)
        assert options and page.count("(default:") >= len(options) - 3 - 1, page  # paths are required; -h
        return
    commands = _commands(page)
    assert commands, page
    module = _run(script, "help_check")
    for command in commands:
        page = " ".join(_help(script, [command], capsys, monkeypatch).split())
        params = inspect.signature(module[command]).parameters.values()
        for p in params:
            assert f"--{p.name}=" in page or f"{p.name.upper()}" in page, f"{script.name} {command}: {p.name}"
        assert page.count("Default:") == sum(p.default is not inspect.Parameter.empty for p in params), page
