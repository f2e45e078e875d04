# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Ignite metric of per-region, per-class Dice and NSD (mm) for union-of-classes sigmoid outputs."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.data import MetaTensor

from medfm_ops.metrics.dice_nsd import binary_dice_nsd
from medfm_ops.metrics.region_outputs import as_samples, merge_batch, region_metric_output_transform
from medfm_ops.metrics.report import region_summary

__all__ = ["RegionSegMetrics", "binary_dice_nsd", "region_metric_output_transform", "task_seg_metrics"]


class RegionSegMetrics(Metric):
    """
    Ignite metric for region-partitioned multi-label segmentation: per sample, the sigmoid channels of the
    sample's region are thresholded and scored against the labels with :py:func:`binary_dice_nsd` (DSC and NSD
    with a tolerance in mm using the sample's voxel spacing).

    Partial labels: when the output carries a per-case ``channel_mask`` (the channels the case's data set
    annotates, see :py:class:`~medfm_ops.data.RegionLabelToChannelsd`), a class that the case does not annotate is
    not scored for that case (its voxels are background in that label, so a score would be meaningless).

    Rows ``(region, class, dsc, nsd)`` are accumulated per sample and per annotated class, gathered across processes
    in :py:meth:`compute`, and aggregated as: per class, the mean over the samples that annotate it; per region, the
    mean over its classes that were scored; overall, the mean over the regions seen. (The LoRKD reference averages
    per (data set, class) first; with one data set per class this is the same.) :py:meth:`compute` returns the overall mean DSC (so the metric can be
    a MONAI evaluator's key metric); :py:meth:`completed` additionally writes into ``engine.state.metrics``:
    ``nsd_name`` (overall mean NSD), ``"dsc/{region}"``, ``"nsd/{region}"``, ``"dsc/{region}/{class}"`` and
    ``"nsd/{region}/{class}"``. :py:meth:`table` returns the per-class table.

    Samples are scored one at a time, so spatial sizes may differ between samples.

    Example (MONAI bundle evaluator)::

        "key_val_metric": {"val_mean_dice": {
            "_target_": "medfm_ops.metrics.RegionSegMetrics",
            "region_channels": {"0": [0, 1], "1": [2, 3, 4]},
            "region_names": {"0": "abdomen", "1": "thorax"},
            "class_names": {"0": ["liver", "spleen"], "1": ["lung_l", "lung_r", "heart"]}}}
    """

    required_output_keys = ("y_pred", "y", "region", "spacing")
    _required_output_keys = required_output_keys

    def __init__(
        self,
        region_channels: Mapping[int | str, Sequence[int]],
        region_names: Mapping[int | str, str] | None = None,
        class_names: Mapping[int | str, Sequence[str]] | None = None,
        tolerance_mm: float | Mapping[str, float] = 1.0,
        threshold: float = 0.5,
        sigmoid: bool = True,
        nsd_name: str = "mean_nsd",
        nsd: bool = True,
        output_transform: Callable = region_metric_output_transform,
        merge_batch: bool = True,
        device: str | torch.device = torch.device("cpu"),
    ) -> None:
        """
        Args:
            region_channels: task id -> global channel indices of its classes (keys may be strings, as in JSON).
            region_names: task id -> region name used in metric keys and tables. Defaults to ``"region{id}"``.
            class_names: task id -> class names, one per channel of ``region_channels[id]``. Defaults to
                ``"ch{global channel}"``.
            tolerance_mm: NSD tolerance in mm, for all classes, or a mapping from class name (or
                ``"region/class"``; the more specific key wins) to mm, with an optional ``"default"`` entry.
                Defaults to 1.0.
            threshold: foreground threshold on the sigmoid probability (``>=``). Defaults to 0.5.
            sigmoid: whether ``y_pred`` holds logits (``True``) or probabilities/binary masks already. Defaults to
                ``True``.
            nsd_name: ``engine.state.metrics`` key of the overall mean NSD. Defaults to ``"mean_nsd"``.
            nsd: compute the NSD. False scores DSC only (no NSD keys in ``engine.state.metrics`` or the table): a
                training validation that selects on DSC then skips the surface distances, which take most of its
                time on CPU. Defaults to True.
            output_transform: maps ``engine.state.output`` (batch-merged, see ``merge_batch``) to a dict with
                ``y_pred``, ``y``, ``region``, ``spacing``. Defaults to :py:func:`region_metric_output_transform`.
            merge_batch: add ``engine.state.batch`` keys missing from ``engine.state.output`` (MONAI evaluators keep
                e.g. the region id only in the batch) before ``output_transform``. Defaults to ``True``.
            device: device of the metric state. Defaults to CPU.

        Raises:
            ValueError: on empty regions, duplicate names, class-name counts that do not match the channels,
                unknown tolerance keys, or a ``threshold`` outside (0, 1).
        """
        if not region_channels:
            raise ValueError("region_channels must map at least one task id to its channels.")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}.")
        self.region_channels = {int(k): [int(c) for c in v] for k, v in region_channels.items()}
        names = {int(k): str(v) for k, v in (region_names or {}).items()}
        self.region_names = {r: names.get(r, f"region{r}") for r in self.region_channels}
        if len(set(self.region_names.values())) != len(self.region_names):
            raise ValueError(f"region names must be unique, got {list(self.region_names.values())}.")
        given = {int(k): [str(n) for n in v] for k, v in (class_names or {}).items()}
        self.class_names: dict[int, list[str]] = {}
        for r, channels in self.region_channels.items():
            if not channels:
                raise ValueError(f"region {r} ({self.region_names[r]}) has no channels.")
            cls = given.get(r, [f"ch{c}" for c in channels])
            if len(cls) != len(channels) or len(set(cls)) != len(cls):
                raise ValueError(
                    f"class_names of region {r} ({self.region_names[r]}) must be {len(channels)} unique names, "
                    f"got {cls}."
                )
            self.class_names[r] = cls
        self.tolerances = self._resolve_tolerances(tolerance_mm)
        self.threshold = float(threshold)
        self.sigmoid = sigmoid
        self.nsd_name = nsd_name
        self.nsd = bool(nsd)
        self.merge_batch = merge_batch
        self._logit_threshold = math.log(threshold / (1.0 - threshold))
        self._table: list[dict[str, Any]] | None = None
        self._summary: dict[str, Any] | None = None
        super().__init__(output_transform=output_transform, device=device, skip_unrolling=True)

    def _resolve_tolerances(self, tolerance_mm: float | Mapping[str, float]) -> dict[int, list[float]]:
        if not isinstance(tolerance_mm, Mapping):
            return {r: [float(tolerance_mm)] * len(ch) for r, ch in self.region_channels.items()}
        known = {"default"}
        out: dict[int, list[float]] = {}
        for r, classes in self.class_names.items():
            region_tol = []
            for c in classes:
                qualified = f"{self.region_names[r]}/{c}"
                known.update((c, qualified))
                key = qualified if qualified in tolerance_mm else c if c in tolerance_mm else "default"
                if key not in tolerance_mm:
                    raise ValueError(f"tolerance_mm has no entry for class '{qualified}' and no 'default'.")
                region_tol.append(float(tolerance_mm[key]))
            out[r] = region_tol
        unknown = sorted(set(tolerance_mm) - known)
        if unknown:
            raise ValueError(f"tolerance_mm keys {unknown} match no class name or 'region/class'.")
        return out

    @reinit__is_reduced
    def reset(self) -> None:
        self._rows: list[torch.Tensor] = []
        self._table = None
        self._summary = None

    def iteration_completed(self, engine: Engine) -> None:
        """Read ``engine.state.output`` (with ``engine.state.batch`` keys merged in) and update the metric."""
        output = engine.state.output
        if self.merge_batch:
            output = merge_batch(output, engine.state.batch)
        output = self._output_transform(output)
        if isinstance(output, Mapping):
            missing = [k for k in self.required_output_keys if k not in output]
            if missing:
                raise ValueError(f"RegionSegMetrics: transformed output lacks keys {missing}, got {list(output)}.")
            output = tuple(output[k] for k in self.required_output_keys) + (output.get("channel_mask"),)
        self.update(output)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        """
        Args:
            output: ``(y_pred, y, region, spacing)`` or ``(y_pred, y, region, spacing, channel_mask)``:
                (B, C, *spatial) logits or B tensors (C, *spatial); labels alike; (B,) region ids; (B, spatial_dims)
                spacing in mm; optional (B, C) bool mask of the channels each case annotates (None: all of its
                region's channels).

        Raises:
            ValueError: on inconsistent lengths or shapes, or an unknown region id.
        """
        if len(output) not in (4, 5):
            raise ValueError(f"RegionSegMetrics.update expects (y_pred, y, region, spacing[, channel_mask]), got "
                             f"{len(output)} items.")
        y_pred, y, region, spacing = output[:4]
        channel_mask = output[4] if len(output) == 5 else None
        preds, labels = as_samples(y_pred, "y_pred"), as_samples(y, "y")
        regions = torch.as_tensor(region).reshape(-1).tolist()
        spacings = torch.as_tensor(spacing, dtype=torch.float64)
        spacings = spacings.reshape(len(regions), -1) if spacings.numel() else spacings
        if not len(preds) == len(labels) == len(regions) == len(spacings):
            raise ValueError(
                f"batch sizes differ: y_pred {len(preds)}, y {len(labels)}, region {len(regions)}, "
                f"spacing {len(spacings)}."
            )
        masks: list[Any] = [None] * len(preds)
        if channel_mask is not None:
            masks = list(torch.as_tensor(channel_mask).reshape(len(preds), -1).bool().cpu())
        for pred, label, r, sp, mask in zip(preds, labels, regions, spacings, masks):
            r = int(r)
            if r not in self.region_channels:
                raise ValueError(f"region id {r} is not in region_channels {sorted(self.region_channels)}.")
            if pred.shape != label.shape:
                raise ValueError(f"y_pred sample shape {tuple(pred.shape)} differs from y {tuple(label.shape)}.")
            channels = self.region_channels[r]
            if max(channels) >= pred.shape[0]:
                raise ValueError(f"region {r} uses channel {max(channels)} but y_pred has {pred.shape[0]} channels.")
            if mask is not None and mask.shape[0] != pred.shape[0]:
                raise ValueError(f"channel_mask has {mask.shape[0]} channels but y_pred has {pred.shape[0]}.")
            scored = [k for k, c in enumerate(channels) if mask is None or bool(mask[c])]
            if not scored:  # the case annotates none of its region's classes: nothing to score
                continue
            pred = pred.as_tensor() if isinstance(pred, MetaTensor) else pred
            label = label.as_tensor() if isinstance(label, MetaTensor) else label
            index = torch.as_tensor([channels[k] for k in scored], device=pred.device)
            selected = pred.index_select(0, index)
            cut = self._logit_threshold if self.sigmoid else self.threshold
            pred_mask = (selected >= cut).cpu()
            gt_mask = (label.index_select(0, index.to(label.device)) >= 0.5).cpu()
            tolerances = [self.tolerances[r][k] for k in scored]
            dsc, nsd = binary_dice_nsd(pred_mask, gt_mask, sp.tolist(), tolerances, surface=self.nsd)
            rows = torch.stack(
                [
                    torch.full_like(dsc, r, dtype=torch.float64),
                    torch.tensor(scored, dtype=torch.float64),
                    dsc.double(),
                    nsd.double(),
                ],
                dim=1,
            )
            self._rows.append(rows)

    def _gathered_rows(self) -> torch.Tensor:
        local = torch.cat(self._rows) if self._rows else torch.zeros(0, 4, dtype=torch.float64)
        world_size = idist.get_world_size()
        if world_size == 1:
            return local
        device = idist.device()
        counts = idist.all_gather(torch.tensor([local.shape[0]], device=device))
        shapes = [[int(n), 4] for n in counts.tolist()]
        parts = idist.all_gather_tensors_with_shapes(local.to(device), shapes)
        return torch.cat([p.cpu() for p in parts])

    def _aggregate(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Gather the rows (collective) and build the per-class table and the region/overall summary."""
        rows = self._gathered_rows()
        if rows.shape[0] == 0:
            raise NotComputableError("RegionSegMetrics must have at least one sample before it can be computed.")
        table: list[dict[str, Any]] = []
        for r, classes in self.class_names.items():
            for k, cls in enumerate(classes):
                sel = rows[(rows[:, 0] == r) & (rows[:, 1] == k)]
                if sel.shape[0] == 0:
                    continue
                row = {
                    "region": self.region_names[r],
                    "class": cls,
                    "n": int(sel.shape[0]),
                    "dsc_mean": float(sel[:, 2].mean()),
                    "dsc_std": float(sel[:, 2].std(unbiased=False)),
                }
                if self.nsd:
                    row.update(nsd_mean=float(sel[:, 3].mean()), nsd_std=float(sel[:, 3].std(unbiased=False)))
                table.append(row)
        keys = ("dsc_mean", "nsd_mean") if self.nsd else ("dsc_mean",)
        regions = region_summary(table, keys, overall=None)
        summary = {"regions": regions, "mean_dsc": sum(e["dsc_mean"] for e in regions) / len(regions)}
        if self.nsd:
            summary["mean_nsd"] = sum(e["nsd_mean"] for e in regions) / len(regions)
        self._table, self._summary = table, summary
        return table, summary

    def compute(self) -> float:
        """
        Gather all rows (collective under DDP: call on every rank) and return the overall mean DSC
        (mean over the regions seen of the mean over each region's classes).

        Raises:
            NotComputableError: when no sample was seen.
        """
        return float(self._aggregate()[1]["mean_dsc"])

    def completed(self, engine: Engine, name: str) -> None:
        """Put the overall mean DSC under ``name`` and the NSD, per-region and per-class scalars alongside it."""
        table, summary = self._aggregate()
        metrics = engine.state.metrics
        metrics[name] = float(summary["mean_dsc"])
        if self.nsd:
            metrics[self.nsd_name] = float(summary["mean_nsd"])
        for entry in (*summary["regions"], *table):
            key = entry["region"] + (f"/{entry['class']}" if "class" in entry else "")
            metrics[f"dsc/{key}"] = entry["dsc_mean"]
            if self.nsd:
                metrics[f"nsd/{key}"] = entry["nsd_mean"]

    def table(self) -> list[dict[str, Any]]:
        """
        Per-class rows ``{"region", "class", "n", "dsc_mean", "dsc_std", "nsd_mean", "nsd_std"}`` (means and
        standard deviations over samples, ddof=0) from the last :py:meth:`compute`; computed now if there is none
        (a collective call under DDP: call it on every rank, or after the epoch's ``compute``).
        """
        table = self._table if self._table is not None else self._aggregate()[0]
        return [dict(row) for row in table]


def task_seg_metrics(task_table: Any, **kwargs: Any) -> RegionSegMetrics:
    """
    :class:`RegionSegMetrics` over the tasks of a task table (its ``region_channels``, ``region_names`` and
    ``class_names``), so that a bundle config names the table once: ``{"_target_":
    "medfm_ops.metrics.task_seg_metrics", "task_table": "@region_table", "tolerance_mm": 1.0}``.

    Args:
        task_table: a :class:`~medfm_ops.data.TaskTable`.
        kwargs: the other arguments of :class:`RegionSegMetrics`.
    """
    return RegionSegMetrics(
        task_table.task_channels, task_table.task_names, task_table.class_names, **kwargs
    )
