"""``fold_network``: every exact fold a (linearised, gated, pruned) network allows.

Run after a method's ``linearise`` / ``constant`` edits. The result is an inference network
(eval semantics: BatchNorm running statistics baked into the layers, Dropout removed) equal to
the input network in eval mode, with fewer layers where the algebra allows it exactly; every
fold that was considered and not applied is reported with its reason.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from pyengine.graph.edits import (
    Edit,
    EditHistory,
    _apply,
    _check_masks,
    _module_nodes,
    _out_shape,
    _shape_prop,
    as_graph_module,
    is_identity_like,
)
from pyengine.graph.linear_maps import FoldRefused, compose_layers, layer_macs
from pyengine.graph.modules import ChannelGate, ConstantZero
from pyengine.graph.trace import is_weight_layer

__all__ = ["fold_network"]


def _common_scope(paths: list[str]) -> str:
    parents = [p.rsplit(".", 1)[0] if "." in p else "" for p in paths]
    parts = [p.split(".") if p else [] for p in parents]
    common: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    return ".".join(common)


def _has_dead_code(gm: torch.fx.GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if not node.users and not node.is_impure():
            return True
    return False


def fold_network(model: nn.Module, example_input: Tensor, *, max_mac_ratio: float | None = None,
                 inplace: bool = False, masks: dict[str, Tensor] | None = None
                 ) -> tuple[torch.fx.GraphModule, EditHistory, list[dict]]:
    """Apply every exact fold, in a fixed order, and return ``(network, applied, refused)``.

    Order (each step in graph order, so the result is deterministic):

    1. ``remove_identity``: Identity, Dropout, StochasticDepth modules.
    2. ``remove_branch``: all weight layers with all-zero weights and all ConstantZero
       activations at once; their constant outputs move into the next bias and the dead
       branches are dropped.
    3. ``fold_bn``: every BatchNorm into the layer before it (or the unpadded layer after it).
    4. ``fold_linear`` of each ChannelGate into its producer (or consumer).
    5. ``fold_linear`` of adjacent Conv/Linear pairs (a layer fed directly by another that feeds
       only it), repeated until none is left: Linear∘Linear, conv∘conv when the second does not
       pad, pointwise∘conv when the first has no bias. Two k>1 convolutions whose second
       zero-pads are refused (borders differ); so is any fold whose merged layer would have
       more than ``max_mac_ratio`` times the MACs of the pair (None: no limit).
    6. ``drop_dead``.

    ``applied`` holds the completed edit records (append them to the run's history; they
    replay with :func:`replay`). ``refused`` holds one dict per fold that was considered and
    not applied: ``{"kind", "target", "into", "reason"}``. ``model`` is left unchanged unless
    ``inplace``. ``masks`` (``{param name: bool mask}`` of ``model``), when given, follows the
    folds in place, as :func:`map_masks` of ``applied`` would.
    """
    if not isinstance(example_input, Tensor):
        raise TypeError("fold_network needs example_input, a tensor of the network's input shape")
    if masks is not None:
        _check_masks(masks, model)
    gm = as_graph_module(model, inplace)
    applied = EditHistory()
    refused: list[dict] = []

    def run(edit: Edit) -> bool:
        try:
            _apply(gm, edit, example_input, structure_only=False, masks=masks)
        except FoldRefused as exc:
            refused.append({"kind": edit.kind, "target": edit.target,
                            "into": edit.args.get("into"), "reason": exc.reason})
            return False
        applied.append(edit)
        return True

    def module_of(node):
        return gm.get_submodule(node.target) if node.op == "call_module" else None

    # 1. identities
    for path in dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"
                              and is_identity_like(module_of(n))):
        run(Edit("remove_identity", path))

    # 2. all-zero layers
    zero = list(dict.fromkeys(
        n.target for n in gm.graph.nodes if n.op == "call_module" and is_weight_layer(module_of(n))
        and not bool(module_of(n).weight.detach().any())))
    zero_acts = list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"
                                   and isinstance(module_of(n), ConstantZero)))
    if zero or zero_acts:
        run(Edit("remove_branch", _common_scope(zero + zero_acts), {"zero_layers": zero}))

    # 3. BatchNorm
    _shape_prop(gm, example_input)
    for path in list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"
                                   and isinstance(module_of(n), nn.modules.batchnorm._BatchNorm))):
        if _module_nodes(gm, path):
            run(Edit("fold_bn", path))

    # 4. gates
    _shape_prop(gm, example_input)
    for path in list(dict.fromkeys(n.target for n in gm.graph.nodes if n.op == "call_module"
                                   and isinstance(module_of(n), ChannelGate))):
        if _module_nodes(gm, path):
            run(Edit("fold_linear", path))

    # 5. chains of linear maps
    tried: set[tuple[str, str]] = set()
    stale = True  # shapes must be propagated again after a fold changed the graph
    while True:
        if max_mac_ratio is not None and stale:  # MACs need the output shapes of the current graph
            _shape_prop(gm, example_input)
            stale = False
        pair = None
        for node in gm.graph.nodes:
            src = node.args[0] if node.op == "call_module" and node.args else None
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and is_weight_layer(module_of(node)) and is_weight_layer(module_of(src))
                    and (src.target, node.target) not in tried):
                pair = (src, node)
                break
        if pair is None:
            break
        src, node = pair
        tried.add((src.target, node.target))
        if max_mac_ratio is not None:
            a, b = module_of(src), module_of(node)
            try:
                merged = compose_layers(a, b, src.target, node.target, structure_only=True)
            except FoldRefused:
                merged = None  # run() below records the reason
            sa, sb = _out_shape(src), _out_shape(node)
            if merged is not None and sa is not None and sb is not None:
                before = layer_macs(a, sa) + layer_macs(b, sb)
                after = layer_macs(merged, sb)
                if after > max_mac_ratio * before:
                    refused.append({"kind": "fold_linear", "target": node.target,
                                    "into": src.target,
                                    "reason": f"exact, but the merged layer has {after} MACs "
                                              f"against {before} for the pair (limit "
                                              f"{max_mac_ratio}x)"})
                    continue
        stale = run(Edit("fold_linear", node.target, {"into": src.target}))

    # 6. dead code
    if _has_dead_code(gm):
        run(Edit("drop_dead", ""))
    for node in gm.graph.nodes:  # shape metadata of the last pass is stale after the folds
        node.meta.pop("tensor_meta", None)
    return gm, applied, refused
