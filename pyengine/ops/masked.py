"""Masked linear, packed sparse linear and the fused mask-upkeep op.

Semantics (each native kernel must equal its reference here):

* ``masked_linear(x, W, M, b) = x @ (W * M)^T + b`` for x of shape (..., K), W (N, K), M a
  bool (or 0/1) mask of W's shape. Backward: dx = dy (W*M), dW = (dy^T x) * M, db = sum dy.
  The native kernels process W in row tiles, so no W-sized masked copy is ever made.
* ``pack_sparse(W)`` stores the nonzeros of W (N, K) row by row (CSR): int32 row pointers,
  int16 column indices when K < 32768 (int32 otherwise) and the values in W's dtype.
  ``sparse_linear(x, packed, b) = x @ W^T + b`` touches only the stored nonzeros. Inference
  only: it has no autograd.
* ``pack_sparse(W, format="bitmap")`` stores W in tiles of 16 rows x 64 columns: one bit per
  entry (int32 words, 32 per tile: word 2r + h is row r of the tile, bit j column 32h + j), the
  count of values stored before each tile, and the nonzeros tile by tile in bit order. On a GPU
  (float16 / bfloat16, up to 64 rows of x) each tile is expanded in shared memory and multiplied
  as a dense block on tensor cores ("load as sparse, compute as dense").
* ``apply_masks_(tensors, masks, mask_index)`` sets ``tensors[i][~masks[mask_index[i]]] = 0``
  for all i in one call (weights, their gradients and optimiser buffers share a layer's mask).
  Zeroing (not multiplying) keeps pruned entries exactly 0 even where a value is inf or NaN.

Convolutions are pruned through ``apply_masks_``: a conv's weight, gradient and momentum are
re-masked after every optimiser step, so the pruned weights stay exactly zero and the ordinary
cuDNN/oneDNN convolution computes the masked result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from pyengine import _native
from pyengine.ops._checks import (
    as_bool_mask,
    as_int,
    check_op_devices,
    check_same_device,
    check_same_dtype,
    check_tensor,
)

# --------------------------------------------------------------------------- references


def masked_linear_reference(x, weight, mask, bias=None):
    return F.linear(x, weight * mask.to(weight.dtype), bias)


def sparse_linear_reference(x, dense_weight, bias=None):
    return F.linear(x, dense_weight, bias)


def apply_masks_reference(tensors, masks, mask_index):
    for t, i in zip(tensors, mask_index):
        t.masked_fill_(~masks[i], 0)


# --------------------------------------------------------------------------- masked linear


def masked_linear(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias=None) -> torch.Tensor:
    """``x @ (weight * mask)^T + bias`` without materialising ``weight * mask``.

    x: (..., K); weight: (N, K); mask: bool or 0/1 of weight's shape; bias: (N,) or None.
    Differentiable in x, weight (gradient masked) and bias. Under torch.func transforms (grad,
    jacrev, vmap, ...) it computes through :func:`masked_linear_reference` (W * M is materialised).
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")
    check_same_device(x=x, weight=weight, mask=mask, bias=bias)
    check_same_dtype(x=x, weight=weight, bias=bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension but weight expects {weight.shape[1]}"
        )
    mask = as_bool_mask("mask", mask, weight.shape)
    # torch.func transforms (grad, vmap, jacrev, ...) cannot run the op's registered autograd (torch
    # raised a confusing "must override the setup_context staticmethod"): they get the reference
    if not _native.native_available(x.device) or torch._C._are_functorch_transforms_active():
        return masked_linear_reference(x, weight, mask, bias)
    lead = x.shape[:-1]
    y = torch.ops.pyengine.masked_linear(x.reshape(math.prod(lead), x.shape[-1]), weight, mask, bias)
    return y.reshape(*lead, weight.shape[0])


# --------------------------------------------------------------------------- sparse linear


