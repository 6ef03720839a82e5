"""Readers for each supported dataset: where to look, how to read, how to fetch.

Every reader returns a ``RawData`` (train and test images with labels, class names, stats) or
raises ``DatasetNotFoundError`` / ``DatasetCorruptError`` naming every place it looked.
Search order for a dataset stored on disk: ``root`` (``--data-dir``), ``$PYENGINE_DATA_DIR``,
``./data``, the download cache (``$XDG_CACHE_HOME/pyengine/datasets`` or
``~/.cache/pyengine/datasets``), then dataset-specific system places.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import shutil
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pyengine.data.core import FileSource, TensorSource, split_indices
from pyengine.data.errors import DatasetCorruptError, DatasetNotFoundError
from pyengine.data.transforms import resize_images

__all__ = [
    "RawData", "search_roots", "download_dir", "read_idx", "read_cifar_batch",
    "load_digits_data", "load_fashion_mnist", "load_cifar", "load_tiny_imagenet",
    "load_image_folder", "download_tiny_imagenet", "TINY_IMAGENET_URL", "TINY_IMAGENET_MD5",
    "FASHION_MNIST_SYSTEM_DIR",
]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian dataset-fashion-mnist
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"  # the official zip (248,100,043 bytes)
CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}

# Per-channel statistics of the training sets (pixel values in [0, 1]).
STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet": ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class RawData:
    """Train and test images of one dataset, before splitting, noise and transforms."""

    train: TensorSource | FileSource
    train_targets: torch.Tensor
    test: TensorSource | FileSource
    test_targets: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    in_channels: int
    native_size: int
    location: str


# --------------------------------------------------------------------------------------------
# Where to look
# --------------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyengine" / "datasets"


def search_roots(root: str | Path | None = None) -> list[Path]:
    """The base folders searched for any dataset, in order, without duplicates."""
    roots: list[Path] = []
    if root is not None:
        roots.append(Path(root).expanduser())
    env = os.environ.get("PYENGINE_DATA_DIR")
    if env:
        roots.append(Path(env).expanduser())
    roots += [Path.cwd() / "data", _cache_dir()]
    out: list[Path] = []
    for r in roots:
        if r not in out:
            out.append(r)
    return out


def download_dir(root: str | Path | None = None) -> Path:
    """Where downloads go: ``root``, else ``$PYENGINE_DATA_DIR``, else the cache folder."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PYENGINE_DATA_DIR")
    return Path(env).expanduser() if env else _cache_dir()


def _candidates(roots: Sequence[Path], subdirs: Sequence[str]) -> list[Path]:
    out: list[Path] = []
    for r in roots:
        for s in subdirs:
            p = r / s if s else r
            if p not in out:
                out.append(p)
    return out


def _data_dir_hint(what: str) -> str:
    return f"pass --data-dir DIR (Python: root=DIR) or set PYENGINE_DATA_DIR=DIR, where {what}"


# --------------------------------------------------------------------------------------------
# digits (scikit-learn, offline)
# --------------------------------------------------------------------------------------------

def load_digits_data(image_size: int = 32, test_fraction: float = 0.2) -> RawData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), scaled to [0, 1] and
    resized bilinearly to ``image_size``. The train/test split is fixed (seed 0) so that every
    run is evaluated on the same test images; ``test_fraction`` of them are held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DatasetNotFoundError(
            "digits", ["the scikit-learn package (sklearn.datasets.load_digits)"],
            ["pip install scikit-learn (it bundles the digits data; nothing is downloaded)"],
            reason=f"dataset 'digits' needs scikit-learn, which cannot be imported ({exc}).",
        ) from exc
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    targets = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    images = resize_images(images, image_size).clamp_(0.0, 1.0)
    train_idx, test_idx = split_indices(len(targets), test_fraction, seed=0)
    train = images[train_idx]
    mean, std = train.mean().item(), train.std().item()
    return RawData(TensorSource(train), targets[train_idx], TensorSource(images[test_idx]),
                   targets[test_idx], [str(i) for i in range(10)], (mean,), (std,), 1,
                   image_size, "sklearn.datasets.load_digits")


