# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Fixtures shared by the test modules: the EKS layer oracles, the tiny expert network, the tiny segmentation setting
(with a session-trained teacher) and the tiny site data set / expert bundle writers."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run as bundle_run

from medfm_ops.bundle import write_expert_bundle
from medfm_ops.networks import instantiate

REPO = Path(__file__).resolve().parents[1]


# --- EKS layers: float64 oracles (test_eks_conv.py, test_eks_conv_transpose.py) ---

def with_random_experts(layer: torch.nn.Module) -> torch.nn.Module:
    """Give every expert a non-zero ``B`` (they start at zero), so the experts really differ from ``W0``."""
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    return layer


def reference_kernel(layer: torch.nn.Module, t: int) -> torch.Tensor:
    """``W0 + (alpha / r_t) B_t A_t`` in the layer's stock kernel layout, written out independently of the layer."""
    r = layer.ranks[t]
    if r == 0:
        return layer.weight
    return layer.weight + (layer.lora_B[t] @ layer.lora_A[t]).reshape(layer.weight.shape) * (layer.alpha / r)


def assert_equals_loops(layer: torch.nn.Module, x: torch.Tensor, tasks: list[int], ref: Callable) -> None:
    """The layer's output on a mixed batch equals a per-sample and a per-task loop of ``ref(layer, x, kernel)``."""
    ids = torch.tensor(tasks)
    out = layer(x, ids)
    per_sample = torch.cat([ref(layer, x[b : b + 1], reference_kernel(layer, t)) for b, t in enumerate(tasks)])
    assert out.shape == per_sample.shape and (out - per_sample).abs().max().item() <= 1e-10
    per_task = torch.empty_like(out)
    for t in set(tasks):
        idx = (ids == t).nonzero().view(-1)
        per_task[idx] = ref(layer, x[idx], reference_kernel(layer, t))
    assert (out - per_task).abs().max().item() <= 1e-10


def assert_executions_agree(layer: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor) -> None:
    """Outputs and all gradients of the CPU grouped execution with channel padding (block 8), without it (block 0)
    and of the per-task execution are the same (float64, 1e-9)."""
    results = []
    for execution, block in (("grouped", 8), ("grouped", 0), ("per_task", 8)):
        layer.execution, layer.CPU_CHANNEL_BLOCK = execution, block
        xg = x.clone().requires_grad_()
        layer.zero_grad()
        out = layer(xg, ids)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        results.append([out, xg.grad, *(p.grad for p in layer.parameters() if p.grad is not None)])
    for other in results[1:]:
        assert len(other) == len(results[0])
        assert all(torch.allclose(a, b, rtol=0, atol=1e-9) for a, b in zip(results[0], other))


@pytest.fixture(scope="session")
def eks_oracle():
    """``with_random_experts(layer)``, ``reference_kernel(layer, t)``, ``assert_equals_loops(layer, x, tasks, ref)``,
    ``assert_executions_agree(layer, x, ids)``."""
    return types.SimpleNamespace(with_random_experts=with_random_experts, reference_kernel=reference_kernel,
                                 assert_equals_loops=assert_equals_loops,
                                 assert_executions_agree=assert_executions_agree)  # fmt: skip


# --- exported bundles run with MONAI only ---


@pytest.fixture(scope="session")
def without_medfm(tmp_path_factory) -> Path:
    """A folder for ``PYTHONPATH`` under which ``import medfm_ops`` fails: a subprocess run with it proves that an
    exported bundle needs no medfm code (its ``scripts/`` only)."""
    blocker = tmp_path_factory.mktemp("no_medfm")
    (blocker / "medfm_ops").mkdir()
    (blocker / "medfm_ops" / "__init__.py").write_text("raise ImportError('the exported bundle must not need medfm')")
    return blocker


#: runs a bundle's inference.json on several input folders in ONE process (one interpreter start instead of one per
#: folder) with MONAI's own ``run``; prints, per folder, the line the bundle's exception hook (scripts/errors.py)
#: prints last on failure, or null when the run succeeded
_INFER_EACH = """
import json, sys, traceback
from pathlib import Path
from monai.bundle import run
bundle, runs = Path(sys.argv[1]), json.loads(sys.argv[2])
sys.path.insert(0, str(bundle))
from scripts.errors import root_cause
last = {}
for name, (images, out) in runs.items():
    try:
        run(config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), dataset_dir=images,
            output_dir=out)
        last[name] = None
    except Exception as e:
        cause = root_cause(e)
        last[name] = "".join(traceback.format_exception_only(type(cause), cause)).strip()
print(json.dumps(last))
"""


