# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""SH-PEFT maths: importance against a hand computation, one global top-k threshold, masked training that never
changes a frozen weight (SGD + momentum + weight decay, AdamW decoupled decay), and the sparse delta round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from medfm_ops.peft import (
    DELTA_FORMAT,
    SELECTION_METHODS,
    SparseParameters,
    TensorSubset,
    apply_sparse_delta,
    budget_count,
    estimate_importance,
    fit_head,
    importance_scores,
    module_shares,
    save_sparse_result,
    select_top_k,
    select_weights,
    sparse_delta,
)


class TinyMixed(nn.Module):
    """Every kind of parameter: convolution kernel and bias, batch norm, attention projections, linear, a token."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.attn = nn.MultiheadAttention(4, num_heads=2, batch_first=True)
        self.token = nn.Parameter(torch.randn(1, 1, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x)).flatten(2).transpose(1, 2)  # (B, HW, 4)
        h = torch.cat([self.token.expand(h.shape[0], -1, -1), h], 1)
        h, _ = self.attn(h, h, h)
        return self.head(h[:, 0])


def _loader(n_batches=3, batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (batch,), generator=g))
            for _ in range(n_batches)]  # fmt: skip


def _mixed() -> TinyMixed:
    torch.manual_seed(0)
    return TinyMixed()


# ------------------------------------------------------------------------------------------------------ importance
def _hand_linear_case():
    """y = x W^T + b, L = mean((y - t)^2) per batch: gradients written out by hand (float64)."""
    torch.manual_seed(3)
    lin = nn.Linear(3, 2).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(3)]
    W, b = lin.weight.detach(), lin.bias.detach()
    gW, gb = [], []
    for x, t in batches:
        dy = 2.0 * (x @ W.T + b - t) / t.numel()  # dL/dy for the mean over all B*2 entries
        gW.append(dy.T @ x)
        gb.append(dy.sum(0))
    return lin, batches, (W, b), (gW, gb)


@pytest.mark.parametrize("variant", ["l2", "l1"])
def test_importance_matches_hand_computation(variant):
    lin, batches, (W, b), (gW, gb) = _hand_linear_case()
    est = estimate_importance(lin, batches, nn.MSELoss(), variant=variant)
    if variant == "l2":
        td = {"weight": sum(g * g for g in gW), "bias": sum(g * g for g in gb)}
        ta = {"weight": W * W, "bias": b * b}
    else:
        td = {"weight": sum(gW).abs(), "bias": sum(gb).abs()}
        ta = {"weight": W.abs(), "bias": b.abs()}
    assert est.variant == variant and est.num_batches == 3 and est.seconds > 0 and est.num_weights == 8
    for n in ("weight", "bias"):
        torch.testing.assert_close(est.task_driven[n], td[n], rtol=1e-12, atol=0)
        torch.testing.assert_close(est.task_agnostic[n], ta[n], rtol=0, atol=0)
    s = float((td["weight"].sum() + td["bias"].sum()) / (ta["weight"].sum() + ta["bias"].sum()))
    for lam in (0.5, 1.0, 1.5):
        hybrid = importance_scores(est, "hybrid", lambda_=lam)
        for n in ("weight", "bias"):
            torch.testing.assert_close(hybrid[n], td[n] + lam * s * ta[n], rtol=1e-12, atol=0)
    assert importance_scores(est, "gradient")["weight"] is est.task_driven["weight"]
    assert importance_scores(est, "magnitude")["bias"] is est.task_agnostic["bias"]


def test_importance_covers_all_parameters_and_leaves_the_network_as_it_was():
    net = _mixed().train()
    net.conv.weight.requires_grad_(False)  # a frozen tensor is scored too
    before = {k: v.clone() for k, v in net.state_dict().items()}  # includes BatchNorm running statistics
    est = estimate_importance(net, _loader(4), nn.CrossEntropyLoss(), num_batches=2)
    names = [n for n, _ in net.named_parameters()]
    assert list(est.task_driven) == names and est.num_batches == 2
    assert {"conv.weight", "conv.bias", "norm.weight", "norm.bias", "attn.in_proj_weight", "attn.out_proj.bias",
            "token", "head.weight"} <= set(names)  # fmt: skip
    for n, p in net.named_parameters():
        assert est.task_driven[n].shape == p.shape and float(est.task_driven[n].sum()) > 0, n
    assert net.training and not net.conv.weight.requires_grad and net.conv.bias.requires_grad
    assert all(p.grad is None for p in net.parameters())
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # eval mode: buffers untouched


def test_importance_errors():
    net = _mixed()
    with pytest.raises(ValueError, match="variant"):
        estimate_importance(net, _loader(), nn.CrossEntropyLoss(), variant="l3")
    with pytest.raises(ValueError, match="num_batches"):
        estimate_importance(net, _loader(), nn.CrossEntropyLoss(), num_batches=0)
    with pytest.raises(ValueError, match="no batch"):
        estimate_importance(net, [], nn.CrossEntropyLoss())
    bad = [(torch.full((2, 1, 6, 6), float("nan")), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="non-finite loss.*batch 0"):
        estimate_importance(net, bad, nn.CrossEntropyLoss())


@pytest.mark.parametrize("budget", [1 / 8, 3 / 8, 5 / 8])
def test_sh_peft_mask_is_the_top_k_of_the_hand_computed_hybrid_score(budget):
    """The mask SH-PEFT trains is the top-k, k = round(budget * N), of I_td + lambda * s * I_ta written out by hand
    (numpy argsort, not the library's threshold)."""
    lin, batches, (W, b), (gW, gb) = _hand_linear_case()
    td = np.concatenate([sum(g * g for g in gW).numpy().ravel(), sum(g * g for g in gb).numpy().ravel()])
    ta = np.concatenate([(W * W).numpy().ravel(), (b * b).numpy().ravel()])
    lam = 0.7
    score = td + lam * (td.sum() / ta.sum()) * ta
    k = round(budget * score.size)
    want = np.zeros(score.size, dtype=bool)
    want[np.argsort(-score, kind="stable")[:k]] = True
    masks = select_weights(estimate_importance(lin, batches, nn.MSELoss()), budget=budget, method="hybrid", lambda_=lam)
    got = np.concatenate([masks["weight"].numpy().ravel(), masks["bias"].numpy().ravel()])
    assert np.array_equal(got, want), (got, want, score)
    sparse = SparseParameters(lin, masks)  # and the trained selection is that mask
    assert all(torch.equal(sparse.masks()[n], masks[n]) for n in masks)


# ------------------------------------------------------------------------------------------------------- selection
@pytest.mark.parametrize("budget", [0.001, 0.01, 0.05, 0.37, 1.0])
@pytest.mark.parametrize("method", SELECTION_METHODS)
def test_selected_count_equals_budget_with_one_threshold(budget, method):
    net = _mixed()
    est = estimate_importance(net, _loader(), nn.CrossEntropyLoss())
    masks = select_weights(est, budget=budget, method=method, lambda_=1.0)
    total = sum(p.numel() for p in net.parameters())
    assert sum(int(m.sum()) for m in masks.values()) == budget_count(budget, total) == max(1, round(budget * total))
    assert all(masks[n].shape == p.shape and masks[n].dtype == torch.bool for n, p in net.named_parameters())
    scores = importance_scores(est, method, lambda_=1.0)
    picked = torch.cat([scores[n][masks[n]].double().flatten() for n in masks])
    left = torch.cat([scores[n][~masks[n]].double().flatten() for n in masks])
    assert left.numel() == 0 or float(picked.min()) >= float(left.max())  # one global threshold
    again = select_weights(est, budget=budget, method=method, lambda_=1.0)
    assert all(torch.equal(again[n], masks[n]) for n in masks)  # deterministic


def test_ties_are_broken_by_order_and_baselines_differ():
    scores = {"a": torch.zeros(2, 3), "b": torch.tensor([5.0, 0.0, 0.0]), "c": torch.zeros(4)}
    masks = select_top_k(scores, 4)
    assert masks["b"].tolist() == [True, False, False] and masks["a"].flatten().tolist() == [True] * 3 + [False] * 3
    assert not masks["c"].any()
    est = estimate_importance(_mixed(), _loader(), nn.CrossEntropyLoss())
    sel = {m: select_weights(est, budget=0.05, method=m) for m in SELECTION_METHODS}
    for a, b in [("hybrid", "gradient"), ("hybrid", "magnitude"), ("gradient", "random"), ("magnitude", "random")]:
        assert any(not torch.equal(sel[a][n], sel[b][n]) for n in sel[a]), (a, b)
    other_seed = select_weights(est, budget=0.05, method="random", seed=1)
    assert any(not torch.equal(other_seed[n], sel["random"][n]) for n in other_seed)
    with pytest.raises(ValueError, match="budget"):
        select_weights(est, budget=0.0)
    with pytest.raises(ValueError, match="budget"):
        select_weights(est, budget=1.5)
    with pytest.raises(ValueError, match="method"):
        select_weights(est, method="fisher")
    with pytest.raises(ValueError, match="not finite"):
        select_top_k({"w": torch.tensor([1.0, float("nan")])}, 1)


def test_per_module_allocation_keeps_each_modules_share_and_its_top_scores():
    net = _mixed()
    est = estimate_importance(net, _loader(), nn.CrossEntropyLoss())
    sizes = {}
    for n, p in net.named_parameters():
        sizes[n.split(".")[0]] = sizes.get(n.split(".")[0], 0) + p.numel()
    k = budget_count(0.2, sum(sizes.values()))
    shares = module_shares(sizes, k)
    assert sum(shares.values()) == k and all(abs(shares[g] - k * c / sum(sizes.values())) < 1 for g, c in sizes.items())
    masks = select_weights(est, budget=0.2, method="hybrid", allocation="per_module")
    scores = importance_scores(est, "hybrid", lambda_=1.0)
    for g, share in shares.items():
        names = [n for n in masks if n.split(".")[0] == g]
        assert sum(int(masks[n].sum()) for n in names) == share, g
        picked = torch.cat([scores[n][masks[n]].double().flatten() for n in names])
        left = torch.cat([scores[n][~masks[n]].double().flatten() for n in names])
        assert share == 0 or left.numel() == 0 or float(picked.min()) >= float(left.max()), g  # its own top scores
    one = select_weights(est, budget=0.2, method="hybrid")  # global: another layout here
    headless = select_weights(est, budget=0.2, method="hybrid", train_whole=["head.*"], allocation="per_module")
    assert all(bool(m.all()) for n, m in headless.items() if n.startswith("head."))
    assert any(not torch.equal(one[n], masks[n]) for n in masks)
    assert module_shares({"a": 1, "b": 1, "c": 1}, 2) == {"a": 1, "b": 1, "c": 0}  # ties: the earlier group
    with pytest.raises(ValueError, match="allocation"):
        select_weights(est, allocation="layerwise")


def test_per_tensor_allocation_keeps_each_tensors_share_and_its_top_scores():
    net = _mixed()
    est = estimate_importance(net, _loader(), nn.CrossEntropyLoss())
    sizes = {n: p.numel() for n, p in net.named_parameters()}
    k = budget_count(0.2, sum(sizes.values()))
    shares = module_shares(sizes, k)
    masks = select_weights(est, budget=0.2, method="hybrid", allocation="per_tensor")
    scores = importance_scores(est, "hybrid", lambda_=1.0)
    assert sum(int(m.sum()) for m in masks.values()) == k
    for n, share in shares.items():
        assert int(masks[n].sum()) == share, n
        if 0 < share < sizes[n]:  # its own top scores
            assert float(scores[n][masks[n]].min()) >= float(scores[n][~masks[n]].max()), n
    per_module = select_weights(est, budget=0.2, method="hybrid", allocation="per_module")
    assert any(not torch.equal(per_module[n], masks[n]) for n in masks)


# -------------------------------------------------------------------------------------------- masked training
OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, nesterov=True),
    "adamw_decoupled_wd": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adam_coupled_wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1),
}


