# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""A real MONAI Label 0.8.5 server serves and fine-tunes an expert bundle written by write_expert_bundle, and
serves, unchanged, a bundle written by site fine-tuning (``medfm_ops.finetune.finetune_expert``).

The server runs from its own environment (``tools/monailabel_env.sh``, default ``<repo>/.venv-label``, created on
first use: minutes). It is started on 127.0.0.1 with a free port, every request is bounded in time, and the server is
stopped (terminate, then kill its process group) whatever the outcome.

What the checks mean with random weights: there is no anatomy to find, so "non-empty" alone would test nothing.
Instead the final-layer bias of each region channel is shifted (an exact, checked shift of that channel's logits)
so that each channel is positive on about 30 % of the voxels of the test volume, making every label 1..n occur.
The oracle is the same bundle run offline with ``python -m monai.bundle run`` (stock MONAI, main environment): the
server's label volume must have the input's shape and affine, values in {0..n}, every label present, and agree with
the offline result voxel for voxel (>= 99.9 %; the two environments run the same MONAI/torch versions).
The site bundle is fine-tuned here on tiny two-blob volumes until its own inference finds both structures; the
server's answer on one of its validation images must match that bundle's offline ``monai.bundle run`` the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet


from medfm_ops.bundle import write_expert_bundle

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LABEL_VENV = Path(os.environ.get("MEDFM_LABEL_VENV", REPO / ".venv-label"))
NAME = "abdomen_expert"
SITE_NAME = "site_expert"
LABELS = {1: "liver", 2: "spleen", 3: "kidney"}
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, 0, 1.2, -5.0], [0, -2.5, 0, 3.0], [0, 0, 0, 1]])
SHAPE = (40, 33, 27)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 30) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (loopback only)
        return resp.read()


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, p in files.items():
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{p.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        )
        parts.append(head.encode() + p.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def label_python() -> Path:
    """The MONAI Label environment's python, created with tools/monailabel_env.sh when missing or unhealthy."""
    res = subprocess.run(
        ["bash", str(REPO / "tools" / "monailabel_env.sh"), str(LABEL_VENV)],
        capture_output=True,
        text=True,
        timeout=1800,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode == 0, f"monailabel_env.sh failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return LABEL_VENV / "bin" / "python"


def _calibrated_state_dict(tiny_expert, image: np.ndarray) -> dict[str, torch.Tensor]:
    """Random UNet whose final bias puts each region channel above 0 on ~30 % of the preprocessed test volume."""
    torch.manual_seed(0)
    net = UNet(**{k: v for k, v in tiny_expert.net_def.items() if k != "_target_"}).eval()
    # the bundle's preprocessing for this volume: orientation/spacing change the grid, the logits' quantiles barely
    # depend on it; the intensity normalisation is what matters for the scale of the logits
    x = torch.from_numpy((image - image.mean()) / image.std())[None, None].float()
    with torch.no_grad():
        before = sliding_window_inference(x, tiny_expert.roi, 1, net, overlap=0.25, mode="gaussian")[0]
    sd = net.state_dict()
    head = [k for k, v in sd.items() if k.endswith("bias") and v.shape == (tiny_expert.net_def["out_channels"],)][-1]
    shift = torch.zeros(tiny_expert.net_def["out_channels"])
    for c in tiny_expert.channels:
        shift[c] = -torch.quantile(before[c].flatten(), 0.7)
    sd[head] = sd[head] + shift
    net.load_state_dict(sd)
    with torch.no_grad():
        after = sliding_window_inference(x, tiny_expert.roi, 1, net, overlap=0.25, mode="gaussian")[0]
    # the shift is exact (last layer is a plain conv added to an identity residual): checked, not assumed
    torch.testing.assert_close(after, before + shift[:, None, None, None], atol=1e-4, rtol=1e-4)
    return sd


def _offline(bundle: Path, images_dir: Path, out_dir: Path, name: str) -> np.ndarray:
    """The bundle's inference.json under stock ``python -m monai.bundle run`` in this (main) environment."""
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--bundle_root", ".",
         "--dataset_dir", str(images_dir), "--output_dir", str(out_dir)],
        cwd=bundle, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return np.asarray(nib.load(out_dir / name.replace(".nii.gz", "_seg.nii.gz")).dataobj)


@pytest.fixture(scope="module")
def setup(site_run, tiny_expert, tmp_path_factory, label_python):
    root = tmp_path_factory.mktemp("monailabel")
    rng = np.random.default_rng(0)
    image = rng.normal(size=SHAPE).astype(np.float32)
    image[10:30, 10:25, 5:20] += 3.0
    case = root / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, AFFINE), case)

    bundle = write_expert_bundle(
        root / "bundle" / NAME, tiny_expert.net_def, _calibrated_state_dict(tiny_expert, image), "abdomen", LABELS,
        tiny_expert.channels, tiny_expert.spacing, tiny_expert.roi,
    )
    # oracle: the same bundle offline, stock monai.bundle run in this (main) environment
    (root / "in").mkdir()
    shutil.copy(case, root / "in" / case.name)
    oracle = _offline(bundle, root / "in", root / "oracle", case.name)

    # a site bundle: a tiny expert fine-tuned on two-blob volumes by medfm's site fine-tuning (the session's run)
    shutil.copytree(site_run["out"], root / "bundle" / SITE_NAME)
    site = site_run["summary"]
    site_case = Path(site["after"]["cases"][0]["label"].replace("labelsTr", "imagesTr"))
    (root / "site_in").mkdir()
    shutil.copy(site_case, root / "site_in" / site_case.name)
    site_oracle = _offline(root / "bundle" / SITE_NAME, root / "site_in", root / "site_oracle", site_case.name)

    # the stock sample app ships inside the monailabel package: copy it out (offline)
    res = subprocess.run(
        [str(label_python), "-m", "monailabel.main", "apps", "--download", "--name", "monaibundle", "--output",
         str(root / "apps")],
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    app = root / "apps" / "monaibundle"
    assert (app / "main.py").is_file(), res.stdout[-2000:] + res.stderr[-2000:]
    shutil.copytree(bundle, app / "model" / NAME)  # training writes into the bundle: serve a copy
    shutil.copytree(root / "bundle" / SITE_NAME, app / "model" / SITE_NAME)  # as written, unchanged

    # studies with annotations, for fine-tuning through the server
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    grid = np.diag([2.0, 2.0, 2.0, 1.0])
    for i in range(3):
        lab = np.zeros((36, 36, 30), np.uint8)
        lab[6:18, 6:18, 5:15], lab[22:30, 20:32, 15:25] = 1, 3
        img = rng.normal(size=lab.shape).astype(np.float32) + 3.0 * lab
        nib.save(nib.Nifti1Image(img, grid), studies / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, grid), studies / "labels" / "final" / f"img{i}.nii.gz")
    return {"root": root, "case": case, "oracle": oracle, "app": app, "studies": studies, "site_case": site_case,
            "site_oracle": site_oracle, "site_labels": site["after"]["table"]}  # fmt: skip


