"""Loads the native library ``pyengine._C`` and says which devices it serves.

Without a built extension every op still works through its pure-PyTorch reference; a single
warning says so and how to build the extension.
"""
from __future__ import annotations

import warnings

import torch

_C = None
_IMPORT_ERROR: Exception | None = None
try:  # the import registers the torch.ops.pyengine.* operators
    from pyengine import _C  # type: ignore[attr-defined, no-redef]
except ImportError as exc:  # pragma: no cover - exercised only without a build
    _IMPORT_ERROR = exc

HAS_NATIVE: bool = _C is not None
CUDA_COMPILED: bool = bool(_C.cuda_compiled()) if _C is not None else False

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(set PYENGINE_CUDA=0 for a CPU-only build, CUDA_HOME to pick a toolkit)"
)

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def native_available(device: torch.device) -> bool:
    """True when ``pyengine._C`` has a kernel for tensors on ``device``.

    When it has none, a warning is issued once and callers use the pure-PyTorch reference.
    """
    if device.type == "cpu" and HAS_NATIVE:
        return True
    if device.type == "cuda" and CUDA_COMPILED:
        return True
    if not HAS_NATIVE:
        _warn_once(
            "no-native",
            f"pyengine._C is not built ({_IMPORT_ERROR}); using the pure-PyTorch reference ops, "
            f"which are slower. To get the native kernels, {BUILD_HINT}.",
        )
    else:
        _warn_once(
            f"no-{device.type}",
            f"pyengine._C was built without {device.type.upper()} kernels; using the pure-PyTorch "
            f"reference ops on {device.type}. To get them, rebuild where the toolkit is present: "
            f"{BUILD_HINT}.",
        )
    return False


def _device_index(device) -> int:
    if device is None:
        return torch.cuda.current_device()
    d = torch.device(device)
    if d.type != "cuda":
        raise ValueError(f"device must be a CUDA device, got {d}")
    return d.index if d.index is not None else torch.cuda.current_device()


def check_device_errors(device=None) -> None:
    """Raises the index error a CUDA kernel found since the last check (ValueError), if any.

    pyengine's CUDA kernels check the indices they read from user data (the column indices and row
    pointers of a packed weight, the winning directions of sliced Wasserstein) on the device,
    without a host sync: a bad entry is skipped, never followed, and recorded. The record is
    raised by the next pyengine CUDA call, or here - after synchronising ``device`` (default: the
    current CUDA device). Without CUDA kernels or a GPU this does nothing.
    """
    if not CUDA_COMPILED or not torch.cuda.is_available():
        return
    msg = _C.take_device_error(_device_index(device), True)
    if msg:
        raise ValueError(msg)


def masked_cache_info() -> dict:
    """State of the CUDA masked-weight cache of masked_linear: entries, bytes, hits, misses and
    limit_bytes (environment variable PYENGINE_MASKED_CACHE_MB, default 1024; 0 turns it off).
    All zero without CUDA kernels."""
    if _C is None:
        return {"entries": 0, "bytes": 0, "hits": 0, "misses": 0, "limit_bytes": 0}
    return dict(_C.masked_cache_info())


def masked_cache_clear() -> int:
    """Drops every cached masked weight (W * M) of masked_linear on CUDA; returns the bytes freed.

    A cached W * M is reused while W's storage, strides and version and the mask are unchanged.
    In-place ops on W move its version on; a write through ``W.data`` does not (``.data`` has a
    version counter of its own), so call this after one (or write through ``W.detach()``)."""
    return int(_C.masked_cache_clear()) if _C is not None else 0


def cpu_cache_info() -> dict:
    """State of the pool that recycles large CPU outputs of the backward kernels.

    Keys: idle_bytes and idle_blocks (memory kept for reuse), live_bytes (pooled outputs still
    alive), hits and misses (requests served from the pool or freshly allocated). All zero
    without the native extension. Capped by the environment variable PYENGINE_CPU_POOL_MB
    (default 512; 0 turns the pool off).
    """
    if _C is None:
        return {"idle_bytes": 0, "idle_blocks": 0, "live_bytes": 0, "hits": 0, "misses": 0}
    return dict(_C.cpu_pool_stats())


def empty_cpu_cache() -> int:
    """Frees the idle blocks of that pool (like ``torch.cuda.empty_cache``); returns the bytes freed."""
    return int(_C.cpu_pool_release()) if _C is not None else 0
