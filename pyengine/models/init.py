"""Weight initialisation shared by the built-in CNNs."""
from torch import nn


def kaiming_init_(model: nn.Module) -> None:
    """He-normal (fan-out) convolutions and unit/zero batch-norm affine parameters."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
