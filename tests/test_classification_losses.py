# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""The classification method losses against a hand computation (float64): every term and weight of the LoRKD
classification loss and of RD's loss, values and gradients, so that a term switched off or mis-weighted fails; the
decay schedule keeps a configured 0 at 0; phi gets the CKA gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfm_ops.engines import LinearDecayHandler
from medfm_ops.losses import LoRKDClsLoss, RDLoss
from medfm_ops.networks import ReprogrammedStudent, build_cls_network


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (p * (np.log(p) - np.log(q))).sum(1)


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA as HSIC ratios with the centring matrix H (another route than the code's column centring)."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def _t(a: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


# ------------------------------------------------------------------------------------------------------ LoRKD
def _lorkd_case():
    rng = np.random.default_rng(0)
    b, ds, dt = 5, 4, 6
    logits = rng.normal(size=(b, 3))  # task 0: 2 classes, task 1: 3 classes
    feats, teacher = rng.normal(size=(b, ds)), 2.0 * rng.normal(size=(b, dt))
    tasks, labels = np.array([0, 1, 1, 0, 1]), np.array([1, 2, 0, 0, 1])
    return logits, feats, teacher, tasks, labels


@pytest.mark.parametrize("beta,tau,temp", [(0.7, 1.0, 1.0), (0.3, 2.0, 4.0), (0.0, 1.0, 2.0)])
def test_lorkd_cls_loss_value_and_gradients_by_hand(beta, tau, temp):
    logits, feats, teacher, tasks, labels = _lorkd_case()
    loss = LoRKDClsLoss(teacher_dim=6, student_dim=4, num_classes=[2, 3], beta=beta, temperature=tau, kd_temperature=temp).double()
    w, bias = loss.student_map.weight.detach().numpy(), loss.student_map.bias.detach().numpy()
    n = len(labels)
    # task term: CE over each sample's own classes at temperature tau
    ce, d_logits = np.zeros(n), np.zeros_like(logits)
    for i in range(n):
        k = 2 if tasks[i] == 0 else 3
        p = _softmax(logits[i : i + 1, :k] / tau)[0]
        ce[i] = -np.log(p[labels[i]])
        d_logits[i, :k] = (p - np.eye(k)[labels[i]]) / tau / n
    # KD term: T^2 KL(softmax(f_T/T) || softmax(M f / T)), M the student-side map to the teacher's width
    mapped = feats @ w.T + bias
    p_t, q = _softmax(teacher / temp), _softmax(mapped / temp)
    kd = temp**2 * _kl(p_t, q)
    want = ce.mean() + beta * kd.mean()
    d_mapped = beta * temp * (q - p_t) / n  # d/ds of T^2 KL(p || softmax(s/T)) = T (q - p)
    d_feats = d_mapped @ w

    lg, ft, te = _t(logits), _t(feats), _t(teacher)
    value = loss(lg, ft, torch.tensor(labels), torch.tensor(tasks), te)
    assert abs(float(value.detach()) - want) < 1e-10
    value.backward()
    np.testing.assert_allclose(lg.grad.numpy(), d_logits, atol=1e-12)
    f_grad = ft.grad.numpy() if ft.grad is not None else np.zeros_like(feats)  # beta = 0: features unused
    np.testing.assert_allclose(f_grad, d_feats, atol=1e-12)
    assert te.grad is None or not te.grad.abs().any()  # the teacher is a fixed target
    if beta > 0:
        np.testing.assert_allclose(loss.student_map.weight.grad.numpy(), d_mapped.T @ feats, atol=1e-12)
        assert loss.last_components["kd"] == pytest.approx(kd.mean(), abs=1e-10)
    else:
        assert "kd" not in loss.last_components


def test_lorkd_kd_term_has_no_trivial_minimum_and_map_options():
    """Zeroing the map cannot reach KD = 0 (the target stays the teacher's distribution); frozen map: no trainable
    parameter; identity: no map, equal widths required."""
    _, feats, teacher, _, _ = _lorkd_case()
    loss = LoRKDClsLoss(6, 4, [2, 3], beta=1.0).double()
    with torch.no_grad():
        loss.student_map.weight.zero_()
        loss.student_map.bias.zero_()
    logits = torch.zeros(5, 3, dtype=torch.float64)
    loss(logits, _t(feats, False), torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long), _t(teacher, False))
    p_t = _softmax(teacher)
    flat_target = _kl(p_t, np.full_like(p_t, 1 / 6)).mean()
    assert loss.last_components["kd"] == pytest.approx(flat_target, abs=1e-10) and flat_target > 0.05
    frozen = LoRKDClsLoss(6, 4, [2, 3], feature_map="frozen")
    assert not any(p.requires_grad for p in frozen.parameters())
    ident = LoRKDClsLoss(4, 4, [2, 3], feature_map="identity")
    assert not list(ident.parameters())
    with pytest.raises(ValueError, match="equal widths"):
        LoRKDClsLoss(6, 4, [2, 3], feature_map="identity")
    with pytest.raises(ValueError, match="feature_map"):
        LoRKDClsLoss(6, 4, [2, 3], feature_map="teacher")
    assert LoRKDClsLoss(0, 4, [2, 3]).student_map is None  # STL / MTL: no KD term, no map


