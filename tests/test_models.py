"""Tests of pyengine.models: architectures, activation sites, linearisation, counts."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from pyengine.models import (
    ActivationSite,
    activation_map,
    build_model,
    count_effective_flops,
    count_flops,
    count_params,
    find_reused_activations,
    linearise,
    list_models,
)

# Small but structurally complete configurations, so the whole file runs in seconds.
TINY_VIT = dict(dim=32, depth=3, heads=2, mlp_dim=48)
TINY_SWIN = dict(embed_dim=16, num_heads=(1, 2, 2, 4), window_size=4)

# name, options, image size, expected activation count, expected kind
BUILTINS = [
    ("resnet18", {}, 16, 17, "relu"),
    ("resnet18", {"stem": "imagenet"}, 32, 17, "relu"),
    ("vgg16_bn", {}, 32, 15, "relu"),
    ("mobilenet_v2", {}, 16, 35, "relu6"),
    ("vit", TINY_VIT, 16, 3, "gelu"),
    ("swin_t", TINY_SWIN, 32, 12, "gelu"),
]


pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


_IDS = [f"{b[0]}-{'-'.join(map(str, b[1].values())) or 'default'}" for b in BUILTINS]


@pytest.mark.parametrize("name,opts,size,count,kind", BUILTINS, ids=_IDS)
def test_builtin_builds_runs_and_counts(name, opts, size, count, kind):
    in_channels = 3
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=size, **opts)
    model.eval()
    out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()

    sites = activation_map(model)
    assert len(sites) == count
    assert {s.kind for s in sites} == {kind}
    # every activation is its own instance, out of place, called exactly once, and addressable
    assert len({id(s.module) for s in sites}) == count
    assert all(not getattr(s.module, "inplace", False) for s in sites)
    assert find_reused_activations(model, torch.randn(1, in_channels, size, size)) == {}
    for s in sites:
        assert model.get_submodule(s.name) is s.module
        assert s.producer is not None
        assert isinstance(model.get_submodule(s.producer), (nn.Conv2d, nn.Linear))


@pytest.mark.parametrize("name,opts,size,count,kind", BUILTINS, ids=_IDS)
def test_builtin_grayscale_input(name, opts, size, count, kind):
    model = build_model(name, num_classes=4, in_channels=1, image_size=size, **opts).eval()
    first = next(m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    if isinstance(first, nn.Conv2d):
        assert first.in_channels == 1
    else:  # the ViT embeds flattened 4x4 patches of one channel
        assert first.in_features == 1 * 4 * 4
    assert model(torch.randn(1, 1, size, size)).shape == (1, 4)


def test_default_swin_t_is_torchvisions_and_has_12_gelus():
    model = build_model("swin_t", num_classes=10)
    sites = activation_map(model)
    assert len(sites) == 12
    assert count_params(model) == 27_527_044  # torchvision swin_t with a 10-class head
    assert [s.producer for s in sites[:2]] == ["features.1.0.mlp.0", "features.1.1.mlp.0"]


def test_resnet_stems():
    cifar = build_model("resnet18", 10)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    pooled = build_model("resnet18", 10, maxpool=True)
    assert isinstance(pooled.maxpool, nn.MaxPool2d)
    imnet = build_model("resnet18", 10, stem="imagenet")
    assert imnet.conv1.kernel_size == (7, 7) and imnet.conv1.stride == (2, 2)
    assert isinstance(imnet.maxpool, nn.MaxPool2d)
    grey = build_model("resnet18", 10, in_channels=1)
    assert grey.conv1.in_channels == 1


def test_mobilenet_v2_cifar_strides():
    model = build_model("mobilenet_v2", 10)
    strides = [model.stem.conv.stride[0]] + [b.dw.conv.stride[0] for b in model.blocks]
    # stem and the 24-channel stage run at stride 1 on CIFAR; three stride-2 blocks remain
    assert strides[0] == 1 and strides[2] == 1
    assert sum(s == 2 for s in strides) == 3
    imnet = build_model("mobilenet_v2", 10, stem="imagenet")
    assert sum(b.dw.conv.stride[0] == 2 for b in imnet.blocks) + imnet.stem.conv.stride[0] // 2 == 5


def _producers(model):
    return {s.name: s.producer for s in activation_map(model)}


def test_producer_mapping_resnet18():
    p = _producers(build_model("resnet18", 10))
    assert p["relu"] == "conv1"
    assert p["layer1.0.relu1"] == "layer1.0.conv1"
    assert p["layer1.0.relu2"] == "layer1.0.conv2"
    # a downsampling block: relu2 follows the residual sum, fed by conv2, not the shortcut conv
    assert p["layer2.0.relu2"] == "layer2.0.conv2"
    assert p["layer4.1.relu1"] == "layer4.1.conv1"
    assert list(p)[:3] == ["relu", "layer1.0.relu1", "layer1.0.relu2"]


def test_producer_mapping_vgg_mobilenet_vit():
    p = _producers(build_model("vgg16_bn", 10))
    assert p["features.relu1_1"] == "features.conv1_1"
    assert p["features.relu3_2"] == "features.conv3_2"
    assert p["features.relu5_3"] == "features.conv5_3"
    assert p["classifier.relu1"] == "classifier.fc1"
    assert p["classifier.relu2"] == "classifier.fc2"

    p = _producers(build_model("mobilenet_v2", 10))
    assert p["stem.act"] == "stem.conv"
    assert p["blocks.0.dw.act"] == "blocks.0.dw.conv"  # expansion 1: no expand unit
    assert "blocks.0.expand.act" not in p
    assert p["blocks.5.expand.act"] == "blocks.5.expand.conv"
    assert p["blocks.5.dw.act"] == "blocks.5.dw.conv"
    assert p["head.act"] == "head.conv"

    p = _producers(build_model("vit", 10, **TINY_VIT))
    assert p == {f"blocks.{i}.mlp.act": f"blocks.{i}.mlp.fc1" for i in range(3)}


def test_vit_default_dims():
    model = build_model("vit", 10)
    assert len(model.blocks) == 6
    assert model.blocks[0].mlp.fc1.weight.shape == (512, 512)
    assert model.blocks[0].attn.heads == 8
    assert model.patch_embed.in_features == 3 * 4 * 4
    assert model.pos_embed.shape == (1, 64 + 1, 512)


def test_torchvision_resnet_adapter_is_equivalent_and_split():
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18(num_classes=5).eval()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left shared or functional
        adapted = build_model("tv:resnet18", num_classes=5, image_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(adapted(x), reference(x))

    sites = activation_map(adapted)
    assert len(sites) == 17
    assert len({id(s.module) for s in sites}) == 17
    p = {s.name: s.producer for s in sites}
    assert p["relu"] == "conv1"
    assert p["layer2.0.relu1"] == "layer2.0.conv1"
    assert p["layer2.0.relu2"] == "layer2.0.conv2"  # not layer2.0.downsample.0
    assert find_reused_activations(adapted, x) == {}
    assert isinstance(adapted.layer1[0], torchvision.models.resnet.BasicBlock)
    clone = pickle.loads(pickle.dumps(adapted))  # the swapped block classes are importable
    torch.testing.assert_close(clone(x), reference(x))


def test_torchvision_adapter_in_channels_and_reports_functional():
    model = build_model("tv:mobilenet_v2", num_classes=3, in_channels=1, check=False)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert len(activation_map(model)) == 35
    with pytest.warns(RuntimeWarning, match="functions"):
        build_model("tv:densenet121", num_classes=3, image_size=32)
    with pytest.raises(KeyError):
        build_model("tv:not_a_model", num_classes=3)


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(4, 4)
        self.act2 = nn.GELU()

    def forward(self, x):
        x = self.act1(self.fc1(x))
        if x.sum() > 0:
            x = x * 2
        return self.act2(self.fc2(x))


def test_producer_fallback_when_untraceable():
    model = _Untraceable()
    with pytest.warns(RuntimeWarning, match="could not be traced"):
        sites = activation_map(model, example_input=torch.randn(2, 4))
    assert [(s.name, s.producer, s.kind) for s in sites] == [
        ("act1", "fc1", "relu"), ("act2", "fc2", "gelu")]


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.ones(4))
        self.act1 = nn.GELU()
        self.act2 = nn.ReLU()
        self.act3 = nn.ReLU()

    def forward(self, x):
        y = self.act1(self.gamma * self.fc(x).flatten(1))  # a parameter operand is skipped
        z = self.act2(torch.cat([y, x], dim=1))  # a concatenation has no single producer
        return self.act3(z)  # fed by another activation: no producer either


def test_producer_walk_rules():
    p = _producers(_Scaled())
    assert p == {"act1": "fc", "act2": None, "act3": None}


def test_linearise_replaces_and_changes_output():
    model = build_model("resnet18", 10).eval()
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    sites = activation_map(model)
    chosen = [sites[1].name, sites[4]]  # a path and an ActivationSite both work
    returned = linearise(model, chosen)
    assert returned is model
    assert isinstance(model.layer1[0].relu1, nn.Identity)
    assert isinstance(model.get_submodule(sites[4].name), nn.Identity)
    after_sites = activation_map(model)
    assert len(after_sites) == 15
    assert sites[1].name not in {s.name for s in after_sites}
    assert not torch.allclose(model(x), before)
    with pytest.raises(ValueError):
        linearise(model, [sites[1].name])  # already an Identity
    with pytest.raises(ValueError):
        linearise(model, ["layer1.0.conv1"])
    with pytest.raises(KeyError):
        linearise(model, ["layer9.relu"])


def test_flops_single_layers_hand_computed():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    # 10x10 outputs x 8 channels x (3 x 3 x 3) weights each
    assert count_flops(conv, (3, 10, 10)) == 10 * 10 * 8 * 27 == 21_600
    strided = nn.Conv2d(3, 8, 3, stride=2)  # 10 -> 4
    assert count_flops(strided, (3, 10, 10)) == 4 * 4 * 8 * 27
    assert count_flops(strided, torch.zeros(5, 3, 10, 10)) == 4 * 4 * 8 * 27  # an example batch
    grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
    assert count_flops(grouped, (4, 5, 5)) == 5 * 5 * 8 * 2 * 9
    fc = nn.Linear(20, 5)
    assert count_flops(fc, (20,)) == 100
    assert count_flops(fc, (7, 20)) == 700  # a row of MACs per token

    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(2 * 4 * 4, 3))
    assert count_flops(net, (1, 4, 4)) == 16 * 2 * 9 + 32 * 3
    assert count_flops(net, (1, 4, 4), by_layer=True) == {"0": 288, "3": 96}


def test_effective_flops_scale_with_density():
    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    dense = count_flops(conv, (2, 6, 6))
    with torch.no_grad():
        conv.weight.view(-1)[::2] = 0.0  # half of the 72 weights
    assert count_effective_flops(conv, (2, 6, 6)) == dense // 2
    assert count_flops(conv, (2, 6, 6)) == dense  # the dense count ignores zeros
    fc = nn.Linear(10, 10)
    with torch.no_grad():
        fc.weight[:, :7] = 0.0
    assert count_flops(fc, (10,), effective=True) == 30


def test_count_params():
    fc = nn.Linear(20, 5)
    assert count_params(fc) == 105
    with torch.no_grad():
        fc.weight[0] = 0.0
        fc.bias.zero_()
    assert count_params(fc, nonzero=True) == 105 - 20 - 5
    assert count_params(build_model("resnet18", 10)) == 11_173_962  # the usual CIFAR ResNet-18


def test_swin_flops_count_functional_attention_linears():
    model = build_model("swin_t", 10, **TINY_SWIN)
    per_layer = count_flops(model, (3, 32, 32), by_layer=True)
    assert "features.1.0.attn.qkv" in per_layer and "features.1.0.attn.proj" in per_layer
    # 32 / 4 = 8x8 tokens, a multiple of the 4x4 window: no padding
    qkv = model.features[1][0].attn.qkv
    assert per_layer["features.1.0.attn.qkv"] == 64 * qkv.weight.numel()


def test_registry_errors_and_listing():
    names = list_models()
    for n in ("resnet18", "vgg16_bn", "mobilenet_v2", "vit", "swin_t"):
        assert n in names
    assert "tv:resnet50" in list_models(include_torchvision=True)
    with pytest.raises(KeyError):
        build_model("resnet19", 10)
    with pytest.raises(TypeError, match="stme"):
        build_model("resnet18", 10, stme="imagenet")
    with pytest.raises(ValueError):
        build_model("vgg16_bn", 10, image_size=16)  # five 2x2 pools need 32 pixels


def test_activation_site_is_a_dataclass_with_the_agreed_fields():
    site = activation_map(build_model("vit", 10, **TINY_VIT))[0]
    assert isinstance(site, ActivationSite)
    assert (site.name, site.producer, site.kind) == ("blocks.0.mlp.act", "blocks.0.mlp.fc1", "gelu")
    assert isinstance(site.module, nn.GELU)
    assert activation_map(build_model("resnet18", 10), kinds={"gelu"}) == []
    copy.deepcopy(site)
