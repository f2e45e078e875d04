# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Write a region expert as a standalone MONAI bundle (stock network + plain state dict, no medfm import)."""

from __future__ import annotations

import datetime
import shutil
import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfm_ops.utils.atomic_io import atomic_torch_save, atomic_write_text
from medfm_ops.utils.staging import staged_directory

from .bundle_scripts import write_bundle_scripts
from .template import TEMPLATE_DIR, render_configs
from .expert_readme import expert_readme
from .metadata_schema import SCHEMA_URL, write_metadata_schema

__all__ = ["write_expert_bundle", "write_metadata", "write_readme", "bundle_metadata", "version_metadata", "SCHEMA_RELPATH"]

SCHEMA_RELPATH = "docs/metadata_schema.json"

def version_metadata(version: str, change: str, required_packages: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The versioning entries every written bundle's ``metadata.json`` starts with: schema, version with its
    changelog entry, and the versions of MONAI, torch, numpy, nibabel, ignite (+ ``required_packages``)."""
    return {
        "schema": SCHEMA_URL,
        "version": version,
        "changelog": {version: change},
        "monai_version": _version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"nibabel": _version("nibabel"), "pytorch-ignite": _version("pytorch-ignite"),
                                      **dict(required_packages or {})},  # fmt: skip
    }


def bundle_metadata(
    version: str,
    change: str,
    name: str,
    task: str,
    description: str,
    authors: str,
    modality: str,
    spatial_shape: Sequence[int],
    is_patch_data: bool,
    pred: Mapping[str, Any],
    required_packages: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """
    The ``metadata.json`` body every bundle written here shares (segmentation experts and classifiers): versions and
    changelog (:func:`version_metadata`), names, copyright, intended use, the one-channel ``image`` input of
    ``spatial_shape`` (``hounsfield`` for CT, else ``magnitude``) and the given ``pred`` output description.
    """
    return {
        **version_metadata(version, change, required_packages),
        "name": name,
        "task": task,
        "description": description,
        "authors": authors,
        "copyright": f"Copyright (c) {datetime.date.today().year} {authors}",
        "data_type": "nibabel",
        "intended_use": "Research only; not for clinical use.",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield" if modality.upper() == "CT" else "magnitude",
                    "modality": modality,
                    "num_channels": 1,
                    "spatial_shape": [int(r) for r in spatial_shape],
                    "dtype": "float32",
                    "value_range": [None, None],
                    "is_patch_data": bool(is_patch_data),
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {"pred": dict(pred)},
        },
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _check_args(
    network_def: Mapping, label_names: Mapping[int, str], output_channels: Sequence[int], spacing, roi_size
) -> int:
    """Validate the arguments of :func:`write_expert_bundle`; returns the number of spatial dimensions."""
    if not isinstance(network_def, Mapping) or "_target_" not in network_def:
        raise ValueError("network_def must be a MONAI bundle config dict with a `_target_` key.")
    keys = sorted(int(k) for k in label_names)
    if keys != list(range(1, len(keys) + 1)):
        raise ValueError(f"label_names keys must be 1..n without gaps, got {keys}.")
    if any(not str(v).strip() or str(v).strip().lower() == "background" for v in label_names.values()):
        raise ValueError(f"label_names values must be non-empty and not 'background', got {dict(label_names)}.")
    if len(output_channels) != len(keys):
        raise ValueError(f"output_channels has {len(output_channels)} entries but label_names has {len(keys)}.")
    if len(set(output_channels)) != len(output_channels) or min(output_channels, default=0) < 0:
        raise ValueError(f"output_channels must be distinct non-negative indices, got {list(output_channels)}.")
    out_ch = network_def.get("out_channels")
    if isinstance(out_ch, int) and max(output_channels) >= out_ch:
        raise ValueError(f"output_channels {list(output_channels)} exceed the network's out_channels={out_ch}.")
    dims = network_def.get("spatial_dims", len(roi_size))
    if not isinstance(dims, int) or len(spacing) != dims or len(roi_size) != dims:
        raise ValueError(f"spacing {tuple(spacing)} and roi_size {tuple(roi_size)} need spatial_dims={dims} values.")
    if any(float(s) <= 0 for s in spacing) or any(int(r) <= 0 for r in roi_size):
        raise ValueError(f"spacing and roi_size must be positive, got {tuple(spacing)} and {tuple(roi_size)}.")
    return dims


def _plain_state_dict(state_dict: Mapping[str, Any], network_def: Mapping) -> dict[str, torch.Tensor]:
    """Detached CPU copy of ``state_dict`` (tensors only), checked to load strictly into ``network_def``."""
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"state_dict must hold tensors only (weights_only loading); non-tensor entries: {bad[:5]}.")
    plain = {str(k): v.detach().cpu().clone() for k, v in state_dict.items()}
    from monai.bundle import ConfigParser

    net = ConfigParser({"net": dict(network_def)}).get_parsed_content("net")
    net.load_state_dict(plain, strict=True)  # raises naming missing/unexpected keys or shape mismatches
    return plain


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=4) + "\n")


def _metadata(
    version, description, authors, region_name, label_names, output_channels, spacing, roi_size, modality, n_out, dtype,
    intensity_nonzero=False,
) -> dict:
    channel_def = {"0": "background", **{str(k): str(v) for k, v in sorted(label_names.items())}}
    n = len(label_names)
    names = [channel_def[str(i)] for i in range(1, n + 1)]
    pred = {
        "type": "image",
        "format": "segmentation",
        "num_channels": int(n_out),
        "spatial_shape": [int(r) for r in roi_size],
        "dtype": "float32",
        "value_range": [0, n],
        "is_patch_data": True,
        "channel_def": channel_def,
    }
    return {
        **bundle_metadata(
            version, f"{region_name} expert exported by medfm (stock MONAI network, fused weights)",
            f"medfm {region_name} expert", f"Segmentation of {n} {region_name} structure(s): {', '.join(names)}",
            description, authors, modality, roi_size, True, pred,
        ),  # fmt: skip
        "medfm": {
            "region": region_name,
            "output_channels": [int(c) for c in output_channels],
            "spacing": [float(s) for s in spacing],
            "roi_size": [int(r) for r in roi_size],
            "intensity": "zscore_nonzero" if intensity_nonzero else "zscore",
            "label_dtype": dtype,
            "label_rule": "argmax over [0, logits[output_channels]]: label i where its logit is the largest above 0",
        },
    }


def write_expert_bundle(
    out_dir: str | os.PathLike,
    network_def: dict,
    state_dict: Mapping[str, torch.Tensor],
    region_name: str,
    label_names: Mapping[int, str],
    output_channels: Sequence[int],
    spacing: Sequence[float],
    roi_size: Sequence[int],
    version: str = "0.1.0",
    description: str | None = None,
    authors: str = "medfm contributors",
    extra_metadata: Mapping[str, Any] | None = None,
    modality: str = "CT",
    config_values: Mapping[str, Mapping[str, Any]] | None = None,
    readme_extra: str = "",
    verify: bool = False,
    intensity_nonzero: bool = False,
) -> Path:
    """
    Write a region expert as a standalone MONAI bundle that needs only ``monai`` (no medfm code).

    The bundle is written as a whole (:func:`~medfm_ops.utils.staged_directory`): built in a hidden sibling of
    ``out_dir``, checked (``verify``), then swapped in; a failed, refused or killed writer leaves an earlier bundle
    at ``out_dir`` as it was, and a second writer of the same folder is refused while the first runs.

    Layout: ``configs/{metadata,inference,train,evaluate,train_lora}.json`` (from the JSON template in
    ``medfm_ops/bundle/templates/seg_expert``; ``train_lora.json`` needs medfm_ops), ``configs/logging.conf``,
    ``scripts/`` (the bundle-local loaders, input guard, finite-loss check, exception hook and atomic checkpoint saver
    the configs name:
    :func:`~medfm_ops.bundle.write_bundle_scripts`), ``models/model.pt`` (plain
    state dict, tensors only, written atomically), ``LICENSE``, ``docs/README.md`` and ``docs/metadata_schema.json``
    (for an offline ``verify_metadata``). The network outputs one sigmoid logit per class of the label union; the
    bundle's label map is ``argmax([0, logits[output_channels]])``, so label ``i`` corresponds to
    ``output_channels[i - 1]`` and ``label_names[i]``.

    Args:
        out_dir: bundle directory to create (parents created); an earlier bundle there is replaced as a whole.
        network_def: ``_target_`` config of a stock network, e.g. ``{"_target_": "monai.networks.nets.UNet",
            "spatial_dims": 3, "in_channels": 1, "out_channels": 12, ...}``.
        state_dict: weights for ``network_def``; must load with ``strict=True``. Tensors only.
        region_name: human-readable region, e.g. ``"abdomen"``.
        label_names: ``{1: "liver", 2: "spleen", ...}``; keys 1..n without gaps.
        output_channels: network output channels of labels 1..n, in order (length n).
        spacing: target voxel spacing in mm, one value per spatial dimension.
        roi_size: sliding-window patch size (and metadata ``spatial_shape``), one value per spatial dimension.
        version: bundle version, recorded in ``changelog``. Defaults to ``"0.1.0"``.
        description: metadata description. Defaults to a generated one naming region, labels and label rule.
        authors: metadata authors (also used in ``copyright``). Defaults to ``"medfm contributors"``.
        extra_metadata: keys merged into ``metadata.json`` last (e.g. ``changelog`` history, ``data_source``).
        modality: ``"CT"`` (input format ``hounsfield``) or an MR modality (``magnitude``). Defaults to ``"CT"``.
        config_values: literal settings per config file, e.g. ``{"train.json": {"epochs": 20, "learning_rate":
            1e-3}, "train_lora.json": {"lora_rank": 4}}`` (see :func:`~medfm_ops.bundle.render_configs`). Defaults
            to the template's.
        readme_extra: markdown appended to ``docs/README.md`` (e.g. a fine-tuning report). Defaults to none.
        verify: run MONAI's bundle checks (:func:`~medfm_ops.bundle.verify_bundle`, which also writes
            ``models/model.ts``) on the staged bundle before it replaces ``out_dir``. Defaults to False.
        intensity_nonzero: z-score over the non-zero voxels only (the region's ``intensity: zscore_nonzero``).
            Defaults to False (all voxels).

    Returns:
        The bundle directory.

    Raises:
        ValueError: when label names, output channels, spacing/roi_size or the state dict are inconsistent
            (the message names the argument), or the state dict does not load into ``network_def``.
        OutputWriteError: when the disk is full (one line naming the file); ``out_dir`` is untouched.
        OutputLockedError: when another running process writes ``out_dir``.
        FileExistsError: when ``out_dir`` is a non-empty folder that is not a bundle.

    Example::

        net_def = {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1,
                   "out_channels": 5, "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                   "num_res_units": 1, "norm": "INSTANCE"}
        write_expert_bundle("bundles/abdomen_expert", net_def, state_dict, "abdomen",
                            {1: "liver", 2: "spleen", 3: "kidney"}, [2, 3, 4], (1.5, 1.5, 1.5), (96, 96, 96))
    """
    dims = _check_args(network_def, label_names, output_channels, spacing, roi_size)
    label_names = {int(k): str(v).strip() for k, v in label_names.items()}
    plain = _plain_state_dict(state_dict, network_def)
    n = len(label_names)
    dtype = "uint8" if n < 256 else "int16"
    out_ch = network_def.get("out_channels", max(output_channels) + 1)
    if description is None:
        description = (
            f"{dims}D {region_name} region expert decomposed from a LoRKD teacher and exported as a stock MONAI "
            f"network. Input: one-channel image resampled to {tuple(float(s) for s in spacing)} mm and z-score "
            f"normalised per image. The network outputs {out_ch} sigmoid logits (label union); this bundle uses "
            f"channels {list(output_channels)} and writes a label map (0 background, 1..{n} as in channel_def)."
        )

    net_cfg = json.loads(json.dumps(dict(network_def)))  # plain JSON types
    meta = _metadata(
        version, description, authors, region_name, label_names, output_channels, spacing, roi_size, modality,
        out_ch, dtype, intensity_nonzero,
    )
    meta.update(dict(extra_metadata or {}))
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"extra_metadata changelog must list the bundle version {meta['version']!r}.")
    values = {
        "network_def": net_cfg,
        "output_channels": [int(c) for c in output_channels],
        "num_labels": n,
        "spacing": [float(s) for s in spacing],
        "roi_size": [int(r) for r in roi_size],
        "spatial_dims": dims,
        "axcodes": "RAS"[:dims],
        "label_dtype": dtype,
        "intensity_nonzero": bool(intensity_nonzero),
    }
    readme = expert_readme(dict(meta), net_cfg) + (f"\n{readme_extra.strip()}\n" if readme_extra.strip() else "")
    return write_bundle_folder(out_dir, render_configs(values, config_values), TEMPLATE_DIR, meta, readme, plain,
                               authors, verify)  # fmt: skip


def write_bundle_folder(
    out_dir: str | os.PathLike,
    configs: Mapping[str, Mapping[str, Any]],
    template_dir: Path,
    meta: Mapping[str, Any],
    readme: str,
    state_dict: Mapping[str, torch.Tensor],
    authors: str,
    verify: bool = False,
) -> Path:
    """
    Write a standalone bundle of any task kind as a whole (the one writer behind the segmentation expert, the
    classification and the fine-tuned bundles): staged beside ``out_dir``
    (:func:`~medfm_ops.utils.staged_directory`), ``configs/<name>`` for each rendered config plus the template's
    ``logging.conf``, ``scripts/`` (input guard, error report, atomic saver), ``configs/metadata.json``, the metadata
    schema (offline ``verify_metadata``), ``LICENSE``, ``docs/README.md`` and ``models/model.pt`` (plain state dict,
    atomically); checked (``verify``: MONAI's checks), then swapped in. A failed or killed writer leaves an earlier
    bundle there as it was.

    Raises:
        ValueError: when the metadata's changelog does not list its version.
        OutputWriteError: when the disk is full (one line naming the file); ``out_dir`` is untouched.
        OutputLockedError: when another running process writes ``out_dir``.
    """
    with staged_directory(out_dir) as root:
        for sub in ("configs", "models", "docs"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        for name, cfg in configs.items():
            _write_json(root / "configs" / name, cfg)
        shutil.copyfile(template_dir / "configs" / "logging.conf", root / "configs" / "logging.conf")
        write_bundle_scripts(root)
        write_metadata(root, meta)
        write_metadata_schema(root / SCHEMA_RELPATH)
        atomic_write_text(root / "LICENSE", _license_text(authors))
        atomic_write_text(root / "docs" / "README.md", readme)
        atomic_torch_save(dict(state_dict), root / "models" / "model.pt")
        if verify:
            from .verify import verify_bundle

            verify_bundle(root)
    return Path(out_dir)


def write_metadata(root: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write ``configs/metadata.json`` of bundle ``root`` atomically (the version must be listed in ``changelog``)."""
    if meta["version"] not in meta["changelog"]:
        raise ValueError(f"metadata changelog must list the bundle version {meta['version']!r}.")
    _write_json(Path(root) / "configs" / "metadata.json", dict(meta))


def write_readme(root: str | os.PathLike, meta: Mapping[str, Any], network_def: Mapping, extra: str = "") -> None:
    """Write ``docs/README.md`` of bundle ``root`` from its metadata, with ``extra`` markdown appended."""
    text = expert_readme(dict(meta), dict(network_def))
    atomic_write_text(Path(root) / "docs" / "README.md", text + (f"\n{extra.strip()}\n" if extra.strip() else ""))


def _license_text(authors: str) -> str:
    return (
        f"Copyright (c) {datetime.date.today().year} {authors}\n\n"
        'Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle\n'
        "except in compliance with the License. You may obtain a copy of the License at\n\n"
        "    http://www.apache.org/licenses/LICENSE-2.0\n\n"
        "Unless required by applicable law or agreed to in writing, software distributed under the License is\n"
        'distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.\n'
        "See the License for the specific language governing permissions and limitations under the License.\n"
    )
