# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Classification losses: per-task cross-entropy (multi-head), LoRKD's classification loss, RD's loss, logit KD.

Each loss names the batch entries it reads in ``input_keys`` (network outputs and prepared targets), so one engine
adapter (:class:`~medfm_ops.engines.TaskLossAdapter`) serves all of them. After each call ``last_components`` holds
the float value of every term and ``last_per_sample_task`` the ``(B,)`` task loss (LoRKD* warm-up).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from medfm_ops.losses.cka import linear_cka

__all__ = [
    "task_cross_entropy",
    "softmax_kl",
    "UnifiedCELoss",
    "SingleTaskCELoss",
    "LoRKDClsLoss",
    "RDLoss",
    "LogitKDLoss",
    "linear_decay",
]


def _masked(logits: torch.Tensor, task_ids: torch.Tensor | None, num_classes: Sequence[int] | None) -> torch.Tensor:
    if task_ids is None or num_classes is None:
        return logits
    n = torch.as_tensor(list(num_classes), device=logits.device)[task_ids.long()]
    valid = torch.arange(logits.shape[1], device=logits.device)[None] < n[:, None]
    return logits.masked_fill(~valid, float("-inf"))


def task_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    task_ids: torch.Tensor | None = None,
    num_classes: Sequence[int] | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    Per-sample ``CE(y, softmax(logits / temperature))`` over each sample's OWN task's classes: ``(B,)``.

    Args:
        logits: ``(B, C_max)`` (entries beyond a task's class count are ignored).
        labels: ``(B,)`` task-local labels.
        task_ids: ``(B,)`` task of each sample; None = every sample uses all ``C_max`` classes.
        num_classes: class count per task (with ``task_ids``).
        temperature: tau. Defaults to 1.
    """
    logp = F.log_softmax(_masked(logits, task_ids, num_classes) / temperature, dim=1)
    return -logp.gather(1, labels.long().view(-1, 1)).view(-1)


def softmax_kl(target_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-sample ``KL(softmax(target/T) || softmax(logits/T)) * T^2`` ``(B,)``; ``-inf`` logits are classes absent
    from both (their terms are 0)."""
    p_log = F.log_softmax(target_logits / temperature, dim=1)
    q_log = F.log_softmax(logits / temperature, dim=1)
    p = p_log.exp()
    terms = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p))
    return terms.sum(1) * temperature**2


class UnifiedCELoss(nn.Module):
    """Cross-entropy of a unified head over all tasks' classes (the foundation classifier): target ``global_label``.
    Subclasses read another target (``input_keys[1]``)."""

    input_keys = ("logits", "global_label")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per = F.cross_entropy(logits, target.long(), reduction="none")
        self.last_per_sample_task = per.detach()
        self.last_components = {"ce": float(per.mean().detach())}
        return per.mean()


class SingleTaskCELoss(UnifiedCELoss):
    """Cross-entropy of single-task logits ``(B, n_t)`` against the task-local ``label`` (the baselines that train one
    classifier on one task: direct reprogramming ``g(phi(F_t(x)))``, full fine-tuning of the teacher).

    Example::

        >>> SingleTaskCELoss()(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0])).item()  # log(2)
        0.693...
    """

    input_keys = ("logits", "label")


