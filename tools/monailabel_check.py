# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Check that a segmentation bundle serves in MONAI Label as it is written.

    python tools/monailabel_check.py check --bundle runs/site/heart_site --image case.nii.gz --work_dir /tmp/serve_check

Creates (or reuses) the MONAI Label environment (``tools/monailabel_env.sh``; minutes the first time), serves a copy
of the bundle with MONAI Label's stock ``monaibundle`` app on 127.0.0.1, sends ``--image`` to ``/infer`` and checks:
the server's label names are the bundle's classes (``configs/metadata.json``), the label map is on the input grid
(shape, affine), and it agrees voxel for voxel (>= 99.9 %) with the bundle's own ``configs/inference.json`` run
offline with ``python -m monai.bundle run``. Writes ``<work_dir>/report.json`` and exits 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fire

from medfm_ops.bundle.label_server import check_bundle_serves
from medfm_ops.utils.atomic_io import atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def label_environment(venv: str | os.PathLike | None = None) -> Path:
    """The MONAI Label environment's python (``tools/monailabel_env.sh``: created when missing, repaired when
    unhealthy, reused otherwise)."""
    venv = Path(venv or os.environ.get("MEDFM_LABEL_VENV", REPO / ".venv-label"))
    res = subprocess.run(["bash", str(REPO / "tools" / "monailabel_env.sh"), str(venv)], capture_output=True, text=True,
                         timeout=1800, stdin=subprocess.DEVNULL)  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"tools/monailabel_env.sh {venv} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return venv / "bin" / "python"


def check(bundle: str, image: str, work_dir: str = "runs/monailabel_check", name: str | None = None,
          label_venv: str | None = None) -> None:  # fmt: skip
    """
    Serve ``bundle`` in MONAI Label and check its answer on ``image``.

    Args:
        bundle: a segmentation bundle folder (e.g. a site fine-tuning's output or an exported expert).
        image: a NIfTI image of the bundle's region.
        work_dir: the app copy, the server log, both label maps and ``report.json``.
        name: the model name in the server. Defaults to the bundle folder's name.
        label_venv: the MONAI Label environment. Defaults to ``$MEDFM_LABEL_VENV`` or ``<repo>/.venv-label``.
    """
    for path, what in ((Path(bundle) / "configs" / "inference.json", "a bundle's configs/inference.json"),
                       (Path(image), "a NIfTI image")):  # fmt: skip
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (expected {what}).")
    report = check_bundle_serves(bundle, image, work_dir, label_environment(label_venv), name=name)
    atomic_write_json(Path(work_dir) / "report.json", report)
    print(json.dumps(report, indent=1), flush=True)
    print(f"{'PASSED' if report['passed'] else 'FAILED'}: {report['model']} served with labels "
          f"{report['server_labels']}, agreement with the offline inference.json {report['agreement']:.4f}; "
          f"report: {Path(work_dir) / 'report.json'}", flush=True)
    if not report["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire({"check": check})
