# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""
Region-wise preprocessing: voxel spacing, intensity normalisation, training patch and sliding window per region.

Regions of one multi-region set can differ in everything but the network: a 1 mm isotropic brain MRI of 35x50x36
voxels and a cardiac short-axis stack of 6-18 slices of 10 mm under a 256x256 plane. The bundle configs declare the
difference as data, one row per region name (``"default"`` covers the regions not named)::

    "region_preprocessing": {
        "default":   {"spacing": null, "patch_size": [32, 32, 32]},
        "heart_mri": {"spacing": [1.5, 1.5, 10.0], "patch_size": [96, 96, 8], "window_size": [96, 96, 8]}
    }

- ``spacing``: target voxel spacing in mm (``Spacingd``), ``null`` to keep each image's own grid.
- ``patch_size``: training patch (images smaller than it are padded: image with its minimum, label with 0).
- ``window_size``: sliding-window size for validation and inference. Defaults to ``patch_size``.
- ``intensity``: ``"zscore"`` (per image, all voxels) or ``"zscore_nonzero"`` (per image, non-zero voxels).
  Defaults to ``"zscore"``.

:class:`RegionPreprocessingTable` resolves the rows against a :class:`~medfm_ops.data.TaskTable`; the transforms
below read a case's row by its ``region`` (task id); :class:`RegionBatchSampler` keeps regions with different patch
shapes out of one batch. A region's row is recorded next to the trained model (``models/region_preprocessing.json``)
and copied into every exported expert bundle (its ``spacing``, ``roi_size`` and ``intensity_nonzero``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import (
    InvertibleTransform,
    MapTransform,
    NormalizeIntensity,
    Randomizable,
    RandSpatialCrop,
    SpatialPad,
    Spacingd,
)
from monai.utils import TraceKeys
from torch.utils.data import BatchSampler, RandomSampler, Sampler

from medfm_ops.data.task_table import TaskTable
from medfm_ops.utils.atomic_io import atomic_write_json

__all__ = [
    "INTENSITY_MODES",
    "check_intensity",
    "RegionPreprocessing",
    "RegionPreprocessingTable",
    "RegionSpacingd",
    "RegionNormalizeIntensityd",
    "RegionRandCropd",
    "RegionToMetad",
    "RegionBatchSampler",
    "recorded_preprocessing",
    "save_region_preprocessing",
    "check_trained_preprocessing",
]

INTENSITY_MODES = ("zscore", "zscore_nonzero")
_ROW_KEYS = {"spacing", "patch_size", "window_size", "intensity"}
DEFAULT_ROW = "default"


@dataclass(frozen=True)
class RegionPreprocessing:
    """One region's row: ``spacing`` (mm, or None: native grid), ``patch_size``, ``window_size``, ``intensity``."""

    spacing: tuple[float, ...] | None
    patch_size: tuple[int, ...]
    window_size: tuple[int, ...]
    intensity: str = "zscore"

    @property
    def intensity_nonzero(self) -> bool:
        """Whether the z-score uses the non-zero voxels only (``NormalizeIntensity(nonzero=...)``)."""
        return self.intensity == "zscore_nonzero"

    def to_json(self) -> dict[str, Any]:
        """The row as the config writes it."""
        return {
            "spacing": None if self.spacing is None else list(self.spacing),
            "patch_size": list(self.patch_size),
            "window_size": list(self.window_size),
            "intensity": self.intensity,
        }


def _sizes(value: Any, what: str, kind: type) -> tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{what} must be a list of positive numbers (one per spatial dimension), got {value!r}.")
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a list of positive numbers, got {value!r}.") from None
    if any(isinstance(v, bool) for v in value) or any(v <= 0 for v in out) or (kind is int and out != tuple(value)):
        raise ValueError(f"{what} must be a list of positive {kind.__name__}s, got {value!r}.")
    return out


def check_intensity(rule: Any, what: str) -> str:
    """``rule`` when it is one of :data:`INTENSITY_MODES`, else a ValueError naming ``what`` (the file or field)."""
    if rule not in INTENSITY_MODES:
        raise ValueError(f"{what}: intensity {rule!r} is not one of {list(INTENSITY_MODES)}.")
    return str(rule)


def _row(raw: Any, what: str) -> RegionPreprocessing:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{what} must be an object with keys among {sorted(_ROW_KEYS)}, got {raw!r}.")
    unknown = sorted(set(raw) - _ROW_KEYS)
    if unknown or "patch_size" not in raw:
        raise ValueError(f"{what} has unknown key(s) {unknown} or no 'patch_size'; expected 'patch_size' and "
                         f"optionally 'spacing', 'window_size', 'intensity'.")
    patch = _sizes(raw["patch_size"], f"{what}.patch_size", int)
    window = _sizes(raw.get("window_size") or raw["patch_size"], f"{what}.window_size", int)
    spacing = None if raw.get("spacing") is None else _sizes(raw["spacing"], f"{what}.spacing", float)
    intensity = check_intensity(raw.get("intensity", INTENSITY_MODES[0]), what)
    dims = {len(patch), len(window), len(spacing or patch)}
    if len(dims) != 1:
        raise ValueError(f"{what}: spacing, patch_size and window_size need the same number of spatial dimensions.")
    return RegionPreprocessing(spacing, patch, window, intensity)


class RegionPreprocessingTable:
    """
    The preprocessing row of every region of ``region_table`` (format in this module's docstring).

    Args:
        table: ``{region name or "default": row}``.
        region_table: the data set's regions; every region needs its own row or the ``"default"`` one.
        source: where ``table`` came from, named in errors. Defaults to None.

    Raises:
        ValueError: on a bad row (the message names the region and the field), a region name the data set does not
            have (a typo would silently fall back to the default), a region without a row and no ``"default"``, or
            rows of different spatial dimensions.

    Example::

        prep = RegionPreprocessingTable({"default": {"patch_size": [32, 32, 32]}}, table)
        prep.of(0).window_size  # (32, 32, 32)
    """

    def __init__(
        self, table: Mapping[str, Any], region_table: TaskTable, source: str | None = None
    ) -> None:
        where = f" in {source}" if source else ""
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"region_preprocessing{where} must be an object {{region name: row}}, got {table!r}.")
        names = set(region_table.task_names.values())
        unknown = sorted(set(table) - names - {DEFAULT_ROW})
        if unknown:
            raise ValueError(f"region_preprocessing{where} names region(s) {unknown} that the data set does not have; "
                             f"its regions: {sorted(names)} (use 'default' for a shared row).")
        parsed = {k: _row(v, f"region_preprocessing['{k}']{where}") for k, v in table.items()}
        self.rows: dict[int, RegionPreprocessing] = {}
        for t, name in region_table.task_names.items():
            row = parsed.get(name, parsed.get(DEFAULT_ROW))
            if row is None:
                raise ValueError(f"region_preprocessing{where} has no row for region '{name}' and no 'default' row.")
            self.rows[int(t)] = row
        if len({len(r.patch_size) for r in self.rows.values()}) != 1:
            raise ValueError(f"region_preprocessing{where}: all regions need the same number of spatial dimensions.")
        self.region_names = dict(region_table.task_names)

    def of(self, task_id: int | torch.Tensor) -> RegionPreprocessing:
        """The row of task ``task_id``. Raises ValueError on an unknown id."""
        t = int(task_id)
        if t not in self.rows:
            raise ValueError(f"no preprocessing row for task id {t}; known: {sorted(self.rows)}.")
        return self.rows[t]

    def of_region(self, name: str) -> RegionPreprocessing:
        """The row of the region called ``name``. Raises ValueError on an unknown name."""
        for t, n in self.region_names.items():
            if n == name:
                return self.rows[int(t)]
        raise ValueError(f"unknown region '{name}'; known: {list(self.region_names.values())}.")

    @property
    def uniform_patch(self) -> bool:
        """Whether every region trains on the same patch shape (mixed-region batches are then possible)."""
        return len({r.patch_size for r in self.rows.values()}) == 1

    @property
    def largest_window(self) -> tuple[int, ...]:
        """The window with the most voxels (for a FLOP count of one window forward)."""
        return max((r.window_size for r in self.rows.values()), key=math.prod)

    def to_json(self) -> dict[str, dict[str, Any]]:
        """``{region name: row}`` for every region, resolved (no ``"default"``)."""
        return {self.region_names[t]: r.to_json() for t, r in sorted(self.rows.items())}


