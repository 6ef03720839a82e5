"""NEPENTHE - entropy-guided unstructured pruning that makes layers collapse (Liao, Quetu, Nguyen,
Tartaglione; arXiv 2404.16890, "Layer Collapse Can be Induced by Unstructured Pruning";
methods.md section 3).

EGP's allocation (pyengine.methods.prune.egp: a budget zeta of the active layers' nonzeros,
shared by softmax of (sum_k H_k m_k) / (H_l m_l), layers that would be over-pruned emptied and
the rest re-shared) with EASIER's estimator by default: the layer entropy is the mean binary
entropy over ALL neurons. Both estimators (``--estimator egp|easier``) and both ON rules
(``--inclusive``: z >= 0, EASIER's; default z > 0, EGP's) are selectable.

After every round the activations whose every neuron was constant on the measured data are
replaced exactly: the identity where all neurons were always ON, the constant 0 where all were
always OFF, a per-channel 0/1 gate where both (pyengine.methods.runner.collapse_edits); an
always-ON GELU / ReLU6 / SiLU is not exactly the identity and is kept, unless ``--approximate``
replaces it as the paper does for Swin-T and MobileNetV2. The
training network keeps its layers (a fold would merge kernels mid-training); every exact fold
is applied to the result at the end, and with ``--fold-each-round`` a folded copy is measured
after each round. The run stops at ``--sparsity`` (a target over the pruned layers) or when the
validation accuracy falls more than ``--tolerance`` below the dense network; the most pruned
network within the tolerance is the result.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyengine.methods.base import EntropySpec, Method, register
from pyengine.methods.depth.common import (
    activation_columns,
    DepthTolerance,
    FoldEachRound,
    last_within_tolerance,
    tolerance_stop,
)
from pyengine.methods.options import option
from pyengine.methods.prune.egp import EGPConfig, egp_prune_step
from pyengine.nn.entropy import LayerEntropy

__all__ = ["NEPENTHE", "NepentheOptions"]


@dataclass
class NepentheOptions(EGPConfig, DepthTolerance, FoldEachRound):
    # EGPConfig's estimator with NEPENTHE's default: EASIER's mean over all neurons (the ON rule
    # stays EGP's z > 0 by default, so that --inclusive means the same for both methods)
    estimator: str = option("easier", "layer entropy: mean over non-constant neurons (egp, the paper) or over "
                            "all neurons (easier, NEPENTHE's estimator)", choices=("egp", "easier"))
    entropy_when: str = option("pass", "NEPENTHE: measure entropy in a pass over the training images in eval mode "
                               "after each training run (pass: the collapse edits are exact for the deployed "
                               "network), or accumulate it during the last training epoch in train mode (train, "
                               "EASIER's way)", choices=("pass", "train"))
    approximate: bool = option(False, "NEPENTHE: also replace an always-ON activation that is not exactly linear "
                               "(GELU, ReLU6, SiLU, Hardswish - Swin-T, MobileNetV2) by the identity, as the paper "
                               "does; the next round's training absorbs the difference (without it such layers "
                               "are refused, since the result would differ from the pruned network)")


@register
class NEPENTHE(Method):
    """EGP's allocation with EASIER's estimator; collapsed activations replaced after each round."""

    name = "nepenthe"
    summary = "entropy-guided pruning that collapses layers, which are then linearised and folded (NEPENTHE)"
    Options = NepentheOptions
    default_rounds = {"paper": 9, "swin": 4, "*": 3}  # EGP's; the tolerance rule may stop earlier
    uses_rewind = False  # its rounds edit the network's structure, so earlier weights no longer fit
    keeps_best = True
    default_val_fraction = 0.1  # the tolerance rule needs a validation split

    def __init__(self, options, run):
        super().__init__(options, run)
        self.total_activations = len(run.sites)

    def prunable(self, model):
        return self.run.producer_weights()

    def entropy_spec(self) -> EntropySpec:
        return EntropySpec(estimator=self.opt.estimator, inclusive=self.opt.inclusive, when=self.opt.entropy_when,
                           train_mode=self.opt.entropy_when == "train", average=self.opt.entropy_average)

    def act(self, summary):
        collapsed, refused = self.run.apply_collapse(summary)
        ent = {d["name"]: LayerEntropy(**d) for d in summary["entropy_sites"]}
        rec = egp_prune_step(self.run.masks, ent, self.opt)
        removed = sum(rec["removed"].values())
        if removed == 0 and not collapsed:
            return None
        return {"removed_total": removed, "allocation": rec["allocation"], "emptied": rec["emptied_layers"],
                "collapsed": [f"{e['kind']} {e['target']}" for e in collapsed], "refused": refused,
                "activations_removed": self.total_activations - len(self.run.sites)}

    def should_stop(self, rounds):
        return self.opt.reached(self.run.masks) or tolerance_stop(rounds, self.opt.tolerance)

    def select(self, rounds):
        return last_within_tolerance(rounds, self.opt.tolerance)

    def summary_extra(self, summary):
        return activation_columns(self, summary)
