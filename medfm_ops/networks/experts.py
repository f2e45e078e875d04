# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Turn any torch/MONAI network into a multi-expert (LoRKD) network, and fuse experts back into the stock network."""

from __future__ import annotations

import copy
import fnmatch
import os
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from medfm_ops.layers import EKSConv, EKSLayer
from medfm_ops.networks.routing import TaskRouting

__all__ = [
    "ExpertNetwork",
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
            task_ids = torch.as_tensor(task_ids, device=x.device).long().view(-1)
            if task_ids.numel() != x.shape[0]:
                raise ValueError(f"task_ids has {task_ids.numel()} entries for a batch of {x.shape[0]} samples.")
            if task_ids.numel() and (task_ids.min() < 0 or task_ids.max() >= self.num_tasks):
                raise IndexError(f"task ids {task_ids.tolist()} out of range for {self.num_tasks} experts.")
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
    ranks: int | Sequence[int] = 8,
    alpha: float = 16.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    copy_net: bool = True,
) -> ExpertNetwork:
    """
    Replace every eligible convolution of ``net`` by an :class:`EKSConv` and wrap it in an :class:`ExpertNetwork`.

    Eligible: ``nn.Conv1d/2d/3d`` with ``groups == 1`` and zero padding mode; grouped/depthwise and transposed
    convolutions stay shared (as in the LoRKD papers). Each new layer's ``W0`` and bias are the original values.

    Args:
        net: any torch / MONAI network (e.g. ``UNet``, ``DynUNet``, ``SegResNet``, ``resnet18``, ``DenseNet121``).
        num_tasks: number of experts ``T``.
        ranks: one rank for all experts or one per expert (rank 0 = that task uses ``W0`` only). Defaults to 8.
        alpha: LoRA scaling numerator (expert ``t`` scaled by ``alpha / r_t``). Defaults to 16.
        include: ``fnmatch`` patterns of qualified module names to convert (all eligible ones when None).
        exclude: ``fnmatch`` patterns of module names to keep shared (e.g. ``["*.conv.unit0.*"]``).
        copy_net: convert a deep copy (the input stays intact). Defaults to True.

    Raises:
        ValueError: when no convolution is converted (e.g. patterns that match nothing).
    """
    net = copy.deepcopy(net) if copy_net else net
    if type(net) in _CONVS:
        raise ValueError("to_experts needs a network containing convolutions, not a bare convolution: use EKSConv.from_conv.")
    targets = []
    for name, m in net.named_modules():
        if type(m) in _CONVS and m.groups == 1 and m.padding_mode == "zeros":
            if (include is None or _matches(name, include)) and not _matches(name, exclude):
                targets.append(name)
    if not targets:
        raise ValueError(
            f"to_experts converted no convolution of {type(net).__name__} (include={include}, exclude={exclude}): "
            "check the patterns against `[n for n, _ in net.named_modules()]`."
        )
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = net.get_submodule(parent_name) if parent_name else net
        setattr(parent, child, EKSConv.from_conv(getattr(parent, child), num_tasks, ranks, alpha))
    return ExpertNetwork(net, num_tasks)


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
    """Expert ranks stored in ``state_dict`` (read from the ``lora_A`` shapes of the model's first EKS layer).

    Returns None when the state dict holds no expert factors for that layer.
    """
    model = getattr(model, "module", model)
    prefix_name, layer = next(eks_layers(model))
    prefix = f"{prefix_name}.lora_A." if prefix_name else "lora_A."
    shapes = {int(k[len(prefix):]): v.shape[0] for k, v in state_dict.items() if k.startswith(prefix)}
    if not shapes:
        return None
    return tuple(shapes[t] // layer.kernel_size[0] for t in range(len(shapes)))


def load_expert_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor] | str | os.PathLike, strict: bool = True
) -> nn.Module:
    """Load a (LoRKD*) checkpoint whose expert ranks may differ from the model's: re-shape the experts, then load.

    Args:
        model: the :class:`ExpertNetwork` (or its DDP wrapper).
        state_dict: a state dict, or the path of a file holding one (e.g. a bundle's ``models/model.pt``).
        strict: as in ``load_state_dict``.

    Raises:
        FileNotFoundError: when the path does not exist (train the bundle first).
    """
    if isinstance(state_dict, (str, os.PathLike)):
        if not os.path.isfile(state_dict):
            raise FileNotFoundError(f"no trained model at {state_dict}: run the bundle's configs/train.json first.")
        state_dict = torch.load(state_dict, map_location="cpu", weights_only=True)
    ranks = ranks_from_state_dict(model, state_dict)
    target = getattr(model, "module", model)
    if ranks is not None and ranks != target.ranks:
        set_expert_ranks(target, ranks)
    target.load_state_dict(state_dict, strict=strict)
    return model


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
