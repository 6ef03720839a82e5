"""pyengine.graph edits: records, each edit kind against a plain-PyTorch reference (float64),
the exact conv/linear algebra, refusals, and mask mapping."""
from __future__ import annotations

import copy
import json
import random
import warnings

import pytest
import torch
from torch import nn

from pyengine.graph import (
    AddConstant,
    ChannelGate,
    ConstantZero,
    Edit,
    EditHistory,
    FoldRefused,
    apply_edit,
    apply_edits,
    compose_layers,
    fold_network,
    map_masks,
    replay,
)
from pyengine.graph.linear_maps import compose_masks
from pyengine.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
D = torch.float64


def rel(out, ref):
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max() / ref.abs().max())


def random_bn(model, gen):
    """Non-trivial eval statistics, so that a wrong BN fold shows."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1, generator=gen)
            m.running_var.uniform_(0.5, 2, generator=gen)
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.uniform_(-0.5, 0.5, generator=gen)


def set_module(model, path, new):
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


class Zero(nn.Module):  # reference for a "constant" ReLU
    def forward(self, x):
        return torch.zeros_like(x)


class Gate(nn.Module):  # reference for a per-channel gate, written independently of ChannelGate
    def __init__(self, on, channels, dim):
        super().__init__()
        self.g = torch.zeros(channels, dtype=D)
        self.g[on] = 1
        self.dim = dim

    def forward(self, x):
        return x.movedim(self.dim, -1).mul(self.g).movedim(-1, self.dim)


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

def test_edit_history_json_round_trip():
    h = EditHistory([Edit("linearise", "a.relu"), Edit("constant", "b", {"on": [0, 2]}),
                     Edit("fold_linear", "c", {"into": "d"})])
    back = EditHistory.from_json(h.to_json())
    assert back == h and isinstance(back, EditHistory)
    assert json.loads(h.to_json())[1] == {"kind": "constant", "target": "b", "args": {"on": [0, 2]}}
    assert "fold c into d" in back.describe()


def test_edit_record_validation():
    with pytest.raises(ValueError, match="kind"):
        Edit("prune", "x")
    with pytest.raises(TypeError, match="JSON"):
        Edit("constant", "x", {"on": torch.tensor([1])})
    with pytest.raises(TypeError):
        EditHistory([("linearise", "x")])
    with pytest.raises(ValueError, match="kind"):
        Edit.from_dict({"target": "x"})


# --------------------------------------------------------------------------------------------
# Single edits
# --------------------------------------------------------------------------------------------

def _resnet(seed=0, width=8):
    torch.manual_seed(seed)
    m = build_model("resnet18", 10, width=width).to(D).eval()
    random_bn(m, torch.Generator().manual_seed(seed))
    return m


def test_linearise_and_constant_match_reference_and_keep_keys():
    model = _resnet()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    ref = copy.deepcopy(model)
    set_module(ref, "layer1.0.relu1", nn.Identity())
    set_module(ref, "layer2.1.relu1", Zero())
    set_module(ref, "layer3.0.relu1", Gate([0, 3, 5], 32, 1))
    edited, hist = apply_edits(model, [Edit("linearise", "layer1.0.relu1"),
                                       Edit("constant", "layer2.1.relu1"),
                                       Edit("constant", "layer3.0.relu1", {"on": [5, 0, 3]})])
    assert torch.equal(edited(x), ref(x))
    assert set(edited.state_dict()) == set(model.state_dict()) | {"layer3.0.relu1.gate"}
    assert isinstance(edited.get_submodule("layer2.1.relu1"), ConstantZero)
    assert isinstance(edited.get_submodule("layer3.0.relu1"), ChannelGate)
    assert hist[2].args == {"on": [0, 3, 5], "dim": 1, "channels": 32}  # completed in place
    assert not torch.equal(model(x), ref(x))  # the input model is left as it was


def test_edit_errors_name_the_problem():
    model = _resnet()
    with pytest.raises(KeyError, match="layer9"):
        apply_edit(model, Edit("linearise", "layer9.relu"))
    with pytest.raises(ValueError, match="not an activation"):
        apply_edit(model, Edit("linearise", "layer1.0.conv1"))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        apply_edit(model, Edit("constant", "layer2.0.relu1", {"on": [16]}))
    vit = build_model("vit", 10, image_size=8, dim=16, depth=1, heads=2, mlp_dim=24)
    with pytest.raises(ValueError, match="GELU.*depends on the input"):
        apply_edit(vit, Edit("constant", "blocks.0.mlp.act"))
    with pytest.raises(ValueError, match="nonzero weights"):
        apply_edit(model, Edit("remove_branch", "layer1", {"zero_layers": ["layer1.0.conv1"]}),
                   torch.randn(1, 3, 8, 8, dtype=D))
    with pytest.raises(ValueError, match="no Conv/Linear layer under 'layer1'"):
        apply_edit(model, Edit("remove_branch", "layer1"), torch.randn(1, 3, 8, 8, dtype=D))
    model.layer1[0].conv1.weight.data.zero_()
    with pytest.raises(ValueError, match="needs example_input"):
        apply_edit(model, Edit("remove_branch", "layer1"))


def test_fold_bn_backward_and_forward():
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(1)
    net = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4),
                        nn.ReLU(), nn.Flatten(), nn.Linear(144, 5), nn.BatchNorm1d(5)).to(D).eval()
    random_bn(net, gen)
    x = torch.randn(2, 3, 8, 8, dtype=D)
    ref = net(x)
    out = apply_edit(net, Edit("fold_bn", "2"), x)
    assert out.get_submodule("1").bias is not None and not hasattr(out, "2")
    assert rel(out(x), ref) < 1e-12
    out = apply_edit(out, Edit("fold_bn", "6"), x)  # Linear then BatchNorm1d
    assert not hasattr(out, "6") and rel(out(x), ref) < 1e-12
    # the leading BN has no layer before it: it folds forward into the unpadded conv
    e = Edit("fold_bn", "0")
    out = apply_edit(out, e, x)
    assert e.args == {"into": "1", "direction": "forward"}
    assert rel(out(x), ref) < 1e-12
    # a BN before a padded conv would lose its shift at the borders: refused
    padded = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)).to(D).eval()
    with pytest.raises(FoldRefused, match="borders"):
        apply_edit(padded, Edit("fold_bn", "0"), x)
    no_stats = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(FoldRefused, match="batch statistics"):
        apply_edit(no_stats, Edit("fold_bn", "1"), x.float())


# --------------------------------------------------------------------------------------------
# The algebra of merged layers
# --------------------------------------------------------------------------------------------

def test_compose_convs_exact_or_refused_for_border_reasons():
    """A grid of random conv pairs (kernels, strides, paddings, dilations, groups, biases): a
    merged conv equals the two convs on inputs of several sizes, and a refusal happens only
    where the second conv zero-pads (the border case)."""
    rng = random.Random(0)
    torch.manual_seed(0)
    merged = refused = 0
    for _ in range(150):
        ka, kb, sa, sb = rng.choice([1, 3]), rng.choice([1, 2, 3]), rng.choice([1, 2]), rng.choice([1, 2])
        pa, pb, da, db = rng.choice([0, 1]), rng.choice([0, 0, 1]), rng.choice([1, 2]), rng.choice([1, 2])
        ga, gb = rng.choice([1, 2, 4]), rng.choice([1, 4])
        a = nn.Conv2d(4, 4, ka, sa, pa, da, ga, rng.random() < 0.5).to(D)
        b = nn.Conv2d(4, 4, kb, sb, pb, db, gb, rng.random() < 0.5).to(D)
        try:
            m = compose_layers(a, b)
        except FoldRefused as exc:
            refused += 1
            assert pb > 0 and "borders" in exc.reason
            continue
        merged += 1
        for h, w in ((7, 8), (9, 12), (16, 13)):
            x = torch.randn(2, 4, h, w, dtype=D)
            try:
                ref = b(a(x))
            except RuntimeError:  # input too small for the pair itself
                continue
            assert m(x).shape == ref.shape
            assert rel(m(x), ref) < 1e-12
    assert merged > 50 and refused > 10


def test_compose_known_cases():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 9, 9, dtype=D)
    # depthwise 3x3 then pointwise: exact, becomes one dense 3x3 conv
    dw = nn.Conv2d(6, 6, 3, 2, 1, groups=6).to(D)
    pw = nn.Conv2d(6, 5, 1).to(D)
    m = compose_layers(dw, pw)
    assert (m.kernel_size, m.stride, m.padding, m.groups) == ((3, 3), (2, 2), (1, 1), 1)
    assert rel(m(x), pw(dw(x))) < 1e-12
    # depthwise then depthwise stays depthwise (the second unpadded)
    dw2 = nn.Conv2d(6, 6, 3, groups=6).to(D)
    m = compose_layers(dw, dw2)
    assert m.groups == 6 and m.kernel_size == (7, 7)  # 2 + 2*2 + 1 (first stride 2)
    assert rel(m(x), dw2(dw(x))) < 1e-12
    # a bias-free strided pointwise conv before a padded 3x3: the merged conv is dilated
    p = nn.Conv2d(6, 4, 1, 2, bias=False).to(D)
    c = nn.Conv2d(4, 3, 3, 1, 1).to(D)
    m = compose_layers(p, c)
    assert (m.kernel_size, m.dilation, m.stride, m.padding) == ((3, 3), (2, 2), (2, 2), (2, 2))
    assert rel(m(x), c(p(x))) < 1e-12
    # the same with a bias: the bias would be missing in the padding -> refused
    with pytest.raises(FoldRefused, match="bias"):
        compose_layers(nn.Conv2d(6, 4, 1), c)
    with pytest.raises(FoldRefused, match="borders"):
        compose_layers(nn.Conv2d(6, 4, 3, padding=1), c)
    fc1, fc2 = nn.Linear(6, 7).to(D), nn.Linear(7, 3).to(D)
    t = torch.randn(2, 5, 6, dtype=D)
    assert rel(compose_layers(fc1, fc2)(t), fc2(fc1(t))) < 1e-12


def test_compose_masks_is_the_structural_product():
    a, b = nn.Linear(5, 4), nn.Linear(4, 3)
    ma = torch.rand(4, 5) > 0.5
    mb = torch.rand(3, 4) > 0.5
    expect = (mb.double() @ ma.double()) > 0
    assert torch.equal(compose_masks(a, b, ma, mb), expect)
    assert compose_masks(a, b, None, None) is None
    # conv: a connection exists iff some path of kept weights joins input i and output o
    ca, cb = nn.Conv2d(2, 2, 1, bias=False), nn.Conv2d(2, 3, 3)
    ma = torch.tensor([[True, False], [False, False]]).view(2, 2, 1, 1)
    mb = torch.zeros(3, 2, 3, 3, dtype=torch.bool)
    mb[1, 0, 2, 0] = True
    got = compose_masks(ca, cb, ma, mb)
    assert got.shape == (3, 2, 3, 3) and got.sum() == 1 and bool(got[1, 0, 2, 0])


# --------------------------------------------------------------------------------------------
# Constant branches
# --------------------------------------------------------------------------------------------

def _egp_resnet(seed=0):
    model = _resnet(seed)
    for b in (0, 1):
        for c in ("conv1", "conv2"):
            model.layer3[b].get_submodule(c).weight.data.zero_()
    return model


def test_default_egp_run_layer3_blocks_leave_the_network():
    """The default EGP run empties conv1 and conv2 of both layer3 blocks."""
    model = _egp_resnet()
    x = torch.randn(2, 3, 8, 8, dtype=D)
    folded, applied, refused = fold_network(model, x)
    names = {n for n, _ in folded.named_modules()}
    for b in ("layer3.0", "layer3.1"):
        assert not {f"{b}.{c}" for c in ("conv1", "bn1", "relu1", "conv2", "bn2")} & names
    convs = sum(isinstance(m, nn.Conv2d) for m in folded.modules())
    assert convs == sum(isinstance(m, nn.Conv2d) for m in model.modules()) - 4 == 16
    assert rel(folded(x), model(x)) < 1e-10
    # the body's per-channel constant went into the shortcut's bias (layer3.0) and into a
    # bias after the identity shortcut (layer3.1)
    assert folded.get_submodule("layer3.0.shortcut.0").bias is not None
    assert isinstance(folded.get_submodule("layer3.1.folded_bias"), nn.Module)
    kinds = [e.kind for e in applied]
    assert kinds.count("remove_branch") == 1 and "fold_bn" in kinds
    assert {r["reason"] for r in refused} == set()  # no linearised activation: nothing to merge
    # replay from a fresh base gives an identical network
    base = build_model("resnet18", 10, width=8).to(D)
    again = replay(base, EditHistory.from_json(applied.to_json()), x)
    again.load_state_dict(folded.state_dict())
    again.eval()
    assert torch.equal(again(x), folded(x))


def test_constant_varying_over_positions_is_kept_at_its_resolution():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 3, 3, padding=1)  # zero padding of a constant map
            self.relu2 = nn.ReLU()

        def forward(self, x):
            return self.relu2(self.conv2(self.relu1(self.conv1(x))) + x)

    torch.manual_seed(0)
    net = Net().to(D).eval()
    net.conv1.weight.data.zero_()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    with pytest.warns(RuntimeWarning, match="only accepts inputs of that resolution"):
        folded, applied, _ = fold_network(net, x)
    const = [m for m in folded.modules() if isinstance(m, AddConstant)]
    assert len(const) == 1 and const[0].value.shape == (1, 3, 6, 6)
    assert applied[0].args["resolution_dependent"]
    assert rel(folded(x), net(x)) < 1e-10
    assert not hasattr(folded, "conv2")


def test_drop_dead_removes_unused_layers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            self.unused(x)
            return self.used(x)

    e = Edit("drop_dead", "")
    out = apply_edit(Net(), e)
    assert not hasattr(out, "unused") and e.args["removed"] == ["unused"]
    assert set(out.state_dict()) == {"used.weight", "used.bias"}


# --------------------------------------------------------------------------------------------
# Random sets of edits on the built-in models
# --------------------------------------------------------------------------------------------

TINY_SWIN = dict(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2, patch_size=2)


def _in_residual_body(model, path):
    """A layer or activation inside a residual branch: emptying it (or making it constant)
    leaves the network's output input-dependent, unlike a layer of a plain chain."""
    if path.startswith("layer"):  # ResNet: the block body, not the shortcut / last ReLU
        block = model.get_submodule(".".join(path.split(".")[:2]))
        last = "relu3" if hasattr(block, "relu3") else "relu2"
        return "shortcut" not in path and not path.endswith(last)
    if path.startswith("blocks.") and hasattr(model, "stem"):  # MobileNetV2 residual blocks
        return model.blocks[int(path.split(".")[1])].use_residual
    return ".mlp" in path  # ViT / Swin MLPs


