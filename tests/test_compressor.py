"""Any registered method on a user's own model through pyengine.Compressor."""
import copy

import pytest
import torch
from torch import nn

import pyengine
from pyengine.graph import TraceError
from pyengine.methods.base import list_methods


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 1)
        self.r2 = nn.ReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.r2(self.c2(self.r1(self.b1(self.c1(x)))))
        return self.fc(x.mean((2, 3)))


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4))
        self.gate = DataDependent()

    def forward(self, x):
        return self.gate(self.inner(x))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
            return self.lin(x)
        return -x


def test_untraceable_model_names_the_module():
    with pytest.raises(TraceError, match="gate"):
        pyengine.Compressor(Branchy(), "imp", example_input=torch.randn(2, 4))


@pytest.mark.parametrize("method", [m for m in list_methods() if m in ("egp", "imp", "magnitude")])
def test_every_pruning_method_on_a_user_model(method):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 6, 6)
    options = {"sparsity": 0.5} if method == "magnitude" else None  # 0.9 (the default) empties the classifier
    comp = pyengine.Compressor(Small(), method, example_input=x[:1], options=options, log=lambda *a: None)
    comp.model.eval()
    comp.measure([(x, None)])
    rec = comp.step()
    assert rec is not None and rec["removed_total"] > 0
    assert comp.masks.sparsity() > 0
    for name, m in comp.masks.masks.items():
        assert (dict(comp.model.named_parameters())[name][~m] == 0).all()
    # a collapsed activation: a large BN shift makes r1 always ON -> identity, then c1 (3x3, BN
    # folded in) and c2 (1x1, no padding) merge exactly into one convolution
    with torch.no_grad():
        comp.model.b1.bias.fill_(100.0)
    comp.measure([(x, None)], spec=pyengine.methods.EntropySpec())
    ref = comp.model(x).detach()
    folded = comp.fold()
    edits = {(e["kind"], e["target"]) for e in comp.fold_record["collapse_edits"]}
    assert ("linearise", "r1") in edits
    assert torch.allclose(folded(x), ref, rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) <= 1  # c1 and c2 merged
    assert any(e["kind"] == "fold_linear" for e in comp.fold_record["folds"])


class Bottleneck(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Linear(16, 2)
        self.r1 = nn.ReLU()
        self.up = nn.Linear(2, 16)
        self.r2 = nn.ReLU()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.r2(self.up(self.r1(self.down(x)))))


@pytest.mark.parametrize("limit", [1.0, None])
def test_fold_refuses_a_merge_with_more_macs_unless_asked(limit):
    """down (16->2) and up (2->16) merge exactly into one 16->16 layer once r1 is the identity, but
    that layer has 4x the pair's MACs: refused (and reported) by default, applied with no limit.
    (r2 collapses too, so up then merges with fc either way: 2->16->3 is one 2->3 layer.)"""
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    comp = pyengine.Compressor(Bottleneck(), "egp", example_input=x[:1], fold_max_mac_ratio=limit,
                               log=lambda *a: None)
    with torch.no_grad():
        comp.model.down.bias.fill_(100.0)  # r1 always ON -> identity
    comp.model.eval()
    comp.measure([(x, None)], spec=pyengine.methods.EntropySpec())
    ref = comp.model(x).detach()
    folded = comp.fold()
    assert ("linearise", "r1") in {(e["kind"], e["target"]) for e in comp.fold_record["collapse_edits"]}
    torch.testing.assert_close(folded(x), ref, rtol=1e-4, atol=1e-3)
    linears = [m for m in folded.modules() if isinstance(m, nn.Linear)]
    merged = any(e["kind"] == "fold_linear" and e["target"] == "up" for e in comp.fold_record["folds"])
    if limit is None:
        assert merged and [(m.in_features, m.out_features) for m in linears] == [(16, 3)]
    else:
        assert not merged and [(m.in_features, m.out_features) for m in linears] == [(16, 2), (2, 3)]
        reasons = [r["reason"] for r in comp.fold_record["refused"] if r.get("target") == "up"]
        assert reasons and "256 MACs against 64" in reasons[0]


def test_fold_max_mac_ratio_is_checked():
    with pytest.raises(ValueError, match="fold_max_mac_ratio"):
        pyengine.Compressor(Bottleneck(), "egp", example_input=torch.randn(1, 16), fold_max_mac_ratio=-1.0)


def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 4))


