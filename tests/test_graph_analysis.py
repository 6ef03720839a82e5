"""pyengine.graph analysis: tracing with module paths, producer map, neuron dimension, layering."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import pyengine.graph as graph
import pyengine.models as models
from pyengine.graph import TraceError, activation_map, neuron_dim, trace
from pyengine.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = dict(dim=16, depth=2, heads=2, mlp_dim=24)
TINY_SWIN = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, patch_size=2)


def test_models_reexport_the_moved_names():
    # the move to pyengine.graph keeps every old import path working
    import pyengine.models.activations as old

    for name in ("activation_map", "find_producers", "linearise", "ActivationSite",
                 "activation_kind", "is_weight_layer", "make_activations_distinct"):
        assert getattr(models, name) is getattr(graph, name)
        assert getattr(old, name) is getattr(graph, name)


@pytest.mark.parametrize("name,opts,size", [
    ("resnet18", {"width": 8}, 8), ("mobilenet_v2", {"width_mult": 0.25}, 8),
    ("vit", TINY_VIT, 8), ("swin_t", TINY_SWIN, 8)])
def test_trace_keeps_module_paths_and_outputs(name, opts, size):
    model = build_model(name, 10, image_size=size, **opts).eval()
    gm = trace(model).eval()
    assert list(gm.state_dict()) and set(gm.state_dict()) == set(model.state_dict())
    x = torch.randn(2, 3, size, size)
    assert torch.equal(gm(x), model(x))
    # weight layers stay Conv/Linear modules under their own paths
    for path, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert type(gm.get_submodule(path)) is type(m)


def test_trace_keeps_swin_attention_whole():
    # torchvision's attention passes qkv.weight to a function: tracing through it would turn
    # the Linear into a bare parameter and freeze self.training into the code
    model = build_model("swin_t", 10, image_size=8, **TINY_SWIN)
    gm = trace(model)
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "features.1.0.attn" in targets
    assert isinstance(gm.get_submodule("features.1.0.attn.qkv"), nn.Linear)


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
            y = y * 2
        return y


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ok = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.block = nn.Sequential(nn.Identity(), _Branchy())

    def forward(self, x):
        return self.block(self.ok(x))


def test_untraceable_module_is_named():
    with pytest.raises(TraceError, match=r"'block\.1' \(_Branchy\)") as info:
        trace(_Outer())
    assert info.value.module_path == "block.1"


def test_untraceable_root_is_named():
    with pytest.raises(TraceError, match="_Branchy"):
        trace(_Branchy())


def test_neuron_dim_from_the_producer():
    r = build_model("resnet18", 10, width=8)
    assert neuron_dim(r, "layer1.0.relu1") == 1
    v = build_model("vgg16_bn", 10, width_mult=0.125)
    assert neuron_dim(v, "features.relu1_1") == 1
    assert neuron_dim(v, "classifier.relu1") == -1
    vit = build_model("vit", 10, image_size=8, **TINY_VIT)
    assert neuron_dim(vit, activation_map(vit)[0]) == -1
    with pytest.raises(ValueError, match="not an activation"):
        neuron_dim(r, "layer1.0.conv1")
    with pytest.raises(KeyError):
        neuron_dim(r, "layer9.relu")


def test_neuron_dim_of_swin_is_the_hidden_unit_not_a_spatial_row():
    model = build_model("swin_t", 10, image_size=8, **TINY_SWIN).eval()
    site = activation_map(model)[0]
    seen = {}
    handle = site.module.register_forward_pre_hook(lambda m, i: seen.setdefault("x", i[0]))
    model(torch.randn(2, 3, 8, 8))
    handle.remove()
    x = seen["x"]
    hidden = model.get_submodule(site.producer).out_features
    assert x.dim() == 4  # (B, H, W, C): dimension 1 is a spatial row
    d = neuron_dim(model, site)
    assert d == -1 and x.shape[d] == hidden and x.shape[1] != hidden


class _Joined(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.act = nn.ReLU()      # fed by a concatenation: no producer, but feeds a conv
        self.b = nn.Conv2d(7, 2, 1)
        self.last = nn.ReLU()     # fed by the conv b... through nothing else
        self.lone = nn.ReLU()     # neither producer nor consumer

    def forward(self, x):
        y = self.b(self.act(torch.cat([self.a(x), x], 1)))
        return self.lone(torch.cat([self.last(y), y], 1))


def test_neuron_dim_without_producer():
    m = _Joined()
    assert neuron_dim(m, "act") == 1  # from the conv it feeds
    assert neuron_dim(m, "last") == 1
    with pytest.raises(ValueError, match="neither a producer nor a consumer"):
        neuron_dim(m, "lone")


_FORBIDDEN = ("pyengine.models", "pyengine.nn", "pyengine.methods", "pyengine.train",
              "pyengine.report", "pyengine.cli", "pyengine.data")


def test_graph_imports_nothing_above_it():
    root = Path(graph.__file__).parent
    bad = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                if n.startswith(_FORBIDDEN):
                    bad.append(f"{path.name}: {n}")
    assert bad == []


def test_trace_keeps_training_dependent_modules_whole():
    # ViT attention applies dropout only when training (a Python branch on self.training):
    # tracing through it would freeze one mode into the graph
    torch.manual_seed(0)
    vit = build_model("vit", 10, image_size=8, attn_dropout=0.5, **TINY_VIT)
    gm = trace(vit)
    assert "blocks.0.attn" in {n.target for n in gm.graph.nodes if n.op == "call_module"}
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(gm.eval()(x), vit.eval()(x))
    gm.train()
    assert not torch.equal(gm(x), gm(x))  # dropout is live again in train mode
    # with no dropout the attention is traced through as before
    plain = trace(build_model("vit", 10, image_size=8, **TINY_VIT))
    assert "blocks.0.attn.qkv" in {n.target for n in plain.graph.nodes if n.op == "call_module"}


class _FrozenStem(nn.Module):
    """A forward with a torch.no_grad() region: a frozen stem whose output is detached."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv = nn.Conv2d(4, 4, 1)
        self.act = nn.ReLU()
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.act(self.stem(x))
        return self.fc(self.act2(self.conv(h)).mean((2, 3)))


