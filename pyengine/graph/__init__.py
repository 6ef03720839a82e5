"""What is known about a network's structure, and the edits that change it.

Layer 3a of pyengine (below nn/ and models/; imports only torch, torch.fx and pyengine.ops):

- analysis: :func:`trace` (torch.fx with the model's own module paths; an untraceable
  submodule is named in a :class:`TraceError`), :func:`activation_map` / :func:`find_producers`
  (every activation and the Conv/Linear feeding it), :func:`neuron_dim`;
- edits as data: :class:`Edit`, :class:`EditHistory`, :func:`apply_edit`, :func:`replay`,
  :func:`map_masks`, :func:`collapse_edit` (the exact edit of an activation whose neurons are
  each constant; :func:`linear_factor`: the factor an activation multiplies by where it is
  linear), and :func:`fold_network` (every exact fold, refusals with reasons);
- measurement: :func:`network_stats`, :func:`measure_latency`;
- export: :func:`export_model` / :func:`load_export` (safetensors + JSON history + ONNX).

    net, applied, refused = fold_network(apply_edit(model, Edit("linearise", "layer1.0.relu1"),
                                                    x), x)
"""
from pyengine.graph.activations import (
    ActivationSite,
    activation_kind,
    activation_map,
    find_functional_activations,
    find_producers,
    find_reused_activations,
    is_weight_layer,
    linear_factor,
    linearise,
    make_activations_distinct,
    neuron_dim,
    register_activation,
)
from pyengine.graph.edits import (
    EDIT_KINDS,
    Edit,
    EditHistory,
    apply_edit,
    apply_edits,
    as_graph_module,
    collapse_edit,
    is_identity_like,
    map_masks,
    replay,
)
from pyengine.graph.export import export_model, load_export
from pyengine.graph.fold import fold_network
from pyengine.graph.linear_maps import FoldRefused, compose_layers
from pyengine.graph.modules import AddBias, AddConstant, ChannelGate, Constant, ConstantZero
from pyengine.graph.stats import count_macs, measure_latency, network_depth, network_stats
from pyengine.graph.trace import TraceError, trace

__all__ = [
    "ActivationSite", "activation_kind", "activation_map", "find_functional_activations",
    "find_producers", "find_reused_activations", "is_weight_layer", "linear_factor", "linearise",
    "make_activations_distinct", "neuron_dim", "register_activation",
    "EDIT_KINDS", "Edit", "EditHistory", "apply_edit", "apply_edits", "as_graph_module",
    "collapse_edit", "is_identity_like", "map_masks", "replay", "fold_network", "FoldRefused", "compose_layers",
    "AddBias", "AddConstant", "ChannelGate", "Constant", "ConstantZero",
    "count_macs", "measure_latency", "network_depth", "network_stats",
    "TraceError", "trace", "export_model", "load_export",
]