class LoRKDClsLoss(nn.Module):
    """
    LoRKD classification loss (per sample, then averaged over the batch)::

        CE(y, softmax(h_t(f) / tau)) + beta * T^2 * KL(softmax(f_T / T) || softmax(M(f) / T))

    with ``f`` the student's features ``(B, student_dim)``, ``f_T`` the frozen teacher's ``(B, teacher_dim)`` and
    ``M`` a map of the STUDENT's features to the teacher's width. The teacher side is never transformed: its
    distribution is a fixed target, so the KD term has no trivial minimum (a trainable, weight-decayed map of the
    teacher's features could shrink to zero and make the target flat). ``T^2`` keeps the KD gradient's scale
    independent of ``T`` (Hinton et al.).

    ``feature_map``:

    - ``"linear"``: a trainable ``nn.Linear(student_dim, teacher_dim)`` trained with the student (put this
      module's parameters in the optimizer; it is not part of the deployed experts);
    - ``"frozen"``: the same map at its random initialisation, never trained (``requires_grad=False``);
    - ``"identity"``: no map (needs ``student_dim == teacher_dim``).

    Args:
        teacher_dim: teacher feature width. 0 = no distillation term (STL/MTL baselines).
        student_dim: student feature width.
        num_classes: classes per task.
        beta: distillation weight. Defaults to 1.
        temperature: tau of the task cross-entropy. Defaults to 1 (plain CE).
        kd_temperature: T of the feature softmax (the KL is multiplied by ``T^2``). Defaults to 1.
        feature_map: ``"linear"``, ``"frozen"`` or ``"identity"``. Defaults to ``"linear"``.

    Raises:
        ValueError: for an unknown ``feature_map``, ``"identity"`` with different widths, or a non-positive
            temperature.
    """

    input_keys = ("logits", "features", "label", "task_id", "teacher_features")
    feature_maps = ("linear", "frozen", "identity")

    def __init__(
        self, teacher_dim: int, student_dim: int, num_classes: Sequence[int], beta: float = 1.0,
        temperature: float = 1.0, kd_temperature: float = 1.0, feature_map: str = "linear",
    ) -> None:  # fmt: skip
        super().__init__()
        if feature_map not in self.feature_maps:
            raise ValueError(f"feature_map must be one of {self.feature_maps}, got {feature_map!r}.")
        if not (temperature > 0 and kd_temperature > 0):
            raise ValueError(f"temperatures must be > 0, got temperature={temperature}, kd_temperature={kd_temperature}.")
        self.num_classes = [int(n) for n in num_classes]
        self.beta, self.temperature, self.kd_temperature = float(beta), float(temperature), float(kd_temperature)
        self.teacher_dim, self.feature_map = int(teacher_dim), feature_map
        self.student_map: nn.Module | None = None
        if self.teacher_dim and feature_map == "identity":
            if int(student_dim) != self.teacher_dim:
                raise ValueError(f"feature_map='identity' needs equal widths, got student {student_dim}, teacher {teacher_dim}.")
            self.student_map = nn.Identity()
        elif self.teacher_dim:
            self.student_map = nn.Linear(int(student_dim), self.teacher_dim)
            self.student_map.requires_grad_(feature_map == "linear")

    def forward(
        self, logits: torch.Tensor, features: torch.Tensor, label: torch.Tensor, task_id: torch.Tensor,
        teacher_features: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """
        Args:
            logits: ``(B, C_max)`` student logits of each sample's task head.
            features: ``(B, student_dim)`` student features.
            label: ``(B,)`` task-local labels.
            task_id: ``(B,)`` task ids.
            teacher_features: ``(B, teacher_dim)`` frozen teacher features (detached here).

        Returns:
            scalar loss; ``last_components`` holds ``ce`` and ``kd`` (the KL before ``beta``, with ``T^2``).
        """
        ce = task_cross_entropy(logits, label, task_id, self.num_classes, self.temperature)
        self.last_per_sample_task = ce.detach()
        total = ce.mean()
        comps = {"ce": float(total.detach())}
        if self.student_map is not None and self.beta > 0:
            if teacher_features is None:
                raise ValueError("LoRKDClsLoss with beta > 0 needs teacher_features (give the prepare_batch a teacher).")
            kd = softmax_kl(teacher_features.detach(), self.student_map(features), self.kd_temperature).mean()
            total = total + self.beta * kd
            comps["kd"] = float(kd.detach())
        self.last_components = comps
        return total


class RDLoss(nn.Module):
    """
    Reprogramming Distillation loss::

        CE(y, z_s) + alpha * CE(y, z_t) + beta * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + gamma * (1 - CKA(f_t, f_s))

    with ``z_s = g(F_s(x))`` the student's logits, ``z_t = g(phi(F_t(x)))`` the reprogrammed teacher's, ``f_s =
    F_s(x)`` the student's features and ``f_t = phi(F_t(x))`` the REPROGRAMMED teacher features (the input of the
    shared classifier ``g``), so that ``phi`` receives the CKA gradient as well as the student. ``z_t`` is detached
    inside the KL (the student follows the reprogrammed teacher, not the reverse). ``alpha``, ``beta`` and
    ``gamma`` are attributes; :class:`~medfm_ops.engines.LinearDecayHandler` decays each linearly from its
    configured value to 0 over the epochs. ``gamma = 0`` is the paper's ablation without CKA, ``beta = 0`` the one
    without KL.

    Args:
        alpha: initial weight of the reprogrammed teacher's CE. Defaults to 1.
        beta: initial weight of the KL term. Defaults to 1.
        gamma: initial weight of the CKA term. Defaults to 1.
        temperature: KL temperature T. Defaults to 1.
    """

    input_keys = ("z_s", "z_t", "f_s", "f_t", "label")

    def __init__(self, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}.")
        self.alpha, self.beta, self.gamma, self.temperature = float(alpha), float(beta), float(gamma), float(temperature)

    def forward(
        self, z_s: torch.Tensor, z_t: torch.Tensor | None, f_s: torch.Tensor, f_t: torch.Tensor | None, label: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            z_s: ``(B, K)`` student logits.
            z_t: ``(B, K)`` reprogrammed teacher logits, or None (no teacher: the scratch baseline).
            f_s: ``(B, D)`` student features.
            f_t: ``(B, D)`` reprogrammed teacher features ``phi(F_t(x))``, or None.
            label: ``(B,)`` labels.

        Returns:
            scalar loss; ``last_components`` holds every term before its weight and the weights used.
        """
        ce_s = F.cross_entropy(z_s, label.long(), reduction="none")
        self.last_per_sample_task = ce_s.detach()
        total = ce_s.mean()
        comps = {"ce_s": float(total.detach()), "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}
        if z_t is not None:
            if f_t is None:
                raise ValueError("RDLoss needs the reprogrammed teacher features f_t with z_t (ReprogrammedStudent(return_features=True)).")
            ce_t = F.cross_entropy(z_t, label.long())
            kl = softmax_kl(z_t.detach(), z_s, self.temperature).mean()
            cka = 1.0 - linear_cka(f_t, f_s) if f_s.shape[0] > 1 else f_s.new_zeros(())
            total = total + self.alpha * ce_t + self.beta * kl + self.gamma * cka
            comps.update(ce_t=float(ce_t.detach()), kl=float(kl.detach()), cka=float(cka.detach()))
        self.last_components = comps
        return total


class LogitKDLoss(nn.Module):
    """Logit KD baseline: ``CE(y, z_s) + beta * KL(softmax(z_T / T) || softmax(z_s / T)) T^2`` with ``z_T`` the
    teacher's logits of the sample's task (``teacher_task_logits``)."""

    input_keys = ("z_s", "label", "teacher_task_logits")

    def __init__(self, beta: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.beta, self.temperature = float(beta), float(temperature)

    def forward(self, z_s: torch.Tensor, label: torch.Tensor, teacher_task_logits: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(z_s, label.long(), reduction="none")
        kd = softmax_kl(teacher_task_logits, z_s, self.temperature)
        self.last_per_sample_task = ce.detach()
        self.last_components = {"ce": float(ce.mean().detach()), "kd": float(kd.mean().detach())}
        return ce.mean() + self.beta * kd.mean()


def linear_decay(epoch: int, max_epochs: int, start: float = 1.0, end: float = 0.0) -> float:
    """Value at ``epoch`` (1-based) of a linear schedule from ``start`` (epoch 1) to ``end`` (epoch ``max_epochs``)."""
    if max_epochs < 1 or not 1 <= epoch <= max_epochs:
        raise ValueError(f"epoch must be in 1..max_epochs, got epoch={epoch}, max_epochs={max_epochs}.")
    if max_epochs == 1:
        return float(start)
    return float(start + (end - start) * (epoch - 1) / (max_epochs - 1))
