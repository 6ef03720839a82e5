import pytest
import torch

from pyengine.models import build_model
from pyengine.ops import entropy_counts_reference
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


MODES = {  # EntropyCollector keyword arguments of each way of collecting
    "hooks": dict(batched=False, fused=False),
    "fused": dict(batched=False, fused=True),
    "batched": dict(batched=True),
}


def _step_net(device):
    import torch.nn as nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
                         nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6 * 6, 7), nn.GELU(),
                         nn.Linear(7, 3)).to(device)


@pytest.mark.parametrize("inclusive", [False, True])
def test_every_way_of_collecting_counts_and_trains_exactly_like_plain_pytorch(device, inclusive):
    """Pre-hooks, the fused relu_count ReLUs and the batched collection (one count per forward):
    in training steps each gives the counts of plain PyTorch counting of the activation inputs,
    the same sample numbers, and the outputs and gradients of the model without a collector; the
    modules get their own forward back on exit."""
    import copy

    base = _step_net(device)
    xs = [torch.randn(n, 3, 6, 6, device=device) for n in (4, 2)]
    xs[1][0, 0, 0, 0] = 0.0  # exact zeros reach the first ReLU only through the conv: make some
    with torch.no_grad():
        base[0].bias.zero_()

    def plain():
        model = copy.deepcopy(base).train()
        seen, grads = {}, []
        hs = [m.register_forward_pre_hook(
            lambda mod, a, name=name: seen.setdefault(name, []).append(a[0].detach().clone()))
            for name, m in model.named_modules() if isinstance(m, (torch.nn.ReLU, torch.nn.GELU))]
        for x in xs:
            model.zero_grad(set_to_none=True)
            out = model(x)
            out.square().sum().backward()
            grads.append([p.grad.clone() for p in model.parameters()] + [out.detach()])
        for h in hs:
            h.remove()
        cdim = {"2": 1, "4": 1, "7": 1}
        counts = {k: sum(entropy_counts_reference(z, cdim[k], False, inclusive) for z in v) for k, v in seen.items()}
        return counts, grads

    ref_counts, ref_grads = plain()
    for mode, kw in MODES.items():
        model = copy.deepcopy(base).train()
        col = EntropyCollector(model, inclusive=inclusive, **kw)
        grads = []
        with col:
            assert sum("forward" in vars(m) for m in model.modules()) == (0 if mode == "hooks" else 2)
            for x in xs:
                model.zero_grad(set_to_none=True)
                out = model(x)
                out.square().sum().backward()
                grads.append([p.grad.clone() for p in model.parameters()] + [out.detach()])
        assert not any("forward" in vars(m) for m in model.modules()), mode
        assert set(col.counts) == set(ref_counts) == {"2", "4", "7"}, mode
        for k in ref_counts:
            assert torch.equal(col.counts[k], ref_counts[k]), (mode, k)
        assert col.samples == {"2": 6 * 36, "4": 6 * 36, "7": 6}, mode
        for a, b in zip(grads, ref_grads):
            for u, v in zip(a, b):
                assert torch.equal(u, v), mode


def _pyengine_ops_called(fn):
    """The pyengine ops that run below autograd while fn() runs, in order."""
    from torch.utils._python_dispatch import TorchDispatchMode

    called = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "pyengine":
                called.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return called


def test_a_training_step_is_counted_in_one_native_call_and_a_measurement_as_it_runs():
    import pyengine

    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    model = _step_net("cpu").train()
    x = torch.randn(4, 3, 6, 6)
    with EntropyCollector(model) as col:
        step = _pyengine_ops_called(lambda: model(x).sum().backward())
        assert step == ["entropy_counts_add_many_"]  # three activations, one call at the forward's end
        assert not col._pending
        with torch.no_grad():
            measure = _pyengine_ops_called(lambda: model(x))
        assert measure == ["relu_count", "relu_count", "entropy_counts_add_"]  # as each activation runs
    with EntropyCollector(model, batched=False) as col2:
        assert _pyengine_ops_called(lambda: model(x).sum().backward()) == ["relu_count", "relu_count", "entropy_counts_add_"]
    for k in col.counts:
        assert torch.equal(col.counts[k], 2 * col2.counts[k])


