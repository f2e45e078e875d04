# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
Deterministic synthetic multi-region 3D segmentation data set (the embedded default of the segmentation bundles).

Four regions by default (see :py:data:`~medfm_ops.data.synthetic_regions.SYNTHETIC_REGIONS`), each with its own
labelled structures, intensity statistics (CT in HU, MR in arbitrary units with a bias field and Rician noise),
shape priors and voxel spacing:

=============  =========================================================  ===============  ========
region         labels (region-local 1..n)                                 spacing (mm)     modality
=============  =========================================================  ===============  ========
brain_mri      ventricles, hippocampus_left, hippocampus_right            1.0 x 1.0 x 1.0  MR (T1)
thorax_ct      lung_left, lung_right, heart                               1.5 x 1.5 x 2.5  CT
abdomen_ct     liver, spleen, kidney_left, kidney_right                   1.2 x 1.2 x 2.0  CT
pelvis_mr      bladder, prostate                                          1.0 x 1.0 x 3.0  MR (T2)
=============  =========================================================  ===============  ========

``abdomen_ct`` has partial labels: its cases alternate between two source data sets, ``abdomen_ct_a`` (liver,
spleen, kidney_left) and ``abdomen_ct_b`` (liver, kidney_left, kidney_right); every structure is in every image, but
a case's label map holds only the classes of its data set (the others are background there), and its datalist item
says so (``dataset``, ``annotated``). The other regions come from one data set each that annotates every class.

Structures are deformed, rotated ellipsoids placed in normalised coordinates of the field of view, redrawn until
every labelled structure keeps at least a third of its nominal voxel count, so every structure is present in every
case. Each case has its own random generator seeded by ``(seed, crc32(region name), case index)``: a case does not
depend on the other regions or on the number of cases.

Files: NIfTI ``.nii.gz``, image float32, label uint8 with region-local values (0 background, 1..n), RAS affine
``diag(spacing)`` centred on the volume.

Datalist JSON schema (shared with :py:func:`~medfm_ops.data.msd.convert_msd`)::

    {
      "name": str,
      "regions": [{"name": str, "task_id": int, "labels": {"1": "liver", ...}}, ...],
      "training":   [item, ...],
      "validation": [item, ...],
      "test":       [item, ...]          # optional
    }
    item = {"image": path, "label": path, "region": task_id (int), "region_name": str,
            "label_names": {"1": "liver", ...},
            "dataset": str,                 # optional: source data set (default: the region name)
            "annotated": ["liver", ...]}    # optional: classes its label annotates (default: all of the region's)