# --------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST)
# --------------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (plain or gzip-compressed, detected from its bytes) into a tensor.

    Raises DatasetCorruptError for a bad magic number, a truncated payload or a bad gzip stream.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DatasetCorruptError("idx", [str(path)], ["re-download or replace the file"],
                                  reason=f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DatasetCorruptError("idx", [str(path)], ["re-download or replace the file"],
                                  reason=f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetCorruptError("idx", [str(path)], ["re-download or replace the file"],
                                  reason=f"{path}: truncated IDX header")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header != count * dtype.itemsize:
        raise DatasetCorruptError(
            "idx", [str(path)], ["re-download or replace the file"],
            reason=f"{path}: IDX header says {dims} ({count * dtype.itemsize} bytes of data) "
                   f"but the file holds {len(raw) - header} bytes")
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder("="), copy=True))


_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_set(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FMNIST_FILES.items():
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                found[key] = folder / name
                break
        else:
            return None
    return found


def load_fashion_mnist(root: str | Path | None = None, download: bool = False,
                       image_size: int | None = None) -> RawData:
    """Fashion-MNIST from IDX files: ``root``, the usual data folders (``X``,
    ``X/fashion-mnist``, ``X/FashionMNIST/raw``), /usr/share/datasets/fashion-mnist (Debian
    package dataset-fashion-mnist), else torchvision's downloader when ``download``."""
    roots = search_roots(root)
    places = _candidates(roots, ["", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw"])
    places.append(FASHION_MNIST_SYSTEM_DIR)
    files = next((f for f in (_find_idx_set(p) for p in places) if f is not None), None)
    target = download_dir(root)
    if files is None and download:
        try:
            from torchvision.datasets import FashionMNIST
            for train in (True, False):
                FashionMNIST(str(target), train=train, download=True)
        except Exception as exc:  # noqa: BLE001 - network, disk, checksum: all reported alike
            raise _fmnist_missing(places, target, f"downloading Fashion-MNIST into {target} "
                                                  f"failed ({type(exc).__name__}: {exc}).") from exc
        files = _find_idx_set(target / "FashionMNIST" / "raw")
        places.append(target / "FashionMNIST" / "raw")
    if files is None:
        raise _fmnist_missing(places, target, None)
    tensors = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = tensors[f"{split}_images"], tensors[f"{split}_labels"]
        if x.dim() != 3 or y.dim() != 1 or x.shape[0] != y.shape[0]:
            raise DatasetCorruptError(
                "fashion-mnist", [str(files[f"{split}_images"].parent)],
                ["replace the files (e.g. re-download with --download)"],
                reason=f"Fashion-MNIST {split} files disagree: images {tuple(x.shape)}, "
                       f"labels {tuple(y.shape)}")
        n_cls = len(FASHION_MNIST_CLASSES)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_cls):
            raise DatasetCorruptError(
                "fashion-mnist", [str(files[f"{split}_labels"])],
                ["replace the files (e.g. re-download with --download)"],
                reason=f"Fashion-MNIST {split} labels span [{int(y.min())}, {int(y.max())}], "
                       f"outside the {n_cls} classes [0, {n_cls - 1}]")
    size = image_size or 28
    mean, std = STATS["fashion-mnist"]
    tr = resize_images(tensors["train_images"].to(torch.uint8).unsqueeze(1), size)
    te = resize_images(tensors["test_images"].to(torch.uint8).unsqueeze(1), size)
    return RawData(TensorSource(tr), tensors["train_labels"].long(), TensorSource(te),
                   tensors["test_labels"].long(), list(FASHION_MNIST_CLASSES), mean, std, 1,
                   size, str(files["train_images"].parent))


def _fmnist_missing(places, target, reason) -> DatasetNotFoundError:
    names = ", ".join(f"{s}[.gz]" for s in _FMNIST_FILES.values())
    return DatasetNotFoundError("fashion-mnist", places, [
        _data_dir_hint(f"DIR, DIR/fashion-mnist or DIR/FashionMNIST/raw holds {names}"),
        "on Debian/Ubuntu: sudo apt install dataset-fashion-mnist (installs the files into "
        f"{FASHION_MNIST_SYSTEM_DIR})",
        f"pass --download (Python: download=True) to fetch it with torchvision into {target}",
    ], reason=reason)


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle batches)
# --------------------------------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Loads the CIFAR batch dictionaries (numpy arrays, lists, strings) and nothing that could
    run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        # pickle protocol 5 stores an array as bytes + numpy's frombuffer/reshape helper
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _str_keys(d: dict) -> dict:
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def read_cifar_batch(path: str | Path, label_key: str = "labels") -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """One CIFAR python batch file -> (uint8 images N x 3 x 32 x 32, int64 labels)."""
    path = Path(path)
    hints = ["replace the folder (e.g. delete it and pass --download)"]
    try:
        with open(path, "rb") as f:
            entry = _str_keys(_SafeUnpickler(f, encoding="latin1").load())
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except FileNotFoundError as exc:
        raise DatasetCorruptError("cifar", [str(path)], hints,
                                  reason=f"CIFAR folder {path.parent} is incomplete: "
                                         f"{path.name} is missing") from exc
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError,
            AttributeError, IndexError) as exc:
        raise DatasetCorruptError("cifar", [str(path)], hints,
                                  reason=f"cannot read CIFAR batch {path} "
                                         f"({type(exc).__name__}: {exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DatasetCorruptError("cifar", [str(path)], hints,
                                  reason=f"CIFAR batch {path} has data {data.shape} and "
                                         f"{labels.shape[0]} labels; expected N x 3072 and N")
    # rows are 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


