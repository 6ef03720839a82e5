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
    """A weight two layers share is masked by the intersection of its masks (listed once: the op
    refuses a buffer twice), and apply() moves the parameter's own version on."""
    a, b = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, nn.ReLU(), b)
    ms = MaskSet(model)
    assert len(ms.params) == 2 and ms.params["0.weight"] is ms.params["2.weight"]
    m0 = torch.rand(3, 4) > 0.3
    m2 = torch.rand(3, 4) > 0.3
    ms.masks["0.weight"], ms.masks["2.weight"] = m0, m2
    w = a.weight.detach().clone()
    v = a.weight._version
    ms.apply()
    assert torch.equal(a.weight.detach(), w * (m0 & m2))
    assert a.weight._version > v