def test_fold_after_step_measures_the_network_as_it_is_now():
    """A ReLU that is just always ON before a step can be mixed after the step's pruning: folding
    on the old measurement would linearise it and change the outputs. fold() refuses stale
    statistics and, given the loader, measures again - the folded network equals the pruned one."""
    torch.manual_seed(0)
    with torch.no_grad():
        net = _mlp().double()
        x = torch.rand(512, 16, dtype=torch.float64)
        pre = net[2](net[1](net[0](x)))
        net[2].bias -= pre.min(0).values - 1e-3  # the second ReLU: always ON by a hair on this data
    comp = pyengine.Compressor(net, "egp", example_input=x[:1], options={"zeta": 0.9}, log=lambda *a: None)
    assert comp.measure([x])["zero_entropy"] == ["3"]
    assert comp.step() is not None
    comp.model.eval()
    with torch.no_grad():
        mixed = bool((comp.model[2](comp.model[1](comp.model[0](x))) <= 0).any())
        ref = comp.model(x)
    assert mixed  # the step's pruning made the once-collapsed ReLU mixed (what makes the case)
    with pytest.raises(RuntimeError, match="latest measure\\(\\) came before the latest step\\(\\)"):
        comp.fold()
    folded = comp.fold([x])
    assert ("linearise", "3") not in {(e["kind"], e["target"]) for e in comp.fold_record["collapse_edits"]}
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ref, rtol=1e-12, atol=1e-12)


def test_fold_needs_a_measurement_for_an_entropy_method():
    comp = pyengine.Compressor(_mlp(), "egp", example_input=torch.randn(1, 16), log=lambda *a: None)
    with pytest.raises(RuntimeError, match="needs a measurement"):
        comp.fold()


def test_step_follows_the_methods_stop_rule():
    """EGP with a sparsity target stops once it is reached, as the command-line runner does."""
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    comp = pyengine.Compressor(_mlp(), "egp", example_input=x[:1], options={"sparsity": 0.6, "zeta": 0.5},
                               log=lambda *a: None)
    done = []
    for _ in range(6):
        comp.measure([x])
        rec = comp.step()
        if rec is None:
            break
        done.append(comp.masks.sparsity())
    assert rec is None and comp.stopped and "reached" in comp.stopped
    assert done[-1] >= 0.6 and all(s < 0.6 for s in done[:-1])  # no round past the one that reached it
    assert comp.step() is None


class Reused(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc(self.act(self.b(self.act(self.a(x)))))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(nn.functional.relu(self.a(x)))


class Mixed(Functional):
    def __init__(self):
        super().__init__()
        self.b = nn.Linear(8, 8)
        self.r = nn.ReLU()

    def forward(self, x):
        return self.fc(self.r(self.b(nn.functional.relu(self.a(x)))))


def test_activations_the_method_cannot_see_are_named():
    x = torch.randn(1, 8)
    with pytest.raises(ValueError, match=r"called more than once per forward: \{'act': 2\}"):
        pyengine.Compressor(Reused(), "egp", example_input=x)
    pyengine.Compressor(Reused(), "magnitude", example_input=x, log=lambda *a: None)  # no entropy: fine
    with pytest.raises(ValueError, match=r"applies its activations as functions \(\['relu'\]\)"):
        pyengine.Compressor(Functional(), "egp", example_input=x)
    with pytest.warns(RuntimeWarning, match="invisible to egp"):
        comp = pyengine.Compressor(Mixed(), "egp", example_input=x, log=lambda *a: None)
    assert [s.name for s in comp.sites] == ["r"]


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match=r"example_input of shape \(1, 3, 8, 8\).*does not run through Sequential"):
        pyengine.Compressor(_mlp(), "imp", example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"does not have: \['2.wieght'\]"):
        pyengine.Compressor(_mlp(), "imp", example_input=torch.randn(1, 16), prunable=["0.weight", "2.wieght"])
    from pyengine.methods.prune.magnitude import IMPOptions

    with pytest.raises(TypeError, match="options for method 'egp' must be a dict or EGPConfig, got IMPOptions"):
        pyengine.Compressor(_mlp(), "egp", example_input=torch.randn(1, 16), options=IMPOptions())


def test_measure_on_an_empty_loader_and_user_exports_are_named(tmp_path):
    comp = pyengine.Compressor(_mlp(), "egp", example_input=torch.randn(1, 16), log=lambda *a: None)
    with pytest.raises(ValueError, match="the loader gave no batch"):
        comp.measure([])
    written = comp.export(tmp_path / "e", formats="safetensors")  # one format as a string
    assert [p.rsplit("/", 1)[-1] for p in written if p.endswith(".safetensors")] == ["model.safetensors"]
    from pyengine.train.checkpoint import load_model_export

    with pytest.raises(ValueError, match=r"user model .*_mlp|user model .*Sequential.*pyengine.graph.load_export"):
        load_model_export(tmp_path / "e")
    net, _, _ = pyengine.graph.load_export(tmp_path / "e", lambda arch: _mlp())
    x = torch.randn(3, 16)
    torch.testing.assert_close(net(x), comp.model(x))


