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
The site bundle is fine-tuned here on tiny two-blob volumes until its own inference finds both structures; the check
of ``tools/monailabel_check.py`` (``medfm_ops.bundle.label_server``, its own server) must pass on one of its
validation images: the site label names, the input grid, the offline ``monai.bundle run`` result.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet


from medfm_ops.bundle import write_expert_bundle
from medfm_ops.bundle.label_server import (
    LabelServer,
    bundle_label_names,
    check_bundle_serves,
    offline_bundle_inference,
    stock_label_app,
)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
LABEL_VENV = Path(os.environ.get("MEDFM_LABEL_VENV", REPO / ".venv-label"))
NAME = "abdomen_expert"
SITE_NAME = "site_expert"
LABELS = {1: "liver", 2: "spleen", 3: "kidney"}
AFFINE = np.array([[-1.5, 0, 0, 10.0], [0, 0, 1.2, -5.0], [0, -2.5, 0, 3.0], [0, 0, 0, 1]])
SHAPE = (40, 33, 27)


@pytest.fixture(scope="module")
def label_python() -> Path:
    """The MONAI Label environment's python, created with tools/monailabel_env.sh when missing or unhealthy."""
    return runpy.run_path(str(REPO / "tools" / "monailabel_check.py"))["label_environment"](LABEL_VENV)


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


def _offline(bundle: Path, image: Path, out_dir: Path) -> np.ndarray:
    """The bundle's inference.json under stock ``python -m monai.bundle run`` in this (main) environment."""
    return np.asarray(nib.load(offline_bundle_inference(bundle, image, out_dir)).dataobj)


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
    oracle = _offline(bundle, case, root / "oracle")

    # a site bundle: a tiny expert fine-tuned on two-blob volumes by medfm's site fine-tuning (the session's run)
    shutil.copytree(site_run["out"], root / "bundle" / SITE_NAME)
    site = site_run["summary"]
    site_case = Path(site["after"]["cases"][0]["label"].replace("labelsTr", "imagesTr"))
    site_oracle = _offline(root / "bundle" / SITE_NAME, site_case, root / "site_oracle")

    app = stock_label_app(label_python, root / "apps")  # shipped inside the monailabel package: offline
    shutil.copytree(bundle, app / "model" / NAME)  # training writes into the bundle: serve a copy

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
    with LabelServer(label_python, setup["app"], [NAME], setup["studies"], setup["root"] / "server.log") as srv:
        yield srv


def test_server_lists_expert(server):
    model = server.info["models"][NAME]
    assert model["type"] == "segmentation"
    assert model["labels"] == {v.lower(): k for k, v in LABELS.items()}
    assert NAME in server.info["trainers"]


def _infer(server: LabelServer, model: str, image: Path, out: Path) -> nib.Nifti1Image:
    """POST ``image`` to the server's ``/infer/<model>`` and return the label volume it sends back."""
    return nib.load(server.infer(model, image, out))


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
    server.request(f"/train/{NAME}?run_sync=true", json.dumps(req).encode(),
             {"Content-Type": "application/json"}, timeout=600)  # fmt: skip
    after = torch.load(weights, weights_only=True)  # still a plain, tensors-only state dict
    assert after.keys() == before.keys()
    assert any(not torch.equal(after[k], before[k]) for k in after), server.log_tail(3000)


def test_serves_site_finetuned_bundle(setup, label_python, tmp_path):
    """The bundle written by site fine-tuning is served unchanged (``tools/monailabel_check.py``'s check, its own
    server): the site's label names, on the input grid, the same result as offline."""
    oracle = setup["site_oracle"]
    assert set(np.unique(oracle)) == {0, 1, 2}  # the fine-tuned bundle finds both structures offline
    bundle = setup["root"] / "bundle" / SITE_NAME
    assert bundle_label_names(bundle) == {"anterior": 1, "posterior": 2}
    report = check_bundle_serves(bundle, setup["site_case"], tmp_path / "check", label_python, name=SITE_NAME)
    assert report["server_labels"] == {"anterior": 1, "posterior": 2} and report["labels_match"]
    assert report["shape"] == list(oracle.shape) and report["affine_match"]
    assert report["labels_present"] == [0, 1, 2] and report["agreement"] >= 0.999 and report["passed"], report
    served = np.asarray(nib.load(tmp_path / "check" / "served_seg.nii.gz").dataobj)
    assert float((served == oracle).mean()) >= 0.999  # the check's own offline run agrees with this module's oracle