def _train(net, optimizer, steps=5, scheduler=None):
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _loader(steps, seed=1, dtype=next(net.parameters()).dtype):
        optimizer.zero_grad()
        loss_fn(net(x), y).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_frozen_weights_never_change_bit_for_bit(opt):
    net = _mixed().train()
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    masks = select_weights(estimate_importance(net, _loader(), nn.CrossEntropyLoss()), budget=0.05)
    sparse = SparseParameters(net, masks)
    optimizer = sparse.attach(OPTIMIZERS[opt](sparse.parameters()))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=6)  # a stock optimiser: schedulers work
    _train(net, optimizer, steps=6, scheduler=scheduler)
    changed = 0
    for n, p in net.named_parameters():
        frozen = ~masks[n]
        assert torch.equal(p.detach()[frozen].view(torch.int32), start[n][frozen].view(torch.int32)), n  # bits
        changed += int((p.detach()[masks[n]] != start[n][masks[n]]).sum())
    assert changed > 0.9 * sparse.num_selected  # the selected weights did train
    assert sparse.num_selected == sum(int(m.sum()) for m in masks.values())
    assert all(torch.equal(sparse.masks()[n], masks[n]) for n in masks)
    state_numel = sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim())
    assert state_numel <= 2 * sparse.num_selected  # optimiser state for the selected entries only