_CIFAR_LAYOUT = {
    # folder, train files, test files, meta file, label key, class-name key, num classes
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "labels", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels",
                 "fine_label_names", 100),
}


def load_cifar(name: str, root: str | Path | None = None, download: bool = False,
               image_size: int | None = None) -> RawData:
    """CIFAR-10/100 from the python-pickle batches (``<root>/cifar-10-batches-py`` or
    ``<root>/cifar-100-python``, or ``root`` itself holding the batch files)."""
    folder, train_files, test_files, meta, label_key, names_key, n_cls = _CIFAR_LAYOUT[name]
    places = _candidates(search_roots(root), [folder, ""])
    marker = train_files[0]
    found = next((p for p in places if (p / marker).is_file()), None)
    target = download_dir(root)

    def fetch() -> None:
        try:
            import torchvision.datasets as tvd
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            cls(str(target), train=True, download=True)
        except Exception as exc:  # noqa: BLE001
            raise _cifar_missing(name, places, target,
                                 f"downloading {name} into {target} failed "
                                 f"({type(exc).__name__}: {exc}).") from exc

    def read(folder: Path):
        xs, ys = zip(*(read_cifar_batch(folder / f, label_key) for f in train_files))
        x_tr, y_tr = torch.cat(xs), torch.cat(ys)
        xs, ys = zip(*(read_cifar_batch(folder / f, label_key) for f in test_files))
        return x_tr, y_tr, torch.cat(xs), torch.cat(ys)

    if found is None and download:
        fetch()
        found = target / folder
        places.append(found)
    if found is None:
        raise _cifar_missing(name, places, target, None)
    try:
        x_tr, y_tr, x_te, y_te = read(found)
    except DatasetCorruptError:
        if not (download and found == target / folder):
            raise
        # a download or extraction killed half-way: torchvision checks every file's MD5 and
        # extracts the (verified) archive again, fetching it anew only if it is bad too
        fetch()
        x_tr, y_tr, x_te, y_te = read(found)
    for y in (y_tr, y_te):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_cls):
            raise DatasetCorruptError(name, [str(found)], ["replace the folder"],
                                      reason=f"{name} labels outside 0..{n_cls - 1} in {found}")
    classes = [str(i) for i in range(n_cls)]
    if (found / meta).is_file():
        try:
            with open(found / meta, "rb") as f:
                m = _str_keys(_SafeUnpickler(f, encoding="latin1").load())
            got = [c.decode() if isinstance(c, bytes) else str(c) for c in m[names_key]]
            if len(got) == n_cls:
                classes = got
        except Exception:  # noqa: BLE001 - class names are a nicety; labels are what count
            pass
    size = image_size or 32
    mean, std = STATS[name]
    return RawData(TensorSource(resize_images(x_tr, size)), y_tr,
                   TensorSource(resize_images(x_te, size)), y_te, classes, mean, std, 3, size,
                   str(found))