def infer_each(bundle: Path, runs: dict[str, tuple[Path, Path]], pythonpath: Path | None = None) -> dict:
    """
    The exported ``bundle``'s inference.json on each ``{name: (input folder, output folder)}`` of ``runs``, in one
    subprocess (``pythonpath``, e.g. :func:`without_medfm`, replaces ``PYTHONPATH``). The exit code and the
    exception hook of the command line are checked elsewhere; this checks what each input makes the bundle say.

    Returns:
        ``{name: None}`` for a run that succeeded, else the error under MONAI's wrappers as the bundle's exception hook
        prints it (``"ValueError: image ...: ..."``).
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    res = subprocess.run([sys.executable, "-c", _INFER_EACH, str(bundle),
                          json.dumps({k: (str(i), str(o)) for k, (i, o) in runs.items()})],
                         env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0 and "terminate called" not in res.stderr, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def bundle_infer_each():
    """:func:`infer_each`: ``bundle_infer_each(bundle, {name: (images, out)}, pythonpath=None) -> {name: line}``."""
    return infer_each


# --- the tiny stock expert network (test_expert_bundle.py, test_monailabel.py) ---


@pytest.fixture(scope="session")
def tiny_expert():
    """``net_def`` (a stock MONAI UNet, 6 sigmoid outputs), ``channels`` (output channels of labels 1..3),
    ``spacing``, ``roi``."""
    net_def = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 6,
               "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1, "norm": "INSTANCE"}  # fmt: skip
    return types.SimpleNamespace(net_def=net_def, channels=[2, 3, 4], spacing=(2.0, 2.0, 2.0), roi=(32, 32, 32))


# --- the tiny segmentation setting and the session's trained teacher ---

#: command-line overrides of the tiny synthetic set (16^3 volumes, 4 cases per region, 4 regions); a data file that
#: the segmentation bundle tests read too
TINY = json.loads((REPO / "tests" / "configs" / "tiny_seg.json").read_text())


def copy_seg_bundles(root: Path) -> Path:
    """Copies of ``foundation_seg`` and ``lorkd_seg`` (configs, docs, licence; no models, eval or runs) in ``root``."""
    for name in ("foundation_seg", "lorkd_seg"):
        shutil.copytree(REPO / "bundles" / name, root / name, ignore=shutil.ignore_patterns("models", "eval", "runs"))
    return root


def train_teacher(root: Path) -> None:
    """Train ``root/foundation_seg`` for 2 epochs on the tiny set (data cached in ``root/cache``)."""
    bundle = root / "foundation_seg"
    bundle_run(config_file=str(bundle / "configs" / "train.json"), bundle_root=str(bundle),
               **{**TINY, "data_cache": str(root / "cache"), "epochs": 2, "val_interval": 1})


@pytest.fixture(scope="session")
def seg_bundles(tmp_path_factory):
    """Copies of foundation_seg and lorkd_seg with a teacher trained on the tiny set (data cache ``<root>/cache``),
    trained once per session. Tests write their own outputs elsewhere (``ckpt_dir``/``output_dir``/``eval_dir``
    overrides) or in ``lorkd_seg`` only through ``test_lorkd_bundle.py``'s module fixture."""
    root = copy_seg_bundles(tmp_path_factory.mktemp("seg_bundles"))
    train_teacher(root)
    return root


# --- a tiny MSD-style site data set and a tiny expert bundle (site fine-tuning, faults, MONAI Label) ---

UNET = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 5,
        "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1, "norm": "INSTANCE"}  # fmt: skip


