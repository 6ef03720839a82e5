"""NEPENTHE: the allocation with the all-neuron estimator against a hand computation, the collapse
edits after a round, and a tiny run that stops at its target, is killed, resumed and exported."""
import math
from dataclasses import asdict

import pytest
import torch

from _depth_helpers import Stop, onnx_matches, quiet, stop_at, tiny_cfg
from _depth_helpers import fast_latency  # noqa: F401 (a fixture, used by name)
from pyengine.methods import run
from pyengine.nn.entropy import LayerEntropy
from pyengine.ops import entropy_from_counts
from test_depth_easier import UserNet

pytestmark = pytest.mark.usefixtures("one_thread")

N = 100  # samples per neuron
# ON counts per neuron of the three activations r1 (fed by c1), r2 (c2), r3 (c3) of UserNet
COUNTS = {"r1": [0, 100, 50, 25, 75, 50], "r2": [50] * 6, "r3": [0, 0, 0, 0, 0, 0, 10, 90]}
PRODUCER = {"r1": "c1", "r2": "c2", "r3": "c3"}


def _h(p):
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def _summary(counts, producer=PRODUCER):
    sites, constant = [], {}
    for name, c in counts.items():
        st = entropy_from_counts(torch.tensor(c), N)
        sites.append(asdict(LayerEntropy(name, producer[name], st.mean, st.mean_nonconstant, len(c), st.n_always_on,
                                         st.n_always_off, N)))
        if st.n_always_on + st.n_always_off == len(c):
            constant[name] = {"on": [i for i, k in enumerate(c) if k == N]}
    return {"round": 0, "val_acc": None, "test_acc": None, "entropy_sites": sites, "constant_neurons": constant}


def _user_comp(estimator):
    from pyengine import Compressor

    net = UserNet()
    with torch.no_grad():  # mean |w| of each producer: 0.3, 0.2, 0.5 (all entries equal)
        net.c1.weight.fill_(0.3)
        net.c2.weight.fill_(-0.2)
        net.c3.weight.fill_(0.5)
    return Compressor(net, "nepenthe", example_input=torch.zeros(1, 1, 8, 8), options={"estimator": estimator},
                      **quiet)


def _hand_allocation(h, m, nnz, zeta=0.5):
    """methods.md section 2, written out: budget, irrelevance, max-shifted softmax, over-full layers
    emptied and the rest of the budget re-shared, floors."""
    active, alloc = list(nnz), {}
    budget = zeta * sum(nnz.values())
    while True:
        total = sum(h[k] * m[k] for k in active)
        irr = {k: total / (h[k] * m[k]) for k in active}
        top = max(irr.values())
        z = sum(math.exp(irr[k] - top) for k in active)
        share = {k: budget * math.exp(irr[k] - top) / z for k in active}
        full = [k for k in active if share[k] >= nnz[k]]
        if not full:
            alloc.update({k: math.floor(share[k]) for k in active})
            return alloc
        for k in full:
            alloc[k] = nnz[k]
            budget -= nnz[k]
            active.remove(k)


def test_allocation_with_the_all_neuron_estimator_matches_a_hand_computation():
    # layer entropies by hand: mean binary entropy over ALL neurons (constant neurons count as 0)
    h_all = {"r1": (1 + 1 + 2 * _h(0.25)) / 6, "r2": 1.0, "r3": 2 * _h(0.1) / 8}
    h_nonconst = {"r1": (1 + 1 + 2 * _h(0.25)) / 4, "r2": 1.0, "r3": _h(0.1)}
    summary = _summary(COUNTS)
    for d in summary["entropy_sites"]:
        assert d["mean"] == pytest.approx(h_all[d["name"]], abs=1e-6)
        assert d["mean_nonconstant"] == pytest.approx(h_nonconst[d["name"]], abs=1e-6)
    nnz = {"c1": 6 * 9, "c2": 6 * 6, "c3": 8 * 6}
    m = {"c1": 0.3, "c2": 0.2, "c3": 0.5}
    expect = _hand_allocation({PRODUCER[k]: v for k, v in h_all.items()}, m, nnz)
    assert expect == {"c3": 48, "c1": 11, "c2": 9}  # c3 (lowest entropy x magnitude) is emptied
    comp = _user_comp("easier")
    assert comp.method.entropy_spec().estimator == "easier"
    rec = comp.step(summary)
    assert rec["allocation"] == {f"{k}.weight": v for k, v in expect.items()}
    kept = {r["name"]: r["kept"] for r in comp.masks.layer_stats()}
    assert kept == {f"{k}.weight": nnz[k] - expect[k] for k in nnz}
    assert rec["emptied"] == ["c3.weight"] and rec["collapsed"] == []
    # EGP's estimator (non-constant neurons only) gives another allocation on the same statistics
    expect_egp = _hand_allocation({PRODUCER[k]: v for k, v in h_nonconst.items()}, m, nnz)
    assert expect_egp == {"c1": 13, "c2": 34, "c3": 20}
    assert _user_comp("egp").step(_summary(COUNTS))["allocation"] == {f"{k}.weight": v for k, v in expect_egp.items()}


