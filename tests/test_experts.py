"""to_experts / export_expert on MONAI networks: routing, fusion exactness, stock state dicts."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import UNet, BasicUNet, DenseNet121, DynUNet, SegResNet, resnet18, resnet50
from torch import nn

from medfm_ops.layers import EKSConv
from medfm_ops.networks import (
    ExpertNetwork,
    backbone_parameters,
    eks_layers,
    expert_parameters,
    export_expert,
    lorkd_star_ranks,
    param_groups,
    round_to_even,
    set_execution,
    set_expert_ranks,
    set_experts_trainable,
    to_experts,
)

# name, builder, input spatial size
NETWORKS = [
    ("UNet", lambda: UNet(3, 1, 3, (4, 8, 16), (2, 2), num_res_units=1, norm="INSTANCE"), 16),
    ("BasicUNet", lambda: BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), 32),
    ("DynUNet", lambda: DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16]), 16),
    ("SegResNet", lambda: SegResNet(3, init_filters=8, norm=("GROUP", {"num_groups": 4}), in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)), 16),
    ("resnet18", lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=3), 16),
    ("resnet50", lambda: resnet50(spatial_dims=3, n_input_channels=1, num_classes=3), 16),
    ("DenseNet121", lambda: DenseNet121(spatial_dims=3, in_channels=1, out_channels=3), 32),
]
TASKS = torch.tensor([0, 2, 1, 2])


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
    n_convs = sum(1 for m in stock.modules() if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d) and m.groups == 1)
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
            assert not any(isinstance(m, EKSConv) for m in expert.modules())
            assert sum(p.numel() for p in expert.parameters()) == sum(p.numel() for p in stock.parameters())
            idx = (TASKS == t).nonzero().view(-1)
            out = expert(x[idx])
            out = out[0] if isinstance(out, (list, tuple)) else out
            assert (out - mixed[idx]).abs().max().item() <= 1e-8, f"{name}: expert {t} differs from the mixed batch"
            fresh.load_state_dict(expert.state_dict(), strict=True)  # the stock definition takes the fused weights
    # the shared backbone W0 was never touched: exporting task None gives back the stock weights
    for k, v in export_expert(model, None).state_dict().items():
        assert torch.equal(v, stock.state_dict()[k]), k


def test_routing_is_cleared_and_input_net_untouched():
    net = UNet(3, 1, 2, (4, 8), (2,))
    model = to_experts(net, 2, 2)
    assert not any(isinstance(m, EKSConv) for m in net.modules()), "copy_net=True keeps the input intact"
    with pytest.raises(IndexError, match="out of range"):
        model(torch.randn(2, 1, 8, 8, 8), torch.tensor([0, 7]))
    assert all(layer._task_ids is None for _, layer in eks_layers(model)), "routing cleared in finally"


def test_include_exclude_and_loud_failure():
    net = UNet(3, 1, 2, (4, 8, 16), (2, 2), num_res_units=0)
    all_convs = len(list(eks_layers(to_experts(net, 2))))
    subset = to_experts(net, 2, exclude=["model.0.*"])
    assert 0 < len(list(eks_layers(subset))) < all_convs
    assert all(not n.startswith("net.model.0.") for n, _ in eks_layers(subset))
    with pytest.raises(ValueError, match="converted no convolution"):
        to_experts(net, 2, include=["does.not.exist*"])


def test_transposed_and_grouped_stay_shared():
    net = nn.Sequential(nn.Conv3d(2, 4, 3), nn.Conv3d(4, 4, 3, groups=4), nn.ConvTranspose3d(4, 2, 2, stride=2))
    model = to_experts(net, 3)
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == ["EKSConv", "Conv3d", "ConvTranspose3d"]


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
