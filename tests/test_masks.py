import pytest
import torch
import torch.nn as nn

from pyengine.methods.prune.magnitude import fraction_for_target, prune_magnitude
from pyengine.nn.masks import MaskSet, prunable_parameters


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def test_prunable_parameters_scopes():
    net = _net()
    assert [n for n, _ in prunable_parameters(net)] == ["0.weight", "4.weight"]
    assert [n for n, _ in prunable_parameters(net, "linear")] == ["4.weight"]
    assert [n for n, _ in prunable_parameters(net, "conv")] == ["0.weight"]
    with pytest.raises(ValueError, match="layers"):
        prunable_parameters(net, "bn")


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masks_stay_exact_through_training(opt_name):
    net = _net()
    masks = MaskSet(net)
    prune_magnitude(masks, 0.7)
    opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) if opt_name == "sgd"
           else torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1))
    masks.apply(opt)
    for step in range(60):
        x = torch.randn(16, 3, 4, 4)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        masks.apply(opt)
        for name, p in masks.params.items():
            m = masks.masks[name]
            assert (p[~m] == 0).all(), f"{name} revived at step {step}"
            assert (p.grad[~m] == 0).all()
            for buf in opt.state[p].values():
                if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                    assert (buf[~m] == 0).all()
    # the kept weights did train
    assert all((p[masks.masks[n]] != 0).any() for n, p in masks.params.items())


def test_global_magnitude_removes_exact_count_and_smallest():
    net = _net()
    masks = MaskSet(net)
    total = masks.total()
    removed = prune_magnitude(masks, 0.5)
    assert sum(removed.values()) == round(0.5 * total) == total - masks.kept()
    all_w = torch.cat([p.detach().abs().flatten() for p in masks.params.values()])
    kept = torch.cat([masks.masks[n].flatten() for n in masks.params])
    assert all_w[~kept].max() <= all_w[kept].min()
    # second round removes a fraction of the *remaining* weights
    before = masks.kept()
    prune_magnitude(masks, 0.2)
    assert masks.kept() == before - round(0.2 * before)


def test_layerwise_magnitude():
    net = _net()
    masks = MaskSet(net)
    prune_magnitude(masks, 0.25, scope="layerwise")
    for r in masks.layer_stats():
        assert r["kept"] == r["numel"] - round(0.25 * r["numel"])
    with pytest.raises(ValueError, match="scope"):
        prune_magnitude(masks, 0.1, scope="bogus")
    with pytest.raises(ValueError, match="fraction"):
        prune_magnitude(masks, 1.5)


def test_fraction_for_target():
    assert fraction_for_target(0.0, 0.9) == pytest.approx(0.9)
    assert fraction_for_target(0.5, 0.75) == pytest.approx(0.5)
    assert fraction_for_target(0.9, 0.5) == 0.0


def test_state_dict_roundtrip_and_errors():
    net = _net()
    masks = MaskSet(net)
    prune_magnitude(masks, 0.6)
    sd = masks.state_dict()
    other = MaskSet(_net())
    other.load_state_dict(sd)
    assert other.fingerprint() == masks.fingerprint()
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"0.weight": sd["0.weight"]})
    bad = dict(sd)
    bad["0.weight"] = torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(bad)


def test_prune_layer_exact_and_empty():
    net = _net()
    masks = MaskSet(net)
    n = masks.masks["0.weight"].numel()
    assert masks.prune("0.weight", n + 10) == n
    assert masks.empty_layers() == ["0.weight"]


def test_apply_masks_tied_weights_and_versions():
    """A weight two layers share is one parameter: one mask under its first name (as
    named_parameters lists it), counted once in the sparsity, and apply() moves its version on."""
    a, b = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, nn.ReLU(), b, nn.ReLU(), nn.Linear(3, 2))
    ms = MaskSet(model)
    assert list(ms.params) == ["0.weight", "4.weight"] == [n for n, _ in model.named_parameters() if "weight" in n]
    torch.manual_seed(0)
    m0 = torch.rand(3, 4) > 0.3
    ms.masks["0.weight"] = m0
    w = a.weight.detach().clone()
    v = a.weight._version
    ms.apply()
    assert torch.equal(a.weight.detach(), w * m0)
    assert a.weight._version > v
    assert ms.total() == 12 + 6 and ms.kept() == int(m0.sum()) + 6
    prune_magnitude(ms, 0.5)
    ms.apply()
    zeros = sum(int((p == 0).sum()) for p in ms.params.values())
    assert ms.total() - ms.kept() == zeros  # the reported sparsity is the real one


