"""Elastic (once-for-all) layers: one set of weights, many active sizes.

Each layer holds the weights of its largest configuration and computes with a slice of them:

* ``ElasticConv2d``: the first ``in`` input channels (taken from the input) and the first
  ``active_out_channels`` output channels of a dense convolution.
* ``ElasticDepthwiseConv2d``: a depthwise convolution whose kernel size shrinks 7 -> 5 -> 3 by
  taking the centre of the larger kernel and mixing it with a learned square matrix per step
  (25x25 for 7 -> 5, 9x9 for 5 -> 3, initialised to the identity), as in OFA (Cai et al., ICLR
  2020, section 3.2 "elastic kernel size"; code: ``DynamicSeparableConv2d``).
* ``ElasticBatchNorm2d``: statistics and affine parameters of the first ``C`` channels.
* ``ElasticSE``: squeeze-and-excitation whose hidden width follows the active channels.
* ``ElasticLinear``: the first ``in`` / ``active_out_features`` features of a linear layer.

Channel slicing only makes sense when the most important channels come first; OFA sorts them by
the L1 norm of the weights that read them (``importance_order``) before training smaller widths.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "make_divisible",
    "ElasticConv2d",
    "ElasticDepthwiseConv2d",
    "ElasticBatchNorm2d",
    "ElasticSE",
    "ElasticLinear",
    "centre_crop",
    "importance_order",
    "same_conv2d",
]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to a multiple of ``divisor``, never below ``min_value`` (default: divisor)
    and never more than 10% below ``v`` (the MobileNet rule OFA uses for every width)."""
    min_value = divisor if min_value is None else min_value
    out = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if out < 0.9 * v:
        out += divisor
    return out


def centre_crop(weight: Tensor, size: int) -> Tensor:
    """The central ``size x size`` window of a (..., K, K) kernel (K and size odd)."""
    k = weight.shape[-1]
    start = (k - size) // 2
    return weight[..., start:start + size, start:start + size]


def same_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1, groups: int = 1) -> Tensor:
    """Convolution with "same" padding k // 2 (odd k). When the input is smaller than the kernel's
    reach, the outer taps only ever meet padding zeros: they are cropped away (same result, and
    oneDNN's depthwise kernels are very slow on 1x1 inputs with 7x7 kernels)."""
    k = weight.shape[-1]
    reach = max(x.shape[-2], x.shape[-1]) - 1
    pad = k // 2
    if pad > reach:
        weight, pad = centre_crop(weight, 2 * reach + 1), reach
    return F.conv2d(x, weight, bias, stride, pad, 1, groups)