def save_region_preprocessing(ckpt_dir: str | os.PathLike, table: RegionPreprocessingTable) -> str:
    """Write ``{ckpt_dir}/region_preprocessing.json`` (every region's resolved row) atomically; returns its path."""
    path = os.path.join(ckpt_dir, "region_preprocessing.json")
    os.makedirs(ckpt_dir, exist_ok=True)
    atomic_write_json(path, table.to_json())
    return path


def recorded_preprocessing(ckpt_dir: str | os.PathLike, region: str) -> dict[str, Any]:
    """
    The row of ``region`` in ``{ckpt_dir}/region_preprocessing.json`` as the training run recorded it (``spacing``,
    ``window_size``, ``intensity``, ...); ``{}`` for runs that recorded none (the bundle's default preprocessing).

    Raises:
        ValueError: when the file exists but has no row for ``region``, or its ``intensity`` is not one of
            :data:`INTENSITY_MODES`.
    """
    path = os.path.join(ckpt_dir, "region_preprocessing.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if region not in table:
        raise ValueError(f"{path} has no row for region '{region}' (rows: {sorted(table)}): retrain the bundle.")
    row = dict(table[region])
    row["intensity"] = check_intensity(row.get("intensity", INTENSITY_MODES[0]), f"{path}: region '{region}'")
    return row


def check_trained_preprocessing(ckpt_dir: str | os.PathLike, table: RegionPreprocessingTable) -> None:
    """
    Check that an inference config's region rows are those the weights in ``ckpt_dir`` were trained with
    (``region_preprocessing.json`` written by the training run). Nothing to check before training or for runs that
    recorded none.

    Raises:
        ValueError: naming the regions whose rows differ, both rows, and the option that reads the trained table.
    """
    path = os.path.join(ckpt_dir, "region_preprocessing.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        trained = json.load(f)
    config = table.to_json()
    differ = {r: (trained.get(r), row) for r, row in config.items() if r in trained and trained[r] != row}
    if differ:
        raise ValueError(
            f"the model in {ckpt_dir} was trained with other region preprocessing than the config's: "
            + "; ".join(f"{r}: trained {t}, config {c}" for r, (t, c) in differ.items())
            + f'. Pass --region_preprocessing "%{path}" (or serve the region\'s exported expert bundle).'
        )


def _region_of(d: Mapping[Hashable, Any], key: Hashable) -> int:
    if key not in d:
        raise KeyError(f"the case has no '{key}' entry (its task id): region-wise preprocessing needs it.")
    return int(torch.as_tensor(d[key]).reshape(-1)[0])


class RegionSpacingd(MapTransform, InvertibleTransform):
    """
    ``Spacingd`` to the case's region spacing (``RegionPreprocessingTable.of(region).spacing``); a region with
    spacing ``None`` keeps its grid. ``mode`` as ``Spacingd`` (e.g. ``["bilinear", "nearest"]``). Invertible
    (``Invertd`` restores the input grid): the inverse finds the region's resampling in the image's applied
    operations, so it needs no ``region`` entry.
    """

    def __init__(
        self,
        keys: KeysCollection,
        preprocessing: RegionPreprocessingTable,
        mode: Sequence[str] | str = ("bilinear", "nearest"),
        region_key: str = "region",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.preprocessing, self.region_key = preprocessing, region_key
        self._spacers = {
            t: Spacingd(keys, pixdim=row.spacing, mode=mode, allow_missing_keys=allow_missing_keys)
            for t, row in preprocessing.rows.items() if row.spacing is not None
        }

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        spacer = self._spacers.get(_region_of(d, self.region_key))
        return d if spacer is None else spacer(d)

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            ops = getattr(d[key], "applied_operations", None) or []
            top = ops[-1].get(TraceKeys.ID) if ops else None
            spacer = next((s for s in self._spacers.values() if id(s.spacing_transform.sp_resample) == top), None)
            if spacer is not None:
                d[key] = spacer.inverse({key: d[key]})[key]
        return d


class RegionNormalizeIntensityd(MapTransform):
    """Per-image z-score of ``keys`` (channel-wise), over all voxels or the non-zero ones as the region's row says."""

    def __init__(
        self,
        keys: KeysCollection,
        preprocessing: RegionPreprocessingTable,
        region_key: str = "region",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.preprocessing, self.region_key = preprocessing, region_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        norm = NormalizeIntensity(nonzero=self.preprocessing.of(_region_of(d, self.region_key)).intensity_nonzero,
                                  channel_wise=True)
        for key in self.key_iterator(d):
            d[key] = norm(d[key])
        return d


class RegionToMetad(MapTransform):
    """Record the case's task id in the meta data of ``keys`` (``meta["region"]``): a region-wise sliding window
    reads it when the network is not routed (teacher, fused expert)."""

    def __init__(self, keys: KeysCollection, region_key: str = "region", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.region_key = region_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        region = _region_of(d, self.region_key)
        for key in self.key_iterator(d):
            if hasattr(d[key], "meta"):
                d[key].meta["region"] = region
        return d


class RegionRandCropd(Randomizable, MapTransform):
    """
    Random training patch of the case's region ``patch_size``: pad to it first (``image_key`` with its minimum,
    the other keys with 0), then one random crop shared by all ``keys``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        preprocessing: RegionPreprocessingTable,
        image_key: str = "image",
        region_key: str = "region",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.preprocessing, self.image_key, self.region_key = preprocessing, image_key, region_key
        self._start: tuple[int, ...] | None = None

    def randomize(self, data: Any = None) -> None:
        raise NotImplementedError("RegionRandCropd draws its crop in __call__ (the patch size depends on the case).")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        patch = self.preprocessing.of(_region_of(d, self.region_key)).patch_size
        keys = list(self.key_iterator(d))
        for key in keys:
            mode = "minimum" if key == self.image_key else "constant"
            d[key] = SpatialPad(spatial_size=patch, mode=mode)(d[key])
        crop = RandSpatialCrop(roi_size=patch, random_size=False)
        crop.set_random_state(state=self.R)
        crop.randomize(d[keys[0]].shape[1:])
        for key in keys:
            d[key] = crop(d[key], randomize=False)
        return d


class RegionBatchSampler(Sampler[list[int]]):
    """
    Shuffled batches in which all cases share one patch shape. When every region trains on the same patch, it is
    exactly ``BatchSampler(RandomSampler(items), batch_size, drop_last)`` (the batches of ``DataLoader(shuffle=True)``
    with the same torch seed); otherwise cases are grouped by their region's patch shape, each group shuffled and
    cut into batches, and the batches shuffled.

    Args:
        items: the datalist items (their ``region_key`` entry is the task id).
        batch_size: cases per batch.
        preprocessing: the regions' rows.
        drop_last: drop each group's last incomplete batch. Defaults to False.
        shuffle: shuffle the cases (and the batches); False keeps the datalist order within each group, groups in
            order of first appearance. Defaults to True.
        region_key: item key of the task id. Defaults to ``"region"``.
    """

    def __init__(
        self,
        items: Sequence[Mapping[str, Any]],
        batch_size: int,
        preprocessing: RegionPreprocessingTable,
        drop_last: bool = False,
        shuffle: bool = True,
        region_key: str = "region",
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.batch_size, self.drop_last, self.shuffle = batch_size, drop_last, shuffle
        self.uniform = preprocessing.uniform_patch
        self.num_items = len(items)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(preprocessing.of(_region_of(item, region_key)).patch_size, []).append(i)
        self.groups = list(groups.values())

    def _cut(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        if self.uniform:
            return self._cut(self.num_items)
        return sum(self._cut(len(g)) for g in self.groups)

    def __iter__(self) -> Iterator[list[int]]:
        if not self.shuffle:
            for group in (self.groups if not self.uniform else [[i for g in self.groups for i in g]]):
                cut = self._cut(len(group))
                yield from (group[b * self.batch_size : (b + 1) * self.batch_size] for b in range(cut))
            return
        if self.uniform:
            yield from BatchSampler(RandomSampler(range(self.num_items)), self.batch_size, self.drop_last)
            return
        generator = torch.Generator()
        generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        batches: list[list[int]] = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
            cut = self._cut(len(order))
            batches += [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(cut)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]
