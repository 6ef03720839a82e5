"""MobileNetV2 with one ReLU6 module per activation, CIFAR and ImageNet strides.

Layout: ``stem`` (conv3x3 -> bn -> act), 17 inverted-residual ``blocks`` (``expand`` 1x1 unit,
absent when the expansion ratio is 1, ``dw`` depthwise 3x3 unit, ``project`` linear 1x1 unit),
``head`` (conv1x1 to 1280 -> bn -> act), global pool, dropout, ``classifier``. Each unit is a
``ConvBNAct`` with children ``conv``, ``bn``, ``act``. Activations: 1 (stem) + 1 (first block,
no expansion) + 2 x 16 + 1 (head) = 35, the count of methods.md section 4.

CIFAR variant (``stem="cifar"``, default): stem stride 1 and the first 24-channel stage at
stride 1 (the two changes of the usual CIFAR port), so a 32x32 input reaches the head at 4x4.
"""
from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ConvBNAct", "InvertedResidual", "MobileNetV2", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, stride s) for the ImageNet network
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round a channel count to a multiple of ``divisor``, never more than 10% below ``v``."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if out < 0.9 * v:
        out += divisor
    return out


class ConvBNAct(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, (kernel - 1) // 2, groups=groups,
                              bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        if act:
            self.act = nn.ReLU6()

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        return self.act(x) if hasattr(self, "act") else x


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        self.use_residual = stride == 1 and c_in == c_out
        if expand_ratio != 1:
            self.expand = ConvBNAct(c_in, hidden, 1)
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden)
        self.project = ConvBNAct(hidden, c_out, 1, act=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.expand(x) if hasattr(self, "expand") else x
        out = self.project(self.dw(out))
        return out + x if self.use_residual else out


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0,
                 stem: str = "cifar", dropout: float = 0.0, last_channel: int = 1280) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        c = make_divisible(32 * width_mult)
        last = make_divisible(last_channel * max(1.0, width_mult))
        self.stem = ConvBNAct(in_channels, c, 3, stride=1 if stem == "cifar" else 2)
        blocks = []
        for stage, (t, c_out, n, s) in enumerate(_SETTINGS):
            if stem == "cifar" and stage == 1:
                s = 1
            c_out = make_divisible(c_out * width_mult)
            for i in range(n):
                blocks.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(c, last, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.blocks(self.stem(x)))
        x = self.dropout(self.avgpool(x).flatten(1))
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, **opts) -> MobileNetV2:
    return MobileNetV2(num_classes, in_channels, **opts)