# --------------------------------------------------------------------------------------------------------- RD
def _rd_case():
    rng = np.random.default_rng(1)
    b, k, d = 6, 3, 5
    return (rng.normal(size=(b, k)), rng.normal(size=(b, k)), rng.normal(size=(b, d)), rng.normal(size=(b, d)),
            np.array([0, 1, 2, 1, 0, 2]))  # fmt: skip


def _rd_hand(z_s, z_t, f_s, f_t, y, alpha, beta, gamma, temp):
    n = len(y)
    onehot = np.eye(z_s.shape[1])[y]
    p_s, p_t = _softmax(z_s), _softmax(z_t)
    ce_s, ce_t = -np.log(p_s[np.arange(n), y]).mean(), -np.log(p_t[np.arange(n), y]).mean()
    kl = temp**2 * _kl(_softmax(z_t / temp), _softmax(z_s / temp)).mean()
    cka = 1.0 - _cka(f_t, f_s)
    value = ce_s + alpha * ce_t + beta * kl + gamma * cka
    d_zs = (p_s - onehot) / n + beta * temp * (_softmax(z_s / temp) - _softmax(z_t / temp)) / n
    d_zt = alpha * (p_t - onehot) / n  # the KL does not push the reprogrammed teacher
    return value, d_zs, d_zt, cka


@pytest.mark.parametrize("alpha,beta,gamma,temp", [(0.3, 0.7, 1.9, 1.0), (1.0, 0.0, 1.0, 2.0), (0.5, 1.2, 0.0, 4.0)])
def test_rd_loss_value_and_gradients_by_hand(alpha, beta, gamma, temp):
    z_s, z_t, f_s, f_t, y = _rd_case()
    loss = RDLoss(alpha=alpha, beta=beta, gamma=gamma, temperature=temp)
    want, d_zs, d_zt, cka = _rd_hand(z_s, z_t, f_s, f_t, y, alpha, beta, gamma, temp)
    ts = [_t(a) for a in (z_s, z_t, f_s, f_t)]
    value = loss(*ts, torch.tensor(y))
    assert abs(float(value.detach()) - want) < 1e-10
    assert loss.last_components["cka"] == pytest.approx(cka, abs=1e-10)
    value.backward()
    np.testing.assert_allclose(ts[0].grad.numpy(), d_zs, atol=1e-12)
    np.testing.assert_allclose(ts[1].grad.numpy(), d_zt, atol=1e-12)
    # CKA gradients against central differences of the hand-computed CKA: both feature sets get it, scaled by gamma
    eps = 1e-6
    for which, tensor in ((2, ts[2]), (3, ts[3])):
        num = np.zeros_like(tensor.grad.numpy())
        base = [z_s, z_t, f_s, f_t]
        for idx in np.ndindex(num.shape):
            plus, minus = [a.copy() for a in base], [a.copy() for a in base]
            plus[which][idx] += eps
            minus[which][idx] -= eps
            num[idx] = (_rd_hand(*plus, y, alpha, beta, gamma, temp)[0] - _rd_hand(*minus, y, alpha, beta, gamma, temp)[0]) / (2 * eps)
        np.testing.assert_allclose(tensor.grad.numpy(), num, atol=1e-7)
        assert (np.abs(num).max() > 1e-4) == (gamma > 0)


def test_rd_phi_receives_the_cka_gradient_and_gamma_zero_switches_it_off():
    """f_t is phi(F_t(x)): with only the CKA term on, phi's parameters get a gradient; with gamma = 0 they do not."""
    torch.manual_seed(0)
    student = ReprogrammedStudent(build_cls_network("resnet_tiny", 2), teacher_dim=7).double()
    x, t_feats, y = torch.randn(4, 1, 12, 12, 12, dtype=torch.float64), torch.randn(4, 7, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    out = student(x, teacher_features=t_feats, return_features=True)
    assert torch.allclose(out["f_t"], student.phi(t_feats)) and torch.allclose(out["z_t"], student.g(out["f_t"]))
    for gamma, expect in ((1.0, True), (0.0, False)):
        student.zero_grad(set_to_none=True)
        out = student(x, teacher_features=t_feats, return_features=True)
        RDLoss(alpha=0.0, beta=0.0, gamma=gamma)(out["z_s"], out["z_t"], out["f_s"], out["f_t"], y).backward()
        g = student.phi.proj.weight.grad
        assert (g is not None and float(g.abs().max()) > 0) == expect, gamma


def test_linear_decay_starts_from_the_configured_weights():
    loss = RDLoss(alpha=0.5, beta=1.0, gamma=0.0)
    handler = LinearDecayHandler(loss)

    class _E:  # the handler reads only engine.state
        class state:  # noqa: N801
            epoch, max_epochs = 1, 5

    handler(_E)
    assert (loss.alpha, loss.beta, loss.gamma) == (0.5, 1.0, 0.0)
    _E.state.epoch = 4
    handler(_E)
    assert (loss.alpha, loss.beta, loss.gamma) == (0.125, 0.25, 0.0)  # a configured 0 (the CKA ablation) stays 0
