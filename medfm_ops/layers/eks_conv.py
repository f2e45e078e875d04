# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Efficient knowledge separation (EKS) convolution: a shared kernel plus one low-rank expert per task.

Reference: LoRKD, "Low-Rank Knowledge Decomposition for Medical Foundation Models" (CVPR 2024) and its journal
extension. The expert factorisation follows the LoRA convolution convention: for a kernel of shape
``(C_out, C_in, k_0, k_1, ..., k_{d-1})`` expert ``t`` holds

- ``A_t`` of shape ``(r_t * k_0, C_in * k_1 * ... * k_{d-1})`` (Kaiming-uniform initialised),
- ``B_t`` of shape ``(C_out * k_0, r_t * k_0)`` (zero initialised, so every expert starts equal to ``W0``),

and ``delta W_t = (alpha / r_t) * (B_t @ A_t).view(kernel_shape)``. For cubic kernels this is exactly the paper's
``B in R^{C_out k x r k}``, ``A in R^{r k x C_in k^{d-1}}``; for non-cubic kernels the first kernel dimension
plays the role of ``k`` and the remaining ones are folded into ``A``'s columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfm_ops.layers.execution import check_execution_mode

__all__ = ["EKSConv"]

_CONV_FNS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _tuple(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name} must be an int or a sequence of length spatial_dims={spatial_dims}, got {value}.")
    return value