@pytest.mark.parametrize("opt", list(OPTIMIZERS))
def test_selected_entries_follow_the_stock_optimizer(opt):
    """Oracle: a dense run of the stock optimiser with masked gradients whose frozen entries are copied back after
    every step (a whole-model copy, fine in a test) gives the same selected entries as the sparse run."""
    sparse_net, dense_net = _mixed().double(), _mixed().double()
    est = estimate_importance(sparse_net, _loader(dtype=torch.float64), nn.CrossEntropyLoss())
    masks = select_weights(est, budget=0.05)
    sparse = SparseParameters(sparse_net, masks)
    _train(sparse_net, sparse.attach(OPTIMIZERS[opt](sparse.parameters())))

    start = [p.detach().clone() for p in dense_net.parameters()]
    dense_opt = OPTIMIZERS[opt](list(dense_net.parameters()))
    for p, m in zip(dense_net.parameters(), masks.values()):
        p.register_hook(lambda g, m=m: g * m)
    loss_fn = nn.CrossEntropyLoss()
    for step, (x, y) in enumerate(_loader(5, seed=1, dtype=torch.float64)):
        dense_opt.zero_grad()
        loss_fn(dense_net(x), y).backward()
        dense_opt.step()
        if step == 0:  # naive gradient masking is not enough: weight decay moved frozen entries
            frozen = ~masks["head.weight"]
            assert not torch.equal(dense_net.head.weight.detach()[frozen], start[-2][frozen])
        with torch.no_grad():
            for p, p0, m in zip(dense_net.parameters(), start, masks.values()):
                p[~m] = p0[~m]
    for (n, a), b in zip(sparse_net.named_parameters(), dense_net.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12, msg=n)


