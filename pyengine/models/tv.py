"""Adapters for torchvision classification models (random init, never a download).

``tv_model(name, ...)`` builds ``torchvision.models.get_model(name, weights=None)`` and makes it
fit for activation hooks and linearisation:

- every activation becomes out-of-place, and an activation instance registered under several
  paths gets one copy per path;
- torchvision's ResNet blocks call one ``relu`` module two (BasicBlock) or three (Bottleneck)
  times; their class is swapped for a subclass whose forward calls ``relu1``, ``relu2``
  (, ``relu3``), the last one after the residual sum, as in ``pyengine.models.resnet``;
- the first convolution is rebuilt for ``in_channels``.

What cannot be fixed generically is reported by a warning at build time: an activation module
still called more than once per forward (``activation_map`` then reports it once, as a shared
site) and activations applied as functions (e.g. ``F.relu`` in Inception's BasicConv2d), which no
hook sees.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict

import torch
from torch import nn

from pyengine.graph.activations import (
    find_functional_activations,
    find_reused_activations,
    make_activations_distinct,
)

__all__ = ["swin_t", "tv_model", "adapt_in_channels", "split_torchvision_resnet_relus"]


def swin_t(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
           patch_size: int = 4, embed_dim: int = 96, depths: tuple[int, ...] = (2, 2, 6, 2),
           num_heads: tuple[int, ...] = (3, 6, 12, 24), window_size: int = 7,
           mlp_ratio: float = 4.0, dropout: float = 0.0, attention_dropout: float = 0.0,
           stochastic_depth_prob: float = 0.2) -> nn.Module:
    """torchvision's Swin-T (the defaults are exactly ``torchvision.models.swin_t``'s), random
    init. The options allow a smaller or CIFAR-adapted network (e.g. ``patch_size=2``,
    ``window_size=4``). Its 12 MLP GELUs (one per block) are modules already."""
    from torchvision.models import SwinTransformer

    model = SwinTransformer(
        patch_size=[patch_size, patch_size], embed_dim=embed_dim, depths=list(depths),
        num_heads=list(num_heads), window_size=[window_size, window_size], mlp_ratio=mlp_ratio,
        dropout=dropout, attention_dropout=attention_dropout,
        stochastic_depth_prob=stochastic_depth_prob, num_classes=num_classes)
    adapt_in_channels(model, in_channels)
    return model


def adapt_in_channels(model: nn.Module, in_channels: int) -> nn.Module:
    """Rebuild the first Conv2d of ``model`` (registration order) for ``in_channels`` inputs."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_channels:
                return model
            if m.groups != 1:
                raise ValueError(f"first convolution {name!r} is grouped; cannot adapt it")
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            m.dilation, 1, m.bias is not None, m.padding_mode)
            parent_path, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, new)
            return model
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to {in_channels} channels")


def _reorder_after(module: nn.Module, after: str, names: list[str]) -> None:
    """Move the children ``names`` right after child ``after`` in registration order."""
    items = list(module._modules.items())
    moved = [(k, v) for k, v in items if k in names]
    rest = [(k, v) for k, v in items if k not in names]
    out: OrderedDict[str, nn.Module | None] = OrderedDict()
    for k, v in rest:
        out[k] = v
        if k == after:
            out.update(moved)
    module._modules = out


def split_torchvision_resnet_relus(model: nn.Module) -> nn.Module:
    """Give every torchvision ResNet block one ReLU module per call (in place)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    from pyengine.models.tv_blocks import SplitReLUBasicBlock, SplitReLUBottleneck

    for m in model.modules():
        if type(m) is BasicBlock:
            m.__class__ = SplitReLUBasicBlock
            del m.relu
            m.relu1, m.relu2 = nn.ReLU(), nn.ReLU()
            _reorder_after(m, "bn1", ["relu1"])
        elif type(m) is Bottleneck:
            m.__class__ = SplitReLUBottleneck
            del m.relu
            m.relu1, m.relu2, m.relu3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
            _reorder_after(m, "bn1", ["relu1"])
            _reorder_after(m, "bn2", ["relu2"])
    return model


def tv_model(name: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 224,
             check: bool = True, **opts) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=..., **opts)``, adapted
    (see the module docstring). ``check`` runs one forward at ``image_size`` to warn about
    activations that are still shared or functional."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise KeyError(f"torchvision has no classification model {name!r}; "
                       f"available: {', '.join(available)}")
    opts.pop("weights", None)  # random init only: nothing is ever downloaded
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **opts)
    if in_channels != 3:
        adapt_in_channels(model, in_channels)
    make_activations_distinct(model)
    split_torchvision_resnet_relus(model)
    if check:
        problems = []
        try:
            shared = find_reused_activations(
                model, torch.zeros(1, in_channels, image_size, image_size))
            if shared:
                problems.append("activation modules called several times per forward "
                                f"(reported once each by activation_map): {shared}")
        except Exception as exc:  # noqa: BLE001 - e.g. an input too small for the network
            problems.append(f"could not run a {image_size}x{image_size} input to check for "
                            f"shared activations ({type(exc).__name__}: {exc})")
        functional = find_functional_activations(model)
        if functional:
            problems.append("activations applied as functions, invisible to activation_map "
                            f"and linearise: {functional[:8]}{' ...' if len(functional) > 8 else ''}")
        if problems:
            warnings.warn(f"tv:{name}: " + "; ".join(problems), RuntimeWarning, stacklevel=3)
    return model