def _cifar_missing(name, places, target, reason) -> DatasetNotFoundError:
    folder, train_files, test_files, *_ = _CIFAR_LAYOUT[name]
    return DatasetNotFoundError(name, places, [
        _data_dir_hint(f"DIR/{folder}/ (or DIR itself) holds "
                       f"{', '.join(train_files + test_files)}"),
        f"pass --download (Python: download=True) to fetch {CIFAR_URLS[name]} with torchvision "
        f"into {target}",
        f"or download and extract {CIFAR_URLS[name]} yourself",
    ], reason=reason)


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet
# --------------------------------------------------------------------------------------------

def _safe_extract_zip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        dest_resolved = dest.resolve()
        for member in zf.namelist():
            if not (dest / member).resolve().is_relative_to(dest_resolved):
                raise RuntimeError(f"refusing to extract {member!r} outside {dest}")
        zf.extractall(dest)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _remove_stale(root: Path, pattern: str) -> None:
    """Removes the ``<name>.<pid>`` leftovers of processes that no longer run (a killed download
    or extraction); those of running processes (another torchrun rank) are left alone."""
    for p in root.glob(pattern):
        pid = p.name.rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def download_tiny_imagenet(root: str | Path, url: str = TINY_IMAGENET_URL,
                           md5: str | None = TINY_IMAGENET_MD5) -> Path:
    """Download the official tiny-imagenet-200.zip (~237 MB) into ``root`` and extract it;
    returns ``root/tiny-imagenet-200``.

    The archive must have the official MD5 (``md5``; None skips the check): one that does not
    (truncated, altered) is moved aside to ``*.zip.bad`` and reported, so the next call fetches it
    anew. Extraction goes into a hidden temporary folder renamed into place when complete, so a
    killed extraction never leaves a partial ``tiny-imagenet-200`` that would be read as the
    dataset. Temporary names carry the process id, so ranks started together by torchrun do not
    write into each other's files."""
    from tqdm import tqdm

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "tiny-imagenet-200.zip"
    dest = root / "tiny-imagenet-200"
    _remove_stale(root, "tiny-imagenet-200.zip.part.*")
    _remove_stale(root, ".tiny-imagenet-200.partial.*")
    if not archive.is_file():
        part = root / f"tiny-imagenet-200.zip.part.{os.getpid()}"
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="tiny-imagenet-200") as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
        part.replace(archive)  # atomic: another process's complete copy is the same file
    if md5 is not None:
        got = _md5(archive)
        if got != md5:
            bad = archive.with_suffix(".zip.bad")
            archive.replace(bad)
            raise DatasetCorruptError(
                "tiny-imagenet", [str(bad)], ["pass --download again to fetch it anew"],
                reason=f"{archive} has MD5 {got}, not the official {md5} (a truncated or altered "
                       f"download); it was moved to {bad.name}")
    if (dest / "wnids.txt").is_file():  # another process finished first
        return dest
    if dest.exists():
        raise DatasetCorruptError(
            "tiny-imagenet", [str(dest)], [f"delete {dest} and pass --download again"],
            reason=f"{dest} exists but holds no wnids.txt (an incomplete extraction?)")
    tmp = root / f".tiny-imagenet-200.partial.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _safe_extract_zip(archive, tmp)
        inner = tmp / "tiny-imagenet-200"
        if not (inner / "wnids.txt").is_file():
            raise DatasetCorruptError("tiny-imagenet", [str(archive)], ["pass --download again"],
                                      reason=f"{archive} holds no tiny-imagenet-200/wnids.txt")
        try:
            inner.rename(dest)
        except OSError:
            if not (dest / "wnids.txt").is_file():  # not another process's complete extraction
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _tiny_listing(folder: Path) -> tuple[list[str], list[Path], list[int], list[Path], list[int]]:
    hints = ["replace the folder (e.g. delete it and pass --download)"]
    wnids_file = folder / "wnids.txt"
    wnids = [w.strip() for w in wnids_file.read_text().split() if w.strip()]
    if not wnids:
        raise DatasetCorruptError("tiny-imagenet", [str(wnids_file)], hints,
                                  reason=f"{wnids_file} lists no classes")
    index = {w: i for i, w in enumerate(wnids)}
    train_paths, train_targets, empty = [], [], []
    for w in wnids:
        imgs = sorted((folder / "train" / w / "images").glob("*.JPEG"))
        if not imgs:
            empty.append(w)
        train_paths += imgs
        train_targets += [index[w]] * len(imgs)
    if empty:  # e.g. an extraction that was killed: never train on a silent subset of the classes
        raise DatasetCorruptError(
            "tiny-imagenet", [str(folder / "train" / w / "images") for w in empty[:5]], hints,
            reason=f"Tiny-ImageNet folder {folder} is incomplete: {len(empty)} of the {len(wnids)} "
                   f"classes in wnids.txt have no training images ({', '.join(empty[:5])}"
                   f"{' ...' if len(empty) > 5 else ''})")
    ann = folder / "val" / "val_annotations.txt"
    if not ann.is_file():
        raise DatasetCorruptError("tiny-imagenet", [str(ann)], hints,
                                  reason=f"Tiny-ImageNet folder {folder} has no {ann.name}")
    test_paths, test_targets = [], []
    for line in ann.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        fname, wnid = parts[0].strip(), parts[1].strip()
        if wnid not in index:
            raise DatasetCorruptError("tiny-imagenet", [str(ann)], hints,
                                      reason=f"{ann} names class {wnid!r}, not in wnids.txt")
        test_paths.append(folder / "val" / "images" / fname)
        test_targets.append(index[wnid])
    missing = [p for p in test_paths if not p.is_file()]
    if missing:  # found now, not when the first evaluation reaches them
        raise DatasetCorruptError(
            "tiny-imagenet", [str(p) for p in missing[:5]], hints,
            reason=f"Tiny-ImageNet folder {folder} is incomplete: {len(missing)} of the "
                   f"{len(test_paths)} validation images in {ann.name} are missing "
                   f"({', '.join(p.name for p in missing[:5])}{' ...' if len(missing) > 5 else ''})")
    if not train_paths or not test_paths:
        raise DatasetCorruptError("tiny-imagenet", [str(folder)], hints,
                                  reason=f"Tiny-ImageNet folder {folder} holds "
                                         f"{len(train_paths)} training and {len(test_paths)} "
                                         "validation images")
    return wnids, train_paths, train_targets, test_paths, test_targets


