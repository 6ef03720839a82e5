"""Activation sites of a model: which modules are activations, and which layer feeds each one.

Entropy-guided methods (EGP, NEPENTHE, EASIER, DSD2) hook every activation, measure the entropy
of its input, and then act on the layer that *produces* that input (prune it, or linearise the
activation and fold the producer into its neighbour). Both halves need every activation to be
its own module instance, called once per forward, and not in-place (a hook must see the input).

The producer of an activation is found by a general rule: the model is traced with torch.fx and,
from the activation's input, the graph is walked backwards through shape-only operations,
normalisation, dropout, pooling and the first operand of residual additions (the other one when
the first leads to no layer: ``x + branch(x)``), to the first Conv/Linear module (a concatenation
stops the walk: it has no single producer). Built-in models put the main branch first in every
residual sum, so that rule gives ResNet relu2 -> conv2 of its block. Where a model cannot be
traced, the execution order of the layers on an example input (or, without one, their
registration order) is used instead, and a warning says so.
"""
from __future__ import annotations

import copy
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from pyengine.graph.trace import is_weight_layer, trace

__all__ = [
    "ActivationSite",
    "activation_kind",
    "register_activation",
    "activation_map",
    "find_producers",
    "linearise",
    "linear_factor",
    "make_activations_distinct",
    "find_reused_activations",
    "find_functional_activations",
    "is_weight_layer",
    "neuron_dim",
]

# Rectifier-like activations (methods.md section 0). Gates such as Sigmoid/Hardsigmoid are not
# activation sites: their "on/off" state means nothing for linearisation. Subclasses before bases.
_KINDS: list[tuple[type[nn.Module], str]] = [
    (nn.ReLU6, "relu6"),
    (nn.ReLU, "relu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Hardswish, "hardswish"),
    (nn.LeakyReLU, "leaky_relu"),
    (nn.RReLU, "rrelu"),
    (nn.PReLU, "prelu"),
    (nn.ELU, "elu"),
    (nn.CELU, "celu"),
    (nn.SELU, "selu"),
    (nn.Mish, "mish"),
]

_FUNCTIONAL_ACTIVATIONS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, F.hardswish, F.leaky_relu,
    F.leaky_relu_, F.elu, F.elu_, F.selu, F.celu, F.mish, F.prelu, F.rrelu,
}
_METHOD_ACTIVATIONS = {"relu", "relu_"}


@dataclass
class ActivationSite:
    """One activation module of a model.

    Attributes:
        name: module path of the activation (``model.get_submodule(name) is module``).
        module: the activation module itself.
        producer: module path of the Conv/Linear layer whose output feeds the activation
            (through normalisation, dropout, reshapes and the main branch of residual sums), or
            None when there is none (e.g. an activation applied to the raw input).
        kind: "relu", "relu6", "gelu", "silu", "hardswish", ...
        dim: the neuron dimension of the activation's input (an index >= 0) where the walk from
            the producer crosses an op that moves dimensions (``transpose``, ``permute``,
            ``movedim``: a Linear's features moved to dimension 1 for a BatchNorm1d, ...); None
            where the producer's own rule holds (dimension 1 after a convolution, the last one
            after a Linear).
    """

    name: str
    module: nn.Module
    producer: str | None
    kind: str
    dim: int | None = None


def register_activation(cls: type[nn.Module], kind: str) -> None:
    """Make ``activation_map`` treat modules of type ``cls`` as activations of ``kind``."""
    _KINDS.insert(0, (cls, kind))


def activation_kind(module: nn.Module) -> str | None:
    """The kind of an activation module ("relu", "gelu", ...), or None for anything else."""
    for cls, kind in _KINDS:
        if isinstance(module, cls):
            return kind
    return None


# --------------------------------------------------------------------------------------------
# Producer mapping
# --------------------------------------------------------------------------------------------

def _first_node(args) -> torch.fx.Node | None:
    """The first graph value among ``args``, preferring computed values over parameters and
    buffers (so ``scale * x`` leads to ``x``)."""
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg(args, lambda n: found.append(n) or n)
    computed = [n for n in found if n.op != "get_attr"]
    return (computed or found or [None])[0]


