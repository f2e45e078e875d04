# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Shared machinery of the EKS (efficient knowledge separation) layers: a shared kernel ``W0`` plus one low-rank
expert per task, executed for a mixed-task batch in one grouped call.

Reference: LoRKD, "Low-Rank Knowledge Decomposition for Medical Foundation Models" (CVPR 2024) and its journal
extension. The expert factorisation follows the LoRA convolution convention. For a kernel of shape
``(d_0, d_1, k_0, k_1, ..., k_{n-1})`` (``(C_out, C_in, ...)`` for a convolution, ``(C_in, C_out, ...)`` for a
transposed convolution, as in torch) and a layer rank ``r`` expert ``t`` holds

- ``A_t`` of shape ``(r * k_0, d_1 * k_1 * ... * k_{n-1})`` (Kaiming-uniform initialised),
- ``B_t`` of shape ``(d_0 * k_0, r * k_0)`` (zero initialised, so every expert starts equal to ``W0``),

and ``delta W_t = s_t * (B_t @ A_t).view(kernel_shape)``. For cubic kernels this is the paper's
``B in R^{C_out k x r k}``, ``A in R^{r k x C_in k^{n-1}}``; for non-cubic kernels the first kernel dimension plays
the role of ``k`` and the remaining ones are folded into ``A``'s columns.

