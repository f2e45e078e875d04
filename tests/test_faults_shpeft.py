# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A run owns its outputs (issue 22, row 4): an SH-PEFT re-run with ``save_delta false`` and ``verify_export false``
leaves no earlier ``sparse_delta.pt`` or ``model.ts`` beside its new model, in ``models/`` or in the exported bundle,
and the export folder is ignored by git."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from test_shpeft_cls import RESNET, _pretrained, _run

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TASK = "blobs_mr"


def test_rerun_without_delta_and_verification_leaves_no_stale_file(tmp_path):
    bundle = tmp_path / "shpeft_cls"
    shutil.copytree(REPO / "bundles" / "shpeft_cls", bundle,
                    ignore=shutil.ignore_patterns("models", "eval", "runs", "export"))  # fmt: skip
    pre = _pretrained(tmp_path / "pretrained", RESNET)
    _run(bundle, "train.json", pretrained=str(pre), epochs=1, head_init="fresh", verify_export=True)
    models, export = bundle / "models", bundle / "export" / TASK
    assert (models / "sparse_delta.pt").is_file() and (export / "models" / "sparse_delta.pt").is_file()
    assert (export / "models" / "model.ts").is_file()
    (models / "model.ts").write_bytes(b"an older tool's TorchScript")  # a file no run of this bundle writes there
    first_model = (models / "model.pt").read_bytes()

    _run(bundle, "train.json", pretrained=str(pre), epochs=1, head_init="fresh", learning_rate=0.05, save_delta=False,
         verify_export=False)  # fmt: skip
    assert (models / "model.pt").read_bytes() != first_model  # a new model ...
    assert not (models / "sparse_delta.pt").exists() and not (models / "model.ts").exists()  # ... and nothing stale
    assert not (export / "models" / "sparse_delta.pt").exists() and not (export / "models" / "model.ts").exists()
    exported = torch.load(export / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(v, torch.load(models / "model.pt", weights_only=True)[k]) for k, v in exported.items())
    assert sorted(p.name for p in (bundle / "export").iterdir()) == [TASK]  # no staging folder or lock left

    ignored = subprocess.run(["git", "check-ignore", "-q", "bundles/shpeft_cls/export/blobs_mr/models/model.pt"],
                             cwd=REPO, capture_output=True)  # fmt: skip
    assert ignored.returncode == 0, "bundles/*/export/ must be ignored by git"