_FUNCTIONAL_WEIGHT_OPS = {F.linear, F.conv1d, F.conv2d, F.conv3d}
_JOINS = {torch.cat, torch.concat, torch.stack}
_SUMS = {operator.add, operator.iadd, torch.add}


def _walk_to_producer(start: torch.fx.Node | None, modules: dict[str, nn.Module],
                      path: list[torch.fx.Node] | None = None) -> str | None:
    """The producer layer of the value ``start`` (see the module docstring); ``path``, when given,
    receives the nodes walked through, from ``start`` back to the producer's node."""
    cur = start
    for _ in range(10_000):  # a guard against cycles, which a valid graph never has
        if cur is None:
            return None
        if path is not None:
            path.append(cur)
        if cur.op == "call_module":
            m = modules.get(cur.target)
            if m is not None and is_weight_layer(m):
                return cur.target
            if m is not None and activation_kind(m) is not None:
                return None  # fed directly by another activation: no layer of its own
            cur = _first_node(cur.args)
        elif cur.op == "call_function":
            if cur.target in _JOINS:
                return None  # a concatenation has several producers, none of them "the" one
            if cur.target in _SUMS:
                return _walk_sum(cur, modules, path)
            if cur.target in _FUNCTIONAL_WEIGHT_OPS and len(cur.args) > 1:
                w = cur.args[1]
                if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                    owner = w.target.rsplit(".", 1)[0] if "." in w.target else ""
                    return owner or None
            cur = _first_node(cur.args)
        elif cur.op == "call_method":
            if cur.target in ("add", "add_"):
                return _walk_sum(cur, modules, path)
            cur = _first_node(cur.args)
        else:  # placeholder, get_attr, output
            return None
    return None


def _walk_sum(node: torch.fx.Node, modules: dict[str, nn.Module], path: list[torch.fx.Node] | None) -> str | None:
    """The producer through a sum: its first operand's (the main branch, as the built-in models write
    ``out + shortcut``); when that one has none (``x + branch(x)``: an identity shortcut from the
    previous activation or the input), the other operand's."""
    operands = []
    torch.fx.node.map_arg(node.args, lambda n: operands.append(n) or n)
    computed = [n for n in operands if n.op != "get_attr"] or operands
    for operand in computed:
        sub: list[torch.fx.Node] = []
        found = _walk_to_producer(operand, modules, sub)
        if found is not None:
            if path is not None:
                path.extend(sub)
            return found
    return None


_MOVES_DIMS = {"transpose", "swapaxes", "swapdims", "permute", "movedim", "moveaxis", "t"}


def _moves_dims(node: torch.fx.Node) -> bool:
    """An op that reorders the dimensions of its input (x.transpose(1, 2), torch.permute, ...)."""
    if node.op == "call_method":
        return node.target in _MOVES_DIMS
    return node.op == "call_function" and getattr(node.target, "__name__", None) in _MOVES_DIMS \
        and getattr(node.target, "__module__", None) in ("torch", None) and hasattr(torch, node.target.__name__)


def _node_ndim(node) -> int | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    shape = getattr(meta, "shape", None)
    return len(shape) if shape is not None else None


def _moved_axis(node: torch.fx.Node, axis: int, ndim: int) -> int | None:
    """Where dimension ``axis`` of an ``ndim``-dim input of the dimension-moving op ``node`` ends
    up: the op is run on a probe whose only dimension of size 2 is ``axis``."""
    args, kwargs = node.args[1:], node.kwargs
    if _has_node((args, kwargs)):  # dimensions computed in the graph: not followed
        return None
    probe = torch.zeros([2 if d == axis else 1 for d in range(ndim)])
    try:
        out = getattr(probe, node.target)(*args, **kwargs) if node.op == "call_method" \
            else node.target(probe, *args, **kwargs)
    except Exception:  # noqa: BLE001 - arguments this rule does not understand
        return None
    return list(out.shape).index(2) if 2 in out.shape else None


