"""EGP - entropy guided pruning (Liao et al., ICCV 2023 workshops, arXiv 2308.06619).

Unstructured pruning whose per-layer budget favours layers of low entropy x magnitude, so
whole layers are emptied or linearised (methods.md section 2):

    B   = zeta * (sum of remaining nonzeros over the active layers)
    I_l = (sum_k H_k m_k) / (H_l m_l)        m_l = mean |w| of layer l's remaining weights
    R   = softmax(I)  (max-shifted),   a_l = B R_l

A layer whose share exceeds its nonzeros is pruned fully and leaves the active set; the rest of
the budget is re-shared until stable. Active layers: entropy > 0 and not yet empty.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from pyengine.methods.base import EntropyAverage, EntropySpec, Method, register
from pyengine.methods.options import option
from pyengine.methods.prune.magnitude import PruneTarget
from pyengine.nn.entropy import LayerEntropy, entropy_by_producer
from pyengine.nn.masks import MaskSet


@dataclass
class EGPConfig(PruneTarget, EntropyAverage):
    """EGP hyper-parameters with the published defaults (paper section 3)."""

    zeta: float = option(0.5, "EGP: fraction of the active layers' remaining weights removed per round",
                         low=0.0, high=1.0, low_open=True)
    estimator: str = option("egp", "layer entropy: mean over non-constant neurons (egp, the paper) or over "
                            "all neurons (easier, NEPENTHE's estimator)", choices=("egp", "easier"))
    inclusive: bool = option(False, "count z >= 0 as ON (EASIER's rule) instead of z > 0 (EGP's)")


def egp_allocate(entropy: dict[str, float], mean_abs: dict[str, float], nonzeros: dict[str, int],
                 zeta: float) -> dict[str, int]:
    """Per-layer number of weights to remove this round. All dicts are keyed by layer."""
    if not 0.0 < zeta <= 1.0:
        raise ValueError(f"zeta must be in (0, 1], got {zeta}")
    active = [l for l in nonzeros if entropy.get(l, 0.0) > 0 and nonzeros[l] > 0 and mean_abs.get(l, 0.0) > 0]
    alloc = {l: 0 for l in nonzeros}
    budget = zeta * sum(nonzeros[l] for l in active)
    while active:
        hm = {l: entropy[l] * mean_abs[l] for l in active}
        total = sum(hm.values())
        irr = {l: total / hm[l] for l in active}
        top = max(irr.values())
        ex = {l: math.exp(irr[l] - top) for l in active}
        z = sum(ex.values())
        share = {l: budget * ex[l] / z for l in active}
        full = [l for l in active if share[l] >= nonzeros[l]]
        if not full:
            for l in active:
                alloc[l] = int(math.floor(share[l]))
            break
        for l in full:
            alloc[l] = nonzeros[l]
            budget -= nonzeros[l]
            active.remove(l)
        if budget <= 0:
            break
    return alloc


def egp_prune_step(masks: MaskSet, entropies: dict[str, LayerEntropy], cfg: EGPConfig) -> dict:
    """One EGP round on ``masks`` given the entropy of every activation.

    Each activation's entropy is attributed to its producer layer's weight (ResNet relu1 ->
    conv1, ...). A layer feeding several activations (``h = conv(x); relu(h); gelu(h)``) gets
    their neuron-weighted mean (:func:`pyengine.nn.entropy.entropy_by_producer`): it is
    zero-entropy, and so left out of the allocation, only when every activation it feeds is.
    Layers without an activation after them (e.g. the classifier) are not pruned by EGP.
    Returns a record: entropy per layer, allocation, removed and emptied layers.
    """
    ent, mabs, nnz = {}, {}, {}
    for producer, h in entropy_by_producer(entropies.values(), cfg.estimator).items():
        wname = f"{producer}.weight"
        if wname not in masks.masks:
            continue
        m = masks.masks[wname]
        kept = int(m.sum())
        ent[wname] = h
        nnz[wname] = kept
        mabs[wname] = float(masks.params[wname].detach().abs()[m].mean()) if kept else 0.0
    alloc = egp_allocate(ent, mabs, nnz, cfg.zeta)
    removed = {n: masks.prune(n, a) for n, a in alloc.items() if a > 0}
    return {
        "entropy": ent,
        "allocation": alloc,
        "removed": removed,
        "zero_entropy_layers": sorted(n for n, h in ent.items() if h == 0.0),
        "emptied_layers": masks.empty_layers(),
    }


@register
class EGP(Method):
    """Entropy guided pruning: per-layer budgets from entropy x magnitude (arXiv 2308.06619)."""

    name = "egp"
    summary = "entropy-guided unstructured pruning that empties whole layers (EGP, ICCV-W 2023)"
    Options = EGPConfig
    # ResNet-18/CIFAR-10: the authors' script's 9 rounds (the paper's table ends at round 8, 99.6%
    # sparsity at zeta 0.5; every round is in the report); Swin-T/CIFAR-10: the paper's 4
    default_rounds = {"paper": 9, "swin": 4, "*": 3}

    def prunable(self, model):
        # EGP only ever prunes layers that feed an activation; sparsity is stated over them
        return self.run.producer_weights()

    def entropy_spec(self) -> EntropySpec:
        return EntropySpec(estimator=self.opt.estimator, inclusive=self.opt.inclusive, when="pass",
                           average=self.opt.entropy_average)

    def act(self, summary):
        ent = {d["name"]: LayerEntropy(**d) for d in summary["entropy_sites"]}
        rec = egp_prune_step(self.run.masks, ent, self.opt)
        removed = sum(rec["removed"].values())
        if removed == 0:
            return None
        return {"removed_total": removed, "allocation": rec["allocation"], "emptied": rec["emptied_layers"]}

    def should_stop(self, rounds):
        return self.opt.reached(self.run.masks)
