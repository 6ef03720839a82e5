"""Any registered method on a user's own model through pyengine.Compressor."""
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
