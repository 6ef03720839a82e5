"""Model architectures written so that every activation is its own module.

    model = build_model("resnet18", num_classes=10)
    sites = activation_map(model)          # 17 ActivationSite(name, module, producer, kind)
    linearise(model, [sites[3].name])      # that ReLU becomes nn.Identity
    count_flops(model, (3, 32, 32), effective=True)

Built-in names (``list_models()``): resnet18/34/50 (CIFAR stem by default, ``stem="imagenet"``),
vgg11/13/16/19_bn, vgglike (DSD2: depth, width), mobilenet_v2 (CIFAR strides by default), vit, swin_t (torchvision's), and
``tv:<name>`` for any torchvision classification model (random init, adapted by
``pyengine.models.tv``).
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from pyengine.graph.activations import (
    ActivationSite,
    activation_kind,
    activation_map,
    find_functional_activations,
    find_producers,
    find_reused_activations,
    is_weight_layer,
    linearise,
    make_activations_distinct,
    register_activation,
)
from pyengine.models.flops import count_effective_flops, count_flops, count_params
from pyengine.models.mobilenet import MobileNetV2, mobilenet_v2
from pyengine.models.ofa_mbv3 import MobileNetV3Subnet, OFAMobileNetV3, ofa_mbv3
from pyengine.models.resnet import ResNet, resnet18, resnet34, resnet50
from pyengine.models.tv import swin_t, tv_model
from pyengine.models.vgg import VGG, vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn
from pyengine.models.vgglike import VGGLike, vgglike  # DSD2 model-size family (issue 9)
from pyengine.models.vit import VisionTransformer, vit

__all__ = [
    "build_model", "list_models", "model_options", "ActivationSite", "activation_map", "activation_kind",
    "register_activation", "find_producers", "find_reused_activations",
    "find_functional_activations", "is_weight_layer", "linearise", "make_activations_distinct",
    "count_params", "count_flops", "count_effective_flops",
    "ResNet", "VGG", "MobileNetV2", "VisionTransformer", "OFAMobileNetV3", "MobileNetV3Subnet",
    "VGGLike",
]

# name -> (builder, class or function whose signature lists the accepted options,
#          minimum image size, whether the builder takes image_size)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], Callable, int, bool]] = {
    "resnet18": (resnet18, ResNet.__init__, 1, False),
    "resnet34": (resnet34, ResNet.__init__, 1, False),
    "resnet50": (resnet50, ResNet.__init__, 1, False),
    "vgg11_bn": (vgg11_bn, VGG.__init__, 32, False),
    "vgg13_bn": (vgg13_bn, VGG.__init__, 32, False),
    "vgg16_bn": (vgg16_bn, VGG.__init__, 32, False),
    "vgg19_bn": (vgg19_bn, VGG.__init__, 32, False),
    "mobilenet_v2": (mobilenet_v2, MobileNetV2.__init__, 1, False),
    "vit": (vit, VisionTransformer.__init__, 1, True),
    "swin_t": (swin_t, swin_t, 1, True),
    "ofa_mbv3": (ofa_mbv3, ofa_mbv3, 1, False),
    "vgglike": (vgglike, VGGLike.__init__, 2, True),  # DSD2; checks image_size >= 2**depth itself
}

_FIXED = {"self", "block", "layers", "config", "num_classes", "in_channels", "image_size"}


def _accepted_options(sig_of: Callable) -> list[str]:
    return [p for p in inspect.signature(sig_of).parameters if p not in _FIXED]


def model_options(name: str) -> list[str] | None:
    """The architecture options a built-in model takes (None for ``tv:`` models and unknown names)."""
    entry = _REGISTRY.get(name)
    return _accepted_options(entry[1]) if entry is not None else None


def list_models(include_torchvision: bool = False) -> list[str]:
    """Built-in model names; with ``include_torchvision`` also every ``tv:<name>``."""
    names = sorted(_REGISTRY)
    if include_torchvision:
        import torchvision
        names += [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    return names


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 32,
                **opts) -> nn.Module:
    """Build a randomly initialised model.

    Args:
        name: a name from ``list_models()`` or ``tv:<torchvision model name>``.
        num_classes: size of the classifier output.
        in_channels: input channels (1 for grayscale data).
        image_size: input side; sizes the ViT position embedding, checks that the input is
            large enough (VGG needs 32), and is the size torchvision models are checked at.
        opts: architecture options, e.g. resnet ``stem="imagenet"``, ``maxpool=True``;
            vgg ``dropout``, ``hidden``; mobilenet_v2 ``width_mult``, ``stem``; vit ``dim``,
            ``depth``, ``heads``, ``mlp_dim``, ``patch_size``; swin_t ``embed_dim``, ``depths``,
            ``num_heads``, ``window_size``, ``patch_size``; tv:* any ``get_model`` keyword.
    """
    if name.startswith("tv:"):
        return tv_model(name[3:], num_classes=num_classes, in_channels=in_channels,
                        image_size=image_size, **opts)
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; built-in: {', '.join(sorted(_REGISTRY))}, "
                       "or tv:<torchvision model name>")
    builder, sig_of, min_size, takes_size = _REGISTRY[name]
    accepted = _accepted_options(sig_of)
    unknown = sorted(set(opts) - set(accepted))
    if unknown:
        raise TypeError(f"{name} does not take option(s) {unknown}; it takes {accepted}")
    if image_size < min_size:
        raise ValueError(f"{name} needs images of at least {min_size}x{min_size}, "
                         f"got image_size={image_size} (--image-size {min_size})")
    if takes_size:
        return builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                       **opts)
    return builder(num_classes=num_classes, in_channels=in_channels, **opts)
