"""Tracing a model into a torch.fx graph whose nodes carry the model's own module paths.

``trace(model)`` returns a :class:`torch.fx.GraphModule` in which

- every weight layer (Conv/Linear), activation, normalisation layer and every module without
  children is one ``call_module`` node, so node targets are the model's module paths and the
  GraphModule's ``state_dict`` has the model's keys;
- a module that uses the weights of a child weight layer without calling it (torchvision's
  ``ShiftedWindowAttention`` passes ``self.qkv.weight`` to a function) is kept whole as one
  node: tracing through it would turn its ``nn.Linear`` children into bare parameters (so mask
  and producer bookkeeping would lose them) and would freeze ``self.training`` into the code.

- what a forward computes under ``torch.no_grad()`` / ``torch.inference_mode()`` (a frozen
  layer, a target computed without gradients) is followed by a ``detach`` where its value leaves
  that region: torch.fx records no grad mode, and without it an edited (traced) network would
  train the frozen layers and send gradients back through the region.

A model torch.fx cannot trace raises :class:`TraceError` naming the innermost submodule whose
own ``forward`` fails (found by tracing the children of a failing module recursively).
"""
from __future__ import annotations

import warnings

import torch
import torch.fx
from torch import nn

__all__ = ["TraceError", "LeafTracer", "trace", "is_weight_layer", "is_norm_layer"]


class TraceError(TypeError):
    """A model (or one of its submodules, named in the message) cannot be traced by torch.fx.

    Attributes:
        module_path: path of the offending submodule ("" for the model itself).
    """

    def __init__(self, message: str, module_path: str = "") -> None:
        super().__init__(message)
        self.module_path = module_path


def is_weight_layer(module: nn.Module) -> bool:
    """True for the layers that produce an activation's input: convolutions and linear layers
    (and subclasses of them, such as masked layers)."""
    return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def is_norm_layer(module: nn.Module) -> bool:
    """BatchNorm/InstanceNorm/LayerNorm/GroupNorm layers (kept as single graph nodes)."""
    return isinstance(module, _NORMS)


class LeafTracer(torch.fx.Tracer):
    """Traces through containers but keeps activations, weight layers, norms, childless modules
    and the modules named in ``extra_leaves`` as single nodes."""

    def __init__(self, extra_leaves: set[str] | None = None) -> None:
        super().__init__()
        self.extra_leaves = set(extra_leaves or ())

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        # torch.no_grad() regions of a forward really run while it is traced: remember them
        node.meta["grad_enabled"] = torch.is_grad_enabled()
        return node

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        from pyengine.graph.activations import activation_kind

        if module_qualified_name in self.extra_leaves:
            return True
        if activation_kind(m) is not None or is_weight_layer(m) or is_norm_layer(m):
            return True
        if next(m.children(), None) is None:
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _opaque_owners(model: nn.Module, graph: torch.fx.Graph) -> set[str]:
    """Modules whose weight-layer children were reached through ``get_attr`` (their weights
    used as plain tensors) rather than called: they must stay whole."""
    owners: set[str] = set()
    for node in graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        layer_path = node.target.rsplit(".", 1)[0]
        try:
            layer = model.get_submodule(layer_path)
        except AttributeError:
            continue
        if not is_weight_layer(layer):
            continue
        stack = list(node.meta.get("nn_module_stack", {}).keys())
        owner = stack[-1] if stack else (layer_path.rsplit(".", 1)[0] if "." in layer_path else "")
        if owner == "":  # the model itself uses the layer's weight: nothing to keep whole
            continue
        owners.add(owner)
    return owners