CASES = [
    # name, options, image size, layers emptied, probability of linearising a site
    ("resnet18", {"width": 8}, 8, 2, 0.35),
    ("resnet50", {"width": 4}, 8, 2, 0.35),
    ("vgg16_bn", {"width_mult": 0.0625, "hidden": 16}, 32, 0, 0.35),
    ("mobilenet_v2", {"width_mult": 0.25, "last_channel": 32}, 8, 2, 0.35),
    ("vit", {"dim": 16, "depth": 3, "heads": 2, "mlp_dim": 24}, 8, 1, 0.6),
    ("swin_t", dict(TINY_SWIN, depths=(2, 1)), 8, 1, 0.6),
]


def _random_case(name, opts, size, n_empty, p_lin, seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    base = build_model(name, 10, image_size=size, **opts).to(D).eval()
    random_bn(base, gen)
    layers = [n for n, m in base.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    masks = {}
    for n in layers:  # unstructured masks, half of the weights
        w = base.get_submodule(n).weight
        masks[f"{n}.weight"] = torch.rand(w.shape, generator=gen) > 0.5
        w.data *= masks[f"{n}.weight"]
    body = [n for n in layers if _in_residual_body(base, n)]
    for n in rng.sample(body, min(n_empty, len(body))):
        base.get_submodule(n).weight.data.zero_()
        masks[f"{n}.weight"][:] = False
    ref = copy.deepcopy(base)
    edits = []
    from pyengine.graph import activation_map, neuron_dim

    for site in activation_map(base):
        r = rng.random()
        if r < p_lin:
            edits.append(Edit("linearise", site.name))
            set_module(ref, site.name, nn.Identity())
        elif site.kind in ("relu", "relu6") and r < p_lin + 0.1 and \
                _in_residual_body(base, site.name):
            edits.append(Edit("constant", site.name))
            set_module(ref, site.name, Zero())
        elif site.kind in ("relu", "relu6") and r < p_lin + 0.3:
            channels = base.get_submodule(site.producer).weight.shape[0]
            on = sorted(rng.sample(range(channels), rng.randrange(1, channels + 1)))
            edits.append(Edit("constant", site.name, {"on": on}))
            set_module(ref, site.name, Gate(on, channels, neuron_dim(base, site)))
    return base, ref, edits, masks


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,opts,size,n_empty,p_lin", CASES, ids=[c[0] for c in CASES])
def test_random_edits_fold_exactly_and_replay(name, opts, size, n_empty, p_lin, seed):
    base, ref, edits, masks = _random_case(name, opts, size, n_empty, p_lin, seed)
    x = torch.randn(2, 3, size, size, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # constants at a fixed resolution
        edited, history = apply_edits(base, edits, x)
        expect = ref(x)
        assert rel(edited(x), expect) < 1e-12
        folded, applied, refused = fold_network(edited, x)
    assert rel(folded(x), expect) < 1e-10
    # every refusal is a pair that is still there, with its reason
    modules = dict(folded.named_modules())
    for r in refused:
        assert r["reason"] and r["target"] in modules
    # fewer or equal layers, never more
    n_layers = lambda m: sum(isinstance(k, (nn.Conv2d, nn.Linear)) for k in m.modules())  # noqa: E731
    assert n_layers(folded) <= n_layers(base)
    if any(e.kind == "linearise" for e in edits) and name in ("vit", "swin_t"):
        assert n_layers(folded) < n_layers(base)  # an MLP's two Linears became one
    # replay from a freshly built base + state dict = the same network, bit for bit
    full = EditHistory(list(history) + list(applied))
    fresh = build_model(name, 10, image_size=size, **opts).to(D)
    again = replay(fresh, EditHistory.from_json(full.to_json()), x)
    assert {k: v.shape for k, v in again.state_dict().items()} == \
        {k: v.shape for k, v in folded.state_dict().items()}
    again.load_state_dict(folded.state_dict())
    again.eval()
    assert torch.equal(again(x), folded(x))
    # masks carried across the edits: every removed weight of the folded network is zero
    mapped = map_masks(masks, base, full, x)
    # carried in the same pass as the edits (apply_edit / fold_network masks=): the same masks
    inline = dict(masks)
    net = base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for e in history:
            net = apply_edit(net, Edit.from_dict(e.to_dict()), x, masks=inline)
        fold_network(net, x, masks=inline)
    assert inline.keys() == mapped.keys()
    assert all(torch.equal(inline[k], mapped[k]) for k in mapped)
    params = dict(folded.named_parameters())
    assert set(mapped) <= set(params)
    for k, m in mapped.items():
        assert m.shape == params[k].shape
        assert not bool(params[k].detach()[~m].any()), k
    # layers no fold touched keep their masks unchanged
    touched = {e.target for e in applied if e.kind == "fold_linear"} | \
        {e.args["into"] for e in applied if e.kind == "fold_linear"}
    for k in set(masks) & set(mapped):
        if k.rsplit(".", 1)[0] not in touched:
            assert torch.equal(mapped[k], masks[k]), k


def test_map_masks_follows_merges_and_removals():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3), nn.ReLU(),
                        nn.Linear(3, 2)).to(D)
    masks = {f"{i}.weight": torch.rand(net[i].weight.shape) > 0.4 for i in (0, 2, 4)}
    x = torch.randn(2, 5, dtype=D)
    edited = apply_edit(net, Edit("linearise", "1"))
    _, applied, _ = fold_network(edited, x)
    full = [Edit("linearise", "1")] + list(applied)
    mapped = map_masks(masks, net, full, x)
    assert set(mapped) == {"0.weight", "4.weight"}
    assert torch.equal(mapped["0.weight"],
                       (masks["2.weight"].double() @ masks["0.weight"].double()) > 0)
    assert torch.equal(mapped["4.weight"], masks["4.weight"])
    with pytest.raises(ValueError, match="mask '0.weight' has shape"):
        map_masks({"0.weight": torch.ones(3, 3, dtype=torch.bool)}, net, full, x)
    with pytest.raises(KeyError, match="nope"):
        map_masks({"nope": torch.ones(1)}, net, full, x)
    # in the same pass: the masks change with the edit, and stay as they were when it fails
    inline = dict(masks)
    edited = apply_edit(net, Edit("linearise", "1"), masks=inline)
    assert inline.keys() == masks.keys()
    folded, _, _ = fold_network(edited, x, masks=inline)
    assert inline.keys() == mapped.keys() and all(torch.equal(inline[k], mapped[k]) for k in mapped)
    before = dict(inline)
    with pytest.raises(KeyError):
        apply_edit(folded, Edit("linearise", "no.such.site"), masks=inline)
    assert inline.keys() == before.keys() and all(inline[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="mask '0.weight' has shape"):
        apply_edit(net, Edit("linearise", "1"), masks={"0.weight": torch.ones(3, 3, dtype=torch.bool)})


def test_constant_goes_into_a_bias_only_where_that_is_exact():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)       # its output is used twice
            self.body = nn.Conv2d(3, 4, 1)       # emptied: outputs its bias
            self.bn = nn.BatchNorm2d(4)
            self.relu = nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.relu(y + self.bn(self.body(x))) + y

    torch.manual_seed(0)
    net = Net().to(D).eval()
    random_bn(net, torch.Generator().manual_seed(0))
    net.body.weight.data.zero_()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    folded, applied, _ = fold_network(net, x)
    assert not hasattr(folded, "body")
    assert isinstance(folded.get_submodule("folded_bias"), nn.Module)  # not conv's bias
    assert rel(folded(x), net(x)) < 1e-12


def test_fold_network_reports_refusals_and_merges_what_is_exact():
    torch.manual_seed(0)
    model = build_model("resnet50", 10, width=4).to(D).eval()
    random_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8, dtype=D)
    edits = [Edit("linearise", "layer1.0.relu1"), Edit("linearise", "layer1.0.relu2")]
    edited, history = apply_edits(model, edits)
    folded, applied, refused = fold_network(edited, x)
    assert rel(folded(x), edited(x)) < 1e-10
    # 3x3 (pad 1) then 1x1: exact, one 3x3 conv under conv2's path; conv3 is gone
    merged = [e for e in applied if e.kind == "fold_linear"]
    assert [(e.target, e.args["into"]) for e in merged] == [("layer1.0.conv3", "layer1.0.conv2")]
    assert not hasattr(folded.layer1.get_submodule("0"), "conv3")
    assert folded.get_submodule("layer1.0.conv2").out_channels == 16
    # 1x1 (with the folded BN's bias) then 3x3 with zero padding: refused, and said why
    (r,) = [r for r in refused if r["target"] == "layer1.0.conv2"]
    assert r["into"] == "layer1.0.conv1" and "borders" in r["reason"]
    assert isinstance(folded.get_submodule("layer1.0.conv1"), nn.Conv2d)