Ranks are given as BASE ranks (the network-wide ``r_t`` of every task, e.g. LoRKD*'s per-region ranks); a layer
with ``rank_multiplier = m`` (e.g. 2 in a decoder) holds factors of layer rank ``r = m * r_t``. The scale ``s_t``
is ``alpha / (m * r_t)`` with ``scaling="rank"`` and ``alpha / (m * base_rank)`` with ``scaling="constant"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfm_ops.layers.execution import check_execution_mode
from medfm_ops.layers.expert_settings import DEFAULT_EXPERTS, EXPERT_SCALINGS

__all__ = ["EKSLayer", "EXPERT_SCALINGS", "check_scaling"]



def check_scaling(scaling: str, name: str = "scaling") -> str:
    """Return ``scaling`` when it is one of :data:`EXPERT_SCALINGS`.

    Raises:
        ValueError: when ``scaling`` is unknown.
    """
    if scaling not in EXPERT_SCALINGS:
        raise ValueError(f"{name} must be one of {EXPERT_SCALINGS}, got {scaling!r}.")
    return scaling


def _tuple(value: int | Sequence[int], spatial_dims: int, name: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * spatial_dims
    value = tuple(int(v) for v in value)
    if len(value) != spatial_dims:
        raise ValueError(f"{name} must be an int or a sequence of length spatial_dims={spatial_dims}, got {value}.")
    return value


class EKSLayer(nn.Module):
    """
    Base of the EKS layers: the kernel for a sample of task ``t`` is ``W0 + delta W_t`` with a low-rank
    ``delta W_t`` (see the module docstring for the factor shapes and the scale).

    This class owns the expert machinery (factors, :meth:`set_ranks`, the deltas, task-id checks, grouped and
    per-task execution, :meth:`fuse`, :meth:`from_conv`). A subclass names its stock layer type and geometry and
    implements :meth:`_operator` (the functional call) and :meth:`_weight_shape` (the stock kernel layout).

    A mixed-task batch runs in one call: the kernels ``W0 + delta W_t`` of all tasks present are built with one
    batched multiply-add, gathered per sample, and executed as ONE grouped call (``groups = B``), see
    :attr:`execution`.
    ``task_ids=None`` runs the shared kernel ``W0`` alone. The layer keeps no routing state: the task ids are an
    argument of every call. ``W0`` is never modified in place, so switching experts is free and exact.

    The parameter names ``weight`` and ``bias`` match the stock layer's, so a converted network keeps the state
    dict keys of its backbone and expert factors live under ``lora_A.<t>`` / ``lora_B.<t>``.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: number of input channels.
        out_channels: number of output channels.
        kernel_size: kernel size.
        num_tasks: number of experts ``T``.
        ranks: base rank of every expert (int) or one base rank per expert (sequence of length ``T``; LoRKD*).
            A rank of 0 means the task uses ``W0`` only. Defaults to 8.
        alpha: scaling numerator, see ``scaling``. Defaults to 16.
        bias: whether to add a learnable bias (shared by all experts). Defaults to True.
        execution: how a mixed-task batch is executed, one of :data:`~medfm_ops.layers.EXECUTION_MODES`.
            Defaults to ``"grouped"``.
        rank_multiplier: this layer's factors have rank ``rank_multiplier * r_t`` (e.g. 2 for a decoder layer,
            as in the LoRKD 3D U-Net). Ranks are read and set in base ranks everywhere. Defaults to 1.
        scaling: one of :data:`EXPERT_SCALINGS`. ``"rank"`` scales expert ``t`` by ``alpha / (rank_multiplier * r_t)``
            (loralib; a re-ranked expert changes scale, hence effective learning rate); ``"constant"`` by
            ``alpha / (rank_multiplier * base_rank)``, unchanged by later :meth:`set_ranks` (the LoRKD authors'
            choice for LoRKD*). Defaults to ``"rank"``.
        base_rank: the ``base_rank`` of ``scaling="constant"``. Defaults to ``ranks`` when it is an int; required
            for ``scaling="constant"`` with a sequence of ranks. Unused by ``scaling="rank"``.
        device: device of the new parameters.
        dtype: dtype of the new parameters.

    Raises:
        ValueError: on an unknown ``spatial_dims``/``scaling``, ``num_tasks < 1``, ``rank_multiplier < 1``, invalid
            ranks, or a missing or non-positive ``base_rank`` for ``scaling="constant"``.
    """

    #: stock layer class per ``spatial_dims`` (``fuse`` returns one) and the geometry attributes it shares with us
    _STOCK_TYPES: dict[int, type[nn.Module]] = {}
    _GEOMETRY: tuple[str, ...] = ()

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int],
        num_tasks: int,
        ranks: int | Sequence[int] = DEFAULT_EXPERTS.ranks,
        alpha: float = DEFAULT_EXPERTS.alpha,
        bias: bool = True,
        execution: str = "grouped",
        rank_multiplier: int = 1,
        scaling: str = DEFAULT_EXPERTS.scaling,
        base_rank: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}.")
        if int(rank_multiplier) != rank_multiplier or rank_multiplier < 1:
            raise ValueError(f"rank_multiplier must be an int >= 1, got {rank_multiplier}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, spatial_dims, "kernel_size")
        self.num_tasks = num_tasks
        self.alpha = float(alpha)
        self.execution = execution
        self.rank_multiplier = int(rank_multiplier)
        self.scaling = check_scaling(scaling)
        if base_rank is None and isinstance(ranks, int):
            base_rank = ranks
        if scaling == "constant" and (base_rank is None or base_rank < 1):
            raise ValueError(
                f"scaling='constant' needs base_rank >= 1 (alpha / base_rank), got base_rank={base_rank} with "
                f"ranks={ranks}: pass base_rank (e.g. the warm-up's uniform rank)."
            )
        self.base_rank = None if base_rank is None else int(base_rank)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self._weight_shape(), **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.ranks: tuple[int, ...] = ()
        self._reset_shared()
        self.set_ranks(ranks)

    # ------------------------------------------------------------------ subclass interface
    def _weight_shape(self) -> tuple[int, ...]:
        """Shape of the stock kernel ``W0`` (e.g. ``(C_out, C_in, *kernel_size)`` for a convolution)."""
        raise NotImplementedError

    def _operator(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int = 1
    ) -> torch.Tensor:
        """The functional layer with this layer's geometry, e.g. ``F.conv3d(x, weight, bias, stride, ..., groups)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_conv(cls, conv: nn.Module, num_tasks: int, ranks: int | Sequence[int] = DEFAULT_EXPERTS.ranks,
                  alpha: float = DEFAULT_EXPERTS.alpha, **kwargs):
        """Build an EKS layer whose shared kernel and bias are the given stock layer's (copied values).

        Args:
            conv: a stock layer of this class's type (e.g. ``nn.Conv3d`` for :class:`EKSConv`).
            num_tasks: number of experts.
            ranks: base ranks, see the class arguments. Defaults to 8.
            alpha: scaling numerator. Defaults to 16.
            kwargs: further arguments of the class (``rank_multiplier``, ``scaling``, ``base_rank``, ``execution``).

        Raises:
            TypeError: when ``conv`` is not one of the stock types.
            ValueError: when ``conv`` has ``groups != 1`` or a non-zero padding mode.
        """
        if type(conv) not in cls._STOCK_TYPES.values():
            names = [t.__name__ for t in cls._STOCK_TYPES.values()]
            raise TypeError(f"{cls.__name__}.from_conv expects one of {names}, got {type(conv).__name__}.")
        if conv.groups != 1:
            raise ValueError(
                f"{cls.__name__} supports groups == 1 only (grouped convs stay shared), got groups={conv.groups}."
            )
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__} supports padding_mode='zeros' only, got {conv.padding_mode!r}.")
        new = cls(
            conv.weight.dim() - 2,
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            num_tasks=num_tasks,
            ranks=ranks,
            alpha=alpha,
            bias=conv.bias is not None,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
            **{k: getattr(conv, k) for k in cls._GEOMETRY},
            **kwargs,
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
            fan_in = self.weight[0].numel()  # torch's fan-in for both layouts
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def _k0(self) -> int:
        return self.kernel_size[0]

    @property
    def layer_ranks(self) -> tuple[int, ...]:
        """Ranks of this layer's factors: ``rank_multiplier * r_t`` per task."""
        return tuple(self.rank_multiplier * r for r in self.ranks)

    @property
    def scales(self) -> tuple[float, ...]:
        """Scale ``s_t`` of every expert (0 for a rank-0 expert), see ``scaling``."""
        m = self.rank_multiplier
        if self.scaling == "constant":
            return tuple(self.alpha / (m * self.base_rank) if r else 0.0 for r in self.ranks)
        return tuple(self.alpha / (m * r) if r else 0.0 for r in self.ranks)

    def set_ranks(self, ranks: int | Sequence[int]) -> None:
        """(Re)create the expert factors with new BASE ranks: ``A`` Kaiming-uniform, ``B`` zero (each expert = ``W0``).

        The factors get rank ``rank_multiplier * r_t``. Used at construction and by LoRKD* after the warm-up (the
        experts were frozen at ``B = 0`` then, so re-creating them loses nothing). With ``scaling="constant"`` the
        scales do not change.

        Raises:
            ValueError: when ``ranks`` is not one non-negative int per task.
        """
        ranks = [int(ranks)] * self.num_tasks if isinstance(ranks, int) else [int(r) for r in ranks]
        if len(ranks) != self.num_tasks or any(r < 0 for r in ranks):
            raise ValueError(f"ranks must be one non-negative int per task ({self.num_tasks}), got {ranks}.")
        w = self.weight
        requires_grad = self.lora_A[0].requires_grad if len(self.lora_A) else True
        rows, cols = w.shape[0] * self._k0, w[0].numel() // self._k0
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for r in ranks:
            r_k = self.rank_multiplier * r * self._k0
            a = torch.empty(r_k, cols, device=w.device, dtype=w.dtype)
            if r > 0:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(rows, r_k, device=w.device, dtype=w.dtype)
            self.lora_A.append(nn.Parameter(a, requires_grad=requires_grad))
            self.lora_B.append(nn.Parameter(b, requires_grad=requires_grad))
        self.ranks = tuple(ranks)

    def ranks_of_factors(self, a_rows: Sequence[int]) -> tuple[int, ...]:
        """Base ranks matching ``lora_A`` factors with ``a_rows`` rows each (e.g. read from a checkpoint).

        Raises:
            ValueError: when a row count is not a multiple of ``rank_multiplier * k_0`` (a checkpoint trained with
                another rank multiplier for this layer).
        """
        step = self.rank_multiplier * self._k0
        if any(n % step for n in a_rows):
            raise ValueError(
                f"expert factors with {list(a_rows)} rows do not fit rank_multiplier={self.rank_multiplier} and kernel "
                f"size {self.kernel_size} (multiples of {step} expected): build the model with the rank multipliers "
                "it was trained with."
            )
        return tuple(n // step for n in a_rows)

    # ------------------------------------------------------------------ expert maths
    def _check_task(self, task: int) -> None:
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task id {task} out of range for {self.num_tasks} experts.")

    def _stacked_factors(self, tasks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(s_t B_t, A_t)`` of every task in ``tasks`` stacked as ``(U, d_0 k_0, R)`` and ``(U, R, cols)``, the
        factors of lower rank zero-padded to the largest ``R`` (zero rows/columns add nothing); None if ``R = 0``."""
        for t in tasks:
            self._check_task(t)
        layer_ranks = [self.rank_multiplier * self.ranks[t] * self._k0 for t in tasks]
        r_max = max(layer_ranks, default=0)
        if r_max == 0:
            return None
        if all(r == r_max for r in layer_ranks):
            a = torch.stack([self.lora_A[t] for t in tasks])
            b = torch.stack([self.lora_B[t] for t in tasks])
        else:
            a = torch.stack([F.pad(self.lora_A[t], (0, 0, 0, r_max - r)) for t, r in zip(tasks, layer_ranks)])
            b = torch.stack([F.pad(self.lora_B[t], (0, r_max - r)) for t, r in zip(tasks, layer_ranks)])
        scales = self.scales
        scale = torch.tensor([scales[t] for t in tasks], dtype=b.dtype, device=b.device)
        return b * scale.view(-1, 1, 1), a

    def delta_weights(self, tasks: Sequence[int]) -> torch.Tensor:
        """``delta W_t`` of every task in ``tasks``, shape ``(len(tasks), *weight.shape)``, one batched matmul."""
        factors = self._stacked_factors(tasks)
        if factors is None:
            return self.weight.new_zeros(len(tasks), *self.weight.shape)
        return torch.bmm(*factors).view(len(tasks), *self.weight.shape)

    def delta_weight(self, task: int) -> torch.Tensor:
        """``delta W_t`` of shape ``weight.shape`` (zeros for a rank-0 expert)."""
        return self.delta_weights([task])[0]

    def expert_weights(self, tasks: Sequence[int]) -> torch.Tensor:
        """Fused kernels ``W0 + delta W_t`` of every task in ``tasks``, shape ``(len(tasks), *weight.shape)``, with
        one batched multiply-add (``W0`` is untouched)."""
        factors = self._stacked_factors(tasks)
        if factors is None:
            return self.weight.unsqueeze(0).expand(len(tasks), *self.weight.shape)
        b, a = factors
        w0 = self.weight.reshape(1, b.shape[1], a.shape[2]).expand(len(tasks), -1, -1)
        return torch.baddbmm(w0, b, a).view(len(tasks), *self.weight.shape)

    def expert_weight(self, task: int) -> torch.Tensor:
        """Fused kernel ``W0 + delta W_t`` (``W0`` is untouched)."""
        return self.expert_weights([task])[0]

    def fuse(self, task: int | None) -> nn.Module:
        """A plain stock layer (e.g. ``nn.Conv3d``) with kernel ``W0 + delta W_task`` (``W0`` for ``task=None``), the
        same geometry and the same bias."""
        stock = self._STOCK_TYPES[self.spatial_dims](
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
            **{k: getattr(self, k) for k in self._GEOMETRY},
        )
        with torch.no_grad():
            stock.weight.copy_(self.weight if task is None else self.expert_weight(task))
            if self.bias is not None:
                stock.bias.copy_(self.bias)
        return stock

    # ------------------------------------------------------------------ forward
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
            return self._operator(x, self.weight, self.bias)
        task_ids = torch.as_tensor(task_ids, device=x.device).long().view(-1)
        if task_ids.numel() != x.shape[0]:
            raise ValueError(f"task_ids has {task_ids.numel()} entries for a batch of {x.shape[0]} samples.")
        tasks, inverse = torch.unique(task_ids, return_inverse=True)
        task_list = tasks.tolist()
        if task_list and (task_list[0] < 0 or task_list[-1] >= self.num_tasks):
            raise IndexError(f"task ids {task_list} out of range for {self.num_tasks} experts.")
        if all(self.ranks[t] == 0 for t in task_list):  # every sample runs W0 (also an empty batch)
            return self._operator(x, self.weight, self.bias)
        weights = self.expert_weights(task_list)  # (U, *weight.shape), once per task present
        if len(task_list) == 1:  # single-task batch: one plain call with the fused kernel
            return self._operator(x, weights[0], self.bias)
        if check_execution_mode(self.execution) == "grouped":
            return self._forward_grouped(x, weights.index_select(0, inverse), self.bias)
        return self._forward_per_task(x, weights, inverse)

    def _forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """ONE grouped call: ``x`` ``(B, C, *spatial)``, per-sample kernels ``weights`` ``(B, d_0, d_1, *k)``, viewed
        as the grouped layout ``(B * d_0, d_1, *k)``; the bias is repeated once per group."""
        b = x.shape[0]
        weight = weights.reshape(b * weights.shape[1], *weights.shape[2:])
        bias = None if bias is None else bias.repeat(b)
        out = self._operator(x.reshape(1, b * x.shape[1], *x.shape[2:]), weight, bias, groups=b)
        return out.view(b, -1, *out.shape[2:])

    def _forward_per_task(self, x: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """One plain call per task present (kernels ``weights[u]``) on its sub-batch, outputs put back in order."""
        outs, order = [], []
        for u in range(weights.shape[0]):
            idx = torch.nonzero(inverse == u, as_tuple=False).view(-1)
            outs.append(self._operator(x.index_select(0, idx), weights[u], self.bias))
            order.append(idx)
        out = torch.cat(outs)
        restore = torch.empty_like(inverse)
        restore[torch.cat(order)] = torch.arange(x.shape[0], device=x.device)
        return out.index_select(0, restore)

    def extra_repr(self) -> str:
        geometry = ", ".join(f"{k}={getattr(self, k)}" for k in self._GEOMETRY)
        return (
            f"spatial_dims={self.spatial_dims}, {self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, "
            f"{geometry}, bias={self.bias is not None}, num_tasks={self.num_tasks}, ranks={list(self.ranks)}, "
            f"rank_multiplier={self.rank_multiplier}, alpha={self.alpha}, scaling={self.scaling!r}, "
            f"execution={self.execution!r}"
        )
