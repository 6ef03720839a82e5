"""Dataset containers shared by every source: image sources, split views, metadata."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

__all__ = ["TensorSource", "FileSource", "ImageDataset", "DatasetInfo", "DatasetBundle",
           "split_indices"]


class TensorSource:
    """Images held in memory as one NCHW tensor (uint8 0..255 or float 0..1)."""

    def __init__(self, images: torch.Tensor) -> None:
        if images.dim() != 4:
            raise ValueError(f"expected NCHW images, got shape {tuple(images.shape)}")
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    @property
    def channels(self) -> int:
        return self.images.shape[1]


class FileSource:
    """Images read from files on demand (PIL), as uint8 CHW tensors with ``channels`` 1 or 3."""

    def __init__(self, paths: Sequence[str | Path], channels: int = 3) -> None:
        self.paths = [str(p) for p in paths]
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image, UnidentifiedImageError

        path = self.paths[i]
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                w, h = im.size
                data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
            from pyengine.data.errors import ImageReadError

            raise ImageReadError(f"cannot read image {path}: {exc}") from exc
        return data.view(h, w, self.channels).permute(2, 0, 1).contiguous()

    def load_all(self, size: int | None = None) -> torch.Tensor:
        """Every image as one uint8 NCHW tensor (resized to ``size`` when given)."""
        from pyengine.data.transforms import resize_images

        imgs = []
        for i in range(len(self)):
            x = self[i]
            if size is not None and tuple(x.shape[-2:]) != (size, size):
                x = resize_images(x.unsqueeze(0), size)[0]
            imgs.append(x)
        return torch.stack(imgs) if imgs else torch.empty(0, self.channels, size or 0, size or 0,
                                                          dtype=torch.uint8)


class ImageDataset(Dataset):
    """A view of ``source`` restricted to ``indices``, with its own labels and transform.

    Attributes:
        targets: int64 labels used for training (noisy where label noise was applied).
        clean_targets: the original labels.
        noisy_indices: positions (in this dataset) whose label was changed by noise.
    """

    def __init__(self, source, indices: torch.Tensor | Sequence[int], targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 clean_targets: torch.Tensor | None = None,
                 noisy_indices: torch.Tensor | None = None) -> None:
        self.source = source
        self.indices = torch.as_tensor(indices, dtype=torch.int64)
        self.targets = torch.as_tensor(targets, dtype=torch.int64)
        if self.targets.numel() != self.indices.numel():
            raise ValueError("one target per index is needed")
        self.clean_targets = self.targets.clone() if clean_targets is None else clean_targets
        self.noisy_indices = (torch.empty(0, dtype=torch.int64) if noisy_indices is None
                              else noisy_indices)
        self.transform = transform

    def __len__(self) -> int:
        return self.indices.numel()

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        img = self.source[int(self.indices[k])]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[k])

    def with_transform(self, transform: Callable[[torch.Tensor], torch.Tensor] | None
                       ) -> "ImageDataset":
        """The same images and labels under another transform (no data is copied), e.g. the
        training set without augmentation: ``bundle.train.with_transform(bundle.test.transform)``."""
        return ImageDataset(self.source, self.indices, self.targets, transform,
                            self.clean_targets, self.noisy_indices)

    @property
    def noisy_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[self.noisy_indices] = True
        return mask


def split_indices(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` into (kept, held out) with ``round(fraction * n)`` held out;
    both sorted."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    held = int(round(fraction * n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[held:].sort().values, perm[:held].sort().values


@dataclass
class DatasetInfo:
    """What a model and a report need to know about a dataset."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: list[str] = field(default_factory=list)
    source: str = ""
    num_train: int = 0
    num_val: int = 0
    num_test: int = 0
    noise: float = 0.0
    noisy_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON-friendly description (without the noisy index list)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if k != "noisy_indices"} | {"num_noisy": int(self.noisy_indices.numel())}


@dataclass
class DatasetBundle:
    """train / val / test datasets and their metadata. ``val`` is None when no validation
    fraction was asked for."""

    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset
    info: DatasetInfo

    def __getitem__(self, split: str) -> ImageDataset | None:
        if split not in ("train", "val", "test"):
            raise KeyError(f"split must be 'train', 'val' or 'test', got {split!r}")
        return getattr(self, split)

    def splits(self) -> dict[str, ImageDataset]:
        return {k: v for k, v in (("train", self.train), ("val", self.val), ("test", self.test))
                if v is not None}