class ElasticConv2d(nn.Module):
    """A bias-free dense convolution; input channels follow the input, output channels are
    ``active_out_channels`` (the first ones of the full weight)."""

    def __init__(self, max_in_channels: int, max_out_channels: int, kernel_size: int = 1,
                 stride: int = 1) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.max_in_channels, self.max_out_channels = max_in_channels, max_out_channels
        self.kernel_size, self.stride = kernel_size, stride
        self.weight = nn.Parameter(torch.empty(max_out_channels, max_in_channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.active_out_channels = max_out_channels

    def active_weight(self, out_channels: int, in_channels: int) -> Tensor:
        if not 0 < out_channels <= self.max_out_channels or not 0 < in_channels <= self.max_in_channels:
            raise ValueError(f"active size {out_channels}x{in_channels} outside the layer's "
                             f"{self.max_out_channels}x{self.max_in_channels}")
        return self.weight[:out_channels, :in_channels]

    def forward(self, x: Tensor) -> Tensor:
        w = self.active_weight(self.active_out_channels, x.shape[1])
        return same_conv2d(x, w, None, self.stride)

    def extra_repr(self) -> str:
        return f"{self.max_in_channels}, {self.max_out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"


class ElasticDepthwiseConv2d(nn.Module):
    """Depthwise convolution with an elastic kernel size (``kernel_sizes``, e.g. 3, 5, 7).

    The weight of kernel k < max is computed from the max kernel step by step: centre-crop to the
    next smaller size s, flatten each channel's s x s window and multiply by the learned
    ``transform_<K>to<s>`` matrix (shared by all channels of the layer), so the small kernels
    are not forced to equal the large kernel's centre.
    """

    def __init__(self, max_channels: int, kernel_sizes: Sequence[int] = (3, 5, 7), stride: int = 1,
                 transform: bool = True) -> None:
        super().__init__()
        sizes = sorted(set(int(k) for k in kernel_sizes))
        if not sizes or any(k < 1 or k % 2 != 1 for k in sizes):
            raise ValueError(f"kernel_sizes must be odd positive integers, got {list(kernel_sizes)}")
        self.max_channels, self.kernel_sizes, self.stride = max_channels, tuple(sizes), stride
        self.weight = nn.Parameter(torch.empty(max_channels, 1, sizes[-1], sizes[-1]))
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
        self.transform = transform
        if transform:
            for big, small in zip(sizes[1:], sizes[:-1]):
                # identity start: at first a small kernel is exactly the centre of the large one
                self.register_parameter(f"transform_{big}to{small}", nn.Parameter(torch.eye(small * small)))
        self.active_kernel_size = sizes[-1]

    def active_weight(self, channels: int, kernel_size: int) -> Tensor:
        if kernel_size not in self.kernel_sizes:
            raise ValueError(f"kernel_size {kernel_size} is not one of {list(self.kernel_sizes)}")
        if not 0 < channels <= self.max_channels:
            raise ValueError(f"{channels} channels outside the layer's {self.max_channels}")
        w = self.weight[:channels]
        if not self.transform:
            return centre_crop(w, kernel_size)
        for big, small in zip(reversed(self.kernel_sizes[1:]), reversed(self.kernel_sizes[:-1])):
            if big <= kernel_size:
                break
            m = getattr(self, f"transform_{big}to{small}")
            w = centre_crop(w, small).reshape(channels, small * small) @ m.t()
            w = w.reshape(channels, 1, small, small)
        return w

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        w = self.active_weight(c, self.active_kernel_size)
        return same_conv2d(x, w, None, self.stride, c)

    def extra_repr(self) -> str:
        return f"{self.max_channels}, kernel_sizes={list(self.kernel_sizes)}, stride={self.stride}"


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the first C channels of its statistics and affine parameters (C = the
    input's channels). In training mode the running statistics of those channels are updated in
    place (the slices are views)."""

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c == self.num_features:
            return super().forward(x)
        if c > self.num_features:
            raise ValueError(f"input has {c} channels, more than the layer's {self.num_features}")
        factor = 0.0
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or not self.track_running_stats
        return F.batch_norm(x, self.running_mean[:c] if self.running_mean is not None else None,
                            self.running_var[:c] if self.running_var is not None else None,
                            self.weight[:c], self.bias[:c], use_batch, factor, self.eps)


class ElasticSE(nn.Module):
    """Squeeze-and-excitation (MobileNetV3): global average, 1x1 reduce (bias) -> ReLU ->
    1x1 expand (bias) -> hard sigmoid, times the input. The hidden width is
    ``make_divisible(C // reduction, divisor)`` of the active channels C."""

    def __init__(self, max_channels: int, reduction: int = 4, divisor: int = 8) -> None:
        super().__init__()
        self.max_channels, self.reduction, self.divisor = max_channels, reduction, divisor
        mid = self.mid_channels(max_channels)
        self.reduce_weight = nn.Parameter(torch.empty(mid, max_channels, 1, 1))
        self.reduce_bias = nn.Parameter(torch.zeros(mid))
        self.expand_weight = nn.Parameter(torch.empty(max_channels, mid, 1, 1))
        self.expand_bias = nn.Parameter(torch.zeros(max_channels))
        nn.init.kaiming_normal_(self.reduce_weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.expand_weight, mode="fan_out", nonlinearity="relu")

    def mid_channels(self, channels: int) -> int:
        return make_divisible(channels // self.reduction, self.divisor)

    def forward(self, x: Tensor) -> Tensor:
        c = x.shape[1]
        if c > self.max_channels:
            raise ValueError(f"input has {c} channels, more than the layer's {self.max_channels}")
        mid = self.mid_channels(c)
        y = x.mean((2, 3), keepdim=True)
        y = F.relu(F.conv2d(y, self.reduce_weight[:mid, :c], self.reduce_bias[:mid]))
        y = F.hardsigmoid(F.conv2d(y, self.expand_weight[:c, :mid], self.expand_bias[:c]))
        return x * y


class ElasticLinear(nn.Module):
    """A linear layer computing with its first ``in`` (from the input) and
    ``active_out_features`` features."""

    def __init__(self, max_in_features: int, max_out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.max_in_features, self.max_out_features = max_in_features, max_out_features
        self.weight = nn.Parameter(torch.empty(max_out_features, max_in_features))
        self.bias = nn.Parameter(torch.zeros(max_out_features)) if bias else None
        bound = max_in_features ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)
        self.active_out_features = max_out_features

    def forward(self, x: Tensor) -> Tensor:
        n_in, n_out = x.shape[-1], self.active_out_features
        if not 0 < n_in <= self.max_in_features or not 0 < n_out <= self.max_out_features:
            raise ValueError(f"active size {n_out}x{n_in} outside the layer's "
                             f"{self.max_out_features}x{self.max_in_features}")
        return F.linear(x, self.weight[:n_out, :n_in], None if self.bias is None else self.bias[:n_out])


def importance_order(importance: Tensor, nested_widths: Sequence[int] = (), stage: int = 0) -> Tensor:
    """The channel order that puts important channels first (descending ``importance``).

    With ``stage`` s > 0 the order respects the widths already trained: ``nested_widths`` are the
    widths from largest to smallest (e.g. expand 6, 4, 3 -> 96, 64, 48 channels); the channels
    outside the first ``nested_widths[1]``, ``nested_widths[2]``, ... ``nested_widths[s]`` keep
    their group, and sorting happens within each group (OFA's ``re_organize_middle_weights``
    with ``expand_ratio_stage=s``). Returns an index tensor usable with ``index_select``.
    """
    imp = importance.detach().clone().double()
    if stage > 0:
        widths = list(nested_widths)
        if len(widths) <= stage:
            raise ValueError(f"stage {stage} needs at least {stage + 1} nested widths, got {widths}")
        # Group g (channels [w_{g+1}, w_g)) is shifted down by (n_groups - g) * big so that no
        # importance can move a channel across a group boundary.
        big = float(imp.abs().max()) * 4 + 1.0
        right = imp.numel()
        for g in range(stage + 1):
            left = widths[g]
            imp[left:right] -= (stage + 1 - g) * big
            right = left
    return torch.sort(imp, descending=True, stable=True).indices
