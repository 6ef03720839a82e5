import torch

from pyengine.models import build_model
from pyengine.nn.entropy import EntropyCollector, measure_entropy


def test_collector_matches_plain_count_over_loader():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=8).eval()
    data = [(torch.randn(n, 1, 8, 8), torch.zeros(n, dtype=torch.long)) for n in (5, 3, 7)]
    # plain PyTorch count: hooks that record the inputs
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: seen.setdefault(name, []).append(a[0].detach().clone()))
               for name, m in model.named_modules() if isinstance(m, torch.nn.ReLU)]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in handles:
        h.remove()
    res = measure_entropy(model, data, torch.device("cpu"))
    assert len(res) == 17
    for name, zs in seen.items():
        z = torch.cat(zs)
        on = (z > 0).transpose(0, 1).reshape(z.shape[1], -1)
        p = on.double().mean(1)
        h = torch.where((p > 0) & (p < 1), -(p * p.log2() + (1 - p) * (1 - p).log2()), torch.zeros_like(p))
        r = res[name]
        assert r.n_samples == z.numel() // z.shape[1]
        assert abs(r.mean - float(h.mean())) < 1e-6
        nc = (p > 0) & (p < 1)
        assert abs(r.mean_nonconstant - (float(h[nc].mean()) if nc.any() else 0.0)) < 1e-6
        assert r.n_always_on == int((p == 1).sum()) and r.n_always_off == int((p == 0).sum())


def test_collector_inclusive_and_per_position():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.0, 1.0, -1.0, 0.0]))
    x = torch.randn(10, 3)
    with EntropyCollector(model) as c:
        model(x)
    assert c.counts["1"].tolist() == [0, 10, 0, 0]
    with EntropyCollector(model, inclusive=True) as c2:
        model(x)
    assert c2.counts["1"].tolist() == [10, 10, 0, 10]
    res = c.results()["1"]
    assert res.mean == 0.0 and res.n_always_on == 1 and res.n_always_off == 3


def test_swin_mlp_neuron_is_the_hidden_unit():
    """torchvision Swin's MLP runs on (B, H, W, C): a neuron is one of the C hidden units (the
    producer is a Linear layer), not a spatial row."""
    torch.manual_seed(0)
    model = build_model("swin_t", num_classes=4, in_channels=3, image_size=16, embed_dim=16, depths=(1, 1),
                        num_heads=(2, 2), window_size=2, patch_size=2).eval()
    x = torch.randn(3, 3, 16, 16)
    seen = {}
    gelus = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.GELU)]
    handles = [m.register_forward_pre_hook(lambda mod, a, name=n: seen.__setitem__(name, a[0].detach().clone()))
               for n, m in gelus]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    with EntropyCollector(model) as col:
        with torch.no_grad():
            model(x)
    for name, z in seen.items():
        assert z.dim() == 4
        hidden = z.shape[-1]
        assert col.counts[name].shape == (hidden,)
        ref = (z > 0).reshape(-1, hidden).sum(0)
        assert torch.equal(col.counts[name].cpu(), ref)
        assert col.samples[name] == z.numel() // hidden


def test_measuring_in_train_mode_leaves_batchnorm_statistics_alone():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.randn(4, 1, 8, 8) * 3 + 1, torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    res = measure_entropy(model, data, torch.device("cpu"), train_mode=True)
    assert len(res) == 17
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training  # the mode is restored too