class SkipNet(torch.nn.Module):
    """A user's residual model: r3 follows the sum of c3's branch and r1's output."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.c1, self.b1, self.r1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.c2, self.b2, self.r2 = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6), nn.ReLU()
        self.c3, self.b3, self.r3 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 10)

    def forward(self, x):
        x = self.r1(self.b1(self.c1(x)))
        x = self.r3(self.b3(self.c3(self.r2(self.b2(self.c2(x))))) + x)
        return self.fc(self.pool(x).flatten(1))


def test_collapsed_activations_are_replaced_and_fold_exactly(tmp_path):
    from pyengine import Compressor

    # r1 always ON (identity), r2 always OFF (constant 0: c3's branch becomes a bias), r3 mixed
    counts = {"r1": [N] * 6, "r2": [0] * 6, "r3": [50, 20, 70, 50, 10, 90]}
    torch.manual_seed(0)
    net = SkipNet()
    for bn in (net.b1, net.b2, net.b3):  # BN statistics that are not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    comp = Compressor(net, "nepenthe", example_input=torch.zeros(1, 1, 8, 8), **quiet)
    rec = comp.step(_summary(counts))
    assert rec["collapsed"] == ["linearise r1", "constant r2"] and rec["activations_removed"] == 2
    assert sorted(s.name for s in comp.sites) == ["r3"]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        edited = comp.model.eval()(x)
        folded = comp.fold(_summary({"r3": counts["r3"]}))
        torch.testing.assert_close(folded.eval()(x), edited, rtol=1e-4, atol=1e-5)
    assert not any(n.startswith(("c2.", "c3.")) for n, _ in folded.named_parameters())  # the dead branch went
    comp.export(tmp_path / "exp", formats=("onnx",))
    assert onnx_matches(tmp_path / "exp", folded, (3, 1, 8, 8))


@pytest.mark.usefixtures("fast_latency")
def test_nepenthe_run_stops_at_target_resumes_and_exports(tmp_path):
    from pyengine.cli import main
    from pyengine.train.checkpoint import load_model_export

    opts = {"sparsity": 0.4}
    full = run(tiny_cfg(tmp_path, "nepenthe", "a", rounds=3, options=opts), **quiet)
    assert [r["round"] for r in full["rounds"]] == [0, 1]  # 50% of the producers' weights: target reached
    assert full["rounds"][1]["sparsity"] >= 0.4 and full["rounds"][0]["val_acc"] is not None
    assert full["rounds"][0]["next_action"]["removed_total"] > 0
    assert all("folded_macs" in r and r["activations_total"] == 17 for r in full["rounds"])
    with pytest.raises(Stop):
        run(tiny_cfg(tmp_path, "nepenthe", "b", rounds=3, options=opts), on_epoch=stop_at((1, 1)), **quiet)
    resumed = run(tiny_cfg(tmp_path, "nepenthe", "b", rounds=3, options=opts, resume=True), **quiet)
    assert resumed["final_acc"] == full["final_acc"] and resumed["final_sparsity"] == full["final_sparsity"]
    assert resumed["edits"] == full["edits"]
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert main(["export", str(tmp_path / "a"), "--format", "onnx"]) == 0
    model, _, _ = load_model_export(tmp_path / "a" / "final")
    assert onnx_matches(tmp_path / "a" / "final", model, (4, 1, 8, 8))
    # structural edits during the run and weight rewinding exclude each other: said up front
    with pytest.raises(Exception, match="--rewind weights"):
        run(tiny_cfg(tmp_path, "nepenthe", "c", rewind="weights"), **quiet)


class GeluNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.g1 = torch.nn.Linear(6, 6), torch.nn.GELU()
        self.l2, self.g2 = torch.nn.Linear(6, 8), torch.nn.GELU()
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.g2(self.l2(self.g1(self.l1(x)))))


@pytest.mark.parametrize("approximate", [False, True])
def test_an_always_on_gelu_is_linearised_only_when_asked(approximate):
    """A GELU whose neurons are all always ON is not the identity (GELU(z) = z Phi(z)): refused by
    default, replaced by the identity with --approximate (the paper's Swin-T / MobileNetV2), the
    edit and the report saying it is approximate; a mixed GELU is never touched."""
    from pyengine import Compressor

    comp = Compressor(GeluNet(), "nepenthe", example_input=torch.zeros(1, 6), options={"approximate": approximate},
                      **quiet)
    counts = {"g1": [N] * 6, "g2": [50, 20, 70, 50, 10, 90, 30, 60]}
    rec = comp.step(_summary(counts, {"g1": "l1", "g2": "l2"}))
    names = sorted(s.name for s in comp.sites)
    if approximate:
        assert rec["collapsed"] == ["linearise g1"] and names == ["g2"]
        assert comp.edits[-1]["args"] == {"approximate": "gelu"}
        from pyengine.graph import Edit

        assert "approximate" in Edit.from_dict(comp.edits[-1]).describe()
        x = torch.randn(4, 6)
        with torch.no_grad():  # the identity in g1's place
            ref = comp.model.fc(comp.model.g2(comp.model.l2(comp.model.l1(x))))
            torch.testing.assert_close(comp.model.eval()(x), ref)
    else:
        assert rec["collapsed"] == [] and names == ["g1", "g2"]
        assert [r["target"] for r in rec["refused"]] == ["g1"] and "not exactly linear" in rec["refused"][0]["reason"]