def test_batched_collection_refuses_an_activation_changed_before_its_count():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))

    class ChangesItsInput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            z = self.net[0](x)
            y = self.net[1](z)
            z.mul_(2)  # legal for autograd: an out-of-place ReLU does not keep z
            return self.net[2](y)

    model = ChangesItsInput()
    x = torch.randn(5, 3)
    col = EntropyCollector(model, inclusive=True)  # inclusive: z itself is taken
    with pytest.raises(RuntimeError, match=r"activation taken at 'net.1' was modified in place.*batched=False"):
        with col:
            model(x)
    with EntropyCollector(model, inclusive=True, batched=False) as col2:  # counted as it runs: before the change
        model(x)
    assert torch.equal(col2.counts["net.1"], entropy_counts_reference(net[0](x).detach(), 1, False, True))


def test_batched_collection_counts_early_when_the_waiting_activations_pass_the_limit():
    """max_pending_mb bounds what waits for its count: with a tiny limit every activation is
    counted as soon as it is taken, and the counts are those of an unlimited collection."""
    model = _step_net("cpu").train()
    x = torch.randn(4, 3, 6, 6)
    runs = {}
    for mb in (1e-6, 1024):
        with EntropyCollector(model, inclusive=True, max_pending_mb=mb) as col:
            calls = _pyengine_ops_called(lambda: model(x).sum().backward())
        runs[mb] = (col, calls)
    import pyengine

    if pyengine.HAS_NATIVE:
        assert runs[1e-6][1] == ["entropy_counts_add_many_"] * 3 and runs[1024][1] == ["entropy_counts_add_many_"]
    for k in runs[1024][0].counts:
        assert torch.equal(runs[1e-6][0].counts[k], runs[1024][0].counts[k])
    with pytest.raises(ValueError, match="max_pending_mb must be positive"):
        EntropyCollector(model, max_pending_mb=0)


def test_batched_collection_counts_an_in_place_activation_before_it_overwrites_its_input():
    """A pre-hook site whose activation works in place (ReLU6(inplace=True), LeakyReLU(inplace=True))
    cannot wait for the end of the forward: it is counted as it runs, and the counts are those of
    plain counting of its input."""
    import torch.nn as nn

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU6(inplace=True), nn.Linear(6, 4), nn.LeakyReLU(0.1, inplace=True))
    x = torch.randn(9, 5)
    with torch.no_grad():
        z1 = model[0](x)
        z2 = model[2](torch.clamp(z1, 0, 6))
    with EntropyCollector(model, names=["1", "3"]) as col:
        model(x).sum().backward()
    assert torch.equal(col.counts["1"], entropy_counts_reference(z1, 1))
    assert torch.equal(col.counts["3"], entropy_counts_reference(z2, 1))


def test_batched_flush_groups_by_the_device_of_each_activations_counts():
    """The flush makes one call per device of the counts (a model spread over devices; here one
    device, the CPU): the counts of two steps must be exact."""
    model = _step_net("cpu").train()
    x = torch.randn(3, 3, 6, 6)
    with EntropyCollector(model) as ref:
        model(x).sum().backward()
    col = EntropyCollector(model)
    with col:
        model(x).sum().backward()
        model(x).sum().backward()
    for k in ref.counts:
        assert torch.equal(col.counts[k], 2 * ref.counts[k]), k


