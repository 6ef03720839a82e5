"""torchvision ResNet blocks with one ReLU module per call (imported only when needed, since
importing torchvision is slow). Defined at module level so adapted models stay picklable."""
from __future__ import annotations

from torch import Tensor
from torchvision.models import resnet as tvr

__all__ = ["SplitReLUBasicBlock", "SplitReLUBottleneck"]


class SplitReLUBasicBlock(tvr.BasicBlock):
    """torchvision BasicBlock calling relu1, then relu2 after the residual sum."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu2(out + identity)


class SplitReLUBottleneck(tvr.Bottleneck):
    """torchvision Bottleneck calling relu1, relu2, then relu3 after the residual sum."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu3(out + identity)
