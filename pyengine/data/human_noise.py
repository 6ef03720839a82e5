"""Human-annotated noisy labels read from a file (CIFAR-10N / CIFAR-100N style, Wei et al., ICLR 2022).

The CIFAR-N release is a ``torch.save``'d dict of NumPy arrays, one array per annotation
(CIFAR-100N: ``clean_label``, ``noisy_label``; CIFAR-10N: ``clean_label``, ``aggre_label``,
``worse_label``, ``random_label1..3``), in the order of the official training set. It is read
with ``torch.load(weights_only=True)`` and only NumPy's array-rebuilding functions allowed, so no
code from the file runs. Also read: ``.npy``, ``.npz``, ``.json`` (a list, or a dict of lists) and
``.csv`` / ``.txt`` (one label per line, or a column named by ``key`` under a header).

    labels = read_label_file("CIFAR-100_human.pt", key="noisy_label")
    noisy = apply_label_file(bundle.train, labels)     # in place: loaders already built see it
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from pyengine._io import error_line
from pyengine.data.core import ImageDataset

__all__ = ["read_label_file", "apply_label_file", "parse_label_spec", "DEFAULT_KEYS"]

#: the annotation taken when a file holds several and no key is given (CIFAR-100N's, then CIFAR-10N's worst)
DEFAULT_KEYS = ("noisy_label", "worse_label")


def parse_label_spec(spec: str) -> tuple[Path, str | None]:
    """``FILE`` or ``FILE:KEY`` -> (path, key). A colon that is part of an existing path is kept."""
    if Path(spec).exists() or ":" not in spec:
        return Path(spec), None
    path, key = spec.rsplit(":", 1)
    return Path(path), (key or None)


def _numpy_safe_globals() -> list:
    """The NumPy callables a pickled array needs, under the names old and new NumPy pickles use."""
    core = getattr(np, "_core", None) or np.core
    rebuild = core.multiarray._reconstruct
    out = [rebuild, (rebuild, "numpy.core.multiarray._reconstruct"), (rebuild, "numpy._core.multiarray._reconstruct"),
           np.ndarray, np.dtype]
    for t in (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64):
        out.append(type(np.dtype(t)))
    scalar = getattr(core.multiarray, "scalar", None)
    if scalar is not None:
        out += [scalar, (scalar, "numpy.core.multiarray.scalar")]
    return out


def _load_torch(path: Path):
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - every unreadable file gets the same clear error
            raise ValueError(f"labels file {path}: not readable as a label array/dict without running code "
                             f"({error_line(exc)})") from None


def _pick(data: dict, key: str | None, path: Path):
    if key is not None:
        if key not in data:
            raise KeyError(f"labels file {path} has no key {key!r}; it holds {sorted(map(str, data))}")
        return data[key]
    for k in DEFAULT_KEYS:
        if k in data:
            return data[k]
    if len(data) == 1:
        return next(iter(data.values()))
    raise KeyError(f"labels file {path} holds several label sets {sorted(map(str, data))}; name one as FILE:KEY")


def _read_text(path: Path, key: str | None) -> list:
    rows = [r for r in csv.reader(path.read_text().splitlines()) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"labels file {path} is empty")
    head = [c.strip() for c in rows[0]]
    try:
        [int(c) for c in head]
        header = None
    except ValueError:
        header = head
        rows = rows[1:]
    if header is not None:
        col = header.index(key) if key in header else (0 if key is None and len(header) == 1 else None)
        if col is None:
            raise KeyError(f"labels file {path} has columns {header}; name one as FILE:KEY")
        return [r[col].strip() for r in rows]
    if key is not None:
        raise KeyError(f"labels file {path} has no header, so no column {key!r}")
    if len(rows) == 1:  # one line of comma-separated labels
        return [c.strip() for c in rows[0] if c.strip()]
    return [r[0].strip() for r in rows]


def read_label_file(path: str | Path, key: str | None = None) -> torch.Tensor:
    """The labels in ``path`` as an int64 tensor (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        data = _load_torch(path)
        arr = _pick(data, key, path) if isinstance(data, dict) else data
    elif suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arr = _pick({k: z[k] for k in z.files}, key, path)
    elif suffix == ".json":
        data = json.loads(path.read_text())
        arr = _pick(data, key, path) if isinstance(data, dict) else data
    elif suffix in (".csv", ".txt", ""):
        arr = _read_text(path, key)
    else:
        raise ValueError(f"labels file {path}: unknown format {suffix!r}; use .pt (CIFAR-N), .npy, .npz, .json, "
                         ".csv or .txt")
    try:
        out = torch.as_tensor(np.asarray(arr, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"labels file {path}: labels must be integers ({exc})") from None
    if out.dim() != 1:
        raise ValueError(f"labels file {path}: expected one label per sample, got an array of shape {tuple(out.shape)}")
    if out.numel() and not bool((out == out.round()).all()):
        raise ValueError(f"labels file {path}: labels must be integers")
    return out.to(torch.int64)


def apply_label_file(dataset: ImageDataset, labels: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Replace ``dataset``'s training labels by ``labels`` **in place** (loaders built on it, and
    datasets made from it with ``with_transform``, share its target tensor and see the change).

    ``labels`` is indexed like the dataset's source (the official training set, before any
    validation split) or, when it has exactly ``len(dataset)`` entries, like the dataset itself.
    ``clean_targets`` stays the original labels; ``noisy_indices`` becomes the positions whose
    label differs from it. Returns those positions.
    """
    labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    n_source = len(dataset.source)
    if labels.numel() == n_source:
        new = labels[dataset.indices]
    elif labels.numel() == len(dataset):
        new = labels
    else:
        raise ValueError(f"the labels file has {labels.numel()} labels, but the training set has {n_source} images "
                         f"({len(dataset)} after the validation split)")
    if num_classes is not None and new.numel() and (int(new.min()) < 0 or int(new.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), the file has [{int(new.min())}, {int(new.max())}]")
    dataset.targets.copy_(new)
    noisy = (dataset.targets != dataset.clean_targets).nonzero().flatten()
    dataset.noisy_indices = noisy
    return noisy
