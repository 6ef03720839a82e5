"""Argument checks shared by the op wrappers: each raises a clear error naming the argument."""
from __future__ import annotations

import operator

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, dtypes=FLOAT_DTYPES, ndim=None, min_ndim=None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {allowed}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")


def as_int(name: str, v) -> int:
    """An integer argument (a Python or NumPy int, or a one-element integer tensor); a float such
    as 2.5 is refused rather than truncated."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {v!r} ({type(v).__name__})") from None


def same_device(a, b) -> bool:
    """Whether two devices are the same, with "cuda" meaning the current CUDA device."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    if a.type == "cuda":
        cur = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (cur if a.index is None else a.index) == (cur if b.index is None else b.index)
    return a.type == "cpu"


def nan_check_value(read, what: str, advice: str = ""):
    """``read()``: a Python value taken from a tensor for a ``check_nan`` test. Under torch.func
    transforms (vmap) a tensor's value cannot decide a Python branch: that is a ValueError saying
    to pass ``check_nan=False`` instead of torch's data-dependent-control-flow error."""
    try:
        return read()
    except RuntimeError as e:
        if not torch._C._are_functorch_transforms_active():
            raise
        raise ValueError(f"check_nan cannot {what} under torch.vmap (a data-dependent check); pass "
                         f"check_nan=False{advice}") from e


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not items:
        return
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name} is on {t.device} but {first_name} is on {first.device}; "
                "all arguments must be on the same device"
            )


def check_op_devices(op: str, **tensors) -> None:
    """check_same_device for a registered op's fake (meta) kernel, with lists of tensors: a meta
    tensor among real ones sends the call there, which must refuse it rather than return an
    uninitialised result (or do nothing, for an in-place op)."""
    flat = {}
    for name, v in tensors.items():
        if isinstance(v, (list, tuple)):
            flat.update({f"{name}[{i}]": t for i, t in enumerate(v)})
        else:
            flat[name] = v
    try:
        check_same_device(**flat)
    except ValueError as e:
        raise ValueError(f"pyengine.{op}: {e}") from None


def check_same_dtype(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but {first_name} has dtype {first.dtype}; they must match"
            )


def as_bool_mask(name: str, mask: torch.Tensor, shape) -> torch.Tensor:
    """Accepts a bool mask, or a numeric one that holds only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but must match the weight's {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real, got {mask.dtype}")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be binary (only 0 and 1), but holds other values")
    return mask != 0