def test_an_optimizer_of_the_replaced_network_is_refused():
    # EASIER's step() linearises an activation: the network is rebuilt with new parameters, and an
    # optimizer made before it used to go on updating the old network - comp.model trained no more
    torch.manual_seed(0)
    x = torch.randn(32, 1, 6, 6)
    y = torch.randint(0, 3, (32,))
    comp = pyengine.Compressor(Small(), "easier", example_input=x[:1], log=lambda *a: None)
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.1)

    def train_step(optimizer):
        loss = nn.functional.cross_entropy(comp.model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        comp.apply_masks(optimizer)

    train_step(opt)
    comp.measure([(x, y)])
    assert comp.step()["linearised"]
    before = comp.model.c2.weight.detach().clone()
    with pytest.raises(RuntimeError, match="new optimizer"):
        train_step(opt)
    opt = torch.optim.SGD(comp.model.parameters(), lr=0.1)
    train_step(opt)
    assert not torch.equal(before, comp.model.c2.weight)
    comp.model.eval()
    comp.fold([(x, y)])
    with pytest.raises(RuntimeError, match="new optimizer"):
        train_step(opt)
    train_step(torch.optim.SGD(comp.model.parameters(), lr=0.1))


class _Encoder(nn.Module):
    """nn.TransformerEncoderLayer: in eval mode without gradients its fused path never calls the
    activation module."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=nn.ReLU(), batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.enc(self.inp(x)).mean(1))


def test_an_activation_that_never_ran_while_measuring_is_named():
    # it used to be left out of the entropies without a word: EGP then silently did nothing
    torch.manual_seed(0)
    x = torch.randn(8, 5, 6)
    comp = pyengine.Compressor(_Encoder(), "egp", example_input=x[:1], log=lambda *a: None)
    comp.model.eval()
    with pytest.warns(RuntimeWarning, match=r"enc\.activation.*never ran"):
        summary = comp.measure([x])
    assert summary["entropy_sites"] == []


def test_fold_with_a_loader_replaces_collapsed_activations_for_any_method():
    # IMP / magnitude measure no entropy, and fold(loader) ignored the loader: an always-ON ReLU
    # stayed, and with it the layer it separates
    torch.manual_seed(0)
    x = torch.randn(16, 1, 6, 6)
    comp = pyengine.Compressor(Small(), "magnitude", example_input=x[:1], options={"sparsity": 0.3},
                               log=lambda *a: None)
    comp.step()
    with torch.no_grad():
        comp.model.c2.bias.fill_(100.0)  # r2 always ON: it becomes the identity
    comp.model.eval()
    before = comp.model(x)
    folded = comp.fold([(x, None)])
    assert [e["target"] for e in comp.fold_record["collapse_edits"]] == ["r2"]
    assert torch.allclose(folded(x), before, atol=1e-5)


class _RandomLoader:
    """Input batches that draw from torch's and Python's random state, as a shuffling or
    augmenting loader does."""

    def __init__(self, x):
        self.x = x

    def __iter__(self):
        import random

        for i in range(0, len(self.x), 16):
            random.random()
            yield self.x[i:i + 16] + 0.0 * torch.rand(1, dtype=self.x.dtype)


def test_fold_with_a_loader_equals_the_eval_network_when_the_method_counts_in_train_mode():
    # EASIER counts its states in train mode (BatchNorm batch statistics); fold(loader) decided the
    # collapses on that count, so the eval-mode network, which its running statistics turn ON here,
    # folded into something else (a difference as large as the outputs). The collapses are decided
    # on an eval-mode pass, as the CLI run's final fold does, and the random state is left alone.
    import random

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():  # batch statistics: the ReLU "2" always OFF; running statistics: always ON
        net[1].bias.fill_(-50.0)
        net[1].running_mean.fill_(-1e4)
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64)
    reference = copy.deepcopy(net).eval()
    with torch.no_grad():
        want = reference(x)
    # the same fold over a loader that draws nothing: where the random state should end up (the
    # layers a fold builds draw their initialisation, the measurement nothing)
    quiet = pyengine.Compressor(copy.deepcopy(net), "easier", example_input=x[:1], log=lambda *a: None)
    torch.manual_seed(3)
    quiet.fold([x[i:i + 16] for i in range(0, len(x), 16)])
    next_torch = torch.rand(3)
    comp = pyengine.Compressor(net, "easier", example_input=x[:1], log=lambda *a: None)
    assert comp.method.entropy_spec().train_mode  # the case this is about
    random.seed(3)
    next_py = random.random()
    random.seed(3)
    torch.manual_seed(3)
    folded = comp.fold(_RandomLoader(x))
    after_py, after_torch = random.random(), torch.rand(3)
    collapsed = {(e["kind"], e["target"]) for e in comp.fold_record["collapse_edits"]}
    with torch.no_grad():
        torch.testing.assert_close(folded.eval()(x), want, rtol=1e-12, atol=1e-9)
    assert ("linearise", "2") in collapsed and ("constant", "2") not in collapsed
    assert after_py == next_py and torch.equal(after_torch, next_torch)  # the loader's draws are undone
