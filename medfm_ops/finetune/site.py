# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Site fine-tuning of one region network: model preparation, data pipeline, evaluation, reports, deployment."""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    NormalizeIntensityd,
    Orientationd,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    Spacingd,
    SpatialPadd,
)
from torch import nn

from medfm_ops.data import CheckImageLabelShaped, SafeLoadImaged
from medfm_ops.finetune.head import HeadPlan, plan_head, resize_head
from medfm_ops.finetune.lora import add_lora, check_mode, merge_lora
from medfm_ops.finetune.source import SourceModel
from medfm_ops.metrics import RegionSegMetrics, format_markdown, region_metric_output_transform, write_table
from medfm_ops.networks import instantiate
from medfm_ops.utils.atomic_io import atomic_write_text
from medfm_ops.utils.bench import machine_info as bench_machine_info

__all__ = [
    "SiteModel",
    "build_site_model",
    "site_transforms",
    "site_postprocessing",
    "site_metric",
    "ChannelSubsetLoss",
    "evaluate",
    "SiteReport",
    "machine_info",
]


class SiteModel:
    """The network being fine-tuned and how to read / deploy it (built by :py:func:`build_site_model`).

    Attributes:
        network: the module that trains (the stock network, or a :class:`~medfm_ops.finetune.SingleTaskAdapter`).
        network_def: ``_target_`` config of the deployed stock network (with the fine-tuned ``out_channels``).
        output_channels: channels holding site classes 1..n.
        plan: the :class:`~medfm_ops.finetune.HeadPlan`.
        mode: ``"full"`` or ``"lora"``.
        source: the :class:`~medfm_ops.finetune.SourceModel` it came from.
    """

    def __init__(
        self,
        network: nn.Module,
        network_def: dict,
        output_channels: list[int],
        plan: HeadPlan,
        mode: str,
        source: SourceModel,
    ) -> None:
        self.network = network
        self.network_def = network_def
        self.output_channels = output_channels
        self.plan = plan
        self.mode = mode
        self.source = source

    @property
    def site_names(self) -> list[str]:
        return list(self.plan.site_names)

    def load_best(self, checkpoint: str | os.PathLike | None) -> bool:
        """Load the best checkpoint written during training into :attr:`network` (False when there is none)."""
        if checkpoint is None or not os.path.isfile(checkpoint):
            return False
        sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
            sd = sd["model"]
        self.network.load_state_dict(sd)
        return True

    def deployable(self, checkpoint: str | os.PathLike | None = None) -> nn.Module:
        """The stock network to deploy: :attr:`network` (with ``checkpoint`` loaded first when given), adapters merged.

        Returns an eval-mode instance of the stock class holding the fine-tuned weights.
        """
        self.load_best(checkpoint)
        return merge_lora(self.network if self.mode == "lora" else copy.deepcopy(self.network)).eval()

    def count_parameters(self) -> dict[str, int]:
        """``{"total", "trainable"}`` parameter counts of :attr:`network`."""
        return {
            "total": sum(p.numel() for p in self.network.parameters()),
            "trainable": sum(p.numel() for p in self.network.parameters() if p.requires_grad),
        }


