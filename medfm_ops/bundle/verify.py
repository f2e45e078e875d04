# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Run MONAI's own bundle checks on a bundle directory, offline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from .expert_bundle import SCHEMA_RELPATH

__all__ = ["verify_bundle", "BundleCheckError", "bundle_check_commands"]


class BundleCheckError(RuntimeError):
    """A ``monai.bundle`` check failed; ``check`` names it and ``output`` holds what it printed."""

    def __init__(self, check: str, output: str):
        super().__init__(f"bundle check `{check}` failed:\n{output[-6000:]}")
        self.check = check
        self.output = output


def bundle_check_commands(bundle_dir: str | os.PathLike, python: str | None = None) -> dict[str, list[str]]:
    """The three ``python -m monai.bundle`` commands :func:`verify_bundle` runs, keyed by check name.

    All paths are relative to ``bundle_dir`` (the commands run there). ``verify_metadata`` reads the schema shipped
    at ``docs/metadata_schema.json`` (MONAI downloads from the metadata's URL only when that file is missing).
    """
    py = python or sys.executable
    meta, infer = "configs/metadata.json", "configs/inference.json"
    if not (Path(bundle_dir) / SCHEMA_RELPATH).is_file():
        raise FileNotFoundError(f"{Path(bundle_dir) / SCHEMA_RELPATH} is missing: verify_metadata would go online.")
    return {
        "verify_metadata": [py, "-m", "monai.bundle", "verify_metadata", "--meta_file", meta,
                            "--filepath", SCHEMA_RELPATH],
        "verify_net_in_out": [py, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file", meta,
                              "--config_file", infer, "--device", "cpu"],
        "ckpt_export": [py, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts",
                        "--ckpt_file", "models/model.pt", "--meta_file", meta, "--config_file", infer],
    }  # fmt: skip


#: prefix of the line the check runner prints (to stdout and stderr) before each check
_MARK = "@@medfm-bundle-check "

#: runs the ``python -m monai.bundle ...`` commands given as ``{check: argv}`` (JSON, argv without the interpreter)
#: one after the other in this one interpreter, as ``python -m monai.bundle`` runs each; stops at the first failure
_RUN_CHECKS = f"""
import json, runpy, sys
for check, argv in json.loads(sys.argv[1]).items():
    print({_MARK!r} + check, flush=True)
    print({_MARK!r} + check, file=sys.stderr, flush=True)
    sys.argv = ["monai.bundle", *argv[2:]]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def verify_bundle(bundle_dir: str | os.PathLike, timeout: float = 600.0) -> None:
    """
    Run ``verify_metadata`` (offline, shipped schema), ``verify_net_in_out`` and ``ckpt_export`` (TorchScript
    ``models/model.ts``) on ``bundle_dir``, the ``python -m monai.bundle ...`` commands of
    :func:`bundle_check_commands` one after the other in one subprocess (one interpreter start instead of three),
    plus the model-zoo rule that ``version`` is listed in ``changelog``.

    Args:
        bundle_dir: bundle root (holding ``configs/``, ``models/``, ``docs/``).
        timeout: seconds allowed to each check. Defaults to 600.

    Raises:
        BundleCheckError: naming the failing check, with its output.
        FileNotFoundError: when the bundle lacks the schema file needed for the offline metadata check.
    """
    root = Path(bundle_dir)
    if importlib.util.find_spec("jsonschema") is None:
        raise BundleCheckError("verify_metadata", "MONAI's verify_metadata needs the `jsonschema` package; install it.")
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    if meta.get("version") not in meta.get("changelog", {}):
        raise BundleCheckError("changelog", f"version {meta.get('version')!r} is not a key of changelog.")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    commands = bundle_check_commands(root)
    argv = {check: cmd[1:] for check, cmd in commands.items()}  # ["-m", "monai.bundle", <command>, ...]
    try:
        res = subprocess.run(
            [sys.executable, "-c", _RUN_CHECKS, json.dumps(argv)], cwd=root, env=env, capture_output=True, text=True,
            timeout=timeout * len(commands), stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        out = f"{e.stdout or ''}{e.stderr or ''}"
        out = out.decode(errors="replace") if isinstance(out, bytes) else out
        raise BundleCheckError(_last_check(out, "verify_metadata"), f"timed out\n{out}") from e
    if res.returncode != 0:
        check = _last_check(res.stdout, "verify_metadata")
        raise BundleCheckError(check, f"exit code {res.returncode}\n{_since(res.stdout, check)}\n"
                                      f"{_since(res.stderr, check)}")  # fmt: skip
    if not (root / "models" / "model.ts").is_file():
        raise BundleCheckError("ckpt_export", "exited 0 but models/model.ts was not written.")


def _last_check(output: str, default: str) -> str:
    """The check the runner started last, by its marker line in ``output``."""
    started = [line[len(_MARK) :].strip() for line in output.splitlines() if line.startswith(_MARK)]
    return started[-1] if started else default


def _since(output: str, check: str) -> str:
    """What ``output`` holds from the marker of ``check`` on (the failing check's own output)."""
    marker = f"{_MARK}{check}\n"
    return output.split(marker, 1)[1] if marker in output else output
