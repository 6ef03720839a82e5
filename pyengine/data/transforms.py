"""Tensor image transforms: resize, standard CIFAR augmentation, normalisation.

They work on CHW tensors (uint8 in 0..255 or float in 0..1) so in-memory datasets never go
through PIL. Randomness comes from torch's generator (per DataLoader worker, seeded by the
loader's generator), so a seeded loader gives the same augmented batches every run.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ImageTransform", "resize_images", "standard_padding"]


def standard_padding(image_size: int) -> int:
    """Padding of the standard random-crop augmentation: 4 pixels at 32x32, scaled with size."""
    return max(1, round(image_size / 8))


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float NCHW batch; a non-square image is resized so that its short
    side is ``size``, then centre-cropped."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if h == w:
        out_h = out_w = size
    elif h < w:
        out_h, out_w = size, max(size, round(w * size / h))
    else:
        out_h, out_w = max(size, round(h * size / w)), size
    x = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False,
                      antialias=out_h < h or out_w < w)
    top, left = (out_h - size) // 2, (out_w - size) // 2
    return x[..., top:top + size, left:left + size]


def resize_images(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize an NCHW batch (uint8 or float) to ``size`` x ``size``, keeping its dtype (uint8
    results are rounded). Works in chunks to bound memory."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    out = []
    for i in range(0, images.shape[0], chunk):
        part = images[i:i + chunk]
        y = _resize(part.float(), size)
        if images.dtype == torch.uint8:
            y = y.round_().clamp_(0, 255).to(torch.uint8)
        out.append(y)
    return torch.cat(out) if out else images.new_empty((0, images.shape[1], size, size))


class ImageTransform:
    """uint8/float CHW image -> float CHW tensor: to [0, 1], resize, augment, normalise.

    Args:
        image_size: output side (images of another size are resized bilinearly).
        mean, std: per-channel normalisation (applied when ``normalize``).
        augment: standard CIFAR augmentation: zero-pad by ``padding`` (default
            ``standard_padding(image_size)``, 4 at 32x32), random ``image_size`` crop, random
            horizontal flip. Padding is black, applied before normalisation, as torchvision's
            RandomCrop on PIL images does.
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 augment: bool = False, padding: int | None = None, normalize: bool = True) -> None:
        self.image_size = int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment
        self.padding = standard_padding(image_size) if padding is None else int(padding)
        self.normalize = normalize

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img.to(torch.float32, copy=True)  # never hand out the stored tensor itself
        if img.dtype == torch.uint8:
            x.div_(255.0)
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = _resize(x.unsqueeze(0), self.image_size).squeeze(0)
        if self.augment:
            p, s = self.padding, self.image_size
            if p > 0:
                x = F.pad(x, (p, p, p, p))
                i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
                x = x[:, i:i + s, j:j + s]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        if self.normalize:
            x = (x - self.mean) / self.std
        return x.contiguous()

    def __repr__(self) -> str:
        return (f"ImageTransform(image_size={self.image_size}, augment={self.augment}, "
                f"padding={self.padding}, normalize={self.normalize})")
