"""Datasets (with label noise and splits) and loaders.

    bundle = build_dataset("digits", val_fraction=0.1, noise=0.2, seed=0)
    bundle.info.num_classes, bundle.info.in_channels, bundle.info.image_size   # 10, 1, 32
    loaders = build_loaders(bundle, batch_size=128)

Datasets: digits (scikit-learn, offline default), fashion-mnist, cifar10, cifar100,
tiny-imagenet, imagefolder:PATH. Small datasets live in memory as tensors; a missing or corrupt
dataset raises DatasetNotFoundError listing every place searched and how to provide it.
"""
from pyengine.data.core import (
    DatasetBundle,
    DatasetInfo,
    FileSource,
    ImageDataset,
    TensorSource,
    split_indices,
)
from pyengine.data.datasets import build_dataset, canonical_name, list_datasets
from pyengine.data.errors import DatasetCorruptError, DatasetNotFoundError, ImageReadError
from pyengine.data.loaders import Loaders, ShardSampler, build_loaders
from pyengine.data.noise import apply_label_noise
from pyengine.data.sources import (
    download_tiny_imagenet,
    read_cifar_batch,
    read_idx,
    search_roots,
)
from pyengine.data.transforms import ImageTransform, resize_images

__all__ = [
    "build_dataset", "list_datasets", "canonical_name", "build_loaders", "apply_label_noise",
    "DatasetBundle", "DatasetInfo", "ImageDataset", "TensorSource", "FileSource", "Loaders",
    "ShardSampler", "DatasetNotFoundError", "DatasetCorruptError", "ImageReadError", "ImageTransform",
    "resize_images", "split_indices", "read_idx", "read_cifar_batch", "download_tiny_imagenet",
    "search_roots",
]