def test_fold_network_mac_limit():
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 10, width_mult=0.25).to(D).eval()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    edited, _ = apply_edits(model, [Edit("linearise", "blocks.1.dw.act")])
    free, applied, _ = fold_network(edited, x)
    assert any(e.kind == "fold_linear" for e in applied)  # depthwise∘pointwise -> dense 3x3
    limited, applied, refused = fold_network(edited, x, max_mac_ratio=1.0)
    assert not any(e.kind == "fold_linear" for e in applied)
    assert any("MACs" in r["reason"] for r in refused)
    assert rel(limited(x), edited(x)) < 1e-10 and rel(free(x), edited(x)) < 1e-10


def test_replay_creates_tensors_on_the_base_models_device():
    # a CUDA base must get CUDA biases/gates/merged layers; the meta device shows the same
    # without a GPU (a tensor made on the CPU by mistake stands out)
    model = _resnet()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    edited, hist = apply_edits(model, [Edit("linearise", "layer1.0.relu1"),
                                       Edit("linearise", "layer4.1.relu2"),
                                       Edit("constant", "layer2.0.relu1", {"on": [1, 2]})])
    _, applied, _ = fold_network(edited, x)
    history = [e for e in list(hist) + list(applied) if e.kind != "remove_branch"]
    base = build_model("resnet18", 10, width=8).to(D).to("meta")
    again = replay(base, history)
    assert {t.device.type for t in again.state_dict().values()} == {"meta"}


