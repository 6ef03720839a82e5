"""DSD2's VGG-like family for model-size double descent (Quetu & Tartaglione, AAAI 2024).

``depth`` (the paper's delta) blocks; block k (1-based) is two
``conv3x3 (with bias) -> ReLU -> BatchNorm`` units with ``width * 2**(k-1)`` channels, then a 2x2
max-pool. Note the order: the ReLU comes *before* the batch norm, as in the authors' code. Then an
adaptive average pool to 7x7 and one Linear classifier on the flattened 7 * 7 * channels map.
``width`` is the paper's 2**gamma (gamma = 5 gives 32). Weights keep PyTorch's default
initialisation, as the authors' model does.

Names: ``features.conv{k}_{j}``, ``features.relu{k}_{j}``, ``features.bn{k}_{j}``,
``features.pool{k}``, ``avgpool``, ``fc``; every ReLU is its own module (2 * depth activations,
each fed by the convolution before it).

Deviation from the authors' code: their ``main.py`` passes gamma itself as the width (their
``kd.py`` passes 2**gamma), which for the default gamma = 5 gives a first block of 5 channels that
the second block cannot take (it expects 2**int(log2 5) = 4): the paper's family is widths
2**gamma, which is what this model builds. For a width that is not a power of two, block k has
``width * 2**(k-1)`` channels (the authors' formula only covers powers of two).
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

__all__ = ["VGGLike", "vgglike"]


class VGGLike(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, depth: int = 5,
                 width: int = 32, pool_size: int = 7) -> None:
        super().__init__()
        for name, v in (("depth", depth), ("width", width), ("pool_size", pool_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"vgglike: {name} must be a positive integer, got {v!r}")
        if image_size < 2 ** depth:
            raise ValueError(f"vgglike: depth {depth} halves the image {depth} times, so it needs images of at "
                             f"least {2 ** depth}x{2 ** depth}; got image_size={image_size} (lower depth)")
        self.depth, self.width = depth, width
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for k in range(1, depth + 1):
            c = width * 2 ** (k - 1)
            for j in (1, 2):
                layers[f"conv{k}_{j}"] = nn.Conv2d(c_in, c, 3, 1, 1)
                layers[f"relu{k}_{j}"] = nn.ReLU()
                layers[f"bn{k}_{j}"] = nn.BatchNorm2d(c)
                c_in = c
            layers[f"pool{k}"] = nn.MaxPool2d(2)
        self.features = nn.Sequential(layers)
        # at 32x32 with depth 5 the map is 1x1 and this pool repeats it 7x7 times, as in the paper's model
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size)
        self.fc = nn.Linear(pool_size * pool_size * c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


def vgglike(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, **opts) -> VGGLike:
    return VGGLike(num_classes, in_channels, image_size, **opts)
