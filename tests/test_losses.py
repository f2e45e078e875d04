# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""Region-masked Dice+BCE, sigmoid/softmax KL distillation and the LoRKD segmentation objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.losses import DiceLoss

from medfm_ops.losses import (
    LoRKDSegLoss,
    MaskedDiceBCELoss,
    SigmoidKLDivLoss,
    SoftmaxKLDivLoss,
    bernoulli_kl_with_logits,
)

S = 1e-5  # MONAI's Dice smoothing (the hand cases use MONAI's form: squared_pred=False, smooth 1e-5)
MONAI_FORM = {"squared_pred": False, "smooth_nr": S, "smooth_dr": S}
EPS = 1e-7  # SAT's Dice smoothing, the default
LN3 = math.log(3.0)


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


# logits (B, C, 2), target, mask, lambda_dice, lambda_bce, expected (worked out by hand)
HAND_CASES = [
    # p = 0.5 everywhere; channel 0 only: dice = 1 - (2*0.5 + s) / (1 + 1 + s), bce = ln 2
    ([[[0.0, 0.0], [0.0, 0.0]]], [[[1.0, 0.0], [1.0, 1.0]]], [[1, 0]], 1.0, 1.0, 1 - (1 + S) / (2 + S) + math.log(2)),
    # both channels, Dice only: channel 1 dice = 1 - (2*1 + s) / (1 + 2 + s)
    (
        [[[0.0, 0.0], [0.0, 0.0]]],
        [[[1.0, 0.0], [1.0, 1.0]]],
        [[1, 1]],
        1.0,
        0.0,
        ((1 - (1 + S) / (2 + S)) + (1 - (2 + S) / (3 + S))) / 2,
    ),
    # p = (0.75, 0.25) against (1, 0): bce = -ln 0.75 per voxel, weighted by 2
    ([[[LN3, -LN3], [9.0, 9.0]]], [[[1.0, 0.0], [0.0, 0.0]]], [[1, 0]], 0.0, 2.0, -2 * math.log(0.75)),
    # two samples, one channel each: mean over the two selected pairs
    (
        [[[0.0, 0.0], [5.0, 5.0]], [[7.0, 7.0], [LN3, -LN3]]],
        [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 0.0]]],
        [[1, 0], [0, 1]],
        0.0,
        1.0,
        (math.log(2) - math.log(0.75)) / 2,
    ),
]


@pytest.mark.parametrize("logits,target,mask,lambda_dice,lambda_bce,expected", HAND_CASES)
def test_masked_dice_bce_hand_computed(logits, target, mask, lambda_dice, lambda_bce, expected):
    loss_fn = MaskedDiceBCELoss(lambda_dice=lambda_dice, lambda_bce=lambda_bce, **MONAI_FORM)
    loss = loss_fn(_t(logits), _t(target), _mask(mask))
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_default_dice_is_sat_form_hand_computed():
    """Default Dice: SAT's squared denominators and 1e-7 smoothing. p = 0.5 on 2 voxels: sum(p^2) = 0.5."""
    logits, target = _t([[[0.0, 0.0], [0.0, 0.0]]]), _t([[[1.0, 0.0], [1.0, 1.0]]])
    dice_only = MaskedDiceBCELoss(lambda_bce=0.0)
    expected = ((1 - (1 + EPS) / (0.5 + 1 + EPS)) + (1 - (2 + EPS) / (0.5 + 2 + EPS))) / 2
    assert dice_only(logits, target, _mask([[1, 1]])).item() == pytest.approx(expected, rel=1e-12)
    assert MaskedDiceBCELoss(lambda_bce=0.0, **MONAI_FORM)(logits, target, _mask([[1, 1]])).item() != pytest.approx(
        expected, rel=1e-3)


def _sat_dice(logits, target):
    """SAT's binary Dice of one pair, written out: 1 - (2 sum(p g) + eps) / (sum(p^2) + sum(g^2) + eps)."""
    p = torch.sigmoid(logits)
    return 1 - (2 * (p * target).sum() + EPS) / ((p**2).sum() + (target**2).sum() + EPS)


def _loop_reference(logits, target, mask, lambda_dice=1.0, lambda_bce=1.0, monai_form=False):
    dice = DiceLoss(sigmoid=True) if monai_form else None
    pairs = [
        lambda_dice * (dice(logits[b : b + 1, c : c + 1], target[b : b + 1, c : c + 1]) if monai_form
                       else _sat_dice(logits[b, c], target[b, c]))
        + lambda_bce * F.binary_cross_entropy_with_logits(logits[b, c], target[b, c])
        for b, c in mask.nonzero().tolist()
    ]
    return torch.stack(pairs)


