"""Structural edits as data, applied to a torch.fx graph, and replayed from the base model.

An :class:`Edit` is a JSON-serialisable record ``(kind, target, args)``; an
:class:`EditHistory` is a list of them. :func:`apply_edit` performs one edit on a model and
returns the edited network, a :class:`torch.fx.GraphModule` whose module paths (and so
``state_dict`` keys) are the model's own for every layer the edit did not touch.
:func:`replay` rebuilds the STRUCTURE of an edited network from the base architecture and its
history (the weights then come from a ``load_state_dict``): it yields exactly the parameter and
buffer names and shapes the edits produced, because every decision an edit takes from weight
values (which layers are all-zero, the shape a constant reduces to) is written into
``edit.args`` when the edit is first applied.

Kinds (the graph is evaluated in eval mode: BatchNorm with running statistics, no dropout):

- ``linearise``: an activation becomes the identity (always ON). With ``args["scale"]`` (a
  number, or a list of one number per channel) it becomes ``x * scale`` instead, a
  :class:`ChannelGate` of those factors on the neuron dimension (``args`` completed with ``dim``
  and ``channels``), which ``fold_network`` folds like a ReLU's 0/1 gate: the linear map an
  activation equals where its neurons stay in a linear state (a LeakyReLU always OFF: its
  negative slope; a SELU always ON: its scale; see :func:`collapse_edit`).
- ``constant``: a ReLU/ReLU6 whose input is always OFF becomes its constant output 0 (not its
  input): a :class:`ConstantZero` module under the same path, so that later edits still find
  every module; ``fold_network`` then propagates the constant and drops the layers that fed it
  (``remove_branch``). With ``args={"on": [...]}``
  only the listed channels are ON: the activation becomes a 0/1 :class:`ChannelGate` on the
  neuron dimension. Refused (ValueError) for GELU, SiLU, ... whose output when OFF depends on
  the input.
- ``fold_bn``: an eval-mode BatchNorm folds into the Conv/Linear before it (``direction
  "backward"``) or, when nothing it alone feeds is before it, into an unpadded Conv/Linear after
  it (``"forward"``). ``args["into"]`` names the layer.
- ``fold_linear``: ``target`` (a Conv/Linear layer or a ChannelGate) folds into its neighbour
  ``args["into"]``; two layers are replaced by one under ``into``'s path where the result is
  exact (see :func:`pyengine.graph.linear_maps.compose_layers`), else FoldRefused.
- ``remove_branch``: constant propagation from the all-zero weight layers and the
  ConstantZero activations under ``target`` (a module-path prefix): a weight layer with
  all-zero weights outputs its bias whatever its input, and an op of constant inputs is
  constant. Each constant that meets a live value in a sum moves
  into the bias of the layer that produced the live value when that is exact (a Conv/Linear/
  BatchNorm used only there), else into an :class:`AddBias` (per-channel, any resolution) or an
  :class:`AddConstant` (varies over positions because of zero padding: a buffer of the recorded
  resolution, and a warning says so). Any other use becomes a :class:`Constant`. Then the dead
  layers are dropped.
- ``remove_identity``: drops an Identity / Dropout / StochasticDepth module (eval semantics).
- ``drop_dead``: removes every node and module that no longer reaches the output.
- ``replace_block``: the block ``target`` (a module path: a residual block, a unit of layers)
  is replaced by the identity: every use of the block's output now reads the block's input,
  and the block's layers are dropped (LaCoOT's removal of a block whose input and output are
  close: a ResNet BasicBlock with an identity shortcut becomes exactly that shortcut). The block
  must have one input and one output of the same shape; ``args["removed"]`` lists the modules
  that went with it.

``remove_branch`` needs ``example_input`` (the constants are computed on it).

An edit that rewrites a layer's weights in place (``fold_bn``, a gate's ``fold_linear``, a
constant moved into a bias) first gives that layer its own copy of any parameter it shares with
another module (tied weights): the other user computes what it computed, as with the new layer
a ``fold_linear`` of two layers builds.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.fx
from torch import Tensor, nn

from pyengine.graph.activations import _producers_in_graph, activation_kind, linear_factor
from pyengine.graph.linear_maps import (
    FoldRefused,
    compose_layers,
    compose_masks,
    fold_bn_backward,
    fold_bn_forward,
    gate_columns,
    gate_mask_columns,
    gate_mask_rows,
    gate_rows,
)
from pyengine.graph.modules import AddBias, AddConstant, ChannelGate, Constant, ConstantZero
from pyengine.graph.trace import is_weight_layer, trace

__all__ = ["EDIT_KINDS", "Edit", "EditHistory", "apply_edit", "apply_edits", "replay",
           "map_masks", "as_graph_module", "FoldRefused", "collapse_edit"]

EDIT_KINDS = ("linearise", "constant", "fold_bn", "fold_linear", "remove_branch",
              "remove_identity", "drop_dead", "replace_block")

# Activations whose output is the constant 0 for every input <= 0 (methods.md section 0: OFF).
_ZERO_WHEN_OFF = {"relu", "relu6"}


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

@dataclass
class Edit:
    """One structural edit: ``kind`` (one of ``EDIT_KINDS``), ``target`` (a module path, or a
    module-path prefix for ``remove_branch``; "" for ``drop_dead``) and JSON-serialisable
    ``args``. Applying an edit completes ``args`` in place with what it decided from the
    weights, so the record replays on a freshly built base model."""

    kind: str
    target: str
    args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"Edit kind must be one of {EDIT_KINDS}, got {self.kind!r}")
        if not isinstance(self.target, str):
            raise TypeError(f"Edit target must be a module path (str), got "
                            f"{type(self.target).__name__}")
        if not isinstance(self.args, dict):
            raise TypeError(f"Edit args must be a dict, got {type(self.args).__name__}")
        try:
            json.dumps(self.args)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"Edit args of {self.kind} {self.target!r} must be "
                            f"JSON-serialisable: {exc}") from exc

    def to_dict(self) -> dict:
        return {"kind": self.kind, "target": self.target, "args": copy.deepcopy(self.args)}

    @classmethod
    def from_dict(cls, d: dict) -> "Edit":
        if not isinstance(d, dict) or "kind" not in d or "target" not in d:
            raise ValueError(f"an edit record needs 'kind' and 'target', got {d!r}")
        return cls(d["kind"], d["target"], copy.deepcopy(d.get("args", {})))

    def describe(self) -> str:
        """One line for a report, e.g. "fold layer1.0.bn1 into layer1.0.conv1"."""
        a = self.args
        if self.kind == "linearise":
            if a.get("approximate"):
                return f"linearise {self.target} (approximate: a {a['approximate']} is not exactly the identity)"
            scale = a.get("scale")
            if isinstance(scale, list):
                factors = sorted(set(scale))
                shown = ", ".join(f"{v:g}" for v in factors[:4]) + (", ..." if len(factors) > 4 else "")
                return (f"linearise {self.target}: x times a per-channel factor ({len(scale)} channels; "
                        f"factors {shown})")
            if scale is not None:
                return f"linearise {self.target}: x times {scale:g}"
            return f"linearise {self.target}"
        if self.kind == "constant":
            if a.get("on"):
                return (f"gate {self.target}: {len(a['on'])} of {a.get('channels', '?')} "
                        "channels ON, the rest constant 0")
            return f"replace {self.target} by its constant output 0"
        if self.kind in ("fold_bn", "fold_linear"):
            return f"fold {self.target} into {a.get('into', '?')}"
        if self.kind == "remove_branch":
            removed = a.get("removed", [])
            seeds = a.get("zero_layers", []) + a.get("constant_activations", [])
            return (f"remove the constant branch(es) of {self.target or 'the network'} "
                    f"(constant from: {', '.join(seeds)}; {len(removed)} module(s) removed)")
        if self.kind == "remove_identity":
            return f"remove {self.target} (identity in eval mode)"
        if self.kind == "replace_block":
            return (f"replace block {self.target} by the identity "
                    f"({len(a.get('removed', []))} module(s) removed)")
        return f"drop dead code ({len(a.get('removed', []))} module(s))"


class EditHistory(list):
    """A list of :class:`Edit` with JSON round-trip (``to_json`` / ``from_json``)."""

    def __init__(self, edits: Iterable[Edit] = ()) -> None:
        super().__init__()
        for e in edits:
            self.append(e)

    def append(self, edit: Edit) -> None:  # type: ignore[override]
        if not isinstance(edit, Edit):
            raise TypeError(f"EditHistory holds Edit records, got {type(edit).__name__}")
        super().append(edit)

    def extend(self, edits: Iterable[Edit]) -> None:  # type: ignore[override]
        for e in edits:
            self.append(e)

    def to_list(self) -> list[dict]:
        return [e.to_dict() for e in self]

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_list(), indent=indent)

    @classmethod
    def from_list(cls, items: Iterable[dict]) -> "EditHistory":
        if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
            raise TypeError("EditHistory.from_list needs a list of edit dicts")
        return cls(Edit.from_dict(d) for d in items)

    @classmethod
    def from_json(cls, text: str) -> "EditHistory":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError("an edit history in JSON is a list of edit records")
        return cls.from_list(data)

    def describe(self) -> list[str]:
        return [e.describe() for e in self]


# --------------------------------------------------------------------------------------------
# The exact edit of a collapsed activation
# --------------------------------------------------------------------------------------------

def collapse_edit(name: str, activation: nn.Module, on: Sequence[int], n_neurons: int, *,
                  approximate: bool = False) -> Edit:
    """The edit that replaces the activation ``name`` (the module ``activation``) by the linear
    map it equals on the data its statistics were measured on, when each of its ``n_neurons``
    neurons was constant there: the neurons in ``on`` always ON, the others always OFF
    (methods.md section 0; the neuron dimension is its producer's). Where a neuron's state is
    linear (:func:`pyengine.graph.activations.linear_factor`) the activation's output is that
    factor times its input, so the edit changes nothing on that data:

    - every neuron ON with factor 1 (ReLU, LeakyReLU, PReLU, ELU, CELU, RReLU): ``linearise``,
      the identity; another factor (SELU: its scale): ``linearise`` with ``{"scale": f}``;
    - every neuron OFF with factor 0 (ReLU, ReLU6): ``constant`` (the constant 0); another factor
      (LeakyReLU: its negative slope; PReLU: its weight, one or one per channel): ``linearise``
      with that ``scale``;
    - some ON, the rest OFF: a ReLU's ``constant`` with ``{"on": on}`` (a 0/1 gate); a LeakyReLU
      or a one-weight PReLU: ``linearise`` with one factor per channel (1 where ON, the slope
      where OFF).

    The ReLU and ReLU6 cases give the records they always gave. ``approximate``: an activation
    whose every neuron is ON where it is not exactly linear there (GELU, ReLU6, SiLU, ...)
    becomes the identity all the same, its record saying ``approximate`` (NEPENTHE's
    linearisation of Swin-T and MobileNetV2). Raises ValueError, the reason in the message, where
    no such edit exists (a GELU always OFF, an ELU partly OFF, a PReLU with one weight per channel
    whose neurons differ: its weights lie on dimension 1 of its input, the neurons on their
    producer's dimension, which need not be the same).
    """
    kind = activation_kind(activation)
    if kind is None:
        raise ValueError(f"{name!r} is a {type(activation).__name__}, not an activation")
    if isinstance(n_neurons, bool) or not isinstance(n_neurons, int) or n_neurons < 1:
        raise ValueError(f"{name!r}: n_neurons must be a positive int, got {n_neurons!r}")
    on = sorted(int(i) for i in on)
    if len(set(on)) != len(on) or any(not 0 <= i < n_neurons for i in on):
        raise ValueError(f"{name!r}: 'on' must hold distinct neuron indices in [0, {n_neurons}), got {on}")
    state = "always ON" if len(on) == n_neurons else ("always OFF" if not on else "ON or OFF per neuron")
    not_linear = f"a {kind} whose neurons are {state} is not exactly linear"
    f_on = linear_factor(activation, "on") if on else None
    f_off = linear_factor(activation, "off") if len(on) < n_neurons else None
    if len(on) == n_neurons:
        if f_on is None:
            if approximate:
                return Edit("linearise", name, {"approximate": kind})
            raise ValueError(not_linear)
        return Edit("linearise", name, {} if f_on == 1.0 else {"scale": f_on})
    if f_off is None or (on and f_on is None):
        raise ValueError(not_linear)
    if kind in _ZERO_WHEN_OFF and (not on or f_on == 1.0):
        return Edit("constant", name, {"on": on})  # the constant 0, or a ReLU's 0/1 gate
    if isinstance(f_off, Tensor):  # a PReLU's weights, on dimension 1 of its input
        if on:
            raise ValueError(f"{not_linear} as one gate: its {f_off.numel()} weights apply on dimension 1 of "
                             "its input, the ON/OFF states on its neurons' dimension")
        return Edit("linearise", name, {"scale": [float(v) for v in f_off], "dim": 1,
                                        "channels": f_off.numel()})
    if not on:
        return Edit("linearise", name, {"scale": f_off})
    scale = [f_off] * n_neurons
    for i in on:
        scale[i] = f_on
    return Edit("linearise", name, {"scale": scale})


# --------------------------------------------------------------------------------------------
# Graph plumbing
# --------------------------------------------------------------------------------------------

def as_graph_module(model: nn.Module, inplace: bool = False) -> torch.fx.GraphModule:
    """``model`` as a GraphModule with its own module paths (a deep copy unless ``inplace``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, torch.fx.GraphModule):
        return model
    gm = trace(model)
    gm.train(model.training)
    return gm


def _module_nodes(gm: torch.fx.GraphModule, target: str) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target == target]


def _get_module(gm: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return gm.get_submodule(path)
    except AttributeError as exc:
        raise KeyError(f"the network has no {what} {path!r}") from exc


def _the_node(gm: torch.fx.GraphModule, target: str, what: str) -> tuple[torch.fx.Node, nn.Module]:
    module = _get_module(gm, target, what)
    nodes = _module_nodes(gm, target)
    if not nodes:
        raise KeyError(f"{what} {target!r} is not called in the traced network")
    if len(nodes) > 1:
        raise FoldRefused(f"{target!r} is called {len(nodes)} times per forward; editing its "
                          "weights would change every call")
    return nodes[0], module


def _set_module(gm: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, leaf, module)


@contextlib.contextmanager
def _own_parameters(gm: nn.Module, path: str, masks: dict | None = None):
    """While an edit rewrites the weights of the layer ``path`` in place: the layer first gets its
    own copy of every parameter it shares with another module of ``gm`` (tied weights: one
    Parameter registered under several paths, e.g. a tied embedding and classifier), so that the
    other users keep the original and compute what they computed - as ``fold_linear`` of two
    layers builds the merged layer anew. A copy keeps ``requires_grad``; in ``masks`` every name
    of a tied parameter gets the mask one of them had (they were one tensor). Where the edit
    raises (a refused fold), the layer gets its shared parameters back."""
    layer = gm.get_submodule(path)
    names: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    shared = []
    for leaf, p in list(layer.named_parameters(recurse=False)):
        users = names.get(id(p), [])
        if len(users) <= 1:
            continue
        if masks is not None:
            known = next((masks[n] for n in users if n in masks), None)
            if known is not None:
                for n in users:
                    masks.setdefault(n, known.clone())
        setattr(layer, leaf, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        shared.append((leaf, p))
    try:
        yield layer
    except BaseException:
        for leaf, p in shared:
            setattr(layer, leaf, p)
        raise


def _has_path(gm: nn.Module, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _new_path(gm: nn.Module, node: torch.fx.Node, leaf: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    scope = list(stack.values())[-1][0] if stack else ""
    base = f"{scope}.{leaf}" if scope else leaf
    path, k = base, 1
    while _has_path(gm, path):
        path, k = f"{base}_{k}", k + 1
    return path


def _model_dtype(gm: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _layer_names(gm: nn.Module) -> set[str]:
    return {n for n, m in gm.named_modules() if n and next(m.children(), None) is None}


def _finish(gm: torch.fx.GraphModule, masks: dict | None) -> None:
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    if masks is not None:
        params = dict(gm.named_parameters())
        for name in list(masks):
            if name not in params:
                del masks[name]
            elif masks[name].shape != params[name].shape:
                raise RuntimeError(f"mask {name!r} of shape {tuple(masks[name].shape)} no longer "
                                   f"fits its weight {tuple(params[name].shape)}")


class _EvalMode:
    """Eval mode and no autograd while the graph is evaluated; the mode is restored after."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __enter__(self):
        self.was = self.module.training
        self.module.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()

    def __exit__(self, *exc):
        self.grad.__exit__(*exc)
        self.module.train(self.was)


def _shape_prop(gm: torch.fx.GraphModule, example_input: Tensor) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    with _EvalMode(gm):
        ShapeProp(gm).propagate(example_input[:1])


def _out_shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


# --------------------------------------------------------------------------------------------
# Constant propagation
# --------------------------------------------------------------------------------------------

class _SeededInterpreter(torch.fx.Interpreter):
    """Evaluates every node, with the seed nodes replaced by their input-independent value: a
    constant activation gives 0, an all-zero weight layer gives ``layer(0)`` (its bias)."""

    def __init__(self, gm: torch.fx.GraphModule, seeds: set[torch.fx.Node]) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.seeds = seeds

    def run_node(self, n: torch.fx.Node):
        if n in self.seeds:
            x = self.env[n.args[0]]
            module = self.module.get_submodule(n.target)
            return module(torch.zeros_like(x))
        return super().run_node(n)


_ADD_TARGETS = {"add", "sub"}


def _binary_kind(node: torch.fx.Node) -> str | None:
    import operator

    if node.kwargs:
        return None
    if node.op == "call_function":
        if node.target in (operator.add, torch.add, operator.iadd):
            return "add"
        if node.target in (operator.sub, torch.sub, operator.isub):
            return "sub"
    if node.op == "call_method" and node.target in _ADD_TARGETS:
        return node.target
    return None


def _reduced_shape(v: Tensor) -> list[int]:
    """Shape of ``v`` (batch 1) with every dimension along which it is constant reduced to 1.
    A tolerance of a few ulps absorbs summation-order differences between positions."""
    shape = list(v.shape)
    scale = float(v.abs().max()) if v.numel() else 0.0
    tol = 16 * torch.finfo(v.dtype).eps * max(scale, 1e-300) if v.is_floating_point() else 0
    for d in range(1, v.dim()):
        first = v.narrow(d, 0, 1)
        if shape[d] > 1 and float((v - first).abs().max()) <= tol:
            shape[d] = 1
    return shape


def _take(v: Tensor, shape: list[int]) -> Tensor:
    index = tuple(slice(0, 1) if s == 1 else slice(None) for s in shape)
    return v[index].reshape(shape)


def _bias_owner(gm: torch.fx.GraphModule, node: torch.fx.Node, shape: list[int]
                ) -> nn.Module | None:
    """The layer producing ``node`` whose bias can absorb a constant of ``shape`` exactly."""
    if node.op != "call_module" or len(node.users) != 1 or len(_module_nodes(gm, node.target)) != 1:
        return None
    m = gm.get_submodule(node.target)
    ndim = len(shape)
    if isinstance(m, nn.Linear):
        channel, count = ndim - 1, m.out_features
    elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
        channel, count = 1, m.out_channels
    elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None:
        channel, count = 1, m.num_features
    else:
        return None
    varying = [d for d in range(1, ndim) if shape[d] != 1]
    if varying and (varying != [channel] or shape[channel] != count):
        return None
    return m


def _add_to_bias(layer: nn.Module, value: Tensor, structure_only: bool) -> None:
    count = layer.bias.shape[0] if getattr(layer, "bias", None) is not None else \
        (layer.weight.shape[0])
    if getattr(layer, "bias", None) is None:
        layer.bias = nn.Parameter(torch.zeros(count, dtype=layer.weight.dtype,
                                              device=layer.weight.device),
                                  requires_grad=layer.weight.requires_grad)
    if not structure_only:
        layer.bias.data = layer.bias.detach() + value.flatten().to(layer.bias.dtype).expand(count)


def _propagate_constants(gm: torch.fx.GraphModule, edit: Edit, seeds: list[torch.fx.Node],
                         example_input: Tensor | None, structure_only: bool) -> None:
    if example_input is None:
        raise ValueError(f"{edit.kind} {edit.target!r} needs example_input: the constants it "
                         "folds are computed on an input of the network's shape")
    seed_set = set(seeds)
    x = example_input[:1]
    x = torch.cat([x, x])  # two identical rows: a value whose dim 0 is not 2 is not per-sample
    with _EvalMode(gm):
        interp = _SeededInterpreter(gm, seed_set)
        interp.run(x)
    values = interp.env

    const: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if node in seed_set:
            const.add(node)
            continue
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        ins = node.all_input_nodes
        if ins and all(i in const or i.op == "get_attr" for i in ins) and any(i in const for i in ins):
            v = values.get(node)
            if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 2:
                const.add(node)

    recorded: dict = edit.args.setdefault("constants", {})
    first_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
    notes: list[str] = edit.args.get("resolution_dependent", [])
    for c in [n for n in gm.graph.nodes if n in const]:
        for u in list(c.users):
            if u in const:
                continue
            key = f"{c.name}->{u.name}"
            v = values[c][:1]
            dtype, device = v.dtype, v.device  # the value's own (a mixed-precision network has several)
            kind = _binary_kind(u)
            live = None
            if kind is not None and len(u.args) == 2:
                a, b = u.args
                if a is c and isinstance(b, torch.fx.Node) and b not in const and kind == "add":
                    live = b
                elif b is c and isinstance(a, torch.fx.Node) and a not in const:
                    live = a
            if live is not None:
                live_v = values.get(live)
                if not (isinstance(live_v, Tensor) and
                        torch.broadcast_shapes(live_v.shape, v.shape) == live_v.shape):
                    live = None
            if key in recorded:
                shape = list(recorded[key])
            elif structure_only:
                raise ValueError(f"the {edit.kind} record of {edit.target!r} has no constant for "
                                 f"{key}: the history does not match this network")
            else:
                shape = _reduced_shape(v) if live is not None else list(v.shape)
                recorded[key] = shape
            value = _take(v, shape) if not structure_only else torch.zeros(shape)
            if kind == "sub" and live is not None:
                value = -value
            varying = sum(1 for s in shape[1:] if s != 1)
            if live is not None:
                owner = _bias_owner(gm, live, shape)
                if owner is not None:
                    with _own_parameters(gm, live.target) as owner:
                        _add_to_bias(owner, value, structure_only)
                    u.replace_all_uses_with(live)
                    gm.graph.erase_node(u)
                    continue
                if varying <= 1:
                    module, leaf = AddBias(shape), "folded_bias"
                else:
                    module, leaf = AddConstant(shape), "folded_constant"
                    notes.append(key)
                module = module.to(dtype=dtype, device=device).train(gm.training)
                tensor = module.bias if isinstance(module, AddBias) else module.value
                if not structure_only:
                    tensor.data = value.to(dtype=dtype, device=device)
                path = _new_path(gm, u, leaf)
                gm.add_submodule(path, module)
                with gm.graph.inserting_before(u):
                    new = gm.graph.call_module(path, (live,))
                new.meta["nn_module_stack"] = dict(u.meta.get("nn_module_stack") or {})
                u.replace_all_uses_with(new)
                gm.graph.erase_node(u)
            else:
                module = Constant(shape).to(dtype=dtype, device=device)
                if not structure_only:
                    module.value.data = value.to(dtype=dtype, device=device)
                if varying > 1:
                    notes.append(key)
                path = _new_path(gm, u, "folded_constant")
                gm.add_submodule(path, module)
                with gm.graph.inserting_before(u):
                    new = gm.graph.call_module(path, (first_input,))
                new.meta["nn_module_stack"] = dict(u.meta.get("nn_module_stack") or {})
                u.replace_input_with(c, new)
    if notes:
        edit.args["resolution_dependent"] = sorted(set(notes))
        if not structure_only:
            warnings.warn(
                f"{edit.kind} {edit.target!r}: constant(s) {sorted(set(notes))} vary over "
                f"positions (zero padding); kept as buffers recorded at input shape "
                f"{tuple(example_input.shape[1:])}, so the edited network only accepts inputs "
                "of that resolution", RuntimeWarning, stacklevel=4)
    gm.graph.eliminate_dead_code()


# --------------------------------------------------------------------------------------------
# The edits
# --------------------------------------------------------------------------------------------

def _edit_linearise(gm, edit, example_input, structure_only, masks):
    module = _get_module(gm, edit.target, "activation")
    if activation_kind(module) is None:
        raise ValueError(f"{edit.target!r} is a {type(module).__name__}, not an activation")
    nodes = _module_nodes(gm, edit.target)
    if not nodes:
        raise KeyError(f"activation {edit.target!r} is not called in the traced network")
    if "scale" in edit.args:
        _linearise_scaled(gm, edit, nodes, example_input)
        return
    for node in nodes:
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)


def _scale_values(edit: Edit) -> list[float] | float:
    """``args["scale"]`` checked: a finite number, or a non-empty list of them."""
    scale = edit.args["scale"]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    if number(scale):
        values = [scale]
    elif isinstance(scale, (list, tuple)) and scale and all(number(v) for v in scale):
        values = list(scale)
    else:
        raise TypeError(f"linearise {edit.target!r}: args 'scale' must be a number or a non-empty list "
                        f"of numbers (one per channel), got {scale!r}")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"linearise {edit.target!r}: args 'scale' holds non-finite value(s) {bad}")
    return [float(v) for v in values] if isinstance(scale, (list, tuple)) else float(scale)


def _linearise_scaled(gm, edit, nodes, example_input):
    """``linearise`` with ``args["scale"]``: the activation becomes ``x * scale`` (one factor, or one
    per channel on the neuron dimension), a :class:`ChannelGate` under the same path. The channels
    and their dimension come from the producer (or ``args["dim"]`` / ``["channels"]``), so that
    ``fold_network`` can fold the gate into a neighbouring layer; a single factor on an activation
    without a producer is kept as a one-channel gate (exact, broadcast on every channel)."""
    scale = _scale_values(edit)
    if isinstance(scale, float):
        try:
            dim, channels = _channels_of(gm, nodes[0], edit, example_input)
        except ValueError:
            dim, channels = -1, 1
        values = [scale] * channels
    else:
        dim, channels = _channels_of(gm, nodes[0], edit, example_input)
        if len(scale) != channels:
            raise ValueError(f"linearise {edit.target!r}: args 'scale' has {len(scale)} factors, the "
                             f"activation has {channels} channels (dimension {dim})")
        values = scale
    edit.args.update(dim=dim, channels=channels)
    dtype, device = _model_dtype(gm)
    gate = ChannelGate(channels, dim, [])
    gate.gate = torch.tensor(values, dtype=torch.float64)  # the factors as recorded, then cast once
    _set_module(gm, edit.target, gate.to(dtype=dtype, device=device))


def _channels_of(gm, node: torch.fx.Node, edit: Edit, example_input: Tensor | None = None) -> tuple[int, int]:
    """(neuron dim, channel count) of an activation node, from its producer layer."""
    if "dim" in edit.args and "channels" in edit.args:
        return int(edit.args["dim"]), int(edit.args["channels"])
    modules = dict(gm.named_modules())
    # the graph being edited is current (every earlier edit was recompiled into it): walked as it
    # is, not traced again - a retrace per edit made a history of n gate edits cost n traces
    producer, dim = _producers_in_graph(gm, [edit.target], example_input, stacklevel=6)[edit.target]
    if producer is None:
        raise ValueError(f"{edit.kind} {edit.target!r}: the activation has no producer Conv/Linear "
                         "layer; give args 'dim' and 'channels' explicitly")
    layer = modules[producer]
    channels = layer.out_channels if isinstance(layer, nn.modules.conv._ConvNd) else layer.out_features
    if dim is not None:  # the producer's channels moved to another dimension (transpose, permute)
        return dim, channels
    if isinstance(layer, nn.modules.conv._ConvNd):
        return 1, channels
    return -1, channels


def _edit_constant(gm, edit, example_input, structure_only, masks):
    module = _get_module(gm, edit.target, "activation")
    kind = activation_kind(module)
    if kind is None:
        raise ValueError(f"{edit.target!r} is a {type(module).__name__}, not an activation")
    if kind not in _ZERO_WHEN_OFF:
        raise ValueError(
            f"{edit.target!r} is a {type(module).__name__}: its output when OFF (input <= 0) "
            "depends on the input, so it has no constant to be replaced by; only ReLU/ReLU6 "
            "(output 0 when OFF) can be made constant")
    nodes = _module_nodes(gm, edit.target)
    if not nodes:
        raise KeyError(f"activation {edit.target!r} is not called in the traced network")
    on = edit.args.get("on")
    if on is None or len(on) == 0:
        _set_module(gm, edit.target, ConstantZero())
        return
    dim, channels = _channels_of(gm, nodes[0], edit, example_input)
    if not isinstance(on, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   for i in on):
        raise TypeError(f"constant {edit.target!r}: args 'on' must be a list of channel indices")
    bad = [i for i in on if not 0 <= i < channels]
    if bad or len(set(on)) != len(on):
        raise ValueError(f"constant {edit.target!r}: 'on' must hold distinct channel indices in "
                         f"[0, {channels}); got out-of-range or repeated {bad or on}")
    edit.args.update(on=sorted(on), dim=dim, channels=channels)
    dtype, device = _model_dtype(gm)
    _set_module(gm, edit.target, ChannelGate(channels, dim, sorted(on)).to(dtype=dtype,
                                                                           device=device))


def _edit_fold_bn(gm, edit, example_input, structure_only, masks):
    node, bn = _the_node(gm, edit.target, "BatchNorm")
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise ValueError(f"fold_bn target {edit.target!r} is a {type(bn).__name__}, "
                         "not a BatchNorm")
    into, direction = edit.args.get("into"), edit.args.get("direction")
    src = node.args[0]
    if (direction in (None, "backward") and isinstance(src, torch.fx.Node)
            and src.op == "call_module" and len(src.users) == 1
            and is_weight_layer(gm.get_submodule(src.target))
            and into in (None, src.target)):
        _, layer = _the_node(gm, src.target, "layer")
        shape = _out_shape(src)
        if isinstance(layer, nn.Linear) and shape is not None and len(shape) != 2:
            raise FoldRefused(f"{src.target} outputs {len(shape)}-D features: {edit.target} "
                              "normalises dimension 1, not the Linear's features")
        with _own_parameters(gm, src.target, masks) as layer:
            fold_bn_backward(layer, bn, src.target, edit.target, structure_only)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        edit.args.update(into=src.target, direction="backward")
        return
    users = list(node.users)
    if (direction in (None, "forward") and len(users) == 1 and users[0].op == "call_module"
            and is_weight_layer(gm.get_submodule(users[0].target))
            and into in (None, users[0].target)):
        _, layer = _the_node(gm, users[0].target, "layer")
        shape = _out_shape(node)
        if isinstance(layer, nn.Linear) and shape is not None and len(shape) != 2:
            raise FoldRefused(f"{edit.target} feeds {users[0].target} a {len(shape)}-D input")
        with _own_parameters(gm, users[0].target, masks) as layer:
            fold_bn_forward(bn, layer, edit.target, users[0].target, structure_only)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        edit.args.update(into=users[0].target, direction="forward")
        return
    raise FoldRefused(f"{edit.target} is neither fed by a Conv/Linear layer that feeds only it "
                      "nor the only input of one")


def _gate_matches(layer: nn.Module, gate: ChannelGate, shape: tuple[int, ...] | None) -> bool:
    if isinstance(layer, nn.modules.conv._ConvNd):
        # a transposed convolution's weight is (in, out / groups, ...): rows are not its outputs
        return gate.dim == 1 and not layer.transposed
    ndim = len(shape) if shape is not None else None
    return gate.dim == -1 or (ndim is not None and gate.dim == ndim - 1)


def _edit_fold_linear(gm, edit, example_input, structure_only, masks):
    node, module = _the_node(gm, edit.target, "layer")
    into = edit.args.get("into")
    src = node.args[0]
    if isinstance(module, ChannelGate):
        direction = edit.args.get("direction")
        if (direction in (None, "backward") and isinstance(src, torch.fx.Node)
                and src.op == "call_module" and len(src.users) == 1
                and is_weight_layer(gm.get_submodule(src.target)) and into in (None, src.target)
                and len(_module_nodes(gm, src.target)) == 1
                and _gate_matches(gm.get_submodule(src.target), module, _out_shape(src))):
            with _own_parameters(gm, src.target, masks) as layer:
                gate_rows(layer, module.gate, structure_only)
            if masks is not None and f"{src.target}.weight" in masks:
                key = f"{src.target}.weight"
                masks[key] = gate_mask_rows(masks[key], module.gate)
            edit.args.update(into=src.target, direction="backward")
        else:
            users = list(node.users)
            ok = (direction in (None, "forward") and len(users) == 1
                  and users[0].op == "call_module"
                  and is_weight_layer(gm.get_submodule(users[0].target))
                  and into in (None, users[0].target)
                  and len(_module_nodes(gm, users[0].target)) == 1
                  and _gate_matches(gm.get_submodule(users[0].target), module, _out_shape(node)))
            if not ok:
                raise FoldRefused(f"gate {edit.target} is neither after a Conv/Linear that feeds "
                                  "only it nor the only input of one (on its channel dimension)")
            with _own_parameters(gm, users[0].target, masks) as layer:
                gate_columns(layer, module.gate, structure_only)
            key = f"{users[0].target}.weight"
            if masks is not None and key in masks:
                groups = layer.groups if isinstance(layer, nn.modules.conv._ConvNd) else 1
                masks[key] = gate_mask_columns(masks[key], module.gate, groups)
            edit.args.update(into=users[0].target, direction="forward")
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        return
    if not is_weight_layer(module):
        raise ValueError(f"fold_linear target {edit.target!r} is a {type(module).__name__}, "
                         "not a Conv/Linear layer or a ChannelGate")
    if not (isinstance(src, torch.fx.Node) and src.op == "call_module"
            and is_weight_layer(gm.get_submodule(src.target))):
        raise FoldRefused(f"{edit.target} is not fed directly by a Conv/Linear layer")
    if into not in (None, src.target):
        raise FoldRefused(f"{edit.target} is fed by {src.target}, not {into}")
    if len(src.users) != 1:
        raise FoldRefused(f"{src.target} feeds {len(src.users)} consumers, not only "
                          f"{edit.target}")
    _, first = _the_node(gm, src.target, "layer")
    merged = compose_layers(first, module, src.target, edit.target, structure_only)
    merged.weight.requires_grad_(first.weight.requires_grad)
    merged.train(first.training)
    if masks is not None:
        m = compose_masks(first, module, masks.get(f"{src.target}.weight"),
                          masks.get(f"{edit.target}.weight"))
        masks.pop(f"{edit.target}.weight", None)
        if m is not None:
            masks[f"{src.target}.weight"] = m
    _set_module(gm, src.target, merged)
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)
    edit.args.update(into=src.target)


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _edit_remove_branch(gm, edit, example_input, structure_only, masks):
    zero_acts = list(dict.fromkeys(
        n.target for n in gm.graph.nodes if n.op == "call_module"
        and isinstance(gm.get_submodule(n.target), ConstantZero) and _under(n.target, edit.target)))
    if "constant_activations" in edit.args and edit.args["constant_activations"] != zero_acts:
        raise ValueError(f"remove_branch {edit.target!r}: the record names constant activations "
                         f"{edit.args['constant_activations']}, the network has {zero_acts}")
    edit.args["constant_activations"] = zero_acts
    zero = edit.args.get("zero_layers")
    layer_nodes = [n for n in gm.graph.nodes if n.op == "call_module"
                   and is_weight_layer(gm.get_submodule(n.target))]
    if zero is None:
        if structure_only:
            raise ValueError(f"remove_branch {edit.target!r} record lacks 'zero_layers'")
        zero = []
        for n in layer_nodes:
            if _under(n.target, edit.target) and n.target not in zero:
                if not bool(gm.get_submodule(n.target).weight.detach().any()):
                    zero.append(n.target)
        if not zero and not zero_acts:
            raise ValueError(f"no Conv/Linear layer under {edit.target!r} has all-zero weights "
                             "and no activation there is constant: there is no constant branch "
                             "to remove")
        edit.args["zero_layers"] = zero
    seeds = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in zero_acts]
    for path in zero:
        module = _get_module(gm, path, "layer")
        if not is_weight_layer(module):
            raise ValueError(f"remove_branch: {path!r} is a {type(module).__name__}, not a "
                             "Conv/Linear layer")
        if not structure_only and bool(module.weight.detach().any()):
            raise ValueError(f"remove_branch: {path!r} has nonzero weights; only an all-zero "
                             "layer outputs a constant")
        nodes = _module_nodes(gm, path)
        if not nodes:
            raise KeyError(f"layer {path!r} is not called in the traced network")
        seeds.extend(nodes)
    _propagate_constants(gm, edit, seeds, example_input, structure_only)


_IDENTITY_NAMES = {"StochasticDepth"}


def is_identity_like(module: nn.Module) -> bool:
    """Identity, Dropout (any p: identity in eval mode) and torchvision's StochasticDepth."""
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd)) or \
        type(module).__name__ in _IDENTITY_NAMES


def _edit_remove_identity(gm, edit, example_input, structure_only, masks):
    module = _get_module(gm, edit.target, "module")
    if not is_identity_like(module):
        raise ValueError(f"remove_identity target {edit.target!r} is a {type(module).__name__}, "
                         "not an Identity/Dropout/StochasticDepth")
    for node in _module_nodes(gm, edit.target):
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)


def _edit_drop_dead(gm, edit, example_input, structure_only, masks):
    gm.graph.eliminate_dead_code()


def _in_block(node: torch.fx.Node, prefix: str) -> bool:
    """Whether ``node`` is computed inside the module ``prefix`` (by its module stack, or for a
    call_module node by its path)."""
    if node.op == "call_module" and _under(node.target, prefix):
        return True
    stack = node.meta.get("nn_module_stack") or {}
    return any(v[0] == prefix for v in stack.values())


def _edit_replace_block(gm, edit, example_input, structure_only, masks):
    if not edit.target:
        raise ValueError("replace_block needs a block's module path as target, got ''")
    _get_module(gm, edit.target, "block")
    inside = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")
              and _in_block(n, edit.target)]
    if not inside:
        raise KeyError(f"block {edit.target!r} is not called in the traced network")
    members = set(inside)
    inputs = list(dict.fromkeys(a for n in inside for a in n.all_input_nodes
                                if a not in members and a.op != "get_attr"))
    outputs = [n for n in inside if any(u not in members for u in n.users)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise FoldRefused(f"block {edit.target!r} has {len(inputs)} input(s) and {len(outputs)} "
                          "output(s) in the traced network; only a block of one input and one "
                          "output can become the identity")
    src, out = inputs[0], outputs[0]
    if example_input is not None:
        _shape_prop(gm, example_input)
        a, b = _out_shape(src), _out_shape(out)
        if a is not None and b is not None and a != b:
            raise FoldRefused(f"block {edit.target!r} maps {list(a[1:])} to {list(b[1:])}: a block "
                              "whose output shape differs from its input's cannot become the "
                              "identity")
    out.replace_all_uses_with(src)
    gm.graph.eliminate_dead_code()


_EDITS = {
    "linearise": _edit_linearise,
    "constant": _edit_constant,
    "fold_bn": _edit_fold_bn,
    "fold_linear": _edit_fold_linear,
    "remove_branch": _edit_remove_branch,
    "remove_identity": _edit_remove_identity,
    "drop_dead": _edit_drop_dead,
    "replace_block": _edit_replace_block,
}


def _apply(gm: torch.fx.GraphModule, edit: Edit, example_input: Tensor | None,
           structure_only: bool, masks: dict | None) -> torch.fx.GraphModule:
    if not isinstance(edit, Edit):
        raise TypeError(f"edit must be an Edit, got {type(edit).__name__}")
    before = _layer_names(gm)
    work = dict(masks) if masks is not None else None  # the caller's masks change only on success
    _EDITS[edit.kind](gm, edit, example_input, structure_only, work)
    _finish(gm, work)
    if masks is not None:
        masks.clear()
        masks.update(work)
    if edit.kind in ("remove_branch", "drop_dead", "replace_block"):
        edit.args["removed"] = sorted(before - _layer_names(gm))
    return gm


def apply_edit(model: nn.Module, edit: Edit, example_input: Tensor | None = None, *,
               inplace: bool = False, masks: dict[str, Tensor] | None = None) -> torch.fx.GraphModule:
    """Apply one edit and return the edited network (a GraphModule; ``model`` is left as it
    was unless ``inplace``). Module paths and state-dict keys of untouched layers are kept.

    ``masks`` (``{param name: bool mask}`` of ``model``), when given, is carried across the edit
    in place, as :func:`map_masks` would, without a second pass over the graph; it is left as it
    was when the edit raises.

    ``edit.args`` is completed in place with the decisions taken from the weights (e.g.
    ``remove_branch``'s ``zero_layers`` and constant shapes, ``fold_bn``'s ``into``), so the
    record can be appended to an :class:`EditHistory` and replayed. Raises KeyError for an
    unknown target, ValueError for an edit that does not apply (FoldRefused, a ValueError, for
    a fold that would not be exact: the reason is in the message and in ``.reason``).
    """
    if masks is not None:
        _check_masks(masks, model)
    gm = as_graph_module(model, inplace)
    return _apply(gm, edit, example_input, structure_only=False, masks=masks)


def apply_edits(model: nn.Module, edits: Iterable[Edit], example_input: Tensor | None = None,
                *, inplace: bool = False) -> tuple[torch.fx.GraphModule, EditHistory]:
    """Apply ``edits`` in order; returns (network, the completed edits as an EditHistory)."""
    gm = as_graph_module(model, inplace)
    history = EditHistory()
    for e in edits:
        _apply(gm, e, example_input, structure_only=False, masks=None)
        history.append(e)
    return gm, history


def replay(base_model: nn.Module, history: Iterable[Edit], example_input: Tensor | None = None
           ) -> nn.Module:
    """Rebuild the structure of an edited network from ``base_model`` (the architecture the
    edits started from; its weights do not matter) and the ``history`` of completed edits.

    Returns a network with exactly the parameter and buffer names and shapes the edits
    produced: load the edited network's ``state_dict`` into it. ``example_input`` is needed
    when the history holds ``constant``/``remove_branch`` edits (shapes are traced through
    the graph). An empty history returns a copy of ``base_model`` unchanged. ``history`` is
    not modified.
    """
    edits = [Edit.from_dict(e.to_dict()) if isinstance(e, Edit) else Edit.from_dict(e)
             for e in history]
    if not edits:
        return copy.deepcopy(base_model)
    gm = as_graph_module(base_model, inplace=False)
    for e in edits:
        _apply(gm, e, example_input, structure_only=True, masks=None)
    return gm


def _check_masks(masks: dict[str, Tensor], model: nn.Module) -> None:
    """Every mask names a parameter of ``model`` and has its shape."""
    params = dict(model.named_parameters())
    for name, m in masks.items():
        if name not in params:
            raise KeyError(f"mask {name!r} names no parameter of {type(model).__name__}")
        if tuple(m.shape) != tuple(params[name].shape):
            raise ValueError(f"mask {name!r} has shape {tuple(m.shape)}, its parameter "
                             f"{tuple(params[name].shape)}")


def map_masks(masks: dict[str, Tensor], before: nn.Module, edits: Iterable[Edit],
              example_input: Tensor | None = None) -> dict[str, Tensor]:
    """Carry ``{param name: bool mask}`` of the network ``before`` across ``edits`` (completed
    records, e.g. ``fold_network``'s applied history) to the edited network.

    Unchanged layers keep their masks, a BN-folded layer keeps its mask, a merged layer gets
    the structural nonzero pattern of the product of its two masks (a missing mask counts as
    dense), a gate folded into a layer clears the rows/columns of its OFF channels, and masks of
    removed layers disappear. ``before`` and ``masks`` are not modified.
    """
    _check_masks(masks, before)
    out = {name: m.detach().clone().bool() for name, m in masks.items()}
    gm = as_graph_module(before, inplace=False)
    for e in edits:
        e = Edit.from_dict(e.to_dict()) if isinstance(e, Edit) else Edit.from_dict(e)
        _apply(gm, e, example_input, structure_only=True, masks=out)
    return out
