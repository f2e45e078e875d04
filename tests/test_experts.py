# Copyright (c) medfm contributors
# Licensed under the Apache License, Version 2.0.
"""to_experts / export_expert on MONAI networks: routing, fusion exactness, stock state dicts."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.networks.nets import UNet, BasicUNet, DenseNet121, DynUNet, SegResNet, resnet18, resnet50
from torch import nn

from medfm_ops.layers import EKSConv, EKSLayer
from medfm_ops.networks import (
    MONAI_UNET_DECODER,
    ExpertNetwork,
    TaskRouting,
    backbone_parameters,
    eks_layers,
    expert_parameters,
    export_expert,
    load_expert_state_dict,
    lorkd_star_ranks,
    param_groups,
    ranks_from_state_dict,
    round_to_even,
    set_execution,
    set_expert_ranks,
    set_experts_trainable,
    to_experts,
)

# name, builder, input spatial size. The classifiers keep their stock block structure (ResNet basic and bottleneck
# blocks with their shortcut convolutions, DenseNet121's 6-12-24-16 dense blocks and transitions) at a quarter of
# the widths: the export is checked layer by layer, the width changes nothing in it (the full widths took ~40 s
# each in float64)
NETWORKS = [
    ("UNet", lambda: UNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, norm="INSTANCE"), 16),
    ("BasicUNet", lambda: BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), 32),
    ("DynUNet", lambda: DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16]), 16),
    ("SegResNet", lambda: SegResNet(3, init_filters=8, norm=("GROUP", {"num_groups": 4}), in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)), 16),
    ("resnet18", lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=3, widen_factor=0.25), 16),
    ("resnet50", lambda: resnet50(spatial_dims=3, n_input_channels=1, num_classes=3, widen_factor=0.25), 16),
    ("DenseNet121", lambda: DenseNet121(spatial_dims=3, in_channels=1, out_channels=3, init_features=16,
                                        growth_rate=8), 32),
]
TASKS = torch.tensor([0, 2, 1, 2])
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _randomise_experts(model: nn.Module) -> None:
    with torch.no_grad():
        for _, layer in eks_layers(model):
            for b in layer.lora_B:
                b.normal_(std=0.05)


@pytest.mark.parametrize("name,build,size", NETWORKS, ids=[n[0] for n in NETWORKS])
def test_export_equals_wrapper_and_loads_into_stock(name, build, size):
    torch.manual_seed(0)
    stock = build().double().eval()
    model = to_experts(stock, num_tasks=3, ranks=[2, 4, 2], alpha=4.0).double().eval()
    n_convs = sum(1 for m in stock.modules() if type(m) in CONV_TYPES and m.groups == 1)  # transposed ones too
    assert len(list(eks_layers(model))) == n_convs > 0
    _randomise_experts(model)
    x = torch.randn(len(TASKS), 1, size, size, size, dtype=torch.float64)
    fresh = build().double()
    with torch.no_grad():
        mixed = model(x, TASKS)
        mixed = mixed[0] if isinstance(mixed, (list, tuple)) else mixed
        assert not torch.allclose(mixed, model(x)[0] if isinstance(model(x), (list, tuple)) else model(x))
        for t in range(3):
            expert = export_expert(model, t)
            assert type(expert) is type(stock)
            assert not any(isinstance(m, EKSLayer) for m in expert.modules())
            assert sum(p.numel() for p in expert.parameters()) == sum(p.numel() for p in stock.parameters())
            idx = (TASKS == t).nonzero().view(-1)
            out = expert(x[idx])
            out = out[0] if isinstance(out, (list, tuple)) else out
            assert (out - mixed[idx]).abs().max().item() <= 1e-8, f"{name}: expert {t} differs from the mixed batch"
            fresh.load_state_dict(expert.state_dict(), strict=True)  # the stock definition takes the fused weights
    # the shared backbone W0 was never touched: exporting task None gives back the stock weights
    for k, v in export_expert(model, None).state_dict().items():
        assert torch.equal(v, stock.state_dict()[k]), k


def _no_routing_state(model: nn.Module, layer_attrs: dict[int, set[str]]) -> bool:
    """No forward hook left on any module, and every EKS layer holds exactly the attributes it had before."""
    hooks = any(m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs or m._forward_hooks for m in model.modules())
    attrs = all(set(vars(layer)) == layer_attrs[id(layer)] for _, layer in eks_layers(model))
    return not hooks and attrs


def test_no_routing_state_after_forward_or_error_and_input_net_untouched():
    net = UNet(3, 1, 2, (4, 8), (2,))
    model = to_experts(net, 2, 2)
    assert not any(isinstance(m, EKSConv) for m in net.modules()), "copy_net=True keeps the input intact"
    attrs = {id(layer): set(vars(layer)) for _, layer in eks_layers(model)}
    assert not any("task_ids" in a for names in attrs.values() for a in names), "no routing attribute"
    seen = []
    first = next(eks_layers(model))[1]
    probe = first.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs.get("task_ids")),
                                        with_kwargs=True)
    model(torch.randn(2, 1, 8, 8, 8), torch.tensor([0, 1]))
    probe.remove()
    assert len(seen) == 1 and seen[0].tolist() == [0, 1], "the ids reach the layer as its task_ids argument"
    assert _no_routing_state(model, attrs)
    with pytest.raises(IndexError, match="out of range"):  # raised before routing starts
        model(torch.randn(2, 1, 8, 8, 8), torch.tensor([0, 7]))
    assert _no_routing_state(model, attrs)
    with pytest.raises(RuntimeError):  # raised by the first EKS conv, inside the routed forward (3 channels, not 1)
        model(torch.randn(2, 3, 8, 8, 8), torch.tensor([0, 1]))
    assert _no_routing_state(model, attrs)
    model(torch.randn(2, 1, 8, 8, 8))  # no task ids: nothing registered
    assert _no_routing_state(model, attrs)


def test_task_routing_explicit_ids_win_and_single_use():
    layer = EKSConv(2, 2, 3, 3, num_tasks=3, ranks=2, padding=1, dtype=torch.float64)
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(2, 2, 6, 6, dtype=torch.float64)
    routing = TaskRouting([layer], torch.tensor([1, 2]))
    with routing:
        assert torch.equal(layer(x), layer(x, torch.tensor([1, 2])))
        assert torch.equal(layer(x, torch.tensor([0, 0])), layer(x, task_ids=torch.tensor([0, 0])))
        assert not torch.equal(layer(x, torch.tensor([0, 0])), layer(x))
        with pytest.raises(RuntimeError, match="already active"):
            routing.__enter__()
    assert not layer._forward_pre_hooks and torch.equal(layer(x), layer(x, None))


def _cpu_replicas(module: nn.Module, n: int) -> list[nn.Module]:
    """``n`` replicas built as ``torch.nn.parallel.replicate`` builds them (``Module._replicate_for_data_parallel``:
    a shallow ``__dict__`` copy, so every replica SHARES its hook dictionaries with the original), on CPU."""
    modules = list(module.modules())
    index = {id(m): i for i, m in enumerate(modules)}
    replicas = []
    for _ in range(n):
        copies = [m._replicate_for_data_parallel() for m in modules]
        for m, rep in zip(modules, copies):
            for key, child in m._modules.items():
                rep._modules[key] = None if child is None else copies[index[id(child)]]
            for key, p in m._parameters.items():
                setattr(rep, key, None if p is None else p.view_as(p))
        replicas.append(copies[0])
    return replicas


@pytest.mark.parametrize("execution", ["grouped", "per_task"])
def test_data_parallel_replicas_route_their_own_batch_concurrently(execution):
    torch.manual_seed(0)
    model = to_experts(UNet(3, 1, 2, (4, 8), (2,), num_res_units=1), num_tasks=3, ranks=2).double().eval()
    _randomise_experts(model)
    set_execution(model, execution)
    attrs = {id(layer): set(vars(layer)) for _, layer in eks_layers(model)}
    chunks = [(torch.randn(2, 1, 8, 8, 8, dtype=torch.float64), torch.tensor(ids)) for ids in ([0, 1], [2, 2], [1, 0])]
    with torch.no_grad():
        expected = [model(x, ids) for x, ids in chunks]
        replicas = _cpu_replicas(model, len(chunks))
        layer0 = next(eks_layers(model))[1]
        assert next(eks_layers(replicas[1]))[1]._forward_pre_hooks is layer0._forward_pre_hooks, "shared hook dicts"
        barrier = threading.Barrier(len(chunks))
        errors: list[float | BaseException] = [0.0] * len(chunks)

        def worker(i: int) -> None:
            try:
                barrier.wait()
                for _ in range(8):
                    out = replicas[i](*chunks[i])
                    errors[i] = max(errors[i], (out - expected[i]).abs().max().item())
            except BaseException as e:  # reported below
                errors[i] = e

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(chunks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(isinstance(e, float) and e <= 1e-12 for e in errors), errors
    assert _no_routing_state(model, attrs)


def test_include_exclude_and_loud_failure():
    net = UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=0)
    all_convs = len(list(eks_layers(to_experts(net, 2))))
    subset = to_experts(net, 2, exclude=["model.0.*"])
    assert 0 < len(list(eks_layers(subset))) < all_convs
    assert all(not n.startswith("net.model.0.") for n, _ in eks_layers(subset))
    with pytest.raises(ValueError, match="converted no convolution"):
        to_experts(net, 2, include=["does.not.exist*"])


def test_transposed_converted_by_default_grouped_stay_shared():
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv3d(4, 4, 3, groups=4), nn.ConvTranspose3d(4, 2, 2, stride=2),
                        nn.ConvTranspose3d(2, 2, 2, groups=2))
    kinds = [type(m).__name__ for m in to_experts(net, 3).net]
    assert kinds == ["EKSConv", "Conv3d", "EKSConvTranspose", "ConvTranspose3d"]
    kinds = [type(m).__name__ for m in to_experts(net, 3, convert_transposed=False).net]
    assert kinds == ["EKSConv", "Conv3d", "ConvTranspose3d", "ConvTranspose3d"]
    kinds = [type(m).__name__ for m in to_experts(net, 3, exclude=["2"]).net]
    assert kinds == ["EKSConv", "Conv3d", "ConvTranspose3d", "ConvTranspose3d"]


def _unet_up_path_convs(unet: UNet) -> set[int]:
    """ids of the convolutions in MONAI UNet's up path, found by walking its structure (not by names): every level
    is ``Sequential(down, SkipConnection(submodule), up)`` and ``up`` is its third element."""
    up, level = set(), unet.model
    while isinstance(level, nn.Sequential) and len(level) == 3 and hasattr(level[1], "submodule"):
        up |= {id(m) for m in level[2].modules() if type(m) in CONV_TYPES}
        level = level[1].submodule
    return up


@pytest.mark.parametrize("channels,res_units", [((4, 8, 16), 1), ((4, 8, 8, 16), 0), ((4, 8), 2)])
def test_monai_unet_decoder_gets_twice_the_rank_and_exports_stock(channels, res_units):
    torch.manual_seed(0)
    build = lambda: UNet(3, 1, 3, channels, (2,) * (len(channels) - 1), num_res_units=res_units)  # noqa: E731
    stock = build().double().eval()
    up = _unet_up_path_convs(stock)
    model = to_experts(stock, 3, ranks=2, alpha=4.0, rank_multipliers=dict.fromkeys(MONAI_UNET_DECODER, 2))
    model = model.double().eval()
    originals = dict(stock.named_modules())
    layers = dict(eks_layers(model.net))
    assert set(layers) == {n for n, m in stock.named_modules() if type(m) in CONV_TYPES}, "every conv converted"
    assert any(isinstance(m, nn.ConvTranspose3d) for m in stock.modules())
    assert {n for n, layer in layers.items() if layer.rank_multiplier == 2} == {
        n for n in layers if id(originals[n]) in up
    }, "exactly the up path at twice the rank"
    assert all(layer.rank_multiplier in (1, 2) for layer in layers.values())
    assert model.ranks == (2, 2, 2) and {layer.layer_ranks for layer in layers.values()} == {(2, 2, 2), (4, 4, 4)}
    _randomise_experts(model)
    x = torch.randn(len(TASKS), 1, 16, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        mixed = model(x, TASKS)
        for t in range(3):
            expert = export_expert(model, t)
            fresh = build().double().eval()
            fresh.load_state_dict(expert.state_dict(), strict=True)
            idx = (TASKS == t).nonzero().view(-1)
            assert (fresh(x[idx]) - mixed[idx]).abs().max().item() <= 1e-10


def test_rank_multipliers_keep_base_ranks_in_checkpoints():
    build = lambda: UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=1)  # noqa: E731
    decoder = dict.fromkeys(MONAI_UNET_DECODER, 2)
    trained = to_experts(build(), 4, ranks=8, rank_multipliers=decoder)
    set_expert_ranks(trained, [12, 10, 0, 4])  # LoRKD*: base ranks
    layers = dict(eks_layers(trained))
    assert trained.ranks == (12, 10, 0, 4)
    assert layers["net.model.2.1.conv.unit0.conv"].layer_ranks == (24, 20, 0, 8)
    assert layers["net.model.2.1.conv.unit0.conv"].lora_A[0].shape[0] == 24 * 3
    assert layers["net.model.0.conv.unit0.conv"].layer_ranks == (12, 10, 0, 4)
    state = trained.state_dict()
    fresh = to_experts(build(), 4, ranks=8, rank_multipliers=decoder)
    assert ranks_from_state_dict(fresh, state) == (12, 10, 0, 4)
    load_expert_state_dict(fresh, state)
    assert fresh.ranks == (12, 10, 0, 4) and all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    with pytest.raises(ValueError, match="rank_multipliers"):  # built without the decoder multipliers
        load_expert_state_dict(to_experts(build(), 4, ranks=8), state)
    with pytest.raises(ValueError, match="convert_transposed"):  # built with the transposed convs shared
        load_expert_state_dict(to_experts(build(), 4, ranks=8, rank_multipliers=decoder, convert_transposed=False), state)


def test_scaling_threaded_through_to_experts():
    net = UNet(3, 1, 2, (4, 8), (2,), num_res_units=0)
    model = to_experts(net, 3, ranks=8, alpha=16.0, scaling="constant", rank_multipliers={"model.2.*": 2})
    set_expert_ranks(model, [4, 8, 16])
    scales = {layer.rank_multiplier: layer.scales for _, layer in eks_layers(model)}
    assert scales == {1: (2.0, 2.0, 2.0), 2: (1.0, 1.0, 1.0)}, "alpha / (m * base rank 8) whatever the new ranks"
    assert all(layer.scaling == "rank" for _, layer in eks_layers(to_experts(net, 3))), "default"


def test_rank_multiplier_pattern_errors():
    net = UNet(3, 1, 2, (4, 8), (2,), num_res_units=0)
    with pytest.raises(ValueError, match="matches a converted layer"):
        to_experts(net, 2, rank_multipliers={"net.model.2.*": 2})  # the ExpertNetwork prefix is not part of names
    with pytest.raises(ValueError, match="different multipliers"):
        to_experts(net, 2, rank_multipliers={"model.2.*": 2, "model.*": 3})
    model = to_experts(net, 2, rank_multipliers=dict.fromkeys(MONAI_UNET_DECODER, 2))  # 1 level: model.2.* only
    assert [n for n, m in eks_layers(model) if m.rank_multiplier == 2] == ["net.model.2.conv"]


def test_freeze_param_groups_and_ranks():
    model = to_experts(UNet(3, 1, 2, (4, 8), (2,)), 4, ranks=8)
    experts, backbone = expert_parameters(model), backbone_parameters(model)
    assert {id(p) for p in experts}.isdisjoint({id(p) for p in backbone})
    assert len(experts) + len(backbone) == len(list(model.parameters()))
    set_experts_trainable(model, False)
    assert not any(p.requires_grad for p in experts) and all(p.requires_grad for p in backbone)
    set_experts_trainable(model, True)
    groups = param_groups(model, lr=1e-4, expert_lr=1e-3, weight_decay=1e-5)
    assert [g["name"] for g in groups] == ["backbone", "experts"] and groups[1]["lr"] == 1e-3
    set_expert_ranks(model, [12, 10, 0, 4])
    assert model.ranks == (12, 10, 0, 4)
    set_execution(model, "per_task")
    assert all(m.execution == "per_task" for _, m in eks_layers(model))


def test_lorkd_star_ranks():
    assert [round_to_even(v) for v in (0.4, 1.0, 2.9, 3.0, 5.2, 7.0)] == [0, 2, 2, 4, 6, 8]
    # equal drops -> uniform base rank; r_i = round_to_even(r * (d_i / mean)^2)
    assert lorkd_star_ranks([1.0, 1.0, 1.0], 8) == [8, 8, 8]
    drops = [0.3, 0.2, 0.1]  # mean 0.2 -> ratios^2 = 2.25, 1, 0.25 -> 18, 8, 2
    assert lorkd_star_ranks(drops, 8) == [18, 8, 2]
    assert lorkd_star_ranks(drops, 8, min_rank=4, max_rank=16) == [16, 8, 4]
    with pytest.raises(ValueError, match="loss drop"):
        lorkd_star_ranks([0.0, -1.0], 8)


def test_expert_network_type():
    assert isinstance(to_experts(nn.Sequential(nn.Conv2d(1, 1, 3)), 2), ExpertNetwork)


def test_lorkd_star_ranks_refuse_an_exploding_allocation():
    """Drops that nearly cancel (one task's loss rose) give a mean near 0: ranks in the thousands are refused with a
    message, unless a clip is asked for; the largest no-rise allocation (one task learns everything) and a mild rise
    (a tiny training run) are allowed."""
    assert lorkd_star_ranks([3.0, 0.0, 0.0], 8) == [72, 0, 0]  # 8 * 3^2: the most without a rise
    assert lorkd_star_ranks([0.07, -0.005, -0.0006, -0.0022], 8) == [162, 0, 0, 0]  # a tiny run's drops (<= 512)
    with pytest.raises(ValueError, match="mean near 0"):
        lorkd_star_ranks([0.5, -0.49], 8)
    assert lorkd_star_ranks([0.5, -0.49], 8, max_rank=16) == [16, 0]