_INDEX_DTYPES = (torch.int16, torch.int32)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index of the first True in a 1-D bool tensor, or its length: a 0-dim tensor (no sync)."""
    n = mask.numel()
    idx = torch.arange(n, device=mask.device)
    return torch.where(mask, idx, torch.full_like(idx, n)).min() if n else torch.zeros((), dtype=torch.int64, device=mask.device)


class _Packed:
    """What both packed formats share: the stored entries, density and bytes."""

    _fields: tuple[str, ...] = ()

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        n, k = self.shape
        return self.nnz / max(1, n * k)

    def nbytes(self) -> int:
        return sum(getattr(self, f).numel() * getattr(self, f).element_size() for f in self._fields)

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to(self, device=None, dtype: torch.dtype | None = None):
        """A copy on ``device`` with values of ``dtype`` (the indices keep theirs), checked again
        as at construction: ``pack_sparse(W).to("cuda", torch.bfloat16)``."""
        if isinstance(device, torch.dtype) and dtype is None:  # .to(torch.float16), as tensors take it
            device, dtype = None, device
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"{type(self).__name__}.to: dtype must be a floating torch.dtype, got {dtype!r}")
        dev = torch.device(device) if device is not None else self.device
        moved = {f: getattr(self, f).to(dev) for f in self._fields}
        moved["values"] = moved["values"].to(dtype) if dtype is not None else moved["values"]
        return replace(self, **moved)


def _check_fields(packed, *names: str) -> tuple[int, int]:
    """The checks both packed formats share: 1-D tensor fields and a (out, in) shape, normalised
    to two ints in place. Returns the shape."""
    cls = type(packed).__name__
    for name in names:
        t = getattr(packed, name)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{cls}.{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{cls}.{name} must be 1-D, got shape {tuple(t.shape)}")
    try:
        n, k = (as_int(f"{cls}.shape", v) for v in packed.shape)  # 6.5 or "8" are refused, not truncated
    except (TypeError, ValueError):
        raise TypeError(f"{cls}.shape must be (out_features, in_features), two integers; got {packed.shape!r}") from None
    if n < 0 or k < 0 or len(tuple(packed.shape)) != 2:
        raise ValueError(f"{cls}.shape must be two sizes >= 0, got {packed.shape!r}")
    object.__setattr__(packed, "shape", (n, k))
    return n, k


@dataclass(frozen=True)
class PackedWeight(_Packed):
    """A weight matrix (out_features, in_features) stored as CSR with narrow column indices.

    Checked when constructed (pack_sparse's output too), so a kernel never follows a bad index:
    rowptr is int32 [N + 1], starts at 0, never decreases and ends at nnz; colidx is int16
    (in_features <= 32768) or int32 with every entry in [0, in_features) and strictly ascending
    within a row; values is floating [nnz]; all three on one device. On CUDA the check costs one
    or two host syncs, at construction only. The kernels check the indices again as they read them
    (on CUDA on the device, reported by the next pyengine call or ``check_device_errors()``), so
    tensors edited in place afterwards cannot crash them either.
    """

    rowptr: torch.Tensor
    colidx: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    _fields = ("rowptr", "colidx", "values")

    def __post_init__(self):
        rowptr, colidx, values = self.rowptr, self.colidx, self.values
        n, k = _check_fields(self, *self._fields)
        if rowptr.dtype != torch.int32:
            raise TypeError(f"PackedWeight.rowptr has dtype {rowptr.dtype}; expected int32")
        if colidx.dtype not in _INDEX_DTYPES:
            raise TypeError(f"PackedWeight.colidx has dtype {colidx.dtype}; expected int16 or int32")
        if colidx.dtype == torch.int16 and k > 32768:
            raise ValueError(f"int16 colidx cannot address in_features = {k} (at most 32768); use int32")
        check_tensor("PackedWeight.values", values)
        check_same_device(rowptr=rowptr, colidx=colidx, values=values)
        if rowptr.numel() != n + 1:
            raise ValueError(f"PackedWeight.rowptr has {rowptr.numel()} entries but out_features = {n} needs {n + 1}")
        nnz = values.numel()
        if colidx.numel() != nnz:
            raise ValueError(f"PackedWeight.colidx holds {colidx.numel()} entries but values holds {nnz}; they must match")
        if nnz >= 2**31:
            raise ValueError("PackedWeight holds 2**31 or more entries; at most 2**31 - 1 are supported")
        rp = rowptr.long()
        # the row pointers first (one sync), then the column indices they delimit (one more)
        first, last, dec = torch.stack([rp[0], rp[-1], _first_true(rp[1:] < rp[:-1])]).tolist()
        if first != 0:
            raise ValueError(f"PackedWeight.rowptr must start at 0 but rowptr[0] is {first}")
        if dec < n:
            a, b = rp[dec].item(), rp[dec + 1].item()
            raise ValueError(f"PackedWeight.rowptr must not decrease, but rowptr[{dec + 1}] = {b} is below rowptr[{dec}] = {a}")
        if last != nnz:
            raise ValueError(f"PackedWeight.rowptr ends at {last} but colidx and values hold {nnz} entries")
        if nnz == 0:
            return
        col = colidx.long()
        bad = _first_true((col < 0) | (col >= k))
        # strictly ascending within a row: every entry that is not the first of its row
        row_start = torch.zeros(nnz + 1, dtype=torch.bool, device=col.device)
        row_start[rp[:-1]] = True
        unsorted = _first_true((col[1:] <= col[:-1]) & ~row_start[1:nnz])
        bad, unsorted = torch.stack([bad, unsorted]).tolist()
        if bad < nnz:
            raise ValueError(f"PackedWeight.colidx holds {col[bad].item()} at position {bad}, but in_features is {k}")
        if unsorted < nnz - 1:
            j = unsorted + 1
            raise ValueError(
                f"PackedWeight.colidx must ascend within each row, but position {j} holds {col[j].item()} after "
                f"{col[j - 1].item()}"
            )

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        counts = (self.rowptr[1:] - self.rowptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(n, device=self.values.device), counts)
        out = torch.zeros(n, k, dtype=self.values.dtype, device=self.values.device)
        out[rows, self.colidx.long()] = self.values
        return out


TILE_ROWS, TILE_COLS = 16, 64  # the bitmap format's tile (csrc/masked/bitmap_kernels.h)


def _popcount32(words: torch.Tensor) -> torch.Tensor:
    """Set bits of each int32 word, as int64 (SWAR arithmetic on the unsigned value)."""
    v = words.long() & 0xFFFFFFFF
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) & 0xFFFFFFFF) >> 24


def _bitmap_tiles(n: int, k: int) -> tuple[int, int]:
    return -(-n // TILE_ROWS), -(-k // TILE_COLS)


def _padding_bits(n: int, k: int, device) -> torch.Tensor:
    """(tiles * 32,) int64: the bits of each word that lie outside an (n, k) matrix."""
    nt, kt = _bitmap_tiles(n, k)
    rows = torch.arange(nt * TILE_ROWS, device=device).view(nt, 1, TILE_ROWS, 1)
    first_col = torch.arange(kt * 2, device=device).view(1, kt, 1, 2) * 32  # each word's first column
    inside = (k - first_col).clamp(0, 32)  # columns of the word inside the matrix
    col_pad = (0xFFFFFFFF ^ ((torch.ones_like(inside) << inside) - 1)) & 0xFFFFFFFF
    return torch.where(rows >= n, torch.full_like(col_pad, 0xFFFFFFFF), col_pad).reshape(-1)


@dataclass(frozen=True)
class BitmapWeight(_Packed):
    """A weight matrix (out_features, in_features) in 16 x 64 bitmap tiles (see the module doc).

    bitmap: int32 [tiles * 32]; offsets: int32 [tiles + 1], offsets[t] = values stored before tile
    t; values: floating [nnz], tile by tile, each tile in bit order. Checked when constructed:
    offsets start at 0, end at nnz and grow by exactly each tile's set bits, and no bit lies
    outside the matrix. The kernels check each tile's range again as they read it (on CUDA on the
    device), so tensors edited in place afterwards cannot crash them either.
    """

    bitmap: torch.Tensor
    offsets: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]
    _fields = ("bitmap", "offsets", "values")

    def __post_init__(self):
        bitmap, offsets, values = self.bitmap, self.offsets, self.values
        n, k = _check_fields(self, *self._fields)
        for name, t in (("bitmap", bitmap), ("offsets", offsets)):
            if t.dtype != torch.int32:
                raise TypeError(f"BitmapWeight.{name} has dtype {t.dtype}; expected int32")
        check_tensor("BitmapWeight.values", values)
        check_same_device(bitmap=bitmap, offsets=offsets, values=values)
        nt, kt = _bitmap_tiles(n, k)
        tiles = nt * kt
        if bitmap.numel() != tiles * 32:
            raise ValueError(
                f"BitmapWeight.bitmap holds {bitmap.numel()} words but a {n} x {k} weight in 16 x 64 tiles needs "
                f"{tiles * 32} (32 per tile)"
            )
        if offsets.numel() != tiles + 1:
            raise ValueError(f"BitmapWeight.offsets holds {offsets.numel()} entries but {tiles} tiles need {tiles + 1}")
        nnz = values.numel()
        if nnz >= 2**31:
            raise ValueError("BitmapWeight holds 2**31 or more values; at most 2**31 - 1 are supported")
        off = offsets.long()
        counts = _popcount32(bitmap).view(tiles, 32).sum(1) if tiles else off.new_zeros(0)
        stray = (bitmap.long() & 0xFFFFFFFF) & _padding_bits(n, k, bitmap.device)
        first, last, bad_count, bad_pad = torch.stack([
            off[0], off[-1], _first_true((off[1:] - off[:-1]) != counts), _first_true(stray != 0)
        ]).tolist()  # one sync
        if first != 0:
            raise ValueError(f"BitmapWeight.offsets must start at 0 but offsets[0] is {first}")
        if bad_count < tiles:
            t = bad_count
            a, b = off[t].item(), off[t + 1].item()
            raise ValueError(
                f"BitmapWeight tile {t} has {int(counts[t])} bits set in bitmap but offsets[{t}] = {a} and "
                f"offsets[{t + 1}] = {b} give it {b - a} values"
            )
        if last != nnz:
            raise ValueError(f"BitmapWeight.offsets ends at {last} but values holds {nnz} entries")
        if bad_pad < tiles * 32:
            raise ValueError(
                f"BitmapWeight.bitmap word {bad_pad} (tile {bad_pad // 32}) sets bits outside the {n} x {k} matrix"
            )

    def to_dense(self) -> torch.Tensor:
        n, k = self.shape
        nt, kt = _bitmap_tiles(n, k)
        shifts = torch.arange(32, dtype=torch.int32, device=self.bitmap.device)
        bits = ((self.bitmap.view(nt, kt, TILE_ROWS, 2, 1) >> shifts) & 1).bool()  # bit j of each word
        tiles = torch.zeros(nt, kt, TILE_ROWS, TILE_COLS, dtype=self.values.dtype, device=self.values.device)
        tiles[bits.view(nt, kt, TILE_ROWS, TILE_COLS)] = self.values
        return tiles.permute(0, 2, 1, 3).reshape(nt * TILE_ROWS, kt * TILE_COLS)[:n, :k].contiguous()


def _pack_bitmap(weight: torch.Tensor) -> BitmapWeight:
    """The bitmap tiles of W in plain PyTorch (any device; row tiles a few at a time)."""
    n, k = weight.shape
    nt, kt = _bitmap_tiles(n, k)
    dev = weight.device
    weights = torch.ones(32, dtype=torch.int32, device=dev) << torch.arange(32, dtype=torch.int32, device=dev)
    words, counts, values = [], [], []
    step = max(1, (1 << 22) // max(1, kt * TILE_ROWS * TILE_COLS))  # ~4M entries per chunk
    for r0 in range(0, nt, step):
        r1 = min(nt, r0 + step)
        w = weight.new_zeros((r1 - r0) * TILE_ROWS, kt * TILE_COLS)
        w[: min(n, r1 * TILE_ROWS) - r0 * TILE_ROWS, :k] = weight[r0 * TILE_ROWS : r1 * TILE_ROWS]
        tiles = w.view(r1 - r0, TILE_ROWS, kt, TILE_COLS).permute(0, 2, 1, 3).contiguous()
        nz = tiles != 0  # NaN is stored, +0 and -0 are not (as pack_sparse)
        # int32 shifts put bit 31 at -2**31, so the int64 sum is the word's signed int32 value
        words.append((nz.view(-1, 32).to(torch.int32) * weights).sum(-1).to(torch.int32))
        counts.append(nz.view(-1, TILE_ROWS * TILE_COLS).sum(1))
        values.append(tiles[nz])
    offsets = torch.zeros(nt * kt + 1, dtype=torch.int32, device=dev)
    if nt * kt:
        offsets[1:] = torch.cumsum(torch.cat(counts), 0).to(torch.int32)
    cat = lambda parts, like: torch.cat(parts) if parts else like  # noqa: E731
    return BitmapWeight(
        cat(words, torch.zeros(0, dtype=torch.int32, device=dev)),
        offsets,
        cat(values, weight.new_zeros(0)),
        (int(n), int(k)),
    )


def _pack_reference(weight):
    n, k = weight.shape
    nz = weight != 0
    counts = nz.sum(1)
    rowptr = torch.zeros(n + 1, dtype=torch.int32, device=weight.device)
    rowptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    rows, cols = nz.nonzero(as_tuple=True)
    idx_dtype = torch.int16 if k < 32768 else torch.int32
    return rowptr, cols.to(idx_dtype), weight[rows, cols]


def pack_sparse(weight: torch.Tensor, format: str = "csr") -> PackedWeight | BitmapWeight:
    """Packs the nonzeros of a 2-D weight for :func:`sparse_linear`.

    format: "csr" (row pointers, 16-bit column indices where they fit) or "bitmap" (16 x 64 bit
    tiles; the tensor-core path for float16 / bfloat16 on a GPU).
    """
    check_tensor("weight", weight, ndim=2)
    if format not in ("csr", "bitmap"):
        raise ValueError(f"format must be 'csr' or 'bitmap', got {format!r}")
    if weight.numel() >= 2**31:
        raise ValueError("weight has 2**31 or more entries; pack_sparse supports fewer")
    w = weight.detach()
    if format == "bitmap":
        return _pack_bitmap(w)
    if _native.native_available(w.device):
        rowptr, colidx, values = torch.ops.pyengine.pack_sparse(w)
    else:
        rowptr, colidx, values = _pack_reference(w)
    return PackedWeight(rowptr, colidx, values, (int(w.shape[0]), int(w.shape[1])))


def sparse_linear(x: torch.Tensor, packed: PackedWeight | BitmapWeight, bias=None) -> torch.Tensor:
    """``x @ W^T + bias`` with W given packed by :func:`pack_sparse` (either format). Inference only."""
    if not isinstance(packed, (PackedWeight, BitmapWeight)):
        raise TypeError(
            f"packed must be a PackedWeight or BitmapWeight from pack_sparse, got {type(packed).__name__}"
        )
    n, k = packed.shape
    check_tensor("x", x, min_ndim=1)
    check_same_device(x=x, values=packed.values, bias=bias)
    check_same_dtype(x=x, values=packed.values, bias=bias)
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dimension but the packed weight expects {k}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and (x.requires_grad or packed.values.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        which = [n for n, t in (("x", x), ("the packed values", packed.values), ("bias", bias))
                 if t is not None and t.requires_grad]
        raise RuntimeError(f"sparse_linear is an inference op with no autograd, but {' and '.join(which)} "
                           "require(s) grad; call it under torch.no_grad() or torch.inference_mode()")
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), k)
    if not _native.native_available(x.device):
        y = sparse_linear_reference(x2, packed.to_dense(), bias)
    elif isinstance(packed, BitmapWeight):
        y = torch.ops.pyengine.sparse_linear_bitmap(x2, packed.bitmap, packed.offsets, packed.values, n, bias)
    else:
        y = torch.ops.pyengine.sparse_linear(x2, packed.rowptr, packed.colidx, packed.values, k, bias)
    return y.reshape(*lead, n)


# --------------------------------------------------------------------------- mask upkeep


def apply_masks_(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], mask_index=None) -> None:
    """Zeroes the pruned entries of many tensors in one call.

    tensors[i] is masked by masks[mask_index[i]] (default: mask_index[i] = i). Masks are bool
    tensors of the same shape and device as the tensors they mask. Works in place.
    """
    tensors = list(tensors)
    masks = list(masks)
    if mask_index is None:
        if len(tensors) != len(masks):
            raise ValueError(
                f"got {len(tensors)} tensors and {len(masks)} masks; pass mask_index to share masks"
            )
        mask_index = list(range(len(tensors)))
    mask_index = [as_int(f"mask_index[{j}]", i) for j, i in enumerate(mask_index)]  # 0.7 is refused, not truncated
    if len(mask_index) != len(tensors):
        raise ValueError(f"mask_index has {len(mask_index)} entries for {len(tensors)} tensors")
    if not tensors:
        return
    for j, m in enumerate(masks):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError(f"masks[{j}] must be a bool tensor")
    for i, (t, mi) in enumerate(zip(tensors, mask_index)):
        check_tensor(f"tensors[{i}]", t)
        if not 0 <= mi < len(masks):
            raise IndexError(f"mask_index[{i}] = {mi} is out of range for {len(masks)} masks")
        m = masks[mi]
        if m.shape != t.shape:
            raise ValueError(f"tensors[{i}] has shape {tuple(t.shape)} but masks[{mi}] has {tuple(m.shape)}")
        if m.device != t.device:
            raise ValueError(f"tensors[{i}] is on {t.device} but masks[{mi}] is on {m.device}")
        if not t.is_contiguous() or not m.is_contiguous():
            raise ValueError(f"tensors[{i}] and masks[{mi}] must be contiguous")
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("all tensors passed to apply_masks_ must be on one device")
    if _native.native_available(device):
        torch.ops.pyengine.apply_masks_(tensors, masks, mask_index)
    else:
        with torch.no_grad():
            apply_masks_reference(tensors, masks, mask_index)


# --------------------------------------------------------------------------- registration

if _native.HAS_NATIVE:

    @torch.library.register_fake("pyengine::masked_linear")
    def _masked_linear_fake(x, weight, mask, bias):
        check_op_devices("masked_linear", x=x, weight=weight, mask=mask, bias=bias)
        return x.new_empty((x.shape[0], weight.shape[0]))

    @torch.library.register_fake("pyengine::masked_linear_backward")
    def _masked_linear_backward_fake(grad_out, x, weight, mask, need_x, need_w, need_b):
        check_op_devices("masked_linear_backward", grad_out=grad_out, x=x, weight=weight, mask=mask)
        dx = x.new_empty(x.shape) if need_x else x.new_empty((0,))
        dw = weight.new_empty(weight.shape) if need_w else weight.new_empty((0,))
        db = weight.new_empty((weight.shape[0],)) if need_b else weight.new_empty((0,))
        return dx, dw, db

    @torch.library.register_fake("pyengine::pack_sparse")
    def _pack_sparse_fake(weight):
        ctx = torch.library.get_ctx()
        nnz = ctx.new_dynamic_size()
        n, k = weight.shape
        idx_dtype = torch.int16 if k < 32768 else torch.int32
        return (
            weight.new_empty((n + 1,), dtype=torch.int32),
            weight.new_empty((nnz,), dtype=idx_dtype),
            weight.new_empty((nnz,)),
        )

    @torch.library.register_fake("pyengine::sparse_linear")
    def _sparse_linear_fake(x, rowptr, colidx, values, in_features, bias):
        check_op_devices("sparse_linear", x=x, rowptr=rowptr, colidx=colidx, values=values, bias=bias)
        return x.new_empty((x.shape[0], rowptr.shape[0] - 1))

    @torch.library.register_fake("pyengine::sparse_linear_bitmap")
    def _sparse_linear_bitmap_fake(x, bitmap, offsets, values, out_features, bias):
        check_op_devices("sparse_linear_bitmap", x=x, bitmap=bitmap, offsets=offsets, values=values, bias=bias)
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("pyengine::apply_masks_")
    def _apply_masks_fake(tensors, masks, mask_index):
        check_op_devices("apply_masks_", tensors=tensors, masks=masks)
        return None

    def _ml_setup(ctx, inputs, output):
        x, weight, mask, bias = inputs
        ctx.save_for_backward(x, weight, mask)
        ctx.has_bias = bias is not None

    def _ml_backward(ctx, grad):
        x, weight, mask = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad
        need_b = bool(need_b and ctx.has_bias)
        if torch.is_grad_enabled():
            # create_graph=True: the same gradients as differentiable torch ops (the native
            # backward writes into its outputs, which autograd cannot record)
            wm = weight * mask.to(weight.dtype)
            return (grad @ wm if need_x else None, (grad.T @ x) * mask.to(weight.dtype) if need_w else None, None,
                    grad.sum(0) if need_b else None)
        dx, dw, db = torch.ops.pyengine.masked_linear_backward(
            grad.contiguous(), x, weight, mask, need_x, need_w, need_b
        )
        return (dx if need_x else None, dw if need_w else None, None, db if need_b else None)

    torch.library.register_autograd("pyengine::masked_linear", _ml_backward, setup_context=_ml_setup)