def detach_outputs(value):
    """``value`` with every tensor in it detached (tuples, lists and dicts followed): what leaves
    a ``torch.no_grad()`` region of a traced forward."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(detach_outputs(v) for v in value)
    if isinstance(value, dict):
        return {k: detach_outputs(v) for k, v in value.items()}
    return value


def _keep_no_grad_regions(graph: torch.fx.Graph) -> None:
    """A value computed without gradients (``torch.no_grad()`` in a forward) is detached where a
    node computed with gradients, or the output, uses it - torch.fx records no grad mode."""
    for node in list(graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method") or node.meta.get("grad_enabled", True):
            continue
        if node.target is detach_outputs:
            continue
        users = [u for u in node.users if u.op == "output" or u.meta.get("grad_enabled", True)]
        if not users:
            continue
        with graph.inserting_after(node):
            detached = graph.call_function(detach_outputs, (node,))
        detached.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
        detached.meta["grad_enabled"] = True
        for u in users:
            u.replace_input_with(node, detached)


def _trace_graph(model: nn.Module, extra_leaves: set[str]) -> torch.fx.Graph:
    with torch.enable_grad():  # a trace under no_grad would take the whole forward for a frozen region
        graph = LeafTracer(extra_leaves).trace(model)
    _keep_no_grad_regions(graph)
    return graph


def _find_culprit(model: nn.Module, prefix: str = "") -> tuple[str, Exception] | None:
    """The innermost submodule whose forward fails to trace, with its error."""
    tracer = LeafTracer()
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if tracer.is_leaf_module(child, path):
            continue
        try:
            _trace_graph(child, set())
        except Exception as exc:  # noqa: BLE001 - any failure narrows the search
            deeper = _find_culprit(child, path)
            return deeper if deeper is not None else (path, exc)
    return None


def _code(model: nn.Module, leaves: set[str], training: bool) -> str:
    model.train(training)
    graph = _trace_graph(model, leaves)
    return torch.fx.GraphModule(model, graph).code


def _mode_dependent(model: nn.Module, leaves: set[str], prefix: str = "") -> set[str]:
    """The innermost submodules whose traced code differs between train and eval mode (a
    Python ``if self.training`` would otherwise be frozen into the graph)."""
    found: set[str] = set()
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        inner = {p[len(path) + 1:] for p in leaves if p.startswith(path + ".")}
        if path in leaves or LeafTracer(leaves).is_leaf_module(child, path):
            continue
        try:
            differs = _code(child, inner, True) != _code(child, inner, False)
        except Exception:  # noqa: BLE001 - a child that only traces inside its parent
            continue
        if differs:
            deeper = _mode_dependent(child, inner, path)
            found |= deeper or {path}
    return found


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Trace ``model`` into a GraphModule with the model's module paths (see module docstring).

    The result shares parameters and buffers with ``model``; modules never called in forward
    are not part of it. Submodules whose forward branches on ``self.training`` (e.g. attention
    dropout applied only in training) are kept whole, so that ``.train()``/``.eval()`` keep
    their meaning; where the model's own forward does so, the graph follows train mode and a
    warning says so. Raises :class:`TraceError` naming the offending submodule when torch.fx
    cannot trace the model (data-dependent control flow, calls torch.fx cannot proxy, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        raise TraceError(f"{type(model).__name__} is a torch.compile'd model, which torch.fx cannot trace: pass "
                         "the module it wraps (model._orig_mod) and compile the result afterwards")
    leaves: set[str] = set()
    was_training = model.training
    try:
        model.train(True)
        graph = _trace_graph(model, leaves)
        for _ in range(8):  # opaque modules can nest; a few passes reach the fixed point
            owners = _opaque_owners(model, graph) - leaves
            if not owners:
                break
            leaves |= owners
            graph = _trace_graph(model, leaves)
        # ``graph`` was traced in train mode: one more trace in eval mode tells whether a forward
        # branches on self.training (two traces in all for a model that does not)
        if torch.fx.GraphModule(model, graph).code != _code(model, leaves, False):
            extra = _mode_dependent(model, leaves)
            if extra:
                leaves |= extra
                model.train(True)
                graph = _trace_graph(model, leaves)
            if torch.fx.GraphModule(model, graph).code != _code(model, leaves, False):
                warnings.warn(f"{type(model).__name__}.forward branches on self.training; the "
                              "traced graph follows train mode", RuntimeWarning, stacklevel=2)
    except Exception as exc:  # noqa: BLE001 - re-raised with the offending module named
        culprit = _find_culprit(model)
        if culprit is None:
            path, cause = "", exc
            where = f"{type(model).__name__} (the model's own forward)"
        else:
            path, cause = culprit
            where = f"submodule {path!r} ({type(model.get_submodule(path)).__name__})"
        raise TraceError(
            f"{where} cannot be traced by torch.fx: {type(cause).__name__}: {cause}. "
            "Structural edits need a torch.fx-traceable model (no data-dependent Python control "
            "flow in forward); rewrite that module's forward or make it a leaf.",
            module_path=path) from exc
    finally:
        model.train(was_training)
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(was_training)
    return gm
