"""Unstructured L1 magnitude pruning, global or layer-wise (methods.md section 1)."""
from __future__ import annotations

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