# spatial shape, mask rows, lambda_dice, lambda_bce
LOOP_CASES = [
    ((5, 6, 4), [[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]], 1.0, 1.0),
    ((7, 5), [[0, 1, 0, 0], [1, 1, 1, 1]], 0.5, 2.0),
    ((9,), [[0, 0, 0, 1]], 1.0, 0.0),
]


@pytest.mark.parametrize("monai_form", [False, True])
@pytest.mark.parametrize("spatial,mask,lambda_dice,lambda_bce", LOOP_CASES)
def test_masked_dice_bce_matches_per_pair_loop(spatial, mask, lambda_dice, lambda_bce, monai_form):
    torch.manual_seed(0)
    mask = _mask(mask)
    logits = torch.randn(mask.shape[0], 4, *spatial, dtype=torch.float64) * 3
    target = (torch.rand_like(logits) > 0.6).double()
    loss_fn = MaskedDiceBCELoss(lambda_dice=lambda_dice, lambda_bce=lambda_bce, **(MONAI_FORM if monai_form else {}))
    ref = _loop_reference(logits, target, mask, lambda_dice, lambda_bce, monai_form)
    torch.testing.assert_close(loss_fn(logits, target, mask), ref.mean())
    # per-sample: mean over each sample's own pairs, and equal to scoring that sample alone
    per_sample = loss_fn.per_sample_loss(logits, target, mask)
    assert per_sample.shape == (mask.shape[0],)
    for b in range(mask.shape[0]):
        alone = loss_fn(logits[b : b + 1], target[b : b + 1], mask[b : b + 1])
        torch.testing.assert_close(per_sample[b], alone)


def _masked_out_invariance(loss_of_logits, logits, mask):
    """Loss unchanged and gradients exactly zero when the logits of unselected channels change (even to inf/nan)."""
    base = logits.clone().requires_grad_(True)
    loss = loss_of_logits(base)
    loss.backward()
    assert torch.all(base.grad[~mask] == 0)
    assert torch.any(base.grad[mask] != 0)
    changed = logits.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 50
    b, c = (~mask).nonzero()[0].tolist()
    changed[b, c].view(-1)[0] = float("inf")
    changed[b, c].view(-1)[1] = float("nan")
    assert not torch.isfinite(changed).all()
    changed.requires_grad_(True)
    loss2 = loss_of_logits(changed)
    loss2.backward()
    assert loss2.item() == loss.item()
    assert torch.all(changed.grad[~mask] == 0)
    torch.testing.assert_close(changed.grad[mask], base.grad[mask], rtol=0, atol=0)


MASKS = [[[1, 0, 0], [0, 1, 1]], [[0, 0, 1], [0, 0, 1]], [[1, 1, 0], [1, 0, 0]]]


@pytest.mark.parametrize("mask", MASKS)
def test_mask_restricts_task_loss_and_gradients(mask):
    torch.manual_seed(1)
    mask = _mask(mask)
    logits = torch.randn(2, 3, 4, 5, 3)
    target = (torch.rand_like(logits) > 0.5).float()
    target[~mask] = 0.0
    loss_fn = MaskedDiceBCELoss()
    _masked_out_invariance(lambda z: loss_fn(z, target, mask), logits, mask)


@pytest.mark.parametrize("mask", MASKS)
def test_mask_restricts_kl_and_gradients(mask):
    torch.manual_seed(2)
    mask = _mask(mask)
    logits, teacher = torch.randn(2, 3, 4, 5, 3), torch.randn(2, 3, 4, 5, 3)
    kd = SigmoidKLDivLoss(temperature=2.0)
    _masked_out_invariance(lambda z: kd(z, teacher, mask), logits, mask)


BAD_INPUTS = [
    ("all-false mask", (2, 3, 4), (2, 3, 4), torch.zeros(2, 3, dtype=torch.bool), ValueError, "selects no"),
    ("int mask", (2, 3, 4), (2, 3, 4), torch.ones(2, 3, dtype=torch.int64), TypeError, "torch.bool"),
    ("mask shape", (2, 3, 4), (2, 3, 4), torch.ones(3, 2, dtype=torch.bool), ValueError, "channel_mask shape"),
    ("target shape", (2, 3, 4), (2, 3, 5), torch.ones(2, 3, dtype=torch.bool), ValueError, "target shape"),
    ("no spatial dim", (2, 3), (2, 3), torch.ones(2, 3, dtype=torch.bool), ValueError, "at least one spatial"),
]


