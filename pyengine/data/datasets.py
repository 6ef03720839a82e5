"""``build_dataset``: one call from a dataset name to train / val / test datasets."""
from __future__ import annotations

from pathlib import Path

import torch

from pyengine.data.core import DatasetBundle, DatasetInfo, ImageDataset, split_indices
from pyengine.data.noise import apply_label_noise
from pyengine.data.sources import (
    RawData,
    load_cifar,
    load_digits_data,
    load_fashion_mnist,
    load_image_folder,
    load_tiny_imagenet,
)
from pyengine.data.transforms import ImageTransform

__all__ = ["build_dataset", "list_datasets", "canonical_name"]

_ALIASES = {
    "digits": "digits",
    "fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
    "cifar10": "cifar10", "cifar-10": "cifar10",
    "cifar100": "cifar100", "cifar-100": "cifar100",
    "tiny-imagenet": "tiny-imagenet", "tiny_imagenet": "tiny-imagenet",
    "tinyimagenet": "tiny-imagenet", "tiny-imagenet-200": "tiny-imagenet",
}


def list_datasets() -> list[str]:
    """Dataset names accepted by ``build_dataset`` (plus ``imagefolder:PATH``)."""
    return ["digits", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet", "imagefolder:PATH"]


def canonical_name(name: str) -> str:
    if name.lower().startswith("imagefolder:"):
        return "imagefolder"
    key = name.lower()
    if key not in _ALIASES:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(list_datasets())}")
    return _ALIASES[key]


def _load_raw(name: str, root, download: bool, image_size: int | None, test_fraction: float,
              in_memory: bool | None) -> RawData:
    key = canonical_name(name)
    if key == "digits":
        return load_digits_data(image_size or 32, test_fraction)
    if key == "fashion-mnist":
        return load_fashion_mnist(root, download, image_size)
    if key in ("cifar10", "cifar100"):
        return load_cifar(key, root, download, image_size)
    if key == "tiny-imagenet":
        return load_tiny_imagenet(root, download, image_size, bool(in_memory))
    return load_image_folder(Path(name.split(":", 1)[1]), image_size, test_fraction,
                             in_memory=bool(in_memory))


def build_dataset(name: str, root: str | Path | None = None, *, image_size: int | None = None,
                  noise: float = 0.0, seed: int = 0, val_fraction: float = 0.0,
                  augment: bool = False, download: bool = False, normalize: bool = True,
                  test_fraction: float = 0.2, in_memory: bool | None = None,
                  noise_seed: int | None = None, padding: int | None = None) -> DatasetBundle:
    """Build train / val / test datasets and their metadata.

    Args:
        name: "digits" (offline, scikit-learn), "fashion-mnist", "cifar10", "cifar100",
            "tiny-imagenet" or "imagefolder:PATH".
        root: data folder (``--data-dir``) searched first.
        image_size: output side; default the dataset's own (digits 32, Fashion-MNIST 28,
            CIFAR 32, Tiny-ImageNet 64, image folders 32). Other sizes are bilinear resizes.
        noise: symmetric label noise on the training split only (``apply_label_noise``).
        seed: seeds the train/validation split; label noise uses ``noise_seed``, by default
            ``seed + 1`` (so the two draws are independent).
        val_fraction: part of the training set held out, clean, as validation (0: ``val`` is
            None).
        augment: standard CIFAR augmentation on the training split (random crop with padding
            ``padding``, default image_size / 8, and horizontal flip).
        download: allow fetching a missing dataset (Fashion-MNIST, CIFAR, Tiny-ImageNet).
        normalize: subtract the per-channel mean and divide by the std.
        test_fraction: held-out test part for datasets without a test split (digits, a single
            image folder); that split is fixed (seed 0), independent of ``seed``.
        in_memory: load file-based datasets (Tiny-ImageNet, image folders) into memory.

    Raises:
        DatasetNotFoundError / DatasetCorruptError with every place searched and how to fix it.
    """
    raw = _load_raw(name, root, download, image_size, test_fraction, in_memory)
    size = image_size or raw.native_size
    n_classes = len(raw.classes)
    train_idx, val_idx = split_indices(len(raw.train), val_fraction, seed)
    clean = raw.train_targets[train_idx]
    n_seed = seed + 1 if noise_seed is None else noise_seed
    noisy, noisy_idx = apply_label_noise(clean, n_classes, noise, n_seed)

    train_tf = ImageTransform(size, raw.mean, raw.std, augment=augment, padding=padding,
                              normalize=normalize)
    eval_tf = ImageTransform(size, raw.mean, raw.std, augment=False, normalize=normalize)
    train = ImageDataset(raw.train, train_idx, noisy, train_tf, clean_targets=clean,
                         noisy_indices=noisy_idx)
    val = (ImageDataset(raw.train, val_idx, raw.train_targets[val_idx], eval_tf)
           if val_idx.numel() else None)
    test = ImageDataset(raw.test, torch.arange(len(raw.test)), raw.test_targets, eval_tf)
    info = DatasetInfo(
        name=canonical_name(name) if not name.lower().startswith("imagefolder:") else name,
        num_classes=n_classes, in_channels=raw.in_channels, image_size=size,
        mean=tuple(raw.mean), std=tuple(raw.std), classes=list(raw.classes),
        source=raw.location, num_train=len(train), num_val=len(val) if val else 0,
        num_test=len(test), noise=noise, noisy_indices=noisy_idx, seed=seed)
    return DatasetBundle(train, val, test, info)
