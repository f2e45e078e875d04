# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Turn any torch/MONAI network into a multi-expert (LoRKD) network, and fuse experts back into the stock network."""

from __future__ import annotations

import copy
import fnmatch
import os
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from medfm_ops.layers import DEFAULT_EXPERTS, EKSConv, EKSConvTranspose, EKSLayer
from medfm_ops.networks.routing import TaskRouting, checked_task_ids

__all__ = [
    "ExpertNetwork",
    "MONAI_UNET_DECODER",
    "to_experts",
    "export_expert",
    "eks_layers",
    "expert_parameters",
    "backbone_parameters",
    "set_experts_trainable",
    "param_groups",
    "set_expert_ranks",
    "ranks_from_state_dict",
    "load_expert_state_dict",
    "load_fused_expert",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_FACTOR_KEY = re.compile(r"(^|\.)lora_[AB]\.\d+$")

#: ``fnmatch`` patterns naming the decoder (up path) of MONAI's ``UNet``: every level of the UNet is a
#: ``Sequential(down, SkipConnection(submodule), up)``, so the up path is the third element of the top level
#: (``model.2.*``) and of every nested level (``model.1.submodule.2.*``, ``model.1.submodule.1.submodule.2.*``...;
#: ``*`` also matches dots). The bottom layer (``...submodule.conv``/``.residual``) belongs to the encoder.
#: Use as ``to_experts(unet, T, rank_multipliers=dict.fromkeys(MONAI_UNET_DECODER, 2))``, or in a bundle config
#: ``"rank_multipliers": {"model.2.*": 2, "model.*.submodule.2.*": 2}``.
MONAI_UNET_DECODER = ("model.2.*", "model.*.submodule.2.*")


def _matches(name: str, patterns: Sequence[str] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def eks_layers(module: nn.Module) -> Iterator[tuple[str, EKSLayer]]:
    """Yield ``(qualified name, layer)`` for every EKS layer (:class:`~medfm_ops.layers.EKSConv`,
    :class:`~medfm_ops.layers.EKSConvTranspose`) inside ``module``."""
    for name, m in module.named_modules():
        if isinstance(m, EKSLayer):
            yield name, m


class ExpertNetwork(nn.Module):
    """
    Wrapper that routes per-sample task ids to every EKS layer of a converted network.

    The wrapped network's code is unchanged (it calls its layers as ``layer(x)``): each ``forward`` call creates one
    :class:`~medfm_ops.networks.TaskRouting` that passes ``task_ids`` to the EKS layers of THIS module and is gone
    when the call returns or raises. The layers hold no routing state and there are no module-level globals, so
    every DistributedDataParallel process and every DataParallel replica routes its own batch. Wrap with DDP AFTER
    the conversion (and use ``find_unused_parameters=True``: experts of tasks absent from a batch get no gradient).

    Args:
        net: a network whose eligible convolutions were replaced by EKS layers (see :func:`to_experts`).
        num_tasks: number of experts.

    Example::

        >>> from monai.networks.nets import UNet
        >>> model = to_experts(UNet(3, 1, 2, (8, 16), (2,)), num_tasks=4, ranks=4)
        >>> model(torch.randn(2, 1, 16, 16, 16), torch.tensor([0, 2])).shape
        torch.Size([2, 2, 16, 16, 16])
    """

    def __init__(self, net: nn.Module, num_tasks: int) -> None:
        super().__init__()
        self.net = net
        self.num_tasks = num_tasks

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: network input ``(B, C_in, *spatial)``.
            task_ids: ``(B,)`` integer task of every sample; None runs the shared backbone ``W0`` only.
                Defaults to None.

        Raises:
            ValueError: when ``task_ids`` does not hold one id per sample.
            IndexError: when a task id is outside ``[0, num_tasks)``.
        """
        if task_ids is not None:
            task_ids = checked_task_ids(task_ids, x, self.num_tasks, "experts")
        # layers looked up per call: a DataParallel replica routes its own replicated layers
        with TaskRouting((m for _, m in eks_layers(self.net)), task_ids):
            return self.net(x)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Expert ranks (the same in every layer)."""
        return next(m for _, m in eks_layers(self.net)).ranks


def to_experts(
    net: nn.Module,
    num_tasks: int,
    ranks: int | Sequence[int] = DEFAULT_EXPERTS.ranks,
    alpha: float = DEFAULT_EXPERTS.alpha,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    copy_net: bool = True,
    convert_transposed: bool = DEFAULT_EXPERTS.convert_transposed,
    rank_multipliers: Mapping[str, int] | None = DEFAULT_EXPERTS.rank_multipliers,
    scaling: str = DEFAULT_EXPERTS.scaling,
    base_rank: int | None = None,
) -> ExpertNetwork:
    """
    Replace every eligible convolution of ``net`` by an EKS layer and wrap it in an :class:`ExpertNetwork`.

    Eligible: ``nn.Conv1d/2d/3d`` (-> :class:`~medfm_ops.layers.EKSConv`) and, unless ``convert_transposed`` is
    False, ``nn.ConvTranspose1d/2d/3d`` (-> :class:`~medfm_ops.layers.EKSConvTranspose`), each with ``groups == 1``
    and zero padding mode. Grouped/depthwise convolutions always stay shared; ``exclude`` keeps any other layer
    shared. Each new layer's ``W0`` and bias are the original values.

    The LoRKD authors' 3D U-Net gives every 3x3x3 convolution of the encoder and decoder an expert, the decoder ones
    at twice the encoder rank, and leaves its transposed convolutions shared. Our defaults convert every eligible
    convolution, transposed ones included, at the base rank; for a MONAI ``UNet`` pass
    ``rank_multipliers=dict.fromkeys(MONAI_UNET_DECODER, 2)`` for the decoder at twice the rank, and
    ``convert_transposed=False`` to keep the transposed convolutions shared as the authors do. The authors scale
    every expert by ``alpha / base_rank`` whatever its LoRKD* rank (``scaling="constant"``); our default
    ``scaling="rank"`` scales it by ``alpha / r_t``.

    Args:
        net: any torch / MONAI network (e.g. ``UNet``, ``DynUNet``, ``SegResNet``, ``resnet18``, ``DenseNet121``).
        num_tasks: number of experts ``T``.
        ranks: base rank for all experts or one per expert (rank 0 = that task uses ``W0`` only). Defaults to 8.
        alpha: scaling numerator, see ``scaling``. Defaults to 16.
        include: ``fnmatch`` patterns of qualified module names to convert (all eligible ones when None).
        exclude: ``fnmatch`` patterns of module names to keep shared (e.g. ``["*.conv.unit0.*"]``).
        copy_net: convert a deep copy (the input stays intact). Defaults to True.
        convert_transposed: give transposed convolutions experts too. Defaults to True.
        rank_multipliers: ``{fnmatch pattern: integer multiplier}``: a converted layer whose name matches a
            pattern holds factors of rank ``multiplier * r_t`` (e.g. :data:`MONAI_UNET_DECODER` -> 2). Ranks stay
            BASE ranks everywhere (``set_expert_ranks``, ``ExpertNetwork.ranks``, checkpoints). Defaults to None
            (multiplier 1 everywhere).
        scaling: ``"rank"``: expert ``t`` of a layer with multiplier ``m`` is scaled by ``alpha / (m * r_t)``, so
            re-ranking an expert (LoRKD*) changes its scale and effective learning rate; ``"constant"``: by
            ``alpha / (m * base_rank)``, fixed at conversion (the LoRKD authors' choice). See
            :data:`~medfm_ops.layers.EXPERT_SCALINGS`. Defaults to ``"rank"``.
        base_rank: the ``base_rank`` of ``scaling="constant"``. Defaults to ``ranks`` when it is an int (the
            warm-up's uniform rank); required for ``scaling="constant"`` with per-task ranks.

    Names in ``include``/``exclude``/``rank_multipliers`` are those of ``net.named_modules()`` (e.g.
    ``model.2.0.conv`` in a MONAI ``UNet``), without the ``net.`` prefix the :class:`ExpertNetwork` adds.

    Raises:
        ValueError: when no convolution is converted (e.g. patterns that match nothing), when no
            ``rank_multipliers`` pattern matches a converted layer, or when patterns with different multipliers
            match the same layer.

    Example::

        >>> from monai.networks.nets import UNet
        >>> unet = UNet(3, 1, 2, (8, 16, 32), (2, 2), num_res_units=1)
        >>> model = to_experts(unet, num_tasks=4, ranks=8, rank_multipliers=dict.fromkeys(MONAI_UNET_DECODER, 2))
        >>> model.net.model[2][1].conv.unit0.conv.layer_ranks, model.ranks
        ((16, 16, 16, 16), (8, 8, 8, 8))
    """
    net = copy.deepcopy(net) if copy_net else net
    kinds = _CONVS + _CONV_TRANSPOSES if convert_transposed else _CONVS
    if type(net) in _CONVS + _CONV_TRANSPOSES:
        raise ValueError(
            "to_experts needs a network containing convolutions, not a bare convolution: use EKSConv.from_conv "
            "or EKSConvTranspose.from_conv."
        )
    targets = []
    for name, m in net.named_modules():
        if type(m) in kinds and m.groups == 1 and m.padding_mode == "zeros":
            if (include is None or _matches(name, include)) and not _matches(name, exclude):
                targets.append(name)
    if not targets:
        raise ValueError(
            f"to_experts converted no convolution of {type(net).__name__} (include={include}, exclude={exclude}, "
            f"convert_transposed={convert_transposed}): check the patterns against "
            "`[n for n, _ in net.named_modules()]`."
        )
    multipliers = _rank_multipliers(targets, rank_multipliers or {})
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        conv = getattr(parent, child)
        layer_type = EKSConvTranspose if type(conv) in _CONV_TRANSPOSES else EKSConv
        layer = layer_type.from_conv(
            conv, num_tasks, ranks, alpha, rank_multiplier=multipliers[name], scaling=scaling, base_rank=base_rank
        )
        setattr(parent, child, layer)
    return ExpertNetwork(net, num_tasks)


def _rank_multipliers(names: Sequence[str], patterns: Mapping[str, int]) -> dict[str, int]:
    """The rank multiplier of every layer name (1 unless a pattern of ``patterns`` matches it)."""
    out = {}
    for name in names:
        values = {int(v) for p, v in patterns.items() if fnmatch.fnmatchcase(name, p)}
        if len(values) > 1:
            matching = {p: v for p, v in patterns.items() if fnmatch.fnmatchcase(name, p)}
            raise ValueError(f"rank_multipliers patterns {matching} give layer {name!r} different multipliers.")
        out[name] = values.pop() if values else 1
    if patterns and not any(_matches(name, list(patterns)) for name in names):
        raise ValueError(
            f"no rank_multipliers pattern in {list(patterns)} matches a converted layer: check them against "
            "`[n for n, _ in net.named_modules()]` (names without the ExpertNetwork's `net.` prefix)."
        )
    return out


def _unwrap(model: nn.Module) -> ExpertNetwork:
    model = getattr(model, "module", model)  # DistributedDataParallel / DataParallel
    if not isinstance(model, ExpertNetwork):
        raise TypeError(f"expected an ExpertNetwork (from to_experts), got {type(model).__name__}.")
    return model


def export_expert(model: nn.Module, task: int | None) -> nn.Module:
    """
    Fuse expert ``task`` into a plain network: an instance of the ORIGINAL network class whose every EKS conv is
    replaced by ``nn.Conv{1,2,3}d`` with kernel ``W0 + delta W_task`` (``task=None``: the shared backbone).

    The result has the backbone's parameter count and state dict keys, so its state dict loads into the stock
    network definition (no medfm code needed to deploy). The input model is not modified.
    """
    model = _unwrap(model)
    if task is not None and not 0 <= task < model.num_tasks:
        raise IndexError(f"task {task} out of range for {model.num_tasks} experts.")
    net = copy.deepcopy(model.net)
    for name, layer in list(eks_layers(net)):
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        fused = layer.fuse(task)
        fused.weight.requires_grad_(True)
        setattr(parent, child, fused)
    return net


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All expert factors ``A_t, B_t`` of the model."""
    return [p for _, m in eks_layers(model) for p in (*m.lora_A, *m.lora_B)]


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All parameters that are not expert factors (shared kernels, biases, norms, heads...)."""
    experts = {id(p) for p in expert_parameters(model)}
    return [p for p in model.parameters() if id(p) not in experts]


def set_experts_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (warm-up: shared backbone only) or unfreeze the expert factors."""
    for p in expert_parameters(model):
        p.requires_grad_(trainable)


def param_groups(
    model: nn.Module, lr: float, expert_lr: float | None = None, weight_decay: float = 0.0, expert_weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer parameter groups ``[backbone, experts]`` (both always present so a warm-up can unfreeze later).

    Args:
        model: a model containing EKS layers.
        lr: backbone learning rate.
        expert_lr: expert learning rate. Defaults to ``lr``.
        weight_decay: backbone weight decay. Defaults to 0.
        expert_weight_decay: expert weight decay. Defaults to 0 (as is usual for LoRA factors).
    """
    return [
        {"params": backbone_parameters(model), "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
        {
            "params": expert_parameters(model),
            "lr": lr if expert_lr is None else expert_lr,
            "weight_decay": expert_weight_decay,
            "name": "experts",
        },
    ]


def set_expert_ranks(model: nn.Module, ranks: Sequence[int]) -> None:
    """Re-create all experts with per-task ``ranks`` (LoRKD*): A Kaiming-uniform, B zero. Rebuild the optimizer."""
    for _, m in eks_layers(model):
        m.set_ranks(ranks)


def ranks_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> tuple[int, ...] | None:
    """BASE expert ranks stored in ``state_dict`` (read from the ``lora_A`` shapes of the model's first EKS layer,
    divided by that layer's rank multiplier).

    Returns None when the state dict holds no expert factors for that layer, or the model has no EKS layer.

    Raises:
        ValueError: when the factor shapes do not fit the layer's rank multiplier.
    """
    model = getattr(model, "module", model)
    first = next(eks_layers(model), None)
    if first is None:  # a network without experts (baselines): nothing to re-shape
        return None
    prefix_name, layer = first
    prefix = f"{prefix_name}.lora_A." if prefix_name else "lora_A."
    shapes = {int(k[len(prefix):]): v.shape[0] for k, v in state_dict.items() if k.startswith(prefix)}
    if not shapes:
        return None
    return layer.ranks_of_factors([shapes[t] for t in range(len(shapes))])


def load_expert_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | str | os.PathLike, strict: bool = True
) -> nn.Module:
    """Load a (LoRKD*) checkpoint whose expert ranks may differ from the model's: re-shape the experts, then load.

    Args:
        model: the :class:`ExpertNetwork` (or its DDP wrapper); a network without experts (a baseline's stock
            network) loads as with ``load_state_dict``.
        state_dict: a state dict, or the path of a file holding one (e.g. a bundle's ``models/model.pt``).
        strict: as in ``load_state_dict``; also checks first that the checkpoint's expert factors fit the model.

    Raises:
        FileNotFoundError: when the path does not exist (train the bundle first).
        ValueError: (strict) when the checkpoint's expert factors are missing, unexpected or of other shapes than the
            model's: the model was not converted with the ``to_experts`` arguments the checkpoint was trained with.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        if not os.path.isfile(state_dict):
            raise FileNotFoundError(f"no trained model at {state_dict}: run the bundle's configs/train.json first.")
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    ranks = ranks_from_state_dict(model, state_dict)
    target = getattr(model, "module", model)
    if ranks is not None and ranks != target.ranks:
        set_expert_ranks(target, ranks)
    if strict:
        _check_expert_factors(target, state_dict)
    target.load_state_dict(state_dict, strict=strict)
    return model


def _factor_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items() if _FACTOR_KEY.search(k)}


def _check_expert_factors(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    expected, found = _factor_shapes(model.state_dict()), _factor_shapes(state_dict)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    other = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or other:
        detail = [f"{len(missing)} missing (e.g. {missing[:1]})"]
        detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
        if other:
            detail.append(f"{len(other)} of other shapes (e.g. {other[0]}: {found[other[0]]} in the checkpoint, "
                          f"{expected[other[0]]} in the model)")
        raise ValueError(
            f"the checkpoint's expert factors do not fit the model: {', '.join(detail)}. Convert the network with the "
            "to_experts arguments it was trained with (include/exclude, convert_transposed, rank_multipliers)."
        )


def load_fused_expert(
    stock_network: nn.Module, expert_model: nn.Module, checkpoint: str | os.PathLike | dict, task: int
) -> nn.Module:
    """
    Load a trained expert model checkpoint, fuse expert ``task`` and load the fused weights into ``stock_network``
    (a freshly built instance of the backbone's stock class, e.g. from a bundle's ``network_def``).

    Returns:
        ``stock_network`` holding ``W0 + delta W_task`` (strict load: the architectures must match).
    """
    load_expert_state_dict(expert_model, checkpoint)
    stock_network.load_state_dict(export_expert(expert_model, task).state_dict(), strict=True)
    return stock_network
