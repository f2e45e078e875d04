# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Region specifications of the synthetic multi-region data set: structures, intensities, spacing."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StructureSpec", "DatasetSpec", "RegionSpec", "SYNTHETIC_REGIONS"]


@dataclass(frozen=True)
class StructureSpec:
    """
    One deformed, rotated ellipsoid painted into a synthetic volume.

    Geometry is given in normalised RAS coordinates of the field of view: every axis spans ``[-1, 1]``, ``+x`` points
    to the patient's right, ``+y`` anterior, ``+z`` superior (so a structure keeps its relative size whatever
    the volume size).

    Args:
        name: class name, or None for unlabelled tissue (body outline, bone, ...).
        center: nominal centre (x, y, z).
        radii: nominal half-axes (x, y, z).
        intensity: mean intensity (HU for CT, arbitrary units for MR).
        texture: standard deviation of the smooth intra-structure texture. Defaults to 15.0.
        jitter: uniform jitter of the centre per axis. Defaults to 0.05.
        scale_jitter: relative uniform jitter of each half-axis. Defaults to 0.15.
        rotation_deg: uniform jitter of the rotation about each axis, degrees. Defaults to 12.0.
        deform: relative amplitude of the smooth radial deformation. Defaults to 0.12.
    """

    name: str | None
    center: tuple[float, float, float]
    radii: tuple[float, float, float]
    intensity: float
    texture: float = 15.0
    jitter: float = 0.05
    scale_jitter: float = 0.15
    rotation_deg: float = 12.0
    deform: float = 0.12


@dataclass(frozen=True)
class DatasetSpec:
    """
    One source data set of a synthetic region that annotates only some of the region's classes (partial labels, as
    when a region's expert learns from several public data sets, each with its own label subset).

    Args:
        name: data set name (the datalist items' ``dataset``).
        annotated: the region's class names this data set labels; the other structures are painted into the
            image but are background in its label maps.
    """

    name: str
    annotated: tuple[str, ...]


@dataclass(frozen=True)
class RegionSpec:
    """
    One body region (task) of the synthetic data set.

    Args:
        name: region name (as in the datalist).
        modality: ``"CT"`` (additive Gaussian noise, values in HU) or ``"MR"`` (multiplicative bias field, Rician
            noise, non-negative values).
        spacing: voxel spacing in mm (x, y, z), written to the NIfTI affine.
        background: intensity outside the body.
        structures: painted in order (later ones overwrite earlier ones); the labelled ones get the region-local
            labels ``1..n`` in their order here.
        noise: noise standard deviation.
        mean_jitter: per-case standard deviation of every structure's mean intensity.
        bias: amplitude of the smooth log bias field (MR only). Defaults to 0.0.
        datasets: source data sets with partial labels; case ``i`` comes from ``datasets[i % len(datasets)]``.
            Defaults to ``()``: one data set named after the region that annotates every class.
    """

    name: str
    modality: str
    spacing: tuple[float, float, float]
    background: float
    structures: tuple[StructureSpec, ...]
    noise: float
    mean_jitter: float
    bias: float = 0.0
    datasets: tuple[DatasetSpec, ...] = ()

    def __post_init__(self) -> None:
        classes = self.class_names
        for ds in self.datasets:
            unknown = [c for c in ds.annotated if c not in classes]
            if not ds.annotated or unknown:
                raise ValueError(
                    f"synthetic region '{self.name}': data set '{ds.name}' annotates {list(ds.annotated)}; "
                    f"expected a non-empty subset of {classes}."
                )

    @property
    def class_names(self) -> list[str]:
        """Names of the labelled structures in label order (label 1 first)."""
        return [s.name for s in self.structures if s.name is not None]

    def dataset_of(self, case_index: int) -> DatasetSpec:
        """The source data set of case ``case_index`` (round robin over ``datasets``)."""
        if not self.datasets:
            return DatasetSpec(self.name, tuple(self.class_names))
        return self.datasets[int(case_index) % len(self.datasets)]


_S = StructureSpec