def build_site_model(
    source: SourceModel,
    site_names: Sequence[str] | Mapping[str, str],
    mode: str = "full",
    head: str = "auto",
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
) -> SiteModel:
    """
    Prepare the network a site fine-tunes.

    ``init="scratch"`` sources (no weights) get the source's stock architecture with ``out_channels`` = number of site
    classes and a seeded random initialisation. Otherwise the head follows :py:func:`plan_head` (``keep``: the
    network as is, site classes read from the matched region channels; ``resize``: :py:func:`resize_head`).
    ``mode="lora"`` wraps the result with :py:func:`add_lora` (backbone frozen, one adapter per convolution).

    Args:
        source: from :py:func:`~medfm_ops.finetune.load_source`.
        site_names: the site's class names (labels 1..n), a list or ``{"1": name, ...}``.
        mode: ``"full"`` or ``"lora"`` (``"sparse"`` raises NotImplementedError). Defaults to ``"full"``.
        head: ``"auto"``, ``"keep"`` or ``"resize"``. Defaults to ``"auto"``.
        rank: LoRA rank. Defaults to 8.
        alpha: LoRA scaling numerator. Defaults to 16.
        seed: seed of every random initialisation (fresh channels, scratch network). Defaults to 0.

    Raises:
        NotImplementedError: for ``mode="sparse"``.
        ValueError: on an unknown mode/head or a head that cannot hold the site classes.
    """
    check_mode(mode)
    if isinstance(site_names, Mapping):
        site_names = [str(site_names[str(i)]) for i in range(1, len(site_names) + 1)]
    site_names = [str(n) for n in site_names]
    out_key = "out_channels"
    if source.state_dict is None:
        network_def = {**copy.deepcopy(source.network_def), out_key: len(site_names)}
        plan = HeadPlan("resize", site_names, [None] * len(site_names), [None] * len(site_names), len(site_names),
                        list(range(len(site_names))))  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = instantiate(copy.deepcopy(network_def))
    else:
        plan = plan_head(site_names, source.class_names, source.output_channels, int(source.network_def[out_key]), head)
        if plan.mode == "resize":
            network_def, state_dict = resize_head(
                source.network_def, source.state_dict, plan.source_channels, seed=seed
            )
        else:
            network_def, state_dict = copy.deepcopy(source.network_def), source.state_dict
        net = instantiate(copy.deepcopy(network_def))
        net.load_state_dict(state_dict, strict=True)
    if mode == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = add_lora(net, rank=rank, alpha=alpha)
    return SiteModel(net, network_def, list(plan.output_channels), plan, mode, source)


def site_transforms(
    spacing: Sequence[float] | None = None,
    patch_size: Sequence[int] | None = None,
    train: bool = False,
    flip_axes: Sequence[int] = (),
    flip_prob: float = 0.5,
    intensity_prob: float = 0.5,
) -> Compose:
    """
    Preprocessing of ``{"image", "label"}`` items (single-channel image, integer label map 0..n).

    Load (errors name the file), channel first, image/label shape check, RAS orientation, optional resampling to
    ``spacing`` (bilinear image, nearest label; ``None`` keeps the NIfTI header spacing), per-image z-score. For
    training: pad to ``patch_size`` (image with its minimum), random crop of ``patch_size``, optional flips along
    ``flip_axes`` (none by default: flips can swap left/right or anterior/posterior class meanings) and mild
    intensity scale/shift. Image and label become float32 MetaTensors (the affine gives the spacing for NSD in mm).

    Args:
        spacing: target spacing in mm or None. Defaults to None.
        patch_size: training patch size (required when ``train``). Defaults to None.
        train: add crop and augmentation. Defaults to False.
        flip_axes: spatial axes flipped at random in training. Defaults to ().
        flip_prob: probability of each flip. Defaults to 0.5.
        intensity_prob: probability of the intensity scale and of the shift (0.1 each). Defaults to 0.5.

    Raises:
        ValueError: when ``train`` is set without ``patch_size``.
    """
    keys = ["image", "label"]
    xforms: list = [
        SafeLoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        CheckImageLabelShaped("image", "label"),
        Orientationd(keys=keys, axcodes="RAS", labels=None),
    ]
    if spacing is not None:
        xforms.append(Spacingd(keys=keys, pixdim=[float(s) for s in spacing], mode=("bilinear", "nearest")))
    xforms.append(NormalizeIntensityd(keys="image", nonzero=False, channel_wise=True))
    if train:
        if patch_size is None:
            raise ValueError("site_transforms(train=True) needs patch_size.")
        patch = [int(p) for p in patch_size]
        xforms += [
            SpatialPadd(keys="image", spatial_size=patch, mode="minimum"),
            SpatialPadd(keys="label", spatial_size=patch),
            RandSpatialCropd(keys=keys, roi_size=patch, random_size=False),
            *[RandFlipd(keys=keys, prob=flip_prob, spatial_axis=int(a)) for a in flip_axes],
            RandScaleIntensityd(keys="image", factors=0.1, prob=intensity_prob),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=intensity_prob),
        ]
    xforms.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return Compose(xforms)


def _select(output_channels: list[int]):
    index = [int(c) for c in output_channels]

    def select(x: torch.Tensor) -> torch.Tensor:  # [zero logit, site logits]: the bundles' label rule
        return torch.cat([torch.zeros_like(x[:1]), x[index]], dim=0)

    return select


def _drop_background(x: torch.Tensor) -> torch.Tensor:
    return x[1:]


