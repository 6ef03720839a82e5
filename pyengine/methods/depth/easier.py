"""EASIER - entropy-based importance metric to reduce depth (Quetu, Liao, Tartaglione, ECML PKDD
2024, arXiv 2404.18949; methods.md section 4).

Iterative depth reduction without pruning a weight:

1. train (the full schedule); during the LAST epoch of every training run, in train mode with
   augmentation, count per neuron how often its pre-activation is ON (z >= 0); a neuron is a
   channel of a convolution or a hidden unit of a transformer MLP. Layer entropy = mean binary
   entropy over ALL its neurons;
2. replace by the identity the activation of lowest entropy and every activation of entropy 0
   (the authors' code does exactly this, whatever the state of a zero-entropy layer);
3. retrain from the current weights with a fresh optimiser and schedule; repeat.

The run stops when the validation accuracy falls more than ``--tolerance`` points below the
dense network's (the paper's flow; the authors' script runs every iteration: ``--tolerance``
large gives that), or after ``--iterations`` (default: one per activation). The result is the
most reduced network within the tolerance; at the end its activations' identities are folded
into the neighbouring layers (exact folds only, pyengine.graph.fold_network).

Deviation from the authors' code (kept on purpose): their entropy is an average over batches
of per-batch entropies; here counts are accumulated over the whole epoch (methods.md section 0).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyengine.methods.base import EntropyAverage, EntropySpec, Method, register
from pyengine.methods.depth.common import (
    activation_columns,
    DepthTolerance,
    FoldEachRound,
    last_within_tolerance,
    tolerance_stop,
)
from pyengine.methods.options import option

__all__ = ["EASIER", "EASIEROptions", "easier_choice"]


@dataclass
class EASIEROptions(DepthTolerance, FoldEachRound, EntropyAverage):
    iterations: int | None = option(None, "EASIER: most linearisation iterations (default: one per activation of "
                                    "the model, as the authors' script)", low=1)


def easier_choice(entropy: dict[str, float], order: list[str]) -> list[str]:
    """The activations one EASIER iteration replaces by the identity: the one of lowest entropy
    (the first in ``order`` on a tie, as numpy's argmin over the hooks) plus every one of entropy
    exactly 0, in ``order``. ``entropy`` holds the activations still present."""
    present = [n for n in order if n in entropy]
    if not present:
        return []
    low = min(present, key=lambda n: entropy[n])  # min keeps the first of equal values
    return [n for n in present if n == low or entropy[n] == 0.0]


@register
class EASIER(Method):
    """Iteratively linearise the lowest-entropy activation, retrain; stop by a tolerance."""

    name = "easier"
    summary = "depth reduction: linearise the lowest-entropy activation per iteration, retrain (EASIER, ECML 2024)"
    Options = EASIEROptions
    default_rounds = {"*": 1}  # replaced by rounds_for: one per activation
    uses_rewind = False  # each iteration restarts from the current weights (fresh optimiser and schedule)
    keeps_best = True
    default_val_fraction = 0.1  # the authors hold out 10% of the training set

    def __init__(self, options, run):
        super().__init__(options, run)
        # the activations of the network the run started from (the denominator of "removed")
        self.total_activations = len(run.sites)
        self.order = [s.name for s in run.sites]

    def entropy_spec(self) -> EntropySpec:
        return EntropySpec(estimator="easier", inclusive=True, when="train", train_mode=True,
                           average=self.opt.entropy_average)

    def rounds_for(self, preset):
        return self.opt.iterations or self.total_activations

    def act(self, summary):
        current = {s.name for s in self.run.sites}
        entropy = {d["name"]: float(d["mean"]) for d in summary["entropy_sites"] if d["name"] in current}
        chosen = easier_choice(entropy, self.order)
        if not chosen:
            return None
        from pyengine.graph import Edit

        self.run.edit([Edit("linearise", n) for n in chosen])
        return {"linearised": chosen, "entropy": {n: entropy[n] for n in chosen},
                "activations_removed": self.total_activations - len(self.run.sites)}

    def should_stop(self, rounds):
        return tolerance_stop(rounds, self.opt.tolerance)

    def select(self, rounds):
        return last_within_tolerance(rounds, self.opt.tolerance)

    def summary_extra(self, summary):
        return activation_columns(self, summary)