@pytest.mark.parametrize("name,shape,target_shape,mask,error,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_task_loss_rejects_bad_inputs(name, shape, target_shape, mask, error, message):
    with pytest.raises(error, match=message):
        MaskedDiceBCELoss()(torch.zeros(shape), torch.zeros(target_shape), mask)


def test_per_sample_loss_rejects_empty_row_and_bad_lambdas():
    logits = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"sample\(s\) \[1\]"):
        MaskedDiceBCELoss().per_sample_loss(logits, logits, _mask([[1, 0, 0], [0, 0, 0]]))
    # the pair mean itself is defined when at least one pair is selected
    assert torch.isfinite(MaskedDiceBCELoss()(logits, logits, _mask([[1, 0, 0], [0, 0, 0]])))
    for kwargs in ({"lambda_dice": -1.0}, {"lambda_bce": -0.1}, {"lambda_dice": 0.0, "lambda_bce": 0.0}):
        with pytest.raises(ValueError):
            MaskedDiceBCELoss(**kwargs)


def test_task_loss_accepts_metatensor_and_half_precision():
    torch.manual_seed(3)
    logits, target, mask = torch.randn(2, 3, 6, 6), (torch.rand(2, 3, 6, 6) > 0.5).float(), _mask(MASKS[0])
    ref = MaskedDiceBCELoss()(logits, target, mask)
    meta = MaskedDiceBCELoss()(MetaTensor(logits), MetaTensor(target), mask)
    torch.testing.assert_close(meta.as_tensor() if isinstance(meta, MetaTensor) else meta, ref)
    half = MaskedDiceBCELoss()(logits.bfloat16(), target.bfloat16(), mask)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- distillation


def _bernoulli_kl_explicit(s, t):
    p, q = torch.sigmoid(t), torch.sigmoid(s)
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


KL_CASES = [  # temperature, spatial, mask
    (1.0, (4, 5, 3), [[1, 0, 1], [0, 1, 0]]),
    (2.0, (6, 4), [[1, 1, 1], [1, 1, 1]]),
    (4.0, (7,), [[0, 0, 1], [1, 0, 0]]),
]


@pytest.mark.parametrize("temperature,spatial,mask", KL_CASES)
def test_sigmoid_kl_matches_explicit_bernoulli_formula(temperature, spatial, mask):
    torch.manual_seed(4)
    mask = _mask(mask)
    s = torch.randn(2, 3, *spatial, dtype=torch.float64) * 3
    t = torch.randn(2, 3, *spatial, dtype=torch.float64) * 3
    pairs = mask.nonzero().tolist()
    kl_pairs = [_bernoulli_kl_explicit(s[b, c] / temperature, t[b, c] / temperature).mean() for b, c in pairs]
    expected = torch.stack(kl_pairs).mean() * temperature**2
    kl = SigmoidKLDivLoss(temperature=temperature)(s, t, mask)
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=1e-12)
    assert kl.item() > 0


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("mask", [None, [[1, 0, 1], [0, 1, 0]]])
def test_sigmoid_kl_zero_when_equal(temperature, mask):
    torch.manual_seed(5)
    z = torch.randn(2, 3, 5, 4, 3) * 10
    kl = SigmoidKLDivLoss(temperature)(z, z.clone(), None if mask is None else _mask(mask))
    assert kl.item() == 0.0


def test_sigmoid_kl_no_gradient_to_teacher_and_student_gradient():
    torch.manual_seed(6)
    s = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    temperature = 2.0
    SigmoidKLDivLoss(temperature)(s, t).backward()
    assert t.grad is None
    # d/ds of T^2 * mean(KL(s/T, t/T)) = T * (sigmoid(s/T) - sigmoid(t/T)) / numel
    expected = temperature * (torch.sigmoid(s / temperature) - torch.sigmoid(t / temperature)) / s.numel()
    torch.testing.assert_close(s.grad, expected.detach())


def test_bernoulli_kl_saturated_logits_finite_non_negative():
    s = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0, 1e-3])
    t = torch.tensor([100.0, -30.0, 1e-7, 29.0, -100.0, 1e-3 + 1e-7])
    kl = bernoulli_kl_with_logits(s, t)
    assert torch.all(torch.isfinite(kl)) and torch.all(kl >= 0)
    # confident teacher (p_t ~ 1) vs confident opposite student: KL ~ -log sigmoid(s) = softplus(100) ~ 100
    assert kl[0].item() == pytest.approx(100.0, rel=1e-4)