def load_tiny_imagenet(root: str | Path | None = None, download: bool = False,
                       image_size: int | None = None, in_memory: bool = False) -> RawData:
    """Tiny-ImageNet-200 (64x64, 200 classes): train/<wnid>/images/*.JPEG for training and the
    official validation set (val/images + val/val_annotations.txt) as the test set, since the
    test labels are not public. Classes are numbered in wnids.txt order. Images are read from
    disk per item unless ``in_memory`` (about 1.2 GB as uint8 at 64x64)."""
    places = _candidates(search_roots(root), ["tiny-imagenet-200", ""])
    found = next((p for p in places if (p / "wnids.txt").is_file()), None)
    target = download_dir(root)
    if found is None and download:
        try:
            found = download_tiny_imagenet(target)
        except DatasetNotFoundError:  # a bad archive or folder: its own message says what to do
            raise
        except Exception as exc:  # noqa: BLE001
            raise _tiny_missing(places, target, f"downloading {TINY_IMAGENET_URL} into {target} "
                                                f"failed ({type(exc).__name__}: {exc}).") from exc
        places.append(found)
    if found is None:
        raise _tiny_missing(places, target, None)
    wnids, tr_paths, tr_y, te_paths, te_y = _tiny_listing(found)
    names = {}
    words = found / "words.txt"
    if words.is_file():
        for line in words.read_text(errors="replace").splitlines():
            w, _, label = line.partition("\t")
            names[w.strip()] = label.strip()
    classes = [names.get(w, w) for w in wnids]
    size = image_size or 64
    train, test = FileSource(tr_paths, 3), FileSource(te_paths, 3)
    if in_memory:
        train, test = TensorSource(train.load_all(size)), TensorSource(test.load_all(size))
    mean, std = STATS["tiny-imagenet"]
    return RawData(train, torch.tensor(tr_y, dtype=torch.int64), test,
                   torch.tensor(te_y, dtype=torch.int64), classes, mean, std, 3, size, str(found))


def _tiny_missing(places, target, reason) -> DatasetNotFoundError:
    return DatasetNotFoundError("tiny-imagenet", places, [
        _data_dir_hint("DIR/tiny-imagenet-200/ (or DIR itself) holds wnids.txt, "
                       "train/<wnid>/images/*.JPEG and val/val_annotations.txt"),
        f"pass --download (Python: download=True) to fetch {TINY_IMAGENET_URL} (~237 MB) "
        f"into {target}",
    ], reason=reason)