class _UserNet(nn.Module):
    """A user's own model: nothing pyengine-specific in it."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.head(x.mean((2, 3)))


def test_user_model_in_a_few_lines():
    from pyengine.graph import activation_map, network_stats

    torch.manual_seed(0)
    net = _UserNet().eval()
    random_bn(net, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 16, 16)
    assert [s.producer for s in activation_map(net)] == ["conv1", "conv2"]
    edited = apply_edit(net, Edit("linearise", "act1"))
    folded, applied, refused = fold_network(edited, x)
    assert refused == []
    assert [e.describe() for e in applied] == ["fold bn1 into conv1", "fold conv2 into conv1"]
    assert network_stats(folded, x)["conv_layers"] == 1
    assert (folded(x) - edited(x)).abs().max() < 1e-5


def test_string_padding_folds_where_it_is_a_number():
    # padding="same" / "valid" were refused outright ("string padding not supported"), even for a
    # BatchNorm folded into the conv before it, where padding plays no part
    from pyengine.graph.linear_maps import FoldRefused, compose_layers

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding="same", bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 1, padding="valid"), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3, dilation=2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model = model.double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded, applied, refused = fold_network(model, x)
    assert refused == []
    assert [e.describe() for e in applied] == ["fold 1 into 0", "fold 4 into 3", "fold 5 into 3"]
    assert (folded(x) - model(x)).abs().max() < 1e-12
    for pad_a, pad_b in (("same", 0), (0, "same"), ("valid", "same"), ("same", "valid")):
        a = nn.Conv2d(4, 4, 1 if pad_b == "same" else 3, padding=pad_a, bias=False).double()
        b = nn.Conv2d(4, 4, 3, padding=pad_b).double()
        y = torch.randn(2, 4, 7, 7, dtype=torch.float64)
        assert (compose_layers(a, b)(y) - b(a(y))).abs().max() < 1e-12
    with pytest.raises(FoldRefused, match="one side more"):  # an even kernel pads one side more
        compose_layers(nn.Conv2d(4, 4, 2, padding="same"), nn.Conv2d(4, 4, 1))


def test_a_gate_is_not_folded_into_a_transposed_convolution():
    # a transposed convolution's weight is (in, out / groups, ...): folding a gate "into its rows"
    # scaled its input channels - a wrong network when in == out, without a word
    torch.manual_seed(0)

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.up = nn.ConvTranspose2d(6, 6, 2, stride=2)
            self.relu = nn.ReLU()
            self.out = nn.ConvTranspose2d(6, 6, 1)
            self.relu2 = nn.ReLU()
            self.head = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.head(self.relu2(self.out(self.relu(self.up(self.conv(x))))))

    model = Decoder().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    for target in ("relu", "relu2"):
        edited = apply_edit(model, Edit("constant", target, {"on": [0, 2, 4]}), x)
        folded, applied, refused = fold_network(edited, x)
        assert (folded(x) - edited(x)).abs().max() < 1e-12
    assert [e.describe() for e in applied] == ["fold relu2 into head"]  # forward, into the plain conv


# --------------------------------------------------------------------------------------------
# Collapsed activations of every kind: the exact linear map of their state
# --------------------------------------------------------------------------------------------

def _measured_states(model, name, x):
    """(ON channels, channels) of activation ``name`` on ``x``, counted with plain PyTorch: its
    input (B, C, H, W) per channel over batch and positions; every channel must be constant."""
    seen = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    z = seen[0].movedim(1, -1).reshape(-1, seen[0].shape[1])
    p = (z > 0).double().mean(0)
    assert bool(((p == 0) | (p == 1)).all()), "the test wants constant neurons"
    return (p == 1).nonzero().flatten().tolist(), z.shape[1]


class _ConvAct(nn.Module):
    """conv 3x3 -> BN -> activation -> conv 1x1 -> linear head: the activation sits between two
    layers that fold into one once it is a linear map."""

    def __init__(self, act):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = act
        self.conv2 = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x):
        return self.head(self.conv2(self.act(self.bn(self.conv1(x)))).flatten(1))


_ON, _OFF, _MIXED = [100.0] * 6, [-100.0] * 6, [100.0, -100.0, -100.0, 100.0, -100.0, 100.0]
EXACT_STATES = [
    # activation, BN shift (decides the states), the edit kind, whether conv2 folds into conv1
    (lambda: nn.ReLU(), _ON, "linearise"),
    (lambda: nn.ReLU(), _MIXED, "constant"),
    (lambda: nn.ReLU6(), _OFF, "constant"),
    (lambda: nn.LeakyReLU(0.1), _ON, "linearise"),
    (lambda: nn.LeakyReLU(0.1), _OFF, "linearise"),
    (lambda: nn.LeakyReLU(0.2), _MIXED, "linearise"),
    (lambda: nn.PReLU(), _OFF, "linearise"),
    (lambda: nn.PReLU(), _MIXED, "linearise"),
    (lambda: nn.PReLU(6), _OFF, "linearise"),
    (lambda: nn.ELU(), _ON, "linearise"),
    (lambda: nn.CELU(0.5), _ON, "linearise"),
    (lambda: nn.SELU(), _ON, "linearise"),
    (lambda: nn.RReLU(), _ON, "linearise"),
]


@pytest.mark.parametrize("make,shift,kind", EXACT_STATES,
                         ids=[f"{m().__class__.__name__}-{'on' if s is _ON else 'off' if s is _OFF else 'mixed'}"
                              for m, s, _ in EXACT_STATES])
def test_collapse_edit_folds_exactly_on_the_measured_data(make, shift, kind):
    # an always-OFF LeakyReLU is slope * x and an always-ON SELU scale * x: linear maps that fold
    # into their neighbours like an always-ON ReLU, where they used to be left in place
    from pyengine.graph.edits import collapse_edit

    torch.manual_seed(0)
    model = _ConvAct(make()).to(D).eval()
    random_bn(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.bn.bias.copy_(torch.tensor(shift, dtype=D))
        if isinstance(model.act, nn.PReLU):
            model.act.weight.uniform_(-1.0, 1.0)
    x = torch.randn(16, 3, 5, 5, dtype=D)
    expect = model(x)
    on, channels = _measured_states(model, "act", x)
    edit = collapse_edit("act", model.act, on, channels)
    assert edit.kind == kind
    edited = apply_edit(model, edit, x)
    assert torch.allclose(edited(x), expect, rtol=1e-12, atol=1e-12)
    folded, applied, refused = fold_network(edited, x)
    assert torch.allclose(folded(x), expect, rtol=1e-10, atol=1e-10)
    n_layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in folded.modules())
    if shift is _OFF and kind == "constant":
        assert n_layers == 0  # the whole network is a constant
    else:  # conv2 folded into conv1 (through the gate where there is one)
        assert n_layers == 2 and not any(isinstance(m, ChannelGate) for m in folded.modules())
    # the records replay on a fresh base model, bit for bit
    history = EditHistory.from_json(EditHistory([edit] + list(applied)).to_json())
    again = replay(_ConvAct(make()).to(D), history, x)
    again.load_state_dict(folded.state_dict())
    assert torch.equal(again.eval()(x), folded(x))


NOT_EXACT = [
    (lambda: nn.GELU(), _ON), (lambda: nn.GELU(), _OFF), (lambda: nn.SiLU(), _OFF), (lambda: nn.ReLU6(), _ON),
    (lambda: nn.ReLU6(), _MIXED), (lambda: nn.ELU(), _OFF), (lambda: nn.CELU(), _MIXED), (lambda: nn.SELU(), _OFF),
    (lambda: nn.RReLU(), _OFF), (lambda: nn.Hardswish(), _ON), (lambda: nn.PReLU(6), _MIXED),
]


@pytest.mark.parametrize("make,shift", NOT_EXACT)
def test_collapse_edit_refuses_states_that_are_not_linear(make, shift):
    from pyengine.graph import activation_kind
    from pyengine.graph.edits import collapse_edit

    torch.manual_seed(0)
    model = _ConvAct(make()).to(D).eval()
    with torch.no_grad():
        model.bn.bias.copy_(torch.tensor(shift, dtype=D))
    x = torch.randn(4, 3, 5, 5, dtype=D)
    on, channels = _measured_states(model, "act", x)
    with pytest.raises(ValueError, match="not exactly linear"):
        collapse_edit("act", model.act, on, channels)
    if shift is _ON:  # NEPENTHE's --approximate: the identity all the same, and said so
        edit = collapse_edit("act", model.act, on, channels, approximate=True)
        assert (edit.kind, edit.args) == ("linearise", {"approximate": activation_kind(model.act)})
    else:  # --approximate only ever replaces an always-ON activation
        with pytest.raises(ValueError, match="not exactly linear"):
            collapse_edit("act", model.act, on, channels, approximate=True)


def test_collapse_edit_gives_the_records_relu_and_relu6_always_got():
    # the built-in models (ReLU, ReLU6) must give the same edits, so the same runs: compared with
    # the run's own decision (pyengine.methods.runner.collapse_edits) for every state
    from types import SimpleNamespace

    from pyengine.graph import activation_kind
    from pyengine.graph.edits import collapse_edit
    from pyengine.methods.runner import collapse_edits

    for act in (nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(), nn.PReLU(), nn.GELU()):
        for on in ([0, 1, 2, 3], [], [1, 3]):
            for approximate in (False, True):
                site = SimpleNamespace(name="a", kind=activation_kind(act), module=act)
                summary = {"entropy_sites": [{"name": "a", "n_neurons": 4}], "constant_neurons": {"a": {"on": on}}}
                theirs, refused = collapse_edits([site], summary, approximate)
                if not theirs:
                    continue  # refused there: a new exact edit here is allowed (LeakyReLU OFF, ...)
                assert collapse_edit("a", act, on, 4, approximate=approximate).to_dict() == theirs[0].to_dict()


def test_linearise_scale_is_checked_and_described():
    model = _ConvAct(nn.LeakyReLU(0.1)).to(D).eval()
    x = torch.randn(2, 3, 5, 5, dtype=D)
    with pytest.raises(ValueError, match="6 channels"):
        apply_edit(model, Edit("linearise", "act", {"scale": [1.0, 0.1]}), x)
    with pytest.raises(TypeError, match="scale"):
        apply_edit(model, Edit("linearise", "act", {"scale": "0.1"}), x)
    with pytest.raises(ValueError, match="non-finite"):
        apply_edit(model, Edit("linearise", "act", {"scale": float("nan")}), x)
    e = Edit("linearise", "act", {"scale": 0.1})
    apply_edit(model, e, x)
    assert e.args == {"scale": 0.1, "dim": 1, "channels": 6}
    assert e.describe() == "linearise act: x times 0.1"


def test_uniform_scale_without_a_producer_is_an_exact_one_channel_gate():
    from pyengine.graph.edits import collapse_edit

    model = nn.Sequential(nn.LeakyReLU(0.3), nn.Flatten(), nn.Linear(12, 2)).to(D).eval()
    x = -torch.rand(4, 3, 2, 2, dtype=D)  # every input negative: always OFF
    edit = collapse_edit("0", model[0], [], 3)
    edited = apply_edit(model, edit, x)
    assert edit.args == {"scale": 0.3, "dim": -1, "channels": 1}
    assert torch.allclose(edited(x), model(x), rtol=1e-14, atol=0)


def test_gate_edits_read_the_graph_they_edit_without_tracing_it_again(monkeypatch):
    # each gate edit traced the whole network again to find its producer: n edits, n traces
    import pyengine.graph.activations as activations

    model = _resnet()
    x = torch.randn(1, 3, 8, 8, dtype=D)
    sites = [s for s in activations.activation_map(model) if s.producer is not None]
    traced = []
    real = activations.trace
    monkeypatch.setattr(activations, "trace", lambda m: traced.append(1) or real(m))
    edits = [Edit("constant", s.name, {"on": [0]}) for s in sites]
    edited, history = apply_edits(model, edits, x)
    assert traced == []
    # the same dimension and channel count as the producer the model's own map names
    for s, e in zip(sites, history):
        assert e.args["dim"] == 1 and e.args["channels"] == model.get_submodule(s.producer).out_channels


# --------------------------------------------------------------------------------------------
# Tied weights, mixed precision
# --------------------------------------------------------------------------------------------

class _TiedBN(nn.Module):
    """``a`` then a BatchNorm (folds backward into ``a``); ``c`` uses a's weight (tied)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.r, self.c = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4)
        self.c.weight = self.a.weight

    def forward(self, x):
        return self.c(self.r(self.bn(self.a(x))))


