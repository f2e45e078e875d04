# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""write_expert_bundle: MONAI's own checks (offline), bundle inference on NIfTI, weights round trip, fine-tuning."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from medfm_ops.bundle import BUNDLE_SCRIPTS, BundleCheckError, verify_bundle, write_expert_bundle

LABELS = {1: "liver", 2: "spleen", 3: "left kidney"}


def _net(tiny_expert) -> UNet:
    torch.manual_seed(0)
    return UNet(**{k: v for k, v in tiny_expert.net_def.items() if k != "_target_"})


def _write(tiny_expert, out: Path) -> Path:
    """The tiny expert written as a bundle in ``out`` (region "abdomen", three labels)."""
    return write_expert_bundle(out, tiny_expert.net_def, _net(tiny_expert).state_dict(), "abdomen", LABELS,
                               tiny_expert.channels, tiny_expert.spacing, tiny_expert.roi)  # fmt: skip


def _run_bundle(bundle: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", *args, "--bundle_root", "."],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def bundle(tiny_expert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "abdomen_expert"
    return _write(tiny_expert, out)


def test_layout_and_metadata(tiny_expert, bundle):
    for rel in ("LICENSE", "configs/metadata.json", "configs/inference.json", "configs/train.json",
                "configs/logging.conf", "docs/README.md", "docs/metadata_schema.json", "models/model.pt"):
        assert (bundle / rel).is_file(), rel  # fmt: skip
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == tiny_expert.net_def["out_channels"]
    assert pred["channel_def"] == {"0": "background", "1": "liver", "2": "spleen", "3": "left kidney"}
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == list(tiny_expert.roi)
    text = (bundle / "configs/inference.json").read_text()
    assert "_meta_" not in text and "medfm" not in text  # standalone: stock MONAI only, no metadata references
    assert not list(bundle.glob("models/.*.tmp"))  # atomic write left no temp file


def test_monai_checks_offline(tiny_expert, bundle):
    """verify_metadata (shipped schema, no download), verify_net_in_out and ckpt_export (TorchScript)."""
    verify_bundle(bundle)
    ts = torch.jit.load(str(bundle / "models/model.ts"))
    x = torch.rand(1, 1, *tiny_expert.roi)
    torch.testing.assert_close(ts(x), _net(tiny_expert).eval()(x))


def test_verify_metadata_uses_schema(tiny_expert, tmp_path):
    bad = _write(tiny_expert, tmp_path / "b")
    meta = json.loads((bad / "configs/metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["dtype"]
    (bad / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleCheckError) as err:
        verify_bundle(bad)
    assert err.value.check == "verify_metadata" and "dtype" in err.value.output


def test_failing_later_check_is_named(tiny_expert, tmp_path):
    """The checks run one after the other in one process: a failure of the last one (weights that do not fit the
    network) is reported as that check, with its own output, and no TorchScript file is left."""
    bad = _write(tiny_expert, tmp_path / "b")
    torch.save({"model.0.conv.weight": torch.zeros(1)}, bad / "models" / "model.pt")
    with pytest.raises(BundleCheckError) as err:
        verify_bundle(bad)
    assert err.value.check == "ckpt_export", err.value.output[-2000:]
    assert "model.0.conv.weight" in err.value.output and "verify_metadata" not in err.value.output
    assert not (bad / "models" / "model.ts").exists()


def test_state_dict_round_trip(tiny_expert, bundle):
    sd = torch.load(bundle / "models/model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    fresh = UNet(**{k: v for k, v in tiny_expert.net_def.items() if k != "_target_"})
    fresh.load_state_dict(sd, strict=True)
    x = torch.rand(1, 1, *tiny_expert.roi)
    torch.testing.assert_close(fresh.eval()(x), _net(tiny_expert).eval()(x))


def _volume(shape, seed=0) -> np.ndarray:
    img = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    img[4:20, 6:22, 3:18] += 4.0
    return img


@pytest.mark.parametrize(
    "affine",
    [
        # permuted and flipped axes, spacing != bundle spacing: exercises Orientationd, Spacingd and Invertd
        np.array([[-1.5, 0, 0, 10.0], [0, 0, 1.2, -5.0], [0, -2.5, 0, 3.0], [0, 0, 0, 1]]),
        np.diag([2.0, 2.0, 2.0, 1.0]),
    ],
    ids=["permuted", "identity-grid"],
)
def test_inference_run_keeps_affine_and_shape(tiny_expert, bundle, tmp_path, affine):
    shape = (40, 33, 27) if affine[0, 0] < 0 else tiny_expert.roi
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(_volume(shape), affine), tmp_path / "in" / "case.nii.gz")
    _run_bundle(bundle, "--config_file", "configs/inference.json", "--dataset_dir", str(tmp_path / "in"),
                "--output_dir", str(tmp_path / "out"))  # fmt: skip
    out = nib.load(tmp_path / "out" / "case_seg.nii.gz")
    seg = np.asarray(out.dataobj)
    assert seg.shape == shape and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    assert set(np.unique(seg)) <= set(range(len(LABELS) + 1))
    if affine[0, 0] > 0:
        # RAS grid at the bundle spacing, one window: the label rule can be computed directly
        img = torch.from_numpy(_volume(shape))
        img = (img - img.mean()) / img.std(unbiased=False)
        with torch.no_grad():
            logits = _net(tiny_expert).eval()(img[None, None])[0]
        expected = torch.cat([torch.zeros_like(logits[:1]), logits[tiny_expert.channels]]).argmax(0).numpy()
        assert (seg == expected).mean() > 0.999


def _msd(root: Path, n: int = 5) -> Path:
    """A tiny MSD-style folder (dataset.json, imagesTr/, labelsTr/) with labels 1 and 3 of the abdomen expert."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    items = []
    for i in range(n):
        lab = np.zeros((36, 36, 30), np.uint8)
        lab[5:15, 5:15, 5:15], lab[20:30, 18:30, 12:24] = 1, 3
        img = _volume(lab.shape, seed=i) + 3.0 * lab
        nib.save(nib.Nifti1Image(img, np.diag([2.0, 2.0, 2.0, 1.0])), root / "imagesTr" / f"c{i}.nii.gz")
        nib.save(nib.Nifti1Image(lab, np.diag([2.0, 2.0, 2.0, 1.0])), root / "labelsTr" / f"c{i}.nii.gz")
        items.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    labels = {"0": "background", **{str(k): v for k, v in LABELS.items()}}
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": labels, "training": items}))
    return root


def test_train_config_fine_tunes(tiny_expert, tmp_path):
    """train.json runs as written (what MONAI Label runs) and saves a plain state dict to models/model.pt."""
    data = _msd(tmp_path / "data")
    work = tmp_path / "bundle"
    _write(tiny_expert, work)
    before = torch.load(work / "models/model.pt", weights_only=True)
    res = _run_bundle(work, "--config_file", "configs/train.json", "--dataset_dir", str(data), "--epochs", "1",
                      "--weight_decay", "0.0")  # fmt: skip
    assert "val_mean_dice" in res.stdout + res.stderr
    after = torch.load(work / "models/model.pt", weights_only=True)
    assert after.keys() == before.keys()
    changed = [k for k in after if not torch.equal(after[k], before[k])]
    assert changed
    head = "model.2.1.conv.unit0.conv.bias"  # final conv: only region channels get gradient
    untouched = [c for c in range(tiny_expert.net_def["out_channels"]) if c not in tiny_expert.channels]
    assert torch.equal(after[head][untouched], before[head][untouched])  # no weight decay: exactly unchanged
    assert not torch.equal(after[head][tiny_expert.channels], before[head][tiny_expert.channels])

    # evaluate.json: a difference-only override of train.json that scores models/model.pt on the validation split
    res = _run_bundle(work, "--config_file", "['configs/train.json','configs/evaluate.json']", "--dataset_dir",
                      str(data), "--output_dir", str(tmp_path / "eval"))  # fmt: skip
    assert (tmp_path / "eval" / "val_mean_dice_raw.csv").is_file(), res.stdout[-2000:]


def test_train_config_on_a_full_disk_keeps_the_previous_model(tiny_expert, tmp_path, without_medfm):
    """Issue 22, disk full while the exported bundle trains directly (`monai.bundle run --config_file
    .../train.json --bundle_root <bundle>`, stock MONAI, medfm unimportable; MONAI Label's /train runs the same
    config): the bundle-local saver (scripts/atomic_checkpoint.py, the package's module byte for byte) fails the
    write of models/model.pt with exit 1 and a last line naming the file, the previous model.pt byte-identical and no
    temporary file left. The disk fills up through a file size limit (``ulimit -f``; Python ignores SIGXFSZ, so the
    write fails with EFBIG as it would with ENOSPC): one iteration, then the first validation saves."""
    data = _msd(tmp_path / "data", n=2)
    work = _write(tiny_expert, tmp_path / "bundle")
    for name, source in BUNDLE_SCRIPTS.items():
        assert (work / "scripts" / name).read_bytes() == source.read_bytes(), name
    model = work / "models" / "model.pt"
    before = model.read_bytes()
    limit = len(before) // 2  # the model does not fit; the run writes nothing else

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(work / "configs" / "train.json"),
         "--bundle_root", str(work), "--dataset_dir", str(data), "--epochs", "1", "--val_split", "0.5",
         "--batch_size", "1", "--device", "$torch.device('cpu')"],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(without_medfm), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"),
        capture_output=True, text=True, timeout=300, preexec_fn=full_disk,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR (cause of the failure above): "), last
    assert last.endswith(f"OutputWriteError: file size limit exceeded (ulimit -f) while writing {model}; the previous "
                         "model.pt is intact"), last  # fmt: skip
    assert "val_mean_dice" in res.stdout + res.stderr  # it got as far as the first validation
    assert model.read_bytes() == before
    assert sorted(p.name for p in model.parent.iterdir()) == ["model.pt"]


def test_lora_override_writes_a_stock_model(tiny_expert, tmp_path):
    """train.json + train_lora.json: adapters train, and finalize fuses them into a stock models/model.pt."""
    data = _msd(tmp_path / "data")
    work = tmp_path / "bundle"
    _write(tiny_expert, work)
    before = torch.load(work / "models/model.pt", weights_only=True)
    _run_bundle(work, "--config_file", "['configs/train.json','configs/train_lora.json']", "--dataset_dir",
                str(data), "--epochs", "1", "--lora_rank", "2", "--learning_rate", "0.05")  # fmt: skip
    after = torch.load(work / "models/model.pt", weights_only=True)
    assert after.keys() == before.keys()  # stock keys: the adapters were fused
    assert any(not torch.equal(after[k], before[k]) for k in after if k.endswith("conv.weight"))
    norm = [k for k in after if ".adn.N." in k or k.endswith("bias")]  # frozen: no adapter on norms/biases
    assert all(torch.equal(after[k], before[k]) for k in norm)
    assert (work / "models" / "lora_adapter.pt").is_file()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"label_names": {1: "a", 3: "b"}, "output_channels": [2, 3]}, "1..n"),
        ({"output_channels": [2, 3]}, "output_channels has 2"),
        ({"output_channels": [2, 3, 6]}, "out_channels=6"),
        ({"output_channels": [2, 2, 3]}, "distinct"),
        ({"spacing": (1.0, 1.0)}, "spatial_dims=3"),
        ({"label_names": {1: "background", 2: "b", 3: "c"}}, "background"),
        ({"network_def": {"spatial_dims": 3}}, "_target_"),
        ({"state_dict": {"x": 1}}, "tensors only"),
        ({"state_dict": {"model.0.conv.weight": torch.zeros(1)}}, "state_dict|Missing|size"),
        ({"extra_metadata": {"changelog": {"0.0.1": "old"}}}, "changelog"),
    ],
)
def test_argument_errors(tiny_expert, tmp_path, change, match):
    args = dict(network_def=tiny_expert.net_def, state_dict=_net(tiny_expert).state_dict(), region_name="abdomen",
                label_names=LABELS, output_channels=tiny_expert.channels, spacing=tiny_expert.spacing,
                roi_size=tiny_expert.roi)  # fmt: skip
    args.update(change)
    with pytest.raises((ValueError, RuntimeError), match=match):
        write_expert_bundle(tmp_path / "b", **args)


def test_cli_write(tiny_expert, tmp_path):
    """tools/export_expert_bundle.py write: network config under `network_def`, state dict file, label list."""
    (tmp_path / "net.json").write_text(json.dumps({"network_def": tiny_expert.net_def}))
    torch.save(_net(tiny_expert).state_dict(), tmp_path / "sd.pt")
    res = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "export_expert_bundle.py"), "write",
         "--network_config", str(tmp_path / "net.json"), "--state_dict", str(tmp_path / "sd.pt"),
         "--out_dir", str(tmp_path / "b"), "--region_name", "abdomen", "--label_names", "[liver,spleen,kidney]",
         "--output_channels", "[2,3,4]", "--spacing", "[2,2,2]", "--roi_size", "[32,32,32]"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"]["3"] == "kidney"
    assert meta["medfm"]["output_channels"] == tiny_expert.channels
    sd = torch.load(tmp_path / "b" / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in _net(tiny_expert).state_dict().items())


def test_sparse_override_trains_the_budget_only(tiny_expert, tmp_path):
    """train.json + train_sparse.json as written: importance on the training loader, 1% budget, AdamW with weight
    decay; frozen weights keep their bits, models/model.pt is stock and models/sparse_delta.pt rebuilds it."""
    from medfm_ops.peft import apply_sparse_delta, budget_count

    data = _msd(tmp_path / "data")
    work = tmp_path / "bundle"
    _write(tiny_expert, work)
    before = torch.load(work / "models/model.pt", weights_only=True)
    _run_bundle(work, "--config_file", "['configs/train.json','configs/train_sparse.json']", "--dataset_dir",
                str(data), "--epochs", "1", "--sparse_budget", "0.02", "--learning_rate", "0.05",
                "--weight_decay", "0.1")  # fmt: skip
    after = torch.load(work / "models/model.pt", weights_only=True)
    delta = torch.load(work / "models/sparse_delta.pt", weights_only=True)
    assert after.keys() == before.keys()
    changed = sum(int((after[k] != before[k]).sum()) for k in after)
    total = sum(p.numel() for p in _net(tiny_expert).parameters())
    assert 0 < changed <= budget_count(0.02, total) and delta["num_changed"] == changed
    merged = apply_sparse_delta(before, delta)
    assert all(torch.equal(merged[k], after[k]) for k in after)