def test_trace_keeps_no_grad_regions():
    # torch.fx records no grad mode: the edited (traced) network used to train the frozen stem
    # and send gradients back through the no_grad region
    from pyengine.graph import Edit, apply_edit

    torch.manual_seed(0)
    model = _FrozenStem()
    x = torch.randn(2, 3, 4, 4)
    model(x).sum().backward()
    assert model.stem.weight.grad is None and model.conv.weight.grad is not None
    for net in (trace(model), apply_edit(model, Edit("linearise", "act2"), x)):
        net.zero_grad(set_to_none=True)
        net(x).sum().backward()
        assert net.get_submodule("stem").weight.grad is None
        assert net.get_submodule("conv").weight.grad is not None
    # tracing under no_grad does not freeze the whole graph
    with torch.no_grad():
        gm = trace(model)
    gm(x).sum().backward()
    assert gm.get_submodule("conv").weight.grad is not None
    assert [s.producer for s in activation_map(model)] == ["stem", "conv"]


class _TransposedFeatures(nn.Module):
    """(B, T, C) features, normalised by a BatchNorm1d over the features via a transpose."""

    def __init__(self, c=5, d=6):
        super().__init__()
        self.fc1 = nn.Linear(c, d)
        self.bn = nn.BatchNorm1d(d)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(d, 3)

    def forward(self, x):
        h = self.act(self.bn(self.fc1(x).transpose(1, 2)))  # (B, D, T)
        return self.fc2(h.transpose(1, 2)).mean(1)