def _per_batch_reference(zs):
    """The authors' way: each batch's layer entropy (all neurons; non-constant ones), averaged."""
    from pyengine.ops.entropy import entropy_counts_reference, entropy_from_counts_reference

    means, ncs = [], []
    for z in zs:
        _, summary = entropy_from_counts_reference(entropy_counts_reference(z, 1), z.numel() // z.shape[1])
        means.append(float(summary[0]))
        ncs.append(float(summary[1]))
    return sum(means) / len(means), sum(ncs) / len(ncs)


@pytest.mark.parametrize("grad", [False, True])
def test_per_batch_averaging_is_the_mean_of_each_batchs_entropy(grad):
    """Neuron 0 is always ON in the first batch and always OFF in the second: zero entropy in each
    batch (the authors' average says 0) but 1 bit over both (pooled). The collapse counts stay the
    pooled ones; the per-batch sums survive a checkpoint."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(3, 2))
        model[0].bias.zero_()
    g = torch.Generator().manual_seed(0)
    xs = [torch.cat([torch.full((4, 1), 1.0), torch.randn(4, 1, generator=g)], 1),
          torch.cat([torch.full((6, 1), -1.0), torch.randn(6, 1, generator=g)], 1),
          torch.randn(5, 2, generator=g)]
    zs = [model[0](x).detach() for x in xs]
    pooled = EntropyCollector(model, per_batch=False)
    col = EntropyCollector(model, per_batch=True)
    with torch.set_grad_enabled(grad), pooled, col:
        for x in xs[:2]:
            model(x)
    mid = col.state_dict()
    col2 = EntropyCollector(model, per_batch=True)
    col2.load_state_dict(mid)
    with torch.set_grad_enabled(grad), pooled, col, col2:
        model(xs[2])
    want_mean, want_nc = _per_batch_reference(zs)
    for c in (col, col2):
        r = c.results()["1"]
        assert r.mean == pytest.approx(want_mean, abs=1e-12) and r.mean_nonconstant == pytest.approx(want_nc, abs=1e-12)
    p = pooled.results()["1"]
    assert r.mean != pytest.approx(p.mean)  # the two averages differ here
    assert (r.n_always_on, r.n_always_off, r.n_samples) == (p.n_always_on, p.n_always_off, p.n_samples) == (0, 1, 15)


def test_per_batch_averaging_reaches_a_methods_measurement():
    import pyengine

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    batches = [torch.randn(n, 4) for n in (3, 9, 2)]
    zs = [net[0](x).detach() for x in batches]
    got = {}
    for avg in ("pooled", "batch"):
        comp = pyengine.Compressor(net, "egp", example_input=batches[0][:1], options={"entropy_average": avg},
                                   log=lambda *a: None)
        site = comp.measure(batches)["entropy_sites"][0]
        got[avg] = (site["mean"], site["mean_nonconstant"])
    want = _per_batch_reference(zs)
    assert got["batch"] == pytest.approx(want, abs=1e-12) and got["pooled"] != pytest.approx(want)
    with pytest.raises(ValueError, match="entropy-average must be one of pooled, batch"):
        pyengine.Compressor(net, "egp", example_input=batches[0][:1], options={"entropy_average": "mean"})


def test_entropy_by_producer_weights_each_activation_by_its_neurons():
    import itertools

    from pyengine.nn.entropy import LayerEntropy, entropy_by_producer

    def rec(name, producer, h_all, h_nc, n, on=0, off=0):
        return LayerEntropy(name, producer, h_all, h_nc, n, on, off, 100)

    # a layer feeding one activation keeps that activation's value bit for bit (3 * 0.1 / 3 is not 0.1)
    one = [rec("a", "fc", 0.1, 0.1, 3)]
    assert entropy_by_producer(one, "egp") == {"fc": 0.1} and entropy_by_producer(one, "easier") == {"fc": 0.1}
    # three activations of one layer: by hand, weights = non-constant neurons (egp) or all neurons (easier)
    recs = [rec("a", "conv", 0.3, 0.5, 10, on=2, off=2), rec("b", "conv", 0.7, 0.7, 4),
            rec("c", "conv", 0.0, 0.0, 5, on=5), rec("d", None, 0.9, 0.9, 2), rec("e", "fc", 0.2, 0.25, 8, off=2)]
    egp = (6 * 0.5 + 4 * 0.7 + 0 * 0.0) / 10
    easier = (10 * 0.3 + 4 * 0.7 + 5 * 0.0) / 19
    for est in ("egp", "easier"):  # the same floats in every order of the records
        assert len({tuple(sorted(entropy_by_producer(p, est).items())) for p in itertools.permutations(recs)}) == 1
    got = entropy_by_producer(recs, "egp")
    assert got["conv"] == pytest.approx(egp, abs=1e-15) and got["fc"] == 0.25 and None not in got
    assert entropy_by_producer(recs, "easier")["conv"] == pytest.approx(easier, abs=1e-15)
    # every activation of the layer constant: 0 with either estimator
    zero = [rec("a", "conv", 0.0, 0.0, 4, on=4), rec("b", "conv", 0.0, 0.0, 2, off=2)]
    assert entropy_by_producer(zero, "egp") == {"conv": 0.0} == entropy_by_producer(zero, "easier")