def _has_node(value) -> bool:
    found: list = []
    torch.fx.node.map_arg(value, lambda n: found.append(n) or n)
    return bool(found)


_ELEMENTWISE = _SUMS | {operator.sub, operator.mul, operator.truediv, torch.mul, torch.sub, torch.div}


def _keeps_shape(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Ops known to keep their input's shape (followed where no shapes were propagated)."""
    from pyengine.graph.trace import is_norm_layer

    if node.op == "call_module":
        m = modules.get(node.target)
        return m is not None and (is_norm_layer(m) or isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)))
    return node.op == "call_function" and node.target in _ELEMENTWISE


def _follow_axis(path: list[torch.fx.Node], producer: nn.Module, modules: dict[str, nn.Module]) -> int | None:
    """The neuron dimension of the value at the start of ``path`` (a walk from an activation's
    input back to its producer's node), following the producer's output dimension through the
    ops that move dimensions; None when nothing on the way moves them (the producer's rule
    holds) or when the way cannot be followed (a dimension count unknown, a reshape)."""
    steps = list(reversed(path[:-1]))  # from the producer forwards to the activation's input
    if not any(_moves_dims(n) for n in steps):
        return None
    is_conv = isinstance(producer, nn.modules.conv._ConvNd)
    ndim = _node_ndim(path[-1]) or (producer.weight.dim() if is_conv else None)
    if ndim is None:
        return None
    axis = 1 if is_conv else ndim - 1
    for node in steps:
        ndim_out = _node_ndim(node)
        if _moves_dims(node):
            axis = _moved_axis(node, axis, ndim)
            if axis is None:
                return None
        elif ndim_out is None and not _keeps_shape(node, modules):
            return None  # no shapes (no example input): only the ops known to keep them are followed
        elif ndim_out is not None and ndim_out != ndim:
            axis = _reshaped_axis(node, axis)  # flatten / view / reshape keeping the dimension whole
            if axis is None:
                return None
        ndim = ndim_out if ndim_out is not None else ndim
    return axis


def _reshaped_axis(node: torch.fx.Node, axis: int) -> int | None:
    """Where dimension ``axis`` of the (first) input of a reshaping op ``node`` is in its output,
    when it is there whole: the same size, after the same number of elements (row-major)."""
    src = _first_node(node.args)
    shape_in = getattr(src.meta.get("tensor_meta"), "shape", None) if src is not None else None
    shape_out = getattr(node.meta.get("tensor_meta"), "shape", None)
    if shape_in is None or shape_out is None or axis >= len(shape_in):
        return None
    before = math.prod(shape_in[:axis])
    for j in range(len(shape_out)):
        if math.prod(shape_out[:j]) == before and shape_out[j] == shape_in[axis]:
            return j
    return None


def _shapes(model: nn.Module, graph_module: torch.fx.GraphModule, example_input: torch.Tensor) -> None:
    """Output shapes on every node (``tensor_meta``) from an eval-mode, no-grad run of one sample."""
    from torch.fx.passes.shape_prop import ShapeProp

    was_training = model.training
    try:
        graph_module.eval()
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_input[:1])
    finally:
        graph_module.train(was_training)
        model.train(was_training)


def _producers_by_fx(model: nn.Module, names: Sequence[str], example_input: torch.Tensor | None = None
                     ) -> dict[str, tuple[str | None, int | None]]:
    return _producers_in_graph(trace(model), names, example_input, model, stacklevel=5)