class _TiedBNForward(nn.Module):
    """A leading BatchNorm (folds forward into ``a``); ``c`` uses a's weight and bias."""

    def __init__(self):
        super().__init__()
        self.bn, self.a, self.r, self.c = nn.BatchNorm1d(4), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)
        self.c.weight, self.c.bias = self.a.weight, self.a.bias

    def forward(self, x):
        return self.c(self.r(self.a(self.bn(x))))


class _TiedGateRows(nn.Module):
    """A ReLU whose channels 0, 2 are always ON and 1, 3 always OFF (``a``'s bias): its gate folds
    into the rows of ``a``, whose weight ``c`` shares."""

    def __init__(self):
        super().__init__()
        self.a, self.r, self.c = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)
        self.c.weight = self.a.weight
        self.a.bias.data = torch.tensor([100.0, -100.0, 100.0, -100.0])

    def forward(self, x):
        return self.c(self.r(self.a(x)) + x)


class _TiedGateColumns(nn.Module):
    """The same gate after ``p``, which has two users: it folds into the columns of ``a``, whose
    weight ``c`` shares."""

    def __init__(self):
        super().__init__()
        self.p, self.r, self.a, self.c = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 4)
        self.c.weight = self.a.weight
        self.p.bias.data = torch.tensor([100.0, -100.0, 100.0, -100.0])

    def forward(self, x):
        h = self.p(x)
        return self.a(self.r(h)) + self.c(h)