# --------------------------------------------------------------------------------------------
# ImageFolder
# --------------------------------------------------------------------------------------------

def _check_image_file(path: str) -> None:
    """Raises if the image at ``path`` cannot be read whole. PIL's verify checks a PNG through its
    last chunk's CRC, but reads no JPEG scan data: a JPEG must also end with its end-of-image
    marker, and one that does not (cut off, or with bytes after it) is decoded at 1/8 scale to
    decide. Other formats are decoded."""
    from PIL import Image

    with Image.open(path) as im:
        fmt = im.format
        im.verify()
    if fmt == "PNG":
        return
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 2))
            if f.read(2) == b"\xff\xd9":
                return
    with Image.open(path) as im:  # verify leaves the image unusable: open it again
        if fmt == "JPEG":
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()


def _drop_unreadable(paths: list[str], labels: list[int]) -> tuple[list[str], list[int]]:
    """Checks every image file up front (:func:`_check_image_file`) so that a corrupt or truncated
    file is reported now, with its name, rather than after an epoch; such files are skipped with
    one warning."""
    import warnings

    from PIL import Image

    keep_p, keep_y, bad = [], [], []
    for p, y in zip(paths, labels):
        try:
            _check_image_file(p)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for a bad file
            bad.append(f"{p} ({type(exc).__name__})")
            continue
        keep_p.append(p)
        keep_y.append(y)
    if bad:
        warnings.warn(f"skipping {len(bad)} unreadable image(s): {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}",
                      RuntimeWarning, stacklevel=3)
    return keep_p, keep_y


def load_image_folder(path: str | Path, image_size: int | None = None,
                      test_fraction: float = 0.2, channels: int = 3,
                      in_memory: bool = False) -> RawData:
    """A torchvision ImageFolder tree (``class_name/*.ext``). If ``path`` has ``train/`` and
    ``val/`` or ``test/`` subfolders those are the splits; otherwise ``test_fraction`` of the
    images (fixed seed 0) form the test set."""
    from torchvision.datasets import ImageFolder

    path = Path(path).expanduser()
    hints = ["pass imagefolder:DIR where DIR holds one folder per class (or train/ and val/ "
             "each holding one folder per class)"]
    if not path.is_dir():
        raise DatasetNotFoundError(f"imagefolder:{path}", [str(path)], hints)

    def scan(folder: Path) -> ImageFolder:
        try:
            return ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DatasetNotFoundError(f"imagefolder:{path}", [str(folder)], hints,
                                       reason=f"no images found under {folder}: {exc}") from exc

    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        tr, te = scan(path / "train"), scan(test_dir)
        if tr.classes != te.classes:
            raise DatasetCorruptError(f"imagefolder:{path}", [str(path / "train"), str(test_dir)],
                                      hints, reason="train and test folders have different classes")
        classes = tr.classes
        tr_paths, tr_y = [p for p, _ in tr.samples], [y for _, y in tr.samples]
        te_paths, te_y = [p for p, _ in te.samples], [y for _, y in te.samples]
    else:
        full = scan(path)
        classes = full.classes
        keep, held = split_indices(len(full.samples), test_fraction, seed=0)
        tr_paths = [full.samples[i][0] for i in keep]
        tr_y = [full.samples[i][1] for i in keep]
        te_paths = [full.samples[i][0] for i in held]
        te_y = [full.samples[i][1] for i in held]
    tr_paths, tr_y = _drop_unreadable(tr_paths, tr_y)
    te_paths, te_y = _drop_unreadable(te_paths, te_y)
    if not tr_paths or not te_paths:
        raise DatasetCorruptError(f"imagefolder:{path}", [str(path)], hints,
                                  reason="no readable image left in the train or test split")
    size = image_size or 32
    train, test = FileSource(tr_paths, channels), FileSource(te_paths, channels)
    if in_memory:
        train, test = TensorSource(train.load_all(size)), TensorSource(test.load_all(size))
    mean, std = STATS["imagenet"] if channels == 3 else ((0.5,), (0.5,))
    return RawData(train, torch.tensor(tr_y, dtype=torch.int64), test,
                   torch.tensor(te_y, dtype=torch.int64), list(classes), mean, std, channels,
                   size, str(path))