def _producers_in_graph(gm: torch.fx.GraphModule, names: Sequence[str],
                       example_input: torch.Tensor | None = None, model: nn.Module | None = None, *,
                       stacklevel: int = 2) -> dict[str, tuple[str | None, int | None]]:
    """{activation: (producer, neuron dimension or None)} read from the graph of ``gm`` as it is,
    without tracing again (a structural edit calls this on the GraphModule it is editing, whose
    graph is current by construction). ``model`` (default ``gm``) is the module the graph was
    traced from: its modules are looked up, and its train mode is restored after a shape
    propagation. ``stacklevel``: of the warning for a dimension move that cannot be followed."""
    model = gm if model is None else model
    graph = gm.graph
    modules = dict(model.named_modules())
    wanted = set(names)
    out: dict[str, tuple[str | None, int | None]] = {}
    walks: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in wanted and node.target not in out:
            path: list[torch.fx.Node] = []
            out[node.target] = (_walk_to_producer(_first_node(node.args), modules, path), None)
            walks[node.target] = path
    moved = [n for n, (p, _) in out.items() if p is not None and any(_moves_dims(x) for x in walks[n])]
    if moved:
        if example_input is not None:
            try:
                _shapes(model, gm, example_input)
            except Exception:  # noqa: BLE001 - then only a convolution's dimension count is known
                pass
        for n in moved:
            dim = _follow_axis(walks[n], modules[out[n][0]], modules)
            if dim is None:
                warnings.warn(f"the input of activation {n!r} reaches it from {out[n][0]!r} through ops that "
                              "move dimensions, which could not be followed"
                              + ("" if example_input is not None else " without an example input")
                              + f": its neuron dimension is taken as {out[n][0]!r}'s own", RuntimeWarning,
                              stacklevel=stacklevel)
            out[n] = (out[n][0], dim)
    for n in names:  # traced but never called in forward
        out.setdefault(n, (None, None))
    return out


