"""VGG with batch norm for small images, one module per activation.

Features: (conv3x3 -> BN -> ReLU) stacks separated by 2x2 max-pools, named by stage
(``features.conv3_2``, ``features.relu3_2``, ``features.pool3``). Then a global average pool
(a no-op at 32x32, where the map is already 1x1) and a three-layer classifier
fc1 -> relu1 -> drop1 -> fc2 -> relu2 -> drop2 -> fc3. VGG-16-bn thus has 13 + 2 = 15
activations, the count of methods.md section 4.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from pyengine.models.init import kaiming_init_

__all__ = ["VGG", "VGG_CONFIGS", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):
    def __init__(self, config: list[list[int]], num_classes: int = 10, in_channels: int = 3,
                 hidden: int = 512, dropout: float = 0.0, width_mult: float = 1.0) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = in_channels
        for stage, widths in enumerate(config, start=1):
            for i, w in enumerate(widths, start=1):
                w = max(1, int(round(w * width_mult)))
                layers[f"conv{stage}_{i}"] = nn.Conv2d(c_in, w, 3, padding=1, bias=False)
                layers[f"bn{stage}_{i}"] = nn.BatchNorm2d(w)
                layers[f"relu{stage}_{i}"] = nn.ReLU()
                c_in = w
            layers[f"pool{stage}"] = nn.MaxPool2d(2, 2)
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(c_in, hidden)),
            ("relu1", nn.ReLU()),
            ("drop1", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, hidden)),
            ("relu2", nn.ReLU()),
            ("drop2", nn.Dropout(dropout)),
            ("fc3", nn.Linear(hidden, num_classes)),
        ]))
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


def vgg11_bn(num_classes: int = 10, in_channels: int = 3, **opts) -> VGG:
    return VGG(VGG_CONFIGS["vgg11"], num_classes, in_channels, **opts)


def vgg13_bn(num_classes: int = 10, in_channels: int = 3, **opts) -> VGG:
    return VGG(VGG_CONFIGS["vgg13"], num_classes, in_channels, **opts)


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, **opts) -> VGG:
    return VGG(VGG_CONFIGS["vgg16"], num_classes, in_channels, **opts)


def vgg19_bn(num_classes: int = 10, in_channels: int = 3, **opts) -> VGG:
    return VGG(VGG_CONFIGS["vgg19"], num_classes, in_channels, **opts)