def write_msd(root: Path, n: int = 6, labels=("Anterior", "Posterior"), spacing=(1.0, 1.0, 1.5)) -> Path:
    """A tiny MSD-style data set: two blobs (labels 1, 2) brighter than the background, ~20x24x20 voxels."""
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(n):
        shape = (18 + i % 3, 24, 20)
        z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        c = np.array(shape) / 2 + rng.uniform(-1.5, 1.5, 3)
        lab = np.zeros(shape, np.uint8)
        for k, dy in enumerate((-4, 4), start=1):
            lab[((z - c[0]) ** 2 + (y - c[1] - dy) ** 2 + (x - c[2]) ** 2) < 14] = k
        img = (lab.astype(np.float32) + rng.normal(0, 0.3, shape)).astype(np.float32)
        affine = np.diag([*spacing, 1.0])
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(img, affine), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(lab, affine), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels_json = {"0": "background", **{str(i): n for i, n in enumerate(labels, start=1)}}
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": labels_json, "training": training}))
    return root


def write_expert(root: Path, names=("ventricles", "posterior", "anterior"), channels=(1, 2, 4)) -> Path:
    torch.manual_seed(0)
    net = instantiate(copy.deepcopy(UNET))
    label_names = {i: n for i, n in enumerate(names, start=1)}
    return write_expert_bundle(
        root, UNET, net.state_dict(), "brain", label_names, list(channels), (1, 1, 1), (16, 16, 16), modality="MR"
    )


#: the settings of the session's site fine-tuning (:func:`site_run`)
SITE_SETTINGS = {"mode": "full", "epochs": 12, "batch_size": 2, "learning_rate": 0.01, "val_split": 0.25,
                 "device": "cpu", "progress": False}  # fmt: skip


@pytest.fixture(scope="session")
def site_run(tmp_path_factory):
    """A tiny expert bundle (:func:`write_expert`) fine-tuned by ``medfm_ops.finetune.finetune_expert`` on a tiny
    two-blob site (:func:`write_msd`, 8 cases) with :data:`SITE_SETTINGS` (verified: ``models/model.ts`` too), once
    per session (test_finetune.py checks it, test_monailabel.py serves a copy): ``{"root", "data", "expert", "out",
    "summary", "settings"}``. Tests leave ``out`` as they found it."""
    from medfm_ops.finetune import SiteFinetuneSettings, finetune_expert

    root = tmp_path_factory.mktemp("site")
    data = write_msd(root / "msd", n=8)
    expert = write_expert(root / "expert")
    out = root / "site_bundle"
    summary = finetune_expert(expert, data, out, SiteFinetuneSettings(**SITE_SETTINGS))
    return {"root": root, "data": data, "expert": expert, "out": out, "summary": summary,
            "settings": dict(SITE_SETTINGS)}  # fmt: skip


@pytest.fixture(scope="session")
def site_files():
    """``write_msd(root, n=6, labels=..., spacing=...)`` (a tiny MSD-style data set), ``write_expert(root, names=...,
    channels=...)`` (a tiny expert bundle of ``unet``), ``unet`` (its network config)."""
    return types.SimpleNamespace(write_msd=write_msd, write_expert=write_expert, unet=copy.deepcopy(UNET))


# --- made-up run records of the site-curve benchmark (test_site_study.py, test_site_shift.py) ---

_MACHINE = {"cpu_model": "cpu", "logical_cores": 2, "torch_threads": 1, "torch": "2", "monai": "1", "gpu": None,
            "load_average_1min": 1.0}  # fmt: skip


def curve_record(row: str, n_label: str, n_all: int, seed: int, dsc: float, **fields) -> dict:
    """One run record as ``benchmarks.site_curve`` saves it (every key its section writer reads), with made-up
    numbers: ``n_label`` "all" stands for ``n_all`` cases; NSD equals ``dsc``; ``fields`` replace any value."""
    record = {"row": row, "n": n_all if n_label == "all" else int(n_label), "n_label": n_label, "seed": seed,
              "epochs": 6, "val_interval": 3, "steps": 150, "dsc": dsc, "nsd": dsc, "dsc_before": None,
              "nsd_before": None, "per_class": {}, "best_epoch": 6, "trainable": 10, "total_params": 10,
              "model_mb": 1.0, "delta_mb": None, "head": "keep", "train_seconds": 60.0, "seconds": 90.0,
              "cpu_seconds": 80.0, "reused": False, "load_average_1min": 1.0, "machine": dict(_MACHINE),
              "bundle": "x"}  # fmt: skip
    return {**record, **fields}


@pytest.fixture(scope="session")
def fake_curve_record():
    """:func:`curve_record`: ``fake_curve_record(row, n_label, n_all, seed, dsc, **fields)``."""
    return curve_record