def site_postprocessing(output_channels: Sequence[int]) -> Compose:
    """
    Per-sample postprocessing for evaluation: ``pred`` logits (C, *sp) -> binary masks (n, *sp) by the expert
    bundles' label rule (argmax over ``[0, logits[output_channels]]``), ``label`` map (1, *sp) -> (n, *sp) one-hot
    without background. MetaTensor meta (affine) is kept.
    """
    n = len(output_channels)
    return Compose(
        [
            Lambdad(keys="pred", func=_select(list(output_channels))),
            AsDiscreted(keys="pred", argmax=True, to_onehot=n + 1),
            AsDiscreted(keys="label", to_onehot=n + 1),
            Lambdad(keys=["pred", "label"], func=_drop_background),
        ]
    )


def _site_output_transform(output: Any) -> dict[str, Any]:
    samples = [output] if isinstance(output, Mapping) else list(output)
    return region_metric_output_transform([{**s, "region": 0} for s in samples])


def site_metric(
    site_names: Sequence[str] | Mapping[str, str], region: str = "site", tolerance_mm: float = 1.0
) -> RegionSegMetrics:
    """
    Per-class DSC and NSD (``tolerance_mm``, spacing from each sample's affine, i.e. the NIfTI header unless
    resampled) of :py:func:`site_postprocessing` outputs; the key value is the mean DSC over the site classes.
    """
    if isinstance(site_names, Mapping):
        site_names = [str(site_names[str(i)]) for i in range(1, len(site_names) + 1)]
    names = [str(n) for n in site_names]
    return RegionSegMetrics(
        region_channels={0: list(range(len(names)))},
        region_names={0: region},
        class_names={0: names},
        tolerance_mm=tolerance_mm,
        sigmoid=False,
        output_transform=_site_output_transform,
        merge_batch=False,
    )


class ChannelSubsetLoss(nn.Module):
    """
    A sigmoid segmentation loss on the site channels only: ``loss(pred[:, output_channels], one_hot(label)[:, 1:])``.

    Args:
        loss: e.g. ``monai.losses.DiceCELoss(sigmoid=True)``.
        output_channels: network channels of site labels 1..n.

    Shapes: ``pred`` (B, C, *sp) logits, ``label`` (B, 1, *sp) integer map 0..n.
    """

    def __init__(self, loss: nn.Module, output_channels: Sequence[int]) -> None:
        super().__init__()
        self.loss = loss
        self.output_channels = [int(c) for c in output_channels]

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        from monai.networks import one_hot

        n = len(self.output_channels)
        target = one_hot(label.long(), n + 1, dim=1)[:, 1:]
        return self.loss(pred[:, self.output_channels], target.to(pred.dtype))


