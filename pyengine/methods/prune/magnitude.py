"""Unstructured L1 magnitude pruning, one shot or iterative (IMP), global or layer-wise
(methods.md section 1; Frankle & Carbin, ICLR 2019; Renda et al., ICLR 2020)."""
from __future__ import annotations

import math

from dataclasses import dataclass

from pyengine.methods.base import Method, register
from pyengine.methods.options import option
from pyengine.nn.masks import MaskSet


def prune_magnitude(masks: MaskSet, fraction: float, scope: str = "global") -> dict[str, int]:
    """Remove ``fraction`` of the *remaining* weights with the smallest |w|.

    scope="global": one ranking over all prunable weights (IMP's default);
    scope="layerwise": the same fraction of each layer's remaining weights.
    Returns how many weights each layer lost.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    if scope == "global":
        return masks.prune_global(round(fraction * masks.kept()))
    if scope == "layerwise":
        return {n: masks.prune(n, round(fraction * int(m.sum()))) for n, m in masks.masks.items()}
    raise ValueError(f"scope must be 'global' or 'layerwise', got {scope!r}")


def fraction_for_target(current_sparsity: float, target_sparsity: float) -> float:
    """The fraction of remaining weights to remove to go from one sparsity to another."""
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if target_sparsity <= current_sparsity:
        return 0.0
    return 1.0 - (1.0 - target_sparsity) / (1.0 - current_sparsity)


@dataclass
class PruneTarget:
    """The option every pruning method shares: a target sparsity over the layers it prunes."""

    sparsity: float | None = option(None, "target sparsity over the layers the method prunes: magnitude prunes "
                                    "to it in one shot; egp and imp stop once they reach it",
                                    low=0.0, high=1.0, high_open=True)

    def reached(self, masks: MaskSet) -> str | None:
        """A reason to stop once the target is met - or as nearly as whole weights allow: at most
        ceil(N (1 - sparsity)) kept of N, over all layers or in every layer (the counts a capped
        round prunes to)."""
        if self.sparsity is None:
            return None
        keep = 1.0 - self.sparsity

        def cap(n: int) -> int:
            return int(math.ceil(n * keep - 1e-9))

        if (masks.sparsity() >= self.sparsity - 1e-9 or masks.kept() <= cap(masks.total())
                or all(int(m.sum()) <= cap(m.numel()) for m in masks.masks.values())):
            return f"target sparsity {self.sparsity:.2%} reached ({masks.sparsity():.4%})"
        return None





@dataclass
class IMPOptions(PruneTarget):
    rate: float = option(0.2, "IMP: fraction of the remaining weights removed per round", low=0.0, high=1.0,
                         low_open=True, high_open=True)
    scope: str = option("global", "magnitude ranking: one global ranking or per layer", choices=("global", "layerwise"))


@dataclass
class MagnitudeOptions(PruneTarget):
    scope: str = option("global", "magnitude ranking: one global ranking or per layer", choices=("global", "layerwise"))

    def __post_init__(self):
        if self.sparsity is None:  # one-shot pruning needs a target
            self.sparsity = 0.9


def _record(removed_by: dict[str, int], fraction: float) -> dict | None:
    total = sum(removed_by.values())
    return {"removed_total": total, "fraction": fraction} if total else None


@register
class IMP(Method):
    """Iterative magnitude pruning: remove ``rate`` of the remaining weights per round, retrain."""

    name = "imp"
    summary = "iterative magnitude pruning: a fraction of the remaining weights per round, then retraining"
    Options = IMPOptions
    default_rounds = {"paper": 34, "vit": 34, "*": 5}  # the SDD protocol: r = 0.2 over 34 rounds

    def act(self, summary):
        frac = self.opt.rate
        if self.opt.sparsity is not None:
            frac = min(frac, fraction_for_target(self.run.masks.sparsity(), self.opt.sparsity))
        return _record(prune_magnitude(self.run.masks, frac, self.opt.scope), frac)

    def should_stop(self, rounds):
        return self.opt.reached(self.run.masks)


@register
class Magnitude(Method):
    """One-shot magnitude pruning to --sparsity, then fine-tuning."""

    name = "magnitude"
    summary = "one-shot magnitude pruning to --sparsity, then retraining"
    Options = MagnitudeOptions
    default_rounds = {"*": 1}

    def act(self, summary):
        frac = fraction_for_target(self.run.masks.sparsity(), self.opt.sparsity)
        return _record(prune_magnitude(self.run.masks, frac, self.opt.scope), frac)