class _TiedBias(nn.Module):
    """``z`` has all-zero weights: its constant output goes into the bias of ``b``, which ``c``
    shares."""

    def __init__(self):
        super().__init__()
        self.b, self.z, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.c.bias = self.b.bias
        self.z.weight.data.zero_()

    def forward(self, x):
        return self.c(x) * 2 + (self.b(x) + self.z(x))


@pytest.mark.parametrize("make, edits, folded_kind, into", [
    (_TiedBN, [], "fold_bn", "a"),
    (_TiedBNForward, [], "fold_bn", "a"),
    (_TiedGateRows, [Edit("constant", "r", {"on": [0, 2]})], "fold_linear", "a"),
    (_TiedGateColumns, [Edit("constant", "r", {"on": [0, 2]})], "fold_linear", "a"),
    (_TiedBias, [], "remove_branch", None),
])
def test_a_fold_into_a_tied_layer_leaves_the_other_user_unchanged(make, edits, folded_kind, into):
    # folding a BatchNorm / a gate / a constant into a layer rewrote its weights in place, and with
    # them the other layer using the same Parameter (0.17 off for the BatchNorm, 0.8 for the gate):
    # the folded layer now gets its own copy, as fold_linear's merged layer always had
    torch.manual_seed(0)
    model = make().to(D).eval()
    random_bn(model, torch.Generator().manual_seed(0))
    x = torch.randn(6, 4, dtype=D)
    with torch.no_grad():
        ref = model(x)  # the unedited network; the gated ReLUs are exactly their gates on x
    edited, history = apply_edits(model, [Edit.from_dict(e.to_dict()) for e in edits], x)
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(1)) > 0.3
    masks = {"a.weight": mask.clone()} if into == "a" else None
    folded, applied, refused = fold_network(edited, x, masks=masks)
    assert [e.args.get("into") for e in applied if e.kind == folded_kind] == [into]
    if folded_kind == "remove_branch":  # z's constant went into b's bias (tied), not a module of its own
        assert not [n for n, _ in folded.named_modules() if "folded" in n]
    with torch.no_grad():
        assert rel(folded(x), ref) < 1e-12
        assert rel(model(x), ref) == 0.0  # the model given is left as it was
    if masks is not None:  # the tied weight's mask stays with both users
        assert torch.equal(masks["c.weight"], mask) and set(masks) == {"a.weight", "c.weight"}
        mapped = map_masks({"a.weight": mask}, edited, applied, x)
        assert mapped.keys() == masks.keys() and all(torch.equal(mapped[k], masks[k]) for k in masks)
    # the records replay: the rebuilt structure holds both tensors, and loads the folded weights
    rebuilt = replay(make().to(D), list(history) + list(applied), x)
    rebuilt.load_state_dict(folded.state_dict())
    with torch.no_grad():
        assert rel(rebuilt.eval()(x), ref) < 1e-12