@pytest.mark.parametrize("temperature,reduction", [(1.0, "mean"), (4.0, "sum"), (2.0, "none")])
def test_softmax_kl(temperature, reduction):
    torch.manual_seed(7)
    s = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    kd = SoftmaxKLDivLoss(temperature=temperature, reduction=reduction)
    p, q = torch.softmax(t / temperature, 1), torch.softmax(s / temperature, 1)
    per_sample = (p * (p / q).log()).sum(1) * temperature**2
    expected = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    out = kd(s, t)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert t.grad is None and s.grad is not None
    assert torch.all(kd(s, s.detach().clone()) == 0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        kd(s[:, :, None], t[:, :, None])
    with pytest.raises(ValueError, match="temperature"):
        SoftmaxKLDivLoss(temperature=0.0)


# ---------------------------------------------------------------- LoRKD objective


@pytest.mark.parametrize("beta,temperature", [(0.1, 1.0), (0.5, 2.0), (0.0, 1.0)])
def test_lorkd_seg_loss_composition(beta, temperature):
    torch.manual_seed(8)
    mask = _mask([[1, 1, 0, 0], [0, 0, 1, 1], [0, 1, 0, 0]])
    s = torch.randn(3, 4, 5, 4, 3, requires_grad=True)
    t = torch.randn(3, 4, 5, 4, 3, requires_grad=True)
    y = (torch.rand(3, 4, 5, 4, 3) > 0.5).float() * mask[:, :, None, None, None]
    loss_fn = LoRKDSegLoss(beta=beta, temperature=temperature)
    total = loss_fn(s, y, mask, teacher_logits=t)
    task = MaskedDiceBCELoss()(s, y, mask)
    kl = SigmoidKLDivLoss(temperature)(s, t, mask)
    torch.testing.assert_close(total, task + beta * kl)
    comps = loss_fn.last_components
    assert set(comps) == {"task", "kl", "total"} and all(isinstance(v, float) for v in comps.values())
    assert comps["task"] == pytest.approx(task.item(), rel=1e-6)
    assert comps["kl"] == pytest.approx(kl.item(), rel=1e-6)
    assert comps["total"] == pytest.approx(total.item(), rel=1e-6)
    per_sample = loss_fn.per_sample_task_loss(s, y, mask)
    torch.testing.assert_close(loss_fn.last_per_sample_task, per_sample.detach())
    assert not loss_fn.last_per_sample_task.requires_grad
    total.backward()
    assert t.grad is None
    assert torch.all(s.grad[~mask] == 0)


def test_lorkd_seg_loss_without_teacher_and_errors():
    torch.manual_seed(9)
    mask = _mask([[1, 0], [0, 1]])
    s, y = torch.randn(2, 2, 4, 4), (torch.rand(2, 2, 4, 4) > 0.5).float()
    loss_fn = LoRKDSegLoss(beta=0.3)
    torch.testing.assert_close(loss_fn(s, y, mask), MaskedDiceBCELoss()(s, y, mask))
    assert loss_fn.last_components["kl"] == 0.0
    assert loss_fn.last_components["total"] == pytest.approx(loss_fn.last_components["task"])
    with pytest.raises(ValueError, match="teacher_logits shape"):
        loss_fn(s, y, mask, teacher_logits=torch.randn(2, 2, 4, 5))
    with pytest.raises(ValueError, match="beta"):
        LoRKDSegLoss(beta=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        LoRKDSegLoss(temperature=0.0)


def test_lorkd_defaults_are_the_paper_form_and_beta_is_crop_size_independent():
    """Defaults: task = mean over (case, annotated class) pairs of SAT's Dice + voxel-mean BCE; kl = mean over the same
    pairs of the voxel-mean Bernoulli KL(teacher || student) at T = 1; total = task + 0.1 * kl. Both are voxel means,
    so a crop twice as large (the same content tiled) gives the same total: beta keeps its weight at any crop size."""
    torch.manual_seed(11)
    mask = _mask([[1, 0, 1], [0, 1, 0]])  # e.g. a partially labelled case: 2 of its region's classes
    s = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    t = torch.randn(2, 3, 4, 5, 3, dtype=torch.float64)
    y = (torch.rand(2, 3, 4, 5, 3) > 0.5).double()
    loss_fn = LoRKDSegLoss()
    assert loss_fn.beta == 0.1 and loss_fn.kd_loss.temperature == 1.0
    total = loss_fn(s, y, mask, teacher_logits=t)
    pairs = mask.nonzero().tolist()
    task = sum(_sat_dice(s[b, c], y[b, c]) + F.binary_cross_entropy_with_logits(s[b, c], y[b, c]) for b, c in pairs)
    q, p = torch.sigmoid(t), torch.sigmoid(s)
    kl_voxels = q * torch.log(q / p) + (1 - q) * torch.log((1 - q) / (1 - p))
    kl = sum(kl_voxels[b, c].mean() for b, c in pairs)
    torch.testing.assert_close(total, (task + 0.1 * kl) / len(pairs))
    tiled = [torch.cat([x, x], dim=2) for x in (s, y, t)]
    torch.testing.assert_close(loss_fn(tiled[0], tiled[1], mask, teacher_logits=tiled[2]), total, rtol=1e-6, atol=0)
    assert loss_fn.last_components["kl"] == pytest.approx(float(kl / len(pairs)), rel=1e-6)