Label files hold region-local values (``label_names``: 0 background, ``k`` the region's ``k``-th class); a case
with ``annotated`` may hold only the values of those classes (partial labels: the region's other classes are not
labelled in that case, so the loss and the metrics ignore them for it). Task ids are ``0..R-1``. Paths are
relative to the directory of the datalist file (absolute paths are accepted);
:py:func:`~medfm_ops.data.datalist.load_datalist` resolves them to absolute paths. Extra keys (e.g. ``params``,
``fingerprint``, a region's ``spacing`` or ``split``) are allowed and ignored by the loader.

Example::

    datalist = ensure_synthetic_dataset("~/.cache/medfm/synthetic", size=32, cases_per_region=8, seed=0)
    table, files = load_datalist(datalist)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from medfm_ops.utils.atomic_io import atomic_directory, atomic_write_json
from medfm_ops.data.synthetic_regions import SYNTHETIC_REGIONS, RegionSpec, StructureSpec

__all__ = [
    "GENERATOR_VERSION",
    "ensure_synthetic_dataset",
    "generate_case",
    "partial_label",
    "synthetic_fingerprint",
    "write_synthetic_dataset",
]

#: Bumped whenever the generated arrays change, so cached data sets are regenerated.
GENERATOR_VERSION = 2  # 2: partial labels (abdomen_ct from two data sets)
DATALIST_NAME = "datalist.json"
_MIN_SIZE = 16
_MAX_DRAWS = 25


def _shape3(size: int | Sequence[int]) -> tuple[int, int, int]:
    shape = (int(size),) * 3 if isinstance(size, (int, np.integer)) else tuple(int(s) for s in size)
    if len(shape) != 3 or min(shape) < _MIN_SIZE:
        raise ValueError(f"size must be an int or 3 ints, each >= {_MIN_SIZE} (room for every structure), got {size}.")
    return shape  # type: ignore[return-value]


def _smooth_field(rng: np.random.Generator, grid: np.ndarray, n_waves: int = 4, max_freq: float = 1.2) -> np.ndarray:
    """Low-frequency field in [-1, 1] over ``grid`` (3, *shape): the mean of random plane cosines."""
    freqs = rng.uniform(-max_freq, max_freq, size=(n_waves, 3))
    phases = rng.uniform(0.0, 2.0 * math.pi, size=n_waves)
    field = np.zeros(grid.shape[1:], dtype=np.float64)
    for k, phi in zip(freqs, phases):
        field += np.cos(math.pi * np.tensordot(k, grid, axes=1) + phi)
    return field / n_waves


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _structure_mask(rng: np.random.Generator, grid: np.ndarray, s: StructureSpec) -> np.ndarray:
    center = np.asarray(s.center) + rng.uniform(-s.jitter, s.jitter, size=3)
    radii = np.asarray(s.radii) * (1.0 + rng.uniform(-s.scale_jitter, s.scale_jitter, size=3))
    local = np.tensordot(_rotation(rng, s.rotation_deg).T, grid - center[:, None, None, None], axes=1)
    dist = np.sqrt(np.sum((local / radii[:, None, None, None]) ** 2, axis=0))
    return dist <= 1.0 + s.deform * _smooth_field(rng, grid)


def _nominal_voxels(s: StructureSpec, shape: tuple[int, int, int]) -> float:
    return 4.0 / 3.0 * math.pi * math.prod(r * n / 2.0 for r, n in zip(s.radii, shape))


def _region_spec(region: str | RegionSpec) -> RegionSpec:
    if isinstance(region, RegionSpec):
        return region
    if region not in SYNTHETIC_REGIONS:
        raise ValueError(f"unknown synthetic region '{region}'; known regions: {list(SYNTHETIC_REGIONS)}.")
    return SYNTHETIC_REGIONS[region]


def generate_case(
    region: str | RegionSpec, size: int | Sequence[int] = 32, seed: int = 0, case_index: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Generate one synthetic case.

    Args:
        region: a region name of ``SYNTHETIC_REGIONS`` or a :py:class:`RegionSpec`.
        size: volume size, one int (cube) or (X, Y, Z); each >= 16. Defaults to 32.
        seed: data set seed. Defaults to 0.
        case_index: index of the case within its region. Defaults to 0.

    Returns:
        ``(image, label, affine)``: image (X, Y, Z) float32, label (X, Y, Z) uint8 with values ``0..n`` (every
        label present: the full annotation; the written files of a partially labelled data set hold
        :py:func:`partial_label` of it), affine (4, 4) float64 RAS with the region's spacing.

    Raises:
        ValueError: on an unknown region or a size below 16.
        RuntimeError: when no draw keeps every structure visible (size too small for the region's structures).
    """
    spec = _region_spec(region)
    shape = _shape3(size)
    rng = np.random.default_rng([int(seed), zlib.crc32(spec.name.encode()), int(case_index)])
    axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in shape]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"))  # (3, X, Y, Z), RAS normalised coordinates

    labelled = [s for s in spec.structures if s.name is not None]
    for _ in range(_MAX_DRAWS):
        masks = [_structure_mask(rng, grid, s) for s in spec.structures]
        label = np.zeros(shape, dtype=np.uint8)
        owner = np.full(shape, -1, dtype=np.int64)
        for i, (s, m) in enumerate(zip(spec.structures, masks)):
            owner[m] = i
        k = 0
        for i, s in enumerate(spec.structures):
            if s.name is not None:
                k += 1
                label[owner == i] = k
        counts = np.bincount(label.ravel(), minlength=len(labelled) + 1)[1:]
        if all(c >= max(4.0, _nominal_voxels(s, shape) / 3.0) for c, s in zip(counts, labelled)):
            break
    else:
        raise RuntimeError(
            f"synthetic region '{spec.name}' at size {shape}: no draw kept every structure visible in "
            f"{_MAX_DRAWS} tries (case {case_index}, seed {seed}); use a larger size."
        )

    texture = gaussian_filter(rng.standard_normal(shape), sigma=1.0)
    texture /= texture.std() + 1e-8
    image = np.full(shape, spec.background, dtype=np.float64)
    for i, s in enumerate(spec.structures):
        region_mask = owner == i
        mean = s.intensity + rng.normal(0.0, spec.mean_jitter)
        image[region_mask] = mean + s.texture * texture[region_mask]
    image = gaussian_filter(image, sigma=0.6)  # partial-volume blur
    if spec.modality == "MR":
        image *= np.exp(spec.bias * _smooth_field(rng, grid, max_freq=0.8))
        n1, n2 = rng.normal(0.0, spec.noise, size=(2, *shape))
        image = np.sqrt((image + n1) ** 2 + n2**2)  # Rician magnitude noise
    else:
        image += rng.normal(0.0, spec.noise, size=shape)

    affine = np.diag([*spec.spacing, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * np.asarray(spec.spacing)
    return image.astype(np.float32), label, affine


def partial_label(label: np.ndarray, region: str | RegionSpec, annotated: Sequence[str]) -> np.ndarray:
    """
    The label map a data set that annotates only ``annotated`` (class names of ``region``) would hold: the values of
    the other classes set to 0 (background), the annotated ones unchanged (region-local values).

    Raises:
        ValueError: when ``annotated`` names a class the region does not have.
    """
    spec = _region_spec(region)
    unknown = [c for c in annotated if c not in spec.class_names]
    if unknown:
        raise ValueError(f"annotated classes {unknown} are not classes of region '{spec.name}' {spec.class_names}.")
    keep = [k for k, c in enumerate(spec.class_names, start=1) if c in annotated]
    return np.where(np.isin(label, keep), label, 0).astype(label.dtype)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def _params(
    size: int | Sequence[int],
    cases_per_region: int,
    seed: int,
    val_fraction: float,
    test_cases_per_region: int,
    regions: Sequence[str] | None,
) -> dict[str, Any]:
    names = list(SYNTHETIC_REGIONS) if regions is None else [str(r) for r in regions]
    for r in names:
        _region_spec(r)
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"regions must be distinct synthetic region names, got {names}.")
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
    if int(test_cases_per_region) < 0 or int(cases_per_region) - int(test_cases_per_region) < 2:
        raise ValueError(
            f"cases_per_region ({cases_per_region}) minus test_cases_per_region ({test_cases_per_region}) must be "
            "at least 2 (one training and one validation case per region)."
        )
    return {
        "generator_version": GENERATOR_VERSION,
        "size": list(_shape3(size)),
        "cases_per_region": int(cases_per_region),
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "test_cases_per_region": int(test_cases_per_region),
        "regions": names,
    }


def synthetic_fingerprint(params: dict[str, Any]) -> str:
    """Short stable hash (12 hex digits) of the generation parameters (as stored in the datalist's ``params``)."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]


def write_synthetic_dataset(
    out_dir: str | os.PathLike,
    size: int | Sequence[int] = 32,
    cases_per_region: int = 8,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_cases_per_region: int = 0,
    regions: Sequence[str] | None = None,
) -> Path:
    """
    Write the synthetic data set into ``out_dir`` (not cached, not atomic: see :py:func:`ensure_synthetic_dataset`).

    Layout: ``{out_dir}/{region}/imagesTr/{region}_{i:03d}.nii.gz``, ``.../labelsTr/...`` and
    ``{out_dir}/datalist.json`` (written last). Per region, the first cases are training, then
    ``max(1, round(val_fraction * (cases_per_region - test_cases_per_region)))`` validation cases, then the test
    cases.

    Args:
        out_dir: target directory (created).
        size: volume size, int or (X, Y, Z), each >= 16. Defaults to 32.
        cases_per_region: cases per region, including validation and test cases. Defaults to 8.
        seed: data set seed. Defaults to 0.
        val_fraction: fraction of the non-test cases used for validation, in (0, 1). Defaults to 0.25.
        test_cases_per_region: cases per region in the ``test`` section (omitted when 0). Defaults to 0.
        regions: region names (task ids in this order). Defaults to all of ``SYNTHETIC_REGIONS``.

    Returns:
        path of the datalist JSON.

    Raises:
        ValueError: on invalid parameters (unknown region, too few cases, size < 16, ...).
    """
    params = _params(size, cases_per_region, seed, val_fraction, test_cases_per_region, regions)
    out = Path(out_dir)
    n_test = params["test_cases_per_region"]
    n_val = max(1, round(params["val_fraction"] * (params["cases_per_region"] - n_test)))
    n_train = params["cases_per_region"] - n_test - n_val
    if n_train < 1:
        n_val, n_train = n_val - 1, 1
    sections: dict[str, list[dict[str, Any]]] = {"training": [], "validation": [], "test": []}
    region_entries = []
    for task_id, name in enumerate(params["regions"]):
        spec = SYNTHETIC_REGIONS[name]
        labels = {str(i): c for i, c in enumerate(spec.class_names, start=1)}
        region_entries.append(
            {
                "name": name,
                "task_id": task_id,
                "labels": labels,
                "modality": spec.modality,
                "spacing": list(spec.spacing),
            }
        )
        for case in range(params["cases_per_region"]):
            image, label, affine = generate_case(spec, params["size"], params["seed"], case)
            source = spec.dataset_of(case)
            rel_image = f"{name}/imagesTr/{name}_{case:03d}.nii.gz"
            rel_label = f"{name}/labelsTr/{name}_{case:03d}.nii.gz"
            _save_nifti(image, affine, out / rel_image)
            _save_nifti(partial_label(label, spec, source.annotated), affine, out / rel_label)
            section = "training" if case < n_train else "validation" if case < n_train + n_val else "test"
            sections[section].append(
                {
                    "image": rel_image,
                    "label": rel_label,
                    "region": task_id,
                    "region_name": name,
                    "label_names": labels,
                    "dataset": source.name,
                    "annotated": [c for c in spec.class_names if c in source.annotated],
                }
            )
    datalist: dict[str, Any] = {
        "name": "medfm_synthetic",
        "description": "synthetic multi-region 3D segmentation set generated by medfm_ops.data.synthetic",
        "fingerprint": synthetic_fingerprint(params),
        "params": params,
        "regions": region_entries,
        "training": sections["training"],
        "validation": sections["validation"],
    }
    if sections["test"]:
        datalist["test"] = sections["test"]
    return atomic_write_json(out / DATALIST_NAME, datalist)


def ensure_synthetic_dataset(
    root: str | os.PathLike,
    size: int | Sequence[int] = 32,
    cases_per_region: int = 8,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_cases_per_region: int = 0,
    regions: Sequence[str] | None = None,
) -> Path:
    """
    Return the datalist of the synthetic data set for these parameters, generating it on first use.

    The data set lives in ``{root}/synthetic_{fingerprint}/`` where the fingerprint hashes the parameters and
    :py:data:`GENERATOR_VERSION`, so other parameters go to another sub-directory. It is built in a temporary
    sibling directory and renamed into place when complete, so an interrupted run never leaves a directory that
    looks complete; later calls reuse it without rewriting anything.

    Args:
        root: cache directory (created; ``~`` is expanded).
        size, cases_per_region, seed, val_fraction, test_cases_per_region, regions: see
            :py:func:`write_synthetic_dataset`. Default to 32, 8, 0, 0.25, 0, all regions.

    Returns:
        path of ``datalist.json`` inside the data set directory.

    Raises:
        ValueError: on invalid parameters, or when the cached directory exists but holds no matching datalist
            (the message names the directory to delete).
    """
    params = _params(size, cases_per_region, seed, val_fraction, test_cases_per_region, regions)
    target = Path(root).expanduser() / f"synthetic_{synthetic_fingerprint(params)}"
    datalist = target / DATALIST_NAME
    if not target.exists():
        with atomic_directory(target) as tmp:
            write_synthetic_dataset(tmp, **{k: v for k, v in params.items() if k != "generator_version"})
    try:
        stored = json.loads(datalist.read_text(encoding="utf-8")).get("params")
    except (OSError, ValueError) as e:
        raise ValueError(f"cached synthetic data set {target} has no readable {DATALIST_NAME} ({e}); delete it.") from e
    if stored != params:
        raise ValueError(
            f"cached synthetic data set {target} was made with params {stored}, expected {params}; delete it."
        )
    return datalist