def test_a_refused_fold_into_a_tied_layer_keeps_the_tie():
    model = _TiedBN()
    model.a, model.c = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)
    model.c.weight = model.a.weight
    model.bn = nn.BatchNorm2d(3, track_running_stats=False)  # batch statistics: refused
    model = model.to(D).eval()
    x = torch.randn(2, 3, 4, 4, dtype=D)
    folded, applied, refused = fold_network(model, x)
    assert [r["target"] for r in refused if r["kind"] == "fold_bn"] == ["bn"]
    assert folded.get_submodule("a").weight is folded.get_submodule("c").weight


def test_a_folded_constant_keeps_the_dtype_of_the_value_it_replaces():
    # the constants of a removed branch took the dtype of the model's first floating tensor (here
    # a float16 layer): a float32 value came back rounded to float16, and the network's float32
    # output became float16
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4).half()  # all-zero weights: a constant branch in float16
            self.r = nn.ReLU()
            self.out = nn.Linear(4, 3)        # float32, as is the rest
            self.b = nn.Linear(4, 3)

        def forward(self, x):
            k = self.out(self.r(self.a(x.half())).float())  # a float32 constant
            return self.b(x) * 2 + k, k  # met by a live value (a bias of its own), and alone

    torch.manual_seed(0)
    model = Mixed().eval()
    with torch.no_grad():
        model.a.weight.zero_()
        model.a.bias.uniform_(-1, 1)
        model.out.bias.uniform_(-1, 1)
    x = torch.randn(5, 4)
    with torch.no_grad():
        ref = model(x)
    folded, applied, _ = fold_network(model, x[:1])
    assert [e.kind for e in applied] == ["remove_branch"] and not hasattr(folded, "a")
    with torch.no_grad():
        got = folded(x)
    for g, r in zip(got, ref):
        assert g.dtype == r.dtype == torch.float32
        torch.testing.assert_close(g, r)  # float32 tolerances: a float16 rounding (~1e-4) fails
    assert {t.dtype for n, t in folded.state_dict().items() if n.startswith("folded_")} == {torch.float32}
    rebuilt = replay(Mixed().eval(), applied, x[:1])
    rebuilt.load_state_dict(folded.state_dict())
    for n, t in rebuilt.state_dict().items():
        assert t.dtype == folded.state_dict()[n].dtype, n


def test_a_gate_keeps_its_inputs_dtype_in_a_mixed_precision_network():
    # a gate made in the model's first floating dtype (float64 here) turned the float16 values
    # it multiplies into float64, and the next float16 Linear refused them
    from pyengine.graph import Edit, apply_edits

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 6).double()
            self.fc2 = nn.Linear(6, 6).half()
            self.act = nn.LeakyReLU(0.25)
            self.fc3 = nn.Linear(6, 3).half()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.fc1(x).half())))

    torch.manual_seed(0)
    net = Mixed()
    x = torch.randn(5, 4, dtype=torch.float64)
    with torch.no_grad():
        h = net.fc2(net.fc1(x).half())
        want = net.fc3(h * 0.25)  # the LeakyReLU on its OFF side: 0.25 z, computed in float16
    edited, _ = apply_edits(net, [Edit("linearise", "act", {"scale": 0.25})])
    with torch.no_grad():
        got = edited(x)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