@pytest.mark.parametrize("opt_name", ["sgd", "adamax", "asgd", "rprop"])
def test_channels_last_weights_and_every_optimiser_buffer_stay_masked(opt_name):
    """A channels-last conv (weight, gradient and optimiser state in that memory format) is masked
    like a contiguous one; every per-entry state tensor of the optimiser is zeroed (Adamax's
    exp_inf, ASGD's averaged weights ax, Rprop's prev and step sizes), not a fixed list of keys."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                        nn.Linear(4 * 16, 5)).to(memory_format=torch.channels_last)
    assert not net[0].weight.is_contiguous()
    ms = MaskSet(net)
    assert all(m.is_contiguous() for m in ms.masks.values())
    prune_magnitude(ms, 0.6)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adamax": lambda p: torch.optim.Adamax(p, lr=0.01),
            "asgd": lambda p: torch.optim.ASGD(p, lr=0.01, t0=0), "rprop": lambda p: torch.optim.Rprop(p, lr=0.01)}
    opt = make[opt_name](net.parameters())
    ms.apply(opt)
    for _ in range(4):
        x = torch.randn(6, 3, 4, 4).contiguous(memory_format=torch.channels_last)
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        ms.apply(opt)
    for name, p in ms.params.items():
        m = ms.masks[name]
        assert (p.detach()[~m] == 0).all() and (p.grad[~m] == 0).all(), name
        bufs = [b for b in opt.state[p].values() if isinstance(b, torch.Tensor) and b.shape == p.shape]
        assert bufs, f"{opt_name} keeps per-entry state"
        for b in bufs:
            assert (b[~m] == 0).all(), name
        assert (p.detach()[m] != 0).any()  # the kept weights trained
    assert not net[0].weight.is_contiguous()  # the layout is the user's, untouched


def test_strided_gradient_is_masked_too():
    """A gradient that is neither contiguous nor a permutation of it (a strided view) is masked by
    the PyTorch fallback."""
    lin = nn.Linear(6, 4, bias=False)
    ms = MaskSet(nn.Sequential(lin))
    ms.masks["0.weight"][:, ::2] = False
    big = torch.ones(4, 12)
    lin.grad = None
    lin.weight.grad = big[:, ::2]
    assert not lin.weight.grad.is_contiguous()
    ms.apply()
    assert (lin.weight.grad[:, ::2] == 0).all() and (lin.weight.grad[:, 1::2] == 1).all()
    assert (lin.weight.detach()[:, ::2] == 0).all()


def test_target_sparsity_is_reached_as_nearly_as_whole_weights_allow():
    """A round capped at the target keeps ceil(N (1 - s)) weights, a hair under s for most N: that
    counts as reached (over all layers, or in every layer), one weight more does not."""
    from pyengine.methods.prune.magnitude import PruneTarget

    net = nn.Sequential(nn.Linear(7, 3, bias=False), nn.Linear(13, 1, bias=False))
    ms = MaskSet(net)
    t = PruneTarget(sparsity=0.8)

    def keep(n0, n1):
        ms.masks["0.weight"].fill_(False)
        ms.masks["0.weight"].view(-1)[:n0] = True
        ms.masks["1.weight"].fill_(False)
        ms.masks["1.weight"].view(-1)[:n1] = True

    keep(5, 2)  # 7 of 34 = ceil(34 * 0.2): the global cap, sparsity 0.794
    assert ms.sparsity() < 0.8 and t.reached(ms)
    keep(5, 3)  # 8 of 34: over the global cap, but each layer at its own (5 of 21, 3 of 13)
    assert t.reached(ms)
    keep(6, 2)  # 8 of 34, the first layer over its cap
    assert t.reached(ms) is None
    assert PruneTarget(sparsity=None).reached(ms) is None
