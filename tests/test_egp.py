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