def test_inclusive_reaches_the_measurement_of_a_run(tmp_path):
    """EGP's --inclusive (ON means z >= 0) changes what the run measures."""
    from pyengine.methods import RunConfig
    from pyengine.methods.base import EntropySpec
    from pyengine.methods.runner import Run

    r = Run(RunConfig(image_size=8, epochs=1, rounds=0, batch_size=64, out=str(tmp_path / "a"),
                      options={"inclusive": True}), log=lambda *a: None)
    r._setup()
    assert r.method.entropy_spec() == EntropySpec(estimator="egp", inclusive=True, when="pass")
    # a ReLU fed by an all-zero layer: every neuron is OFF under z > 0 and ON under z >= 0
    with torch.no_grad():
        r.model.layer4[1].conv1.weight.zero_()
        r.model.layer4[1].bn1.weight.zero_()
        r.model.layer4[1].bn1.bias.zero_()
    batches = [(torch.randn(4, 1, 8, 8), None)]
    on_gt, _ = r.measure(EntropySpec(inclusive=False), batches)
    on_ge, c_ge = r.measure(EntropySpec(inclusive=True), batches)
    name = "layer4.1.relu1"
    assert on_gt[name].n_always_off == on_gt[name].n_neurons
    assert on_ge[name].n_always_on == on_ge[name].n_neurons
    assert len(c_ge[name]["on"]) == on_ge[name].n_neurons


def test_nan_in_a_later_batch_is_reported_once_when_results_are_read():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU())
    with EntropyCollector(model) as col:
        model(torch.randn(5, 3))
        bad = torch.randn(5, 3)
        bad[2, 1] = float("nan")
        model(bad)  # no error here: the count stays on the device
    import pytest

    with pytest.raises(ValueError, match="NaN"):
        col.results()


def test_collector_reset_and_reload_start_over_cleanly():
    """The hooks keep what a call needs between calls; a reset, a reload or a new batch size must
    still give the counts and sample numbers of a fresh collector."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU())
    xs = [torch.randn(n, 2, 5, 5) for n in (6, 6, 9, 9)]  # same shapes across the reset and the reload

    def fresh(batches):
        with EntropyCollector(model) as c, torch.no_grad():
            for x in batches:
                model(x)
        return c

    ref_a, ref_b = fresh(xs[1:3]), fresh(xs[1:])
    c = EntropyCollector(model)
    with c, torch.no_grad():
        model(xs[0])
        c.reset()
        model(xs[1])
        model(xs[2])
    assert torch.equal(c.counts["1"], ref_a.counts["1"]) and c.samples == ref_a.samples == {"1": 15 * 25}
    state = c.state_dict()
    c.reset()
    c.load_state_dict(state)
    with c, torch.no_grad():
        model(xs[3])
    assert torch.equal(c.counts["1"], ref_b.counts["1"]) and c.samples == ref_b.samples


def test_fused_relu_sites_count_and_train_exactly_like_hooks(device):
    """nn.ReLU sites run the fused relu_count op while collecting, the others (GELU here) keep a
    pre-hook: the counts, the sample numbers, the outputs and every gradient of a training step
    equal the hook-only collector's, and the modules get their own forward back on exit."""
    import copy

    import torch.nn as nn

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.GELU(),
                         nn.Linear(7, 3)).to(device)
    xs = [torch.randn(n, 3, 6, 6, device=device) for n in (4, 2)]
    runs = {}
    for fused in (False, True):
        model = copy.deepcopy(base).train()
        col = EntropyCollector(model, fused=fused, inclusive=True)
        grads = []
        with col:
            if fused:
                assert sum("forward" in vars(m) for m in model.modules()) == 2  # the two ReLUs
            for x in xs:
                model.zero_grad(set_to_none=True)
                out = model(x)
                out.square().sum().backward()
                grads.append([p.grad.clone() for p in model.parameters()] + [out.detach()])
        assert not any("forward" in vars(m) for m in model.modules())
        runs[fused] = (dict(col.counts), dict(col.samples), grads, col.results())
    (c0, s0, g0, r0), (c1, s1, g1, r1) = runs[False], runs[True]
    assert set(c0) == set(c1) == {"2", "4", "7"} and s0 == s1
    for k in c0:
        assert torch.equal(c0[k], c1[k]), k
        assert r0[k].mean == r1[k].mean
    for a, b in zip(g0, g1):
        for u, v in zip(a, b):
            assert torch.equal(u, v)