def test_neuron_dim_follows_a_transpose():
    # fc1's features reach the ReLU in dimension 1, not in the last one (there: T positions,
    # of the same size 6 as the features, so nothing failed - the entropy was per position)
    import pyengine

    torch.manual_seed(0)
    model = _TransposedFeatures().eval()
    x = torch.randn(32, 6, 5)
    with torch.no_grad():
        model.bn.bias[:3] = -100.0  # features 0-2 always OFF, 3-5 always ON
        model.bn.bias[3:] = 100.0
    comp = pyengine.Compressor(model, "nepenthe", example_input=x[:1], log=lambda s: None)
    summary = comp.measure([x])
    assert summary["constant_neurons"] == {"act": {"on": [3, 4, 5]}}
    before = model(x)
    folded = comp.fold([x])
    assert [e["kind"] for e in comp.fold_record["collapse_edits"]] == ["constant"]
    assert torch.allclose(folded(x), before, atol=1e-6)
    assert neuron_dim(model, "act", x[:1]) == 1
    sites = activation_map(model, example_input=x[:1])
    assert (sites[0].producer, sites[0].dim) == ("fc1", 1) and neuron_dim(model, sites[0]) == 1


class _ShortcutFirst(nn.Module):
    """A residual block written ``x + branch(x)``: the identity shortcut is the sum's first operand."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.relu0 = nn.ReLU()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(c, 2)

    def forward(self, x):
        x = self.relu0(self.stem(x))
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(x + self.bn2(self.conv2(out)))
        return self.fc(out.mean((2, 3)))


def test_producer_of_a_sum_whose_first_operand_is_the_shortcut():
    # the walk took the first operand only: x comes from relu0, so relu2 had no producer and
    # EGP / NEPENTHE silently never pruned conv2
    import pyengine

    model = _ShortcutFirst()
    x = torch.randn(2, 3, 6, 6)
    producers = {s.name: s.producer for s in activation_map(model, example_input=x)}
    assert producers == {"relu0": "stem", "relu1": "conv1", "relu2": "conv2"}
    comp = pyengine.Compressor(model, "egp", example_input=x, log=lambda s: None)
    assert "conv2.weight" in comp.masks.names


def test_a_compiled_model_gets_a_hint():
    # the error said "rewrite that module's forward or make it a leaf"
    compiled = torch.compile(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(TraceError, match=r"torch\.compile'd.*_orig_mod"):
        trace(compiled)


LINEAR_STATES = [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.15), nn.PReLU(), nn.PReLU(5), nn.ELU(0.7), nn.CELU(1.3),
                 nn.SELU(), nn.RReLU(), nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Mish()]


@pytest.mark.parametrize("act", LINEAR_STATES, ids=lambda a: type(a).__name__)
def test_linear_factor_is_what_the_activation_does_in_each_state(act):
    # the factor is checked against the module's own forward on inputs of one sign (and 0): where
    # a factor is given, module(z) == factor * z; where none is, no single factor fits
    from pyengine.graph.activations import linear_factor

    torch.manual_seed(0)
    # an RReLU in train mode: its OFF slope is drawn at random there (in eval mode it is fixed, but
    # a collapse edit also serves the network that goes on training)
    act = act.double().train(isinstance(act, nn.RReLU))
    if isinstance(act, nn.PReLU):
        with torch.no_grad():
            act.weight.uniform_(-1, 1)
    z = torch.rand(64, 5, 3, dtype=torch.float64) * 10  # up to 10: a ReLU6 is not the identity there
    z[0] = 0.0
    for state, sign in (("on", 1.0), ("off", -1.0)):
        x = sign * z
        y = act(x)
        f = linear_factor(act, state)
        if f is None:
            ratio = y[x != 0] / x[x != 0]
            assert float(ratio.max() - ratio.min()) > 1e-3, f"{state}: {type(act).__name__} is linear there"
            continue
        factor = f.view(1, -1, 1) if isinstance(f, torch.Tensor) else f
        assert torch.allclose(y, factor * x, rtol=1e-15, atol=0), state
    with pytest.raises(ValueError, match="state"):
        linear_factor(act, "both")
    with pytest.raises(ValueError, match="not an activation"):
        linear_factor(nn.Linear(2, 2), "on")