def _probe(model: nn.Module, example_input: torch.Tensor, handles: list) -> None:
    """One eval-mode forward without gradients; then the hooks are removed and the mode restored."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()


def _producers_by_order(model: nn.Module, names: Sequence[str],
                        example_input: torch.Tensor | None) -> dict[str, str | None]:
    """Fallback: the last weight layer run (or registered) before each activation."""
    modules = dict(model.named_modules())
    order: list[str] = []
    if example_input is not None:
        handles = []
        for name, m in modules.items():
            if is_weight_layer(m) or activation_kind(m) is not None:
                handles.append(m.register_forward_pre_hook(
                    lambda mod, inp, _n=name: order.append(_n)))
        _probe(model, example_input, handles)
    else:
        order = [n for n, m in modules.items() if is_weight_layer(m) or activation_kind(m)]
    out: dict[str, str | None] = {}
    last: str | None = None
    for n in order:
        if is_weight_layer(modules[n]):
            last = n
        elif n not in out:
            out[n] = last
    for n in names:
        out.setdefault(n, None)
    return out


def find_producers(model: nn.Module, names: Sequence[str] | None = None,
                   example_input: torch.Tensor | None = None) -> dict[str, str | None]:
    """Map each activation path in ``names`` (default: all) to the path of its producer layer."""
    return {n: p for n, (p, _) in _producers_and_dims(model, names, example_input).items()}


def _producers_and_dims(model: nn.Module, names: Sequence[str] | None = None,
                        example_input: torch.Tensor | None = None) -> dict[str, tuple[str | None, int | None]]:
    """{activation: (producer, neuron dimension or None)}; see :class:`ActivationSite`."""
    if names is None:
        names = [n for n, m in model.named_modules() if activation_kind(m) is not None]
    try:
        return _producers_by_fx(model, names, example_input)
    except Exception as exc:  # noqa: BLE001 - any tracing failure falls back the same way
        how = "execution order on the example input" if example_input is not None \
            else "module registration order"
        warnings.warn(
            f"{type(model).__name__} could not be traced with torch.fx ({type(exc).__name__}: "
            f"{exc}); activation producers are inferred from {how}, which can be wrong for "
            f"residual blocks. Pass example_input for a better guess.",
            RuntimeWarning, stacklevel=4)
        return {n: (p, None) for n, p in _producers_by_order(model, names, example_input).items()}


def activation_map(model: nn.Module, kinds: Iterable[str] | None = None,
                   example_input: torch.Tensor | None = None) -> list[ActivationSite]:
    """Every activation module of ``model`` in registration order, with its producer layer.

    ``kinds`` restricts the result (e.g. ``{"relu"}``). A module instance registered under
    several paths is reported once, under its first path; a module called several times in one
    forward is still one site (built-in models never do either; see ``find_reused_activations``).
    ``example_input`` is only used when the model cannot be traced with torch.fx.
    """
    wanted = set(kinds) if kinds is not None else None
    found = []
    for name, m in model.named_modules():
        kind = activation_kind(m)
        if kind is not None and (wanted is None or kind in wanted):
            found.append((name, m, kind))
    producers = _producers_and_dims(model, [n for n, _, _ in found], example_input) if found else {}
    sites = []
    for n, m, k in found:
        producer, dim = producers.get(n, (None, None))
        sites.append(ActivationSite(n, m, producer, k, dim))
    return sites


# --------------------------------------------------------------------------------------------
# Editing activations
# --------------------------------------------------------------------------------------------

def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def linearise(model: nn.Module, names: Iterable[str | ActivationSite]) -> nn.Module:
    """Replace the named activations by ``nn.Identity`` (in place) and return the model.

    Raises KeyError for a path that does not exist and ValueError for one that is not an
    activation (e.g. already linearised).
    """
    for item in names:
        name = item.name if isinstance(item, ActivationSite) else item
        try:
            m = model.get_submodule(name)
        except AttributeError as exc:
            raise KeyError(f"{type(model).__name__} has no submodule {name!r}") from exc
        if activation_kind(m) is None:
            raise ValueError(f"{name!r} is a {type(m).__name__}, not an activation")
        _set_submodule(model, name, nn.Identity())
    return model


# SELU's scale (torch's constant): selu(z) = SELU_SCALE * z for z >= 0
SELU_SCALE = 1.0507009873554804934193349852946


def linear_factor(module: nn.Module, state: str) -> float | torch.Tensor | None:
    """The factor ``a`` with ``module(z) == a * z`` for every input ``z`` in ``state``, where the
    activation is exactly linear there; None where it is not (or where ON/OFF counts cannot tell).

    ``state`` is "on" (z >= 0) or "off" (z <= 0): every kind below has f(0) = 0, so both ON rules
    (EGP's z > 0, EASIER's z >= 0; methods.md section 0) give the same answer. The factor is a
    float, or for a PReLU with one weight per channel a 1-D tensor of those weights (a PReLU
    applies them along dimension 1 of its input).

    ======================  ===================  ==============================================
    kind                    ON                   OFF
    ======================  ===================  ==============================================
    relu                    1                    0
    relu6                   None (1 only < 6)    0
    leaky_relu              1                    its negative_slope
    prelu                   1                    its weight (one, or one per channel)
    elu, celu               1                    None (alpha (exp(z) - 1))
    selu                    SELU_SCALE           None
    rrelu                   1                    None (a random slope in training)
    gelu, silu, hardswish,  None                 None
    mish, registered kinds
    ======================  ===================  ==============================================

    ReLU6 is the identity only below 6, which the ON/OFF statistics do not record. Raises
    ValueError for a state other than "on"/"off" or a module that is not an activation.
    """
    if state not in ("on", "off"):
        raise ValueError(f"state must be 'on' or 'off', got {state!r}")
    kind = activation_kind(module)
    if kind is None:
        raise ValueError(f"a {type(module).__name__} is not an activation")
    if state == "on":
        if kind in ("relu", "leaky_relu", "prelu", "elu", "celu", "rrelu"):
            return 1.0
        if kind == "selu":
            return SELU_SCALE
        return None
    if kind in ("relu", "relu6"):
        return 0.0
    if kind == "leaky_relu":
        return float(module.negative_slope)
    if kind == "prelu":
        w = module.weight.detach()
        return float(w) if w.numel() == 1 else w.flatten().clone()
    return None


def make_activations_distinct(model: nn.Module) -> nn.Module:
    """Turn in-place activations into out-of-place ones and give every path that shares an
    activation instance its own copy. Does not fix one path called several times in forward
    (that needs a change of the forward; see ``find_reused_activations``)."""
    seen: set[int] = set()
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if activation_kind(m) is None:
            continue
        if hasattr(m, "inplace"):
            m.inplace = False
        if id(m) in seen:
            _set_submodule(model, name, copy.deepcopy(m))
        seen.add(id(m))
    return model


def find_reused_activations(model: nn.Module, example_input: torch.Tensor) -> dict[str, int]:
    """Activation paths called more than once in one forward on ``example_input``, with the
    number of calls."""
    calls: dict[str, int] = {}
    handles = []
    for name, m in model.named_modules():
        if activation_kind(m) is not None:
            def hook(mod, inp, _n=name):
                calls[_n] = calls.get(_n, 0) + 1
            handles.append(m.register_forward_pre_hook(hook))
    _probe(model, example_input, handles)
    return {n: c for n, c in calls.items() if c > 1}


def find_functional_activations(model: nn.Module) -> list[str]:
    """Names of the traced graph nodes that apply an activation as a function (F.relu, x.relu(),
    ...): those are invisible to ``activation_map``. Empty when the model cannot be traced."""
    try:
        graph = trace(model).graph
    except Exception:  # noqa: BLE001
        return []
    out = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS:
            out.append(node.name)
        elif node.op == "call_method" and node.target in _METHOD_ACTIVATIONS:
            out.append(node.name)
    return out


# --------------------------------------------------------------------------------------------
# Neuron dimension
# --------------------------------------------------------------------------------------------

def _layer_neuron_dim(layer: nn.Module) -> int:
    # Conv outputs are channels-first (N, C, ...); Linear acts on the last dimension, whatever
    # the leading ones are: (B, F), ViT tokens (B, T, C), torchvision Swin maps (B, H, W, C).
    return 1 if isinstance(layer, nn.modules.conv._ConvNd) else -1


def _consumer_layer(model: nn.Module, name: str) -> str | None:
    """The first weight layer fed (through single-input modules) by activation ``name``."""
    graph = trace(model).graph
    modules = dict(model.named_modules())
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == name), None)
    for _ in range(10_000):
        if node is None or len(node.users) != 1:
            return None
        node = next(iter(node.users))
        if node.op != "call_module":
            return None
        m = modules.get(node.target)
        if m is not None and is_weight_layer(m):
            return node.target
        if m is None or activation_kind(m) is not None:
            return None
    return None


def neuron_dim(model: nn.Module, site: "ActivationSite | str",
               example_input: torch.Tensor | None = None) -> int:
    """The dimension of the activation's input that indexes its neurons.

    Taken from the layer that produces the activation's input: a convolution's output is
    channels-first, so its neurons are dimension 1; a Linear layer's neurons are its output
    features, the LAST dimension whatever the leading ones are (ViT (B, T, C) -> -1, and
    torchvision Swin's MLP on (B, H, W, C) -> -1, not 1) - followed through the ops that move
    dimensions on the way (a Linear's output transposed for a BatchNorm1d has its features in
    dimension 1: see :attr:`ActivationSite.dim`). An activation without a producer
    (fed by a concatenation, or by another activation) takes the dimension from the first
    weight layer it feeds. Raises ValueError when neither exists, KeyError for an unknown site.
    """
    name = site.name if isinstance(site, ActivationSite) else site
    if not isinstance(name, str):
        raise TypeError(f"site must be an ActivationSite or a module path, got {type(site).__name__}")
    try:
        module = model.get_submodule(name)
    except AttributeError as exc:
        raise KeyError(f"{type(model).__name__} has no submodule {name!r}") from exc
    if activation_kind(module) is None:
        raise ValueError(f"{name!r} is a {type(module).__name__}, not an activation")
    if isinstance(site, ActivationSite):
        producer, dim = site.producer, site.dim
    else:
        producer, dim = _producers_and_dims(model, [name], example_input)[name]
    if dim is not None:  # the producer's dimension, moved on the way (transpose, permute)
        return dim
    if producer is not None:
        return _layer_neuron_dim(model.get_submodule(producer))
    try:
        consumer = _consumer_layer(model, name)
    except Exception:  # noqa: BLE001 - untraceable: no second opinion available
        consumer = None
    if consumer is not None:
        return _layer_neuron_dim(model.get_submodule(consumer))
    raise ValueError(f"activation {name!r} has neither a producer nor a consumer Conv/Linear "
                     "layer; its neuron dimension cannot be derived")