def evaluate(
    network: nn.Module,
    dataloader: Any,
    inferer: Any,
    postprocessing: Any,
    metric: RegionSegMetrics,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """
    Run a MONAI :class:`~monai.engines.SupervisedEvaluator` once with ``metric`` as key metric.

    Returns:
        ``{"table": per-class rows, "mean_dsc", "mean_nsd", "seconds"}``.
    """
    evaluator = SupervisedEvaluator(
        device=torch.device(device),
        val_data_loader=dataloader,
        network=network.to(device),
        inferer=inferer,
        postprocessing=postprocessing,
        key_val_metric={"mean_dsc": metric},
        amp=False,
    )
    start = time.perf_counter()
    evaluator.run()
    seconds = time.perf_counter() - start
    table = metric.table()
    return {
        "table": table,
        "mean_dsc": float(evaluator.state.metrics["mean_dsc"]),
        "mean_nsd": float(evaluator.state.metrics[metric.nsd_name]),
        "seconds": seconds,
    }


def machine_info() -> dict[str, Any]:
    """:func:`medfm_ops.utils.bench.machine_info` of the default device plus the MONAI version and load averages."""
    import monai

    info = bench_machine_info("cuda:0" if torch.cuda.is_available() else "cpu")
    info["monai"] = monai.__version__
    info["load_average"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return info


class SiteReport:
    """
    Collects the before/after evaluations of a site fine-tuning run and writes them to ``output_dir``:
    ``metrics_{before,after}.{csv,md}`` (per class), ``metrics.{csv,md}`` (both stages, per class and mean),
    ``summary.json`` (everything, incl. split, head plan, timings, machine), and prints the tables.

    Args:
        output_dir: where the files go (created).
        run_info: JSON-serialisable settings recorded in ``summary.json`` (mode, epochs, split, ...).
    """

    def __init__(self, output_dir: str | os.PathLike, run_info: Mapping[str, Any] | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.info = dict(run_info or {})
        self.stages: dict[str, dict[str, Any]] = {}
        self.start = time.perf_counter()

    @staticmethod
    def _rows(stage: str, result: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = [
            {"stage": stage, "class": r["class"], "n": r["n"], "dsc": r["dsc_mean"], "dsc_std": r["dsc_std"],
             "nsd": r["nsd_mean"], "nsd_std": r["nsd_std"]}
            for r in result["table"]
        ]  # fmt: skip
        n = max((r["n"] for r in rows), default=0)
        rows.append({"stage": stage, "class": "mean", "n": n, "dsc": result["mean_dsc"], "dsc_std": None,
                     "nsd": result["mean_nsd"], "nsd_std": None})  # fmt: skip
        return rows

    def record(self, stage: str, result: Mapping[str, Any]) -> dict[str, Any]:
        """Store, write (``metrics_{stage}.csv/.md``) and print one evaluation from :py:func:`evaluate`."""
        self.stages[stage] = dict(result)
        rows = self._rows(stage, result)
        cols = ["stage", "class", "n", "dsc", "dsc_std", "nsd", "nsd_std"]
        write_table(rows, self.output_dir / f"metrics_{stage}.csv", self.output_dir / f"metrics_{stage}.md", cols)
        tol = self.info.get("nsd_tolerance_mm", 1.0)
        print(f"\n[site fine-tuning] {stage} fine-tuning: DSC and NSD ({tol} mm) on {rows[-1]['n']} validation cases\n"
              + format_markdown(rows, cols), flush=True)  # fmt: skip
        return dict(result)

    def finish(self, site_model: SiteModel, trainer: Any = None, best_checkpoint: str | None = None) -> dict[str, Any]:
        """
        Write the deployable stock network (``model.pt`` + ``network_def.json``), the combined tables and
        ``summary.json``; print the before/after comparison. For LoRA, records the largest difference between the
        adapted and the merged network on a random input (should be float rounding only).
        """
        deployed = site_model.deployable()
        torch.save({k: v.detach().cpu() for k, v in deployed.state_dict().items()}, self.output_dir / "model.pt")
        spec = {"network_def": site_model.network_def, "output_channels": site_model.output_channels,
                "label_names": {str(i): n for i, n in enumerate(site_model.site_names, start=1)}}  # fmt: skip
        atomic_write_text(self.output_dir / "network_def.json", json.dumps(spec, indent=2) + "\n")
        merge_diff = None
        if site_model.mode == "lora":
            patch = self.info.get("patch_size") or [16] * int(site_model.network_def.get("spatial_dims", 3))
            dev = next(site_model.network.parameters()).device
            x = torch.randn(1, int(site_model.network_def.get("in_channels", 1)), *patch, device=dev)
            with torch.no_grad():
                site_model.network.eval()
                merge_diff = float((site_model.network(x) - deployed.to(dev)(x)).abs().max())
        stages = [s for s in ("before", "after") if s in self.stages]
        rows = [r for s in stages for r in self._rows(s, self.stages[s])]
        cols = ["stage", "class", "n", "dsc", "dsc_std", "nsd", "nsd_std"]
        if rows:
            write_table(rows, self.output_dir / "metrics.csv", self.output_dir / "metrics.md", cols)
        times = getattr(getattr(trainer, "state", None), "times", {}) or {}
        summary = {
            **self.info,
            "source": site_model.source.describe(),
            "mode": site_model.mode,
            "head": {"mode": site_model.plan.mode, "out_channels": site_model.plan.out_channels,
                     "classes": site_model.plan.describe(site_model.source.class_names)},  # fmt: skip
            "parameters": site_model.count_parameters(),
            "epochs_run": int(getattr(getattr(trainer, "state", None), "epoch", 0) or 0),
            "train_seconds": times.get("COMPLETED"),
            "total_seconds": time.perf_counter() - self.start,
            "best_checkpoint": best_checkpoint if best_checkpoint and os.path.isfile(best_checkpoint) else None,
            "lora_merge_max_abs_diff": merge_diff,
            "machine": machine_info(),
            **{s: {k: v for k, v in r.items()} for s, r in self.stages.items()},
        }
        atomic_write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
        if rows:
            print("\n[site fine-tuning] before vs after\n" + format_markdown(rows, cols), flush=True)
        print(f"[site fine-tuning] outputs in {self.output_dir}", flush=True)
        return summary