def test_sparse_parameters_errors():
    net = _mixed()
    masks = select_weights(estimate_importance(net, _loader(), nn.CrossEntropyLoss()), budget=0.05)
    with pytest.raises(ValueError, match="does not have"):
        SparseParameters(net, {**masks, "nope": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="bool tensor of shape"):
        SparseParameters(net, {"head.bias": torch.ones(3)})
    with pytest.raises(ValueError, match="select no weight"):
        SparseParameters(net, {n: torch.zeros_like(m) for n, m in masks.items()})
    sparse = SparseParameters(net, masks)
    with pytest.raises(ValueError, match="sparse.parameters"):
        sparse.attach(torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="no optimiser is attached"):
        nn.CrossEntropyLoss()(net(_loader()[0][0]), _loader()[0][1]).backward()


def _norm_buffers(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


@pytest.mark.parametrize("kind", ["sparse", "linear_probe", "bitfit", "full"])
def test_norm_statistics_unchanged_unless_asked(kind):
    """update_norm_stats=False: BatchNorm buffers stay bit-for-bit through training (train() mode every step, as the
    engines set it); True (plain PyTorch): they move. Selected weights train either way."""
    for update in (False, True):
        net = _mixed().train()
        if kind == "sparse":
            masks = select_weights(estimate_importance(net, _loader(), nn.CrossEntropyLoss()), budget=0.05)
            trainable = SparseParameters(net, masks, update_norm_stats=update)
        else:
            include = {"linear_probe": ["head.*"], "bitfit": ["*.bias", "head.*"], "full": ["*"]}[kind]
            trainable = TensorSubset(net, include, update_norm_stats=update)
        before, weights = _norm_buffers(net), {n: p.detach().clone() for n, p in net.named_parameters()}
        assert set(before) == {"norm.running_mean", "norm.running_var", "norm.num_batches_tracked"}
        _train(net, trainable.attach(torch.optim.AdamW(trainable.parameters(), lr=0.01)), steps=3)
        assert net.training  # the network is in train mode; the hook runs the norm layers in eval mode per call
        after = _norm_buffers(net)
        same = all(torch.equal(after[k], before[k]) for k in before)
        assert same == (not update), (kind, update)
        assert any(not torch.equal(p.detach(), weights[n]) for n, p in net.named_parameters())
        assert f"update_norm_stats={update}" in repr(trainable)
        if kind == "sparse" and not update:  # detach() restores the usual behaviour
            trainable.detach()
            net.train()(_loader(1)[0][0])
            assert not torch.equal(net.norm.running_mean, before["norm.running_mean"])


# ---------------------------------------------------------------------------------------------------- head warm-up
def test_fit_head_trains_only_the_head_and_changes_the_task_gradient():
    """The head alone moves (its loss falls), every other weight and the BatchNorm buffers stay bit for bit, flags and
    mode are restored; the importance estimated afterwards differs from the fresh head's (the point of the warm-up)."""
    net = _mixed().train()
    loader = _loader(n_batches=4, batch=4)
    loss = nn.CrossEntropyLoss()
    fresh = estimate_importance(net, loader, loss).task_driven
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.token.requires_grad_(False)  # a caller's flag, restored as it was

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(loss(net.eval()(x), y) for x, y in loader)) / len(loader)

    start_loss = mean_loss()
    net.train()
    assert fit_head(net, "head", loader, loss, epochs=30, learning_rate=0.1) is net
    after = net.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    assert net.training and not net.token.requires_grad and all(p.grad is None for p in net.parameters())
    assert mean_loss() < start_loss - 0.02
    fitted = estimate_importance(net, loader, loss).task_driven
    assert not torch.allclose(fitted["conv.weight"], fresh["conv.weight"])
    untouched = _mixed()
    assert fit_head(untouched, "head", [], loss, epochs=0, learning_rate=0.05) is untouched  # 0: loader not read


def test_fit_head_errors():
    net, loss = _mixed(), nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        fit_head(net, "head", _loader(), loss, epochs=-1, learning_rate=0.1)
    with pytest.raises(ValueError, match="'fc' is not a module"):
        fit_head(net, "fc", _loader(), loss, epochs=1, learning_rate=0.1)
    with pytest.raises(ValueError, match="no batch"):
        fit_head(net, "head", [], loss, epochs=1, learning_rate=0.1)
    bad = [(torch.full((2, 1, 6, 6), float("nan")), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(ValueError, match="non-finite loss .* epoch 1, batch 0"):
        fit_head(net, "head", bad, loss, epochs=1, learning_rate=0.1)


# ---------------------------------------------------------------------------------------------------------- delta
def _tuned_pair():
    net = _mixed()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    masks = select_weights(estimate_importance(net, _loader(), nn.CrossEntropyLoss()), budget=0.05)
    sparse = SparseParameters(net.train(), masks)
    _train(net, sparse.attach(torch.optim.AdamW(sparse.parameters(), lr=0.01, weight_decay=0.1)))
    return base, {k: v.clone() for k, v in net.state_dict().items()}, sparse.masks()


def test_delta_reproduces_the_tuned_weights_exactly(tmp_path):
    base, tuned, masks = _tuned_pair()
    delta = sparse_delta(base, tuned, masks)
    assert delta["format"] == DELTA_FORMAT
    merged = apply_sparse_delta(base, delta)
    assert all(torch.equal(merged[k], tuned[k]) for k in tuned) and merged.keys() == tuned.keys()
    n_params = sum(int(m.sum()) for m in masks.values())
    buffers = sum(base[k].numel() for k in base if k not in masks)  # BatchNorm statistics move in train mode
    assert 0 < delta["num_changed"] <= n_params + buffers
    assert all(not torch.equal(base[k], tuned[k]) for k in delta["tensors"])
    # a change outside the mask, another base, and a mangled file are refused
    bad = {**tuned, "head.weight": tuned["head.weight"] + (~masks["head.weight"]).float()}
    with pytest.raises(ValueError, match="frozen entries of 'head.weight'"):
        sparse_delta(base, bad, masks)
    with pytest.raises(ValueError, match="another base"):
        apply_sparse_delta(tuned, delta)
    with pytest.raises(ValueError, match="not a sparse delta"):
        apply_sparse_delta(base, {"tensors": {}})

    # the finalize step of a bundle: base and model are the same file, the base is read first
    torch.save(base, tmp_path / "model.pt")
    torch.save({"model": tuned}, tmp_path / "best.pt")
    save_sparse_result(tmp_path / "best.pt", tmp_path / "model.pt", tmp_path / "model.pt", tmp_path / "delta.pt", masks)
    written = torch.load(tmp_path / "model.pt", weights_only=True)
    loaded = torch.load(tmp_path / "delta.pt", weights_only=True)
    assert all(torch.equal(written[k], tuned[k]) for k in tuned)
    assert all(torch.equal(v, tuned[k]) for k, v in apply_sparse_delta(base, loaded).items())
    with pytest.raises(FileNotFoundError, match="never validated"):
        save_sparse_result(tmp_path / "none.pt", tmp_path / "model.pt", tmp_path / "m.pt", tmp_path / "d.pt")
