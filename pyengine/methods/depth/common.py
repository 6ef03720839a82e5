"""What the depth methods share: the tolerance rule, and the folded network's numbers per round.

The tolerance rule (EASIER, NEPENTHE, LaCoOT): a network is acceptable while its validation
accuracy is at most ``tolerance`` percentage points below the reference (the dense network, or
for LaCoOT the trained network before any block is removed). Iterative methods stop at the first
round outside the tolerance and keep the most reduced network inside it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from pyengine.methods.options import option

__all__ = ["DepthTolerance", "FoldEachRound", "selection_acc", "within_tolerance", "last_within_tolerance",
           "tolerance_stop", "network_numbers", "folded_numbers"]


@dataclass
class DepthTolerance:
    """The option every depth method shares (declared once, so ``--tolerance`` is one flag)."""

    tolerance: float = option(1.0, "largest drop of validation accuracy (percentage points) below the dense / "
                              "unreduced network that is accepted: iterations stop at the first network "
                              "beyond it and the most reduced network within it is the result", low=0.0)


@dataclass
class FoldEachRound:
    fold_each_round: bool = option(True, "after every round, fold a copy of the network and record its depth, "
                                   "parameters, MACs and latency (the per-iteration table and plot)")


def selection_acc(summary: dict) -> float | None:
    """The accuracy a depth method selects on: validation, else (no validation split) test."""
    v = summary.get("val_acc")
    return v if v is not None else summary.get("test_acc")


def within_tolerance(summary: dict, reference: dict, tolerance: float) -> bool:
    a, ref = selection_acc(summary), selection_acc(reference)
    if a is None or ref is None:
        return True  # nothing to judge by (a user's loop that reports no accuracy)
    return a >= ref - tolerance - 1e-9


def tolerance_stop(rounds: list[dict], tolerance: float) -> str | None:
    """A reason to stop when the latest round fell outside the tolerance of round 0."""
    if len(rounds) < 2 or within_tolerance(rounds[-1], rounds[0], tolerance):
        return None
    split = "validation" if rounds[-1].get("val_acc") is not None else "test (no validation split)"
    return (f"{split} accuracy {selection_acc(rounds[-1]):.2f}% is more than {tolerance:g} points below the "
            f"dense network's {selection_acc(rounds[0]):.2f}%: stopping")


def last_within_tolerance(rounds: list[dict], tolerance: float) -> int:
    """Index of the most reduced round (the latest) whose accuracy is within the tolerance of round 0,
    looking no further than the first round outside it."""
    best = 0
    for i in range(1, len(rounds)):
        if not within_tolerance(rounds[i], rounds[0], tolerance):
            break
        best = i
    return best


def network_numbers(model, example_input, *, latency: bool = True) -> dict:
    """Depth, parameters, MACs and (``latency``) the eval-mode latency of a batch of 32 of ``model``."""
    from pyengine.graph import measure_latency, network_stats

    model.eval()
    st = network_stats(model, example_input)
    out = {"depth": st["depth"], "params": st["params"], "macs": st["macs"]}
    if latency:
        batch = example_input[:1].expand(32, *example_input.shape[1:]).clone()  # the model's input dtype
        if batch.is_floating_point():
            batch = torch.randn(batch.shape, dtype=batch.dtype, device=batch.device)
        out["latency_ms_batch32"] = measure_latency(model, batch, example_input.device)
    return out


def folded_numbers(ctx, summary: dict, *, latency: bool = True) -> dict:
    """Depth, parameters, MACs and latency of the round's network once folded, measured on a copy:
    the collapse edits the round's statistics allow (identity / constant / gate activations) plus
    every exact fold, as the run's end would do. The training network keeps its layers."""
    from pyengine.graph import apply_edit, fold_network
    from pyengine.methods.runner import collapse_edits

    exact = getattr(ctx, "exact_collapse_summary", None)
    if exact is not None:  # the collapses the run's end will fold: decided on the eval-mode network
        summary = exact(summary, ctx.method.entropy_spec())
    model = copy.deepcopy(ctx.model)
    model.eval()
    edits, _refused = collapse_edits(ctx.sites, summary, ctx.approximate_collapse)
    for e in edits:
        try:
            model = apply_edit(model, e, ctx.example_input)
        except (ValueError, NotImplementedError):
            pass
    folded, _applied, _ref = fold_network(model, ctx.example_input, max_mac_ratio=ctx.fold_max_mac_ratio)
    return {f"folded_{k}": v for k, v in network_numbers(folded, ctx.example_input, latency=latency).items()}


def activation_columns(method, summary: dict) -> dict:
    """The per-round columns EASIER and NEPENTHE share: activations removed of the total, and the
    folded network's numbers when the method folds every round."""
    out = {"activations_total": method.total_activations,
           "activations_removed": method.total_activations - len(method.run.sites)}
    if method.opt.fold_each_round:
        out.update(folded_numbers(method.run, summary))
    return out