#: The default regions, in task-id order.
SYNTHETIC_REGIONS: dict[str, RegionSpec] = {
    r.name: r
    for r in (
        RegionSpec(
            name="brain_mri",
            modality="MR",
            spacing=(1.0, 1.0, 1.0),
            background=0.0,
            noise=20.0,
            mean_jitter=25.0,
            bias=0.25,
            structures=(
                _S(None, (0.0, 0.0, 0.0), (0.88, 0.92, 0.85), 260.0, texture=20.0, deform=0.04, scale_jitter=0.05),
                _S(None, (0.0, 0.0, 0.02), (0.78, 0.84, 0.75), 620.0, texture=30.0, deform=0.05, scale_jitter=0.05),
                _S("ventricles", (0.0, 0.05, 0.12), (0.16, 0.32, 0.16), 170.0, deform=0.2),
                _S("hippocampus_left", (-0.36, -0.12, -0.22), (0.12, 0.26, 0.13), 470.0, texture=12.0),
                _S("hippocampus_right", (0.36, -0.12, -0.22), (0.12, 0.26, 0.13), 470.0, texture=12.0),
            ),
        ),
        RegionSpec(
            name="thorax_ct",
            modality="CT",
            spacing=(1.5, 1.5, 2.5),
            background=-1000.0,
            noise=20.0,
            mean_jitter=10.0,
            structures=(
                _S(None, (0.0, 0.0, 0.0), (0.92, 0.68, 1.3), 30.0, deform=0.05, scale_jitter=0.05),
                _S("lung_left", (-0.42, 0.0, 0.08), (0.31, 0.46, 0.62), -830.0, texture=40.0),
                _S("lung_right", (0.42, 0.0, 0.08), (0.33, 0.48, 0.62), -830.0, texture=40.0),
                _S(None, (0.0, -0.52, 0.0), (0.1, 0.1, 1.3), 600.0, texture=60.0, deform=0.0, rotation_deg=3.0),
                _S("heart", (-0.12, 0.2, -0.22), (0.3, 0.27, 0.32), 60.0, texture=12.0),
            ),
        ),
        RegionSpec(
            name="abdomen_ct",
            modality="CT",
            spacing=(1.2, 1.2, 2.0),
            background=-1000.0,
            noise=15.0,
            mean_jitter=8.0,
            structures=(
                _S(None, (0.0, 0.0, 0.0), (0.94, 0.72, 1.3), -90.0, texture=10.0, deform=0.05, scale_jitter=0.05),
                _S(None, (0.0, 0.05, 0.0), (0.82, 0.6, 1.3), 35.0, texture=12.0, deform=0.05, scale_jitter=0.05),
                _S(None, (0.0, -0.52, 0.0), (0.1, 0.1, 1.3), 550.0, texture=60.0, deform=0.0, rotation_deg=3.0),
                _S("liver", (0.38, 0.08, 0.22), (0.38, 0.42, 0.36), 105.0, texture=8.0, rotation_deg=20.0),
                _S("spleen", (-0.52, -0.18, 0.28), (0.15, 0.22, 0.2), 125.0, texture=8.0),
                _S("kidney_left", (-0.36, -0.38, -0.12), (0.13, 0.14, 0.26), 175.0, texture=10.0),
                _S("kidney_right", (0.36, -0.38, -0.18), (0.13, 0.14, 0.26), 175.0, texture=10.0),
            ),
            # two source data sets with different, overlapping label subsets (liver and left kidney in both)
            datasets=(
                DatasetSpec("abdomen_ct_a", ("liver", "spleen", "kidney_left")),
                DatasetSpec("abdomen_ct_b", ("liver", "kidney_left", "kidney_right")),
            ),
        ),
        RegionSpec(
            name="pelvis_mr",
            modality="MR",
            spacing=(1.0, 1.0, 3.0),
            background=0.0,
            noise=25.0,
            mean_jitter=30.0,
            bias=0.3,
            structures=(
                _S(None, (0.0, 0.0, 0.0), (0.94, 0.72, 1.3), 620.0, texture=30.0, deform=0.05, scale_jitter=0.05),
                _S(None, (0.0, 0.0, 0.0), (0.8, 0.58, 1.3), 260.0, texture=20.0, deform=0.05, scale_jitter=0.05),
                _S(None, (-0.55, -0.1, -0.2), (0.16, 0.16, 0.25), 110.0, texture=10.0),
                _S(None, (0.55, -0.1, -0.2), (0.16, 0.16, 0.25), 110.0, texture=10.0),
                _S("bladder", (0.0, 0.18, 0.25), (0.3, 0.26, 0.34), 1100.0, texture=30.0),
                _S("prostate", (0.0, -0.02, -0.32), (0.17, 0.14, 0.22), 420.0, texture=25.0),
            ),
        ),
    )
}