class EKSConv(nn.Module):
    """
    Convolution whose kernel for a sample of task ``t`` is ``W0 + delta W_t`` with a low-rank ``delta W_t``.

    A mixed-task batch runs in one call: the expert deltas are computed once per task present in the batch, added
    to ``W0`` per sample, and executed as ONE grouped convolution (``groups = B``), see :attr:`execution`.
    ``task_ids=None`` runs the shared kernel ``W0`` alone. The layer keeps no routing state: the task ids are an
    argument of every call (inside a network, :class:`medfm_ops.networks.ExpertNetwork` passes them for one forward
    call, see :class:`medfm_ops.networks.TaskRouting`). ``W0`` is never modified in place, so switching experts is
    free and exact; :meth:`fuse` returns a plain ``nn.Conv{1,2,3}d`` for one task.

    Only ``groups == 1`` convolutions are supported: grouped/depthwise convolutions stay shared, as in the paper
    (:func:`medfm_ops.networks.to_experts` leaves them untouched). Transposed convolutions also stay shared.

    The parameter names ``weight`` and ``bias`` match ``nn.Conv{1,2,3}d``, so a converted network keeps the state
    dict keys of its backbone and expert factors live under ``lora_A.<t>`` / ``lora_B.<t>``.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        kernel_size: convolution kernel size.
        num_tasks: number of experts ``T``.
        ranks: rank of every expert (int) or one rank per expert (sequence of length ``T``; LoRKD*).
            A rank of 0 means the task uses ``W0`` only. Defaults to 8.
        alpha: LoRA scaling numerator; expert ``t`` is scaled by ``alpha / r_t``. Defaults to 16.
        stride: convolution stride. Defaults to 1.
        padding: zero padding, an int/sequence or ``"same"``/``"valid"``. Defaults to 0.
        dilation: kernel dilation. Defaults to 1.
        bias: whether to add a learnable bias (shared by all experts). Defaults to True.
        execution: how a mixed-task batch is executed, one of :data:`~medfm_ops.layers.EXECUTION_MODES`.
            Defaults to ``"grouped"``.
        device: device of the new parameters.
        dtype: dtype of the new parameters.

    Example::

        >>> conv = EKSConv(3, 8, 16, 3, num_tasks=4, ranks=[8, 4, 0, 8], padding=1)
        >>> x = torch.randn(2, 8, 16, 16, 16)
        >>> conv(x, torch.tensor([0, 3])).shape
        torch.Size([2, 16, 16, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        num_tasks: int,
        ranks: int | Sequence[int] = 8,
        alpha: float = 16.0,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool = True,
        execution: str = "grouped",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONV_FNS:
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, spatial_dims, "kernel_size")
        self.stride = _tuple(stride, spatial_dims, "stride")
        self.padding = padding if isinstance(padding, str) else _tuple(padding, spatial_dims, "padding")
        self.dilation = _tuple(dilation, spatial_dims, "dilation")
        self.num_tasks = num_tasks
        self.alpha = float(alpha)
        self.execution = execution
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.ranks: tuple[int, ...] = ()
        self._reset_shared()
        self.set_ranks(ranks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(
        cls, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, num_tasks: int, ranks: int | Sequence[int] = 8, alpha: float = 16.0
    ) -> EKSConv:
        """Build an EKS conv whose shared kernel and bias ARE the given convolution's (same tensors, copied values).

        Raises:
            ValueError: when ``conv`` has ``groups != 1`` or a non-zero padding mode.
        """
        if conv.groups != 1:
            raise ValueError(f"EKSConv supports groups == 1 only (grouped convs stay shared), got groups={conv.groups}.")
        if conv.padding_mode != "zeros":
            raise ValueError(f"EKSConv supports padding_mode='zeros' only, got {conv.padding_mode!r}.")
        spatial_dims = conv.weight.dim() - 2
        new = cls(
            spatial_dims,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            num_tasks=num_tasks,
            ranks=ranks,
            alpha=alpha,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(conv.weight.requires_grad)
        return new

    def _reset_shared(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def _k0(self) -> int:
        return self.kernel_size[0]

    @property
    def _a_cols(self) -> int:
        return self.in_channels * math.prod(self.kernel_size[1:])

    def set_ranks(self, ranks: int | Sequence[int]) -> None:
        """(Re)create the expert factors with new ranks: ``A`` Kaiming-uniform, ``B`` zero (each expert = ``W0``).

        Used at construction and by LoRKD* after the warm-up (the experts were frozen at ``B = 0`` then, so
        re-creating them loses nothing).
        """
        ranks = [int(ranks)] * self.num_tasks if isinstance(ranks, int) else [int(r) for r in ranks]
        if len(ranks) != self.num_tasks or any(r < 0 for r in ranks):
            raise ValueError(f"ranks must be one non-negative int per task ({self.num_tasks}), got {ranks}.")
        w = self.weight
        requires_grad = [p.requires_grad for p in self.lora_A] or [True]
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for r in ranks:
            a = torch.empty(r * self._k0, self._a_cols, device=w.device, dtype=w.dtype)
            if r > 0:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(self.out_channels * self._k0, r * self._k0, device=w.device, dtype=w.dtype)
            self.lora_A.append(nn.Parameter(a, requires_grad=requires_grad[0]))
            self.lora_B.append(nn.Parameter(b, requires_grad=requires_grad[0]))
        self.ranks = tuple(ranks)

    # ------------------------------------------------------------------ expert maths
    def delta_weight(self, task: int) -> torch.Tensor:
        """``delta W_t`` of shape ``(C_out, C_in, *kernel_size)`` (zeros for a rank-0 expert)."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task id {task} out of range for {self.num_tasks} experts.")
        r = self.ranks[task]
        if r == 0:
            return torch.zeros_like(self.weight)
        delta = self.lora_B[task] @ self.lora_A[task]
        return delta.view(self.weight.shape) * (self.alpha / r)

    def expert_weight(self, task: int) -> torch.Tensor:
        """Fused kernel ``W0 + delta W_t`` (a new tensor; ``W0`` is untouched)."""
        return self.weight + self.delta_weight(task)

    def fuse(self, task: int | None) -> nn.Module:
        """A plain ``nn.Conv{1,2,3}d`` with kernel ``W0 + delta W_task`` (``W0`` for ``task=None``) and the same bias."""
        conv = _CONV_TYPES[self.spatial_dims](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight if task is None else self.expert_weight(task))
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    # ------------------------------------------------------------------ forward
    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1) -> torch.Tensor:
        return _CONV_FNS[self.spatial_dims](x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x: input of shape ``(B, C_in, *spatial)``.
            task_ids: ``(B,)`` integer task of every sample, or None for the shared kernel ``W0`` only.
                Defaults to None.

        Returns:
            ``(B, C_out, *spatial_out)``.

        Raises:
            ValueError: when ``task_ids`` does not hold one id per sample, or :attr:`execution` is unknown.
            IndexError: when a task id is outside ``[0, num_tasks)``.
        """
        if task_ids is None:
            return self._conv(x, self.weight, self.bias)
        task_ids = torch.as_tensor(task_ids, device=x.device).long().view(-1)
        if task_ids.numel() != x.shape[0]:
            raise ValueError(f"task_ids has {task_ids.numel()} entries for a batch of {x.shape[0]} samples.")
        tasks, inverse = torch.unique(task_ids, return_inverse=True)
        task_list = tasks.tolist()
        if task_list[0] < 0 or task_list[-1] >= self.num_tasks:
            raise IndexError(f"task ids {task_list} out of range for {self.num_tasks} experts.")
        if len(task_list) == 1:  # single-task batch: one plain convolution with the fused kernel
            return self._conv(x, self.expert_weight(task_list[0]), self.bias)
        if check_execution_mode(self.execution) == "grouped":
            return self._forward_grouped(x, task_list, inverse)
        return self._forward_per_task(x, task_list, inverse)

    def _forward_grouped(self, x: torch.Tensor, task_list: list[int], inverse: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        deltas = torch.stack([self.delta_weight(t) for t in task_list])  # (U, C_out, C_in, *k): once per task present
        weight = (self.weight.unsqueeze(0) + deltas[inverse]).reshape(b * self.out_channels, *self.weight.shape[1:])
        bias = None if self.bias is None else self.bias.repeat(b)  # one bias copy per group
        out = self._conv(x.reshape(1, b * self.in_channels, *x.shape[2:]), weight, bias, groups=b)
        return out.view(b, self.out_channels, *out.shape[2:])

    def _forward_per_task(self, x: torch.Tensor, task_list: list[int], inverse: torch.Tensor) -> torch.Tensor:
        outs = []
        order = []
        for u, t in enumerate(task_list):
            idx = torch.nonzero(inverse == u, as_tuple=False).view(-1)
            outs.append(self._conv(x.index_select(0, idx), self.expert_weight(t), self.bias))
            order.append(idx)
        out = torch.cat(outs)
        restore = torch.empty_like(inverse)
        restore[torch.cat(order)] = torch.arange(x.shape[0], device=x.device)
        return out.index_select(0, restore)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}, "
            f"num_tasks={self.num_tasks}, ranks={list(self.ranks)}, alpha={self.alpha}, execution={self.execution!r}"
        )
