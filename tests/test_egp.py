import math

import pytest
import torch
import torch.nn as nn

from pyengine.methods.prune.egp import EGPConfig, egp_allocate, egp_prune_step
from pyengine.nn.entropy import LayerEntropy
from pyengine.nn.masks import MaskSet


def test_allocation_hand_computed():
    # H*m: a = 0.5*1 = 0.5, b = 1*1 = 1 -> I_a = 1.5/0.5 = 3, I_b = 1.5/1 = 1.5
    # softmax: R_a = 1/(1+e^-1.5), B = 0.5 * (100 + 100) = 100
    alloc = egp_allocate({"a": 0.5, "b": 1.0}, {"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}, 0.5)
    ra = 1 / (1 + math.exp(-1.5))
    assert alloc == {"a": math.floor(100 * ra), "b": math.floor(100 * (1 - ra))}


def test_allocation_caps_and_reshares():
    # a small layer with very low entropy would get more than it has: it is emptied and the
    # rest of the budget goes to the others.
    alloc = egp_allocate({"a": 0.01, "b": 1.0, "c": 0.9}, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 10, "b": 200, "c": 200}, 0.5)
    assert alloc["a"] == 10
    budget_rest = 0.5 * 410 - 10
    # b and c share what is left by softmax of their re-computed irrelevance
    hm = {"b": 1.0, "c": 0.9}
    irr = {k: sum(hm.values()) / v for k, v in hm.items()}
    z = sum(math.exp(v - max(irr.values())) for v in irr.values())
    for k in ("b", "c"):
        assert alloc[k] == math.floor(budget_rest * math.exp(irr[k] - max(irr.values())) / z)


def test_allocation_skips_zero_entropy_and_empty():
    alloc = egp_allocate({"a": 0.0, "b": 1.0, "c": 0.5}, {"a": 1, "b": 1, "c": 1}, {"a": 50, "b": 50, "c": 0}, 0.5)
    assert alloc["a"] == 0 and alloc["c"] == 0
    assert alloc["b"] == 25  # the only active layer takes the whole budget
    with pytest.raises(ValueError, match="zeta"):
        egp_allocate({}, {}, {}, 0.0)


def test_egp_step_on_model_maps_activation_to_producer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    masks = MaskSet(net)
    ents = {"1": LayerEntropy("1", "0", mean=0.5, mean_nonconstant=0.8, n_neurons=6, n_always_on=0,
                              n_always_off=0, n_samples=10)}
    rec = egp_prune_step(masks, ents, EGPConfig(zeta=0.5))
    assert rec["allocation"] == {"0.weight": 12}
    assert masks.layer_stats()[0]["kept"] == 12
    assert masks.layer_stats()[1]["kept"] == 18  # the classifier has no activation after it
    assert rec["entropy"] == {"0.weight": 0.8}  # EGP's estimator: non-constant neurons


# --------------------------------------------------------------------------------------------
# A layer feeding several activations
# --------------------------------------------------------------------------------------------

def _rec(name, producer, h_all, h_nc, n, on=0, off=0):
    return LayerEntropy(name, producer, mean=h_all, mean_nonconstant=h_nc, n_neurons=n, n_always_on=on,
                        n_always_off=off, n_samples=10)


@pytest.mark.parametrize("estimator", ["egp", "easier"])
def test_shared_producer_entropy_is_the_neuron_weighted_mean_in_any_order(estimator):
    # layer "0" feeds "a" (6 neurons, 2 of them constant) and "b" (2 neurons, all always OFF:
    # entropy 0); the later record used to overwrite the earlier one, so with "b" last the layer
    # read as zero-entropy and EGP never pruned it
    a = _rec("a", "0", h_all=0.4, h_nc=0.6, n=6, on=1, off=1)
    b = _rec("b", "0", h_all=0.0, h_nc=0.0, n=2, off=2)
    # by hand: egp averages over non-constant neurons (a: 4, b: 0), easier over all (a: 6, b: 2)
    expect = 0.6 if estimator == "egp" else (6 * 0.4 + 2 * 0.0) / 8
    for order in ([a, b], [b, a]):
        net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
        rec = egp_prune_step(MaskSet(net), {e.name: e for e in order}, EGPConfig(zeta=0.5, estimator=estimator))
        assert rec["entropy"]["0.weight"] == pytest.approx(expect, abs=1e-15)
        assert rec["zero_entropy_layers"] == []
        assert rec["allocation"] == {"0.weight": 12}  # the only active layer: half its 24 weights


def test_shared_producer_is_zero_entropy_only_when_every_activation_is():
    a = _rec("a", "0", 0.0, 0.0, 6, on=6)
    b = _rec("b", "0", 0.0, 0.0, 2, off=2)
    c = _rec("c", "2", 0.3, 0.3, 3)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    rec = egp_prune_step(MaskSet(net), {"a": a, "b": b, "c": c}, EGPConfig(zeta=0.5))
    assert rec["entropy"] == {"0.weight": 0.0, "2.weight": 0.3}
    assert rec["zero_entropy_layers"] == ["0.weight"]
    assert rec["allocation"] == {"0.weight": 0, "2.weight": 9}  # 0.5 * 18 to the only active layer


class _TwoActivations(nn.Module):
    """One Linear feeding a ReLU (all 6 features) and a GELU (features 0-1 of a normalised copy)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.relu = nn.ReLU()
        self.gelu = nn.GELU()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(torch.cat([self.relu(h), self.gelu(self.bn(h)[:, :2])], 1))


@pytest.mark.parametrize("estimator", ["egp", "easier"])
def test_shared_producer_entropy_measured_matches_plain_pytorch(estimator):
    from pyengine.graph import activation_map
    from pyengine.nn.entropy import measure_entropy

    torch.manual_seed(0)
    model = _TwoActivations().eval()
    with torch.no_grad():
        model.fc.bias[:3] = torch.tensor([-50.0, 50.0, 0.0])  # feature 0 always OFF, 1 always ON (ReLU)
        model.bn.running_mean.uniform_(-0.5, 0.5)
    assert {s.name: s.producer for s in activation_map(model)} == {"relu": "fc", "gelu": "fc"}
    data = [torch.randn(16, 4) for _ in range(3)]
    ent = measure_entropy(model, data, torch.device("cpu"))
    # reference: the inputs of both activations, binary entropy per neuron, by hand
    with torch.no_grad():
        h = torch.cat([model.fc(x) for x in data]).double()
        z = {"relu": h, "gelu": model.bn(h.float()).double()[:, :2]}
    per_neuron = []
    for zi in z.values():
        p = (zi > 0).double().mean(0)
        hp = torch.where((p > 0) & (p < 1), -(p * p.log2() + (1 - p) * (1 - p).log2()), torch.zeros_like(p))
        per_neuron.append((hp, (p > 0) & (p < 1)))
    if estimator == "egp":  # the mean over the non-constant neurons of both activations
        expect = float(torch.cat([hp[nc] for hp, nc in per_neuron]).mean())
    else:  # the mean over all 6 + 2 neurons
        expect = float(torch.cat([hp for hp, _ in per_neuron]).mean())
    rec = egp_prune_step(MaskSet(model, ["fc.weight"]), ent, EGPConfig(zeta=0.5, estimator=estimator))
    assert rec["entropy"]["fc.weight"] == pytest.approx(expect, abs=1e-6)


class _TwoHeads(nn.Module):
    """One Linear feeding two activations (a shared producer), on 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(64, 24)
        self.relu = nn.ReLU()
        self.leaky = nn.LeakyReLU(0.1)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        h = self.fc1(self.flat(x))
        return self.fc2(torch.cat([self.relu(h), self.leaky(h + 0.5)], dim=1))


def test_the_round_report_pools_the_activations_of_a_shared_producer(tmp_path, monkeypatch):
    # the report's per-layer row took the entropy of whichever activation came last
    from pyengine.methods import runner as R

    from _depth_helpers import quiet, tiny_cfg

    monkeypatch.setattr(R.Run, "_base_model", lambda self: _TwoHeads())
    rep = R.Run(tiny_cfg(tmp_path, "egp", rounds=1, epochs=1), **quiet).run()
    rnd = rep["rounds"][0]
    sites = {d["name"]: d for d in rnd["entropy_sites"]}
    assert set(sites) == {"relu", "leaky"} and {d["producer"] for d in sites.values()} == {"fc1"}
    row = next(r for r in rnd["layers"] if r["layer"] == "fc1.weight")
    assert sorted(row["activation"].split(", ")) == ["leaky", "relu"]
    # independent pooling from the records: EGP's mean over non-constant neurons, EASIER's over all
    w = {n: d["n_neurons"] - d["n_always_on"] - d["n_always_off"] for n, d in sites.items()}
    want = sum(w[n] * d["mean_nonconstant"] for n, d in sites.items()) / sum(w.values()) if sum(w.values()) else 0.0
    want_all = sum(d["n_neurons"] * d["mean"] for d in sites.values()) / sum(d["n_neurons"] for d in sites.values())
    assert row["entropy"] == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert row["entropy_all"] == pytest.approx(want_all, rel=1e-12, abs=1e-15)
    assert row["neurons"] == 48
    assert row["always_on"] == sum(d["n_always_on"] for d in sites.values())
    assert sites["relu"]["mean"] != sites["leaky"]["mean"]  # the two differ, so the pooling is seen


class _LeakyOff(nn.Module):
    """A LeakyReLU whose input is always negative (a large negative bias): always OFF, so
    exactly ``0.1 * z``, and fc1 -> leaky -> fc2 is one linear map (not a constant one)."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(64, 16)
        self.leaky = nn.LeakyReLU(0.1)
        self.fc2 = nn.Linear(16, 10)
        with torch.no_grad():
            self.fc1.bias.fill_(-1e3)

    def forward(self, x):
        return self.fc2(self.leaky(self.fc1(self.flat(x))))


def test_a_run_folds_an_always_off_leaky_relu_exactly(tmp_path, monkeypatch):
    # the run's collapse kept any LeakyReLU that was always OFF (only ON ones became identities)
    from pyengine.methods import runner as R

    from _depth_helpers import capture_fold, quiet, tiny_cfg

    seen = capture_fold(monkeypatch)
    monkeypatch.setattr(R.Run, "_base_model", lambda self: _LeakyOff())
    rep = R.Run(tiny_cfg(tmp_path, "egp", rounds=0, epochs=1), **quiet).run()
    kinds = {(e["kind"], e["target"]) for e in rep["fold"]["collapse_edits"]}
    assert ("linearise", "leaky") in kinds
    leaky = next(e for e in rep["fold"]["collapse_edits"] if e["target"] == "leaky")
    assert leaky["args"]["scale"] == pytest.approx(0.1)
    assert not any(isinstance(m, nn.LeakyReLU) for m in seen["after"].modules())
    assert sum(isinstance(m, nn.Linear) for m in seen["after"].modules()) == 1  # fc1 and fc2 merged
    assert rep["networks"]["folded"]["depth"] == 1 and rep["networks"]["pruned"]["depth"] == 2
    with torch.no_grad():
        for x, _ in seen["test"]:
            want = seen["before"](x).double()
            got = seen["after"](x).double()
            assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max().clamp_min(1.0))