@pytest.fixture(scope="module")
def server(setup, label_python):
    port = _free_port()
    log_path = setup["root"] / "server.log"
    cmd = [str(label_python), "-m", "monailabel.main", "start_server", "--app", str(setup["app"]),
           "--studies", str(setup["studies"]), "--conf", "models", f"{NAME},{SITE_NAME}", "--conf", "zoo_source", "local",
           "--conf", "sam2", "false", "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    env = dict(os.environ, MONAI_LABEL_DATASTORE_AUTO_RELOAD="false", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        info = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                info = json.loads(_request(f"{base}/info/", timeout=5))
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1.0)
        if info is None:
            pytest.fail(f"server not ready in 240 s:\n{log_path.read_text()[-4000:]}")
        yield {"base": base, "info": info, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this fixture started (start_new_session)
            proc.wait(timeout=30)


def test_server_lists_expert(server):
    model = server["info"]["models"][NAME]
    assert model["type"] == "segmentation"
    assert model["labels"] == {v.lower(): k for k, v in LABELS.items()}
    assert NAME in server["info"]["trainers"]


def _infer(server: dict, model: str, image: Path, out: Path) -> nib.Nifti1Image:
    """POST ``image`` to the server's ``/infer/<model>`` and return the label volume it sends back."""
    body, ctype = _multipart({"params": json.dumps({"device": "cpu"})}, {"file": image})
    try:
        data = _request(f"{server['base']}/infer/{model}?output=image", body, {"Content-Type": ctype}, timeout=300)
    except urllib.error.HTTPError as e:
        pytest.fail(f"infer failed ({e.code}):\n{server['log'].read_text()[-4000:]}")
    out.write_bytes(data)
    return nib.load(out)


def test_infer_returns_label_volume(server, setup, tmp_path):
    pred = _infer(server, NAME, setup["case"], tmp_path / "pred.nii.gz")
    seg = np.asarray(pred.dataobj)
    assert seg.shape == SHAPE
    np.testing.assert_allclose(pred.affine, AFFINE, atol=1e-5)
    assert set(np.unique(seg)) <= set(range(len(LABELS) + 1))
    assert set(np.unique(setup["oracle"])) == set(range(len(LABELS) + 1))  # calibration made every label occur
    assert set(np.unique(seg)) == set(range(len(LABELS) + 1))
    agreement = float((seg == setup["oracle"]).mean())
    assert agreement >= 0.999, f"server vs offline bundle agreement {agreement:.4f}"


def test_finetune_through_server(server, setup):
    """MONAI Label's bundle trainer runs train.json on the studies' final labels and rewrites models/model.pt."""
    weights = setup["app"] / "model" / NAME / "models" / "model.pt"
    before = torch.load(weights, weights_only=True)
    req = {"max_epochs": 1, "device": "cpu", "val_split": 0.34, "multi_gpu": False}
    _request(f"{server['base']}/train/{NAME}?run_sync=true", json.dumps(req).encode(),
             {"Content-Type": "application/json"}, timeout=600)  # fmt: skip
    after = torch.load(weights, weights_only=True)  # still a plain, tensors-only state dict
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after), server["log"].read_text()[-3000:]


def test_serves_site_finetuned_bundle(server, setup, tmp_path):
    """The bundle written by site fine-tuning is served unchanged: site label names, same result as offline."""
    model = server["info"]["models"][SITE_NAME]
    assert model["labels"] == {"anterior": 1, "posterior": 2}
    oracle = setup["site_oracle"]
    assert set(np.unique(oracle)) == {0, 1, 2}  # the fine-tuned bundle finds both structures offline
    pred = _infer(server, SITE_NAME, setup["site_case"], tmp_path / "site_pred.nii.gz")
    seg = np.asarray(pred.dataobj)
    assert seg.shape == oracle.shape
    np.testing.assert_allclose(pred.affine, nib.load(setup["site_case"]).affine, atol=1e-5)
    agreement = float((seg == oracle).mean())
    assert agreement >= 0.999, f"server vs offline site bundle agreement {agreement:.4f}"
