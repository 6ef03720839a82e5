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
