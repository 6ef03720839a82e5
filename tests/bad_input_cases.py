"""Every op's bad-input cases, runnable on their own so a crash kills only this process.

    python tests/bad_input_cases.py --device cuda [--start N] [--good]

Runs the cases from index N on, printing one JSON line per case before it starts ("start") and
when it ends ("done", with the exception's type and message). A case passes when the call raises
the expected exception type with a message matching the expected pattern - a crash, a hang, a
silent result or the wrong error fails it. After each case on CUDA a tiny kernel checks the
context is still usable. With --good, every op also runs once on small valid inputs first (the
compute-sanitizer pass of benchmarks/gpu_check.sh uses this).

tests/test_crash_isolation.py runs this file in a child process per device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

if __name__ == "__main__":  # runnable from anywhere in the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import pyengine  # noqa: E402
from pyengine import ops  # noqa: E402

P = torch.ops.pyengine


def _csr(device, k=4096, n=8, dtype=torch.float32):
    """A valid small CSR (rowptr, colidx int16, values) for an (n, k) weight."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) * (torch.rand(n, k, generator=g) < 0.01)
    p = ops.pack_sparse(w.to(dtype))
    return p.rowptr.to(device), p.colidx.to(device), p.values.to(device)


def cases(dev: torch.device):
    """(name, callable, expected exception type, message regex); the callable must raise."""
    cuda = dev.type == "cuda"
    f32 = dict(device=dev, dtype=torch.float32)
    f64 = dict(device=dev, dtype=torch.float64)

    def sync_check():
        # CUDA index errors are found on the device and raised at the next sync point
        if cuda:
            ops.check_device_errors(dev)

    x = torch.randn(3, 4, **f32)
    w = torch.randn(5, 4, **f32)
    m = torch.rand(5, 4, device=dev) > 0.5
    out = []

    # ---- masked linear
    out += [
        ("masked_linear x 1-D", lambda: P.masked_linear(x[0], w, m, None), ValueError, "x must have 2 dimensions"),
        ("masked_linear weight dtype", lambda: P.masked_linear(x, w.double(), m, None), TypeError, "weight has dtype float64"),
        ("masked_linear mask not bool", lambda: P.masked_linear(x, w, m.float(), None), TypeError, "mask has dtype float32"),
        ("masked_linear mask shape", lambda: P.masked_linear(x, w, m[:, :2], None), ValueError, "mask has shape"),
        ("masked_linear K mismatch", lambda: P.masked_linear(torch.randn(3, 6, **f32), w, m, None), ValueError, "6 features"),
        ("masked_linear bias length", lambda: P.masked_linear(x, w, m, torch.randn(7, **f32)), ValueError, "bias has 7 entries"),
        ("masked_linear int x", lambda: P.masked_linear(x.long(), w.long(), m, None), TypeError, "x has dtype int64"),
        ("masked_linear_backward grad shape",
         lambda: P.masked_linear_backward(torch.randn(3, 6, **f32), x, w, m, True, True, True), ValueError, "grad_out has shape"),
        ("masked_linear wrapper mask not binary", lambda: ops.masked_linear(x, w, m.float() * 0.5), ValueError, "binary"),
    ]
    if cuda:
        out += [("masked_linear x on cpu", lambda: P.masked_linear(x.cpu(), w, m, None), ValueError, "CUDA tensor|is on")]

    # ---- sparse linear: raw op with inconsistent CSR (the kernels must never follow a bad index)
    rp, ci, vals = _csr(dev)
    nnz = vals.numel()
    xs = torch.randn(2, 4096, **f32)

    def sparse(rowptr=rp, colidx=ci, values=vals, k=4096, xx=xs):
        P.sparse_linear(xx, rowptr, colidx, values, k, None)
        sync_check()

    big = ci.int().clone()
    big[12] = 70000
    neg = ci.clone()
    neg[3] = -5
    dec = rp.clone()
    dec[3] = dec[2] - 1
    past = rp.clone()
    past[-1] = nnz + 1000
    past[-2] = nnz + 500
    start = rp.clone()
    start[0] = 1
    short = rp.clone()
    short[-1] -= 1  # rows hold ~40 entries: still non-decreasing
    unsorted = ci.clone()
    unsorted[0] = 4095  # the first row starts with the last column, ahead of its smaller ones
    out += [
        ("sparse_linear colidx >= K", lambda: sparse(colidx=big), ValueError, r"colidx holds 70000 at position 12, but in_features is 4096"),
        ("sparse_linear colidx negative", lambda: sparse(colidx=neg), ValueError, r"colidx holds -5 at position 3"),
        ("sparse_linear rowptr decreasing", lambda: sparse(rowptr=dec), ValueError, "rowptr must not decrease|rowptr ends"),
        ("sparse_linear rowptr past values", lambda: sparse(rowptr=past), ValueError, "rowptr ends at|points past"),
        ("sparse_linear rowptr start", lambda: sparse(rowptr=start), ValueError, "rowptr must start at 0"),
        ("sparse_linear colidx/values length", lambda: sparse(values=vals[:-1]), ValueError, "colidx holds .* entries but values"),
        ("sparse_linear int16 K too big", lambda: sparse(k=40000, xx=torch.randn(2, 40000, **f32)), ValueError, "int16 colidx cannot"),
        ("sparse_linear x features", lambda: sparse(xx=torch.randn(2, 100, **f32)), ValueError, "in_features is 4096"),
        ("sparse_linear values dtype", lambda: sparse(values=vals.double()), TypeError, "values has dtype float64"),
        ("sparse_linear rowptr dtype", lambda: sparse(rowptr=rp.long()), TypeError, "rowptr has dtype int64"),
        # a batch large enough for the SpMM (float32, M > 32) and the densify + GEMM (float64) paths
        ("sparse_linear spmm colidx >= K", lambda: sparse(colidx=big, xx=torch.randn(40, 4096, **f32)), ValueError, "colidx holds 70000"),
        ("sparse_linear gemm colidx >= K",
         lambda: sparse(colidx=big, values=vals.double(), xx=torch.randn(80, 4096, **f64)), ValueError, "colidx holds 70000"),
        ("sparse_linear gemm rowptr past",
         lambda: sparse(rowptr=past, values=vals.double(), xx=torch.randn(80, 4096, **f64)), ValueError, "rowptr ends at|points past"),
        # the last row pointer short of the stored entries (CUDA used to drop the entries past it)
        ("sparse_linear rowptr short", lambda: sparse(rowptr=short), ValueError, "rowptr ends at .* but colidx and values hold"),
        ("sparse_linear spmm rowptr short", lambda: sparse(rowptr=short, xx=torch.randn(40, 4096, **f32)), ValueError,
         "rowptr ends at .* but colidx and values hold"),
        ("sparse_linear gemm rowptr short",
         lambda: sparse(rowptr=short, values=vals.double(), xx=torch.randn(80, 4096, **f64)), ValueError,
         "rowptr ends at .* but colidx and values hold"),
    ]
    if cuda:  # the CUDA float32 SpMM needs ascending columns (the CPU kernels take any order)
        out += [("sparse_linear spmm columns out of order",
                 lambda: sparse(colidx=unsorted, xx=torch.randn(40, 4096, **f32)), ValueError, "colidx must ascend")]
    shape = (rp.numel() - 1, 4096)
    out += [
        ("PackedWeight colidx >= K", lambda: ops.PackedWeight(rp, big, vals, shape), ValueError, "colidx holds 70000 at position 12"),
        ("PackedWeight rowptr decreasing", lambda: ops.PackedWeight(dec, ci, vals, shape), ValueError, "must not decrease"),
        ("PackedWeight rowptr past", lambda: ops.PackedWeight(past, ci, vals, shape), ValueError, "rowptr ends at"),
        ("PackedWeight K disagrees", lambda: ops.PackedWeight(rp, ci, vals, (shape[0], 40000)), ValueError, "int16 colidx cannot"),
        ("PackedWeight K too small", lambda: ops.PackedWeight(rp, ci, vals, (shape[0], 10)), ValueError, "in_features is 10"),
        ("PackedWeight rows disagree", lambda: ops.PackedWeight(rp, ci, vals, (3, 4096)), ValueError, "out_features = 3"),
        ("sparse_linear wrapper K mismatch",
         lambda: ops.sparse_linear(torch.randn(2, 10, **f32), ops.PackedWeight(rp, ci, vals, shape)), ValueError, "features"),
        ("pack_sparse 1-D", lambda: P.pack_sparse(torch.randn(5, **f32)), ValueError, "weight must have 2 dimensions"),
        ("pack_sparse format", lambda: ops.pack_sparse(torch.randn(5, 5, **f32), format="coo"), ValueError, "format must be"),
    ]

    # ---- sparse linear, bitmap tiles: raw op with inconsistent offsets (never followed), on the
    # tensor-core path (bfloat16, 3 rows of x) and the densify + GEMM paths (float32; 80 rows)
    g = torch.Generator().manual_seed(1)
    wb = torch.randn(40, 300, generator=g) * (torch.rand(40, 300, generator=g) < 0.1)
    bw = ops.pack_sparse(wb.to(dev), format="bitmap")
    bm, off, bv = bw.bitmap, bw.offsets, bw.values
    tiles = off.numel() - 1
    off_past = off.clone()
    off_past[-1] = bv.numel() + 1000
    off_dec = off.clone()
    off_dec[5] = off[4] - 1
    off_count = off.clone()
    off_count[3] += 1  # tiles 2 and 3 no longer match their bits
    bm_short = bm[:-32]

    def bitmap(bitmap=bm, offsets=off, values=bv, n=40, xx=None, dtype=torch.float32, rows=3, bias=None):
        xx = torch.randn(rows, 300, device=dev, dtype=dtype) if xx is None else xx
        P.sparse_linear_bitmap(xx, bitmap, offsets, values.to(dtype), n, bias)
        sync_check()

    for label, dt, rows in (("mma", torch.bfloat16, 3), ("gemm", torch.float32, 80)):
        out += [
            (f"sparse_linear_bitmap {label} offsets past values", lambda dt=dt, rows=rows: bitmap(offsets=off_past, dtype=dt, rows=rows),
             ValueError, rf"offsets\[{tiles - 1}\] = \d+ and offsets\[{tiles}\] = \d+ do not delimit"),
            (f"sparse_linear_bitmap {label} offsets decreasing", lambda dt=dt, rows=rows: bitmap(offsets=off_dec, dtype=dt, rows=rows),
             ValueError, r"offsets\[4\] = \d+ and offsets\[5\] = \d+ do not delimit|tile 5 has \d+ bits set"),
            (f"sparse_linear_bitmap {label} count mismatch", lambda dt=dt, rows=rows: bitmap(offsets=off_count, dtype=dt, rows=rows),
             ValueError, r"tile [23] has \d+ bits set in bitmap but offsets give it \d+ values"),
        ]
    out += [
        ("sparse_linear_bitmap bitmap size", lambda: bitmap(bitmap=bm_short), ValueError, "bitmap holds .* words but a \\(40, 300\\) weight"),
        ("sparse_linear_bitmap offsets size", lambda: bitmap(offsets=off[:-1]), ValueError, "offsets holds .* entries but"),
        ("sparse_linear_bitmap bitmap dtype", lambda: bitmap(bitmap=bm.long()), TypeError, "bitmap has dtype int64"),
        ("sparse_linear_bitmap offsets dtype", lambda: bitmap(offsets=off.float()), TypeError, "offsets has dtype float32"),
        ("sparse_linear_bitmap x features", lambda: bitmap(xx=torch.randn(2, 100, **f32)), ValueError, "bitmap holds .* words but a \\(40, 100\\)"),
        ("sparse_linear_bitmap bias", lambda: bitmap(bias=torch.randn(7, **f32)), ValueError, "bias has 7 entries but out_features is 40"),
        ("sparse_linear_bitmap out_features", lambda: bitmap(n=-1), ValueError, "out_features must be >= 0"),
        ("BitmapWeight offsets past", lambda: ops.BitmapWeight(bm, off_past, bv, (40, 300)), ValueError, "offsets ends at|bits set"),
        ("BitmapWeight count mismatch", lambda: ops.BitmapWeight(bm, off_count, bv, (40, 300)), ValueError, "tile 2 has .* bits set"),
        ("BitmapWeight shape disagrees", lambda: ops.BitmapWeight(bm, off, bv, (40, 100)), ValueError, "bitmap holds .* words"),
        ("sparse_linear wrapper bitmap K mismatch", lambda: ops.sparse_linear(torch.randn(2, 10, **f32), bw), ValueError, "features"),
    ]

    # ---- apply_masks_
    a = torch.randn(10, **f32)
    mk = torch.ones(10, dtype=torch.bool, device=dev)
    out += [
        ("apply_masks_ index", lambda: P.apply_masks_([a], [mk], [3]), IndexError, r"mask_index\[0\] = 3"),
        ("apply_masks_ mask dtype", lambda: P.apply_masks_([a], [mk.float()], [0]), TypeError, "masks.0. has dtype float32"),
        ("apply_masks_ shape", lambda: P.apply_masks_([a], [mk[:5]], [0]), ValueError, "has shape"),
        ("apply_masks_ non-contiguous",
         lambda: P.apply_masks_([torch.randn(4, 4, **f32).t()], [torch.ones(4, 4, dtype=torch.bool, device=dev)], [0]),
         ValueError, "contiguous"),
        ("apply_masks_ count", lambda: P.apply_masks_([a, a], [mk], [0]), ValueError, "mask_index has 1 entries for 2"),
        # one buffer twice (the CUDA kernel rewrites whole vectors: two blocks could undo each other's zeros)
        ("apply_masks_ same tensor twice", lambda: P.apply_masks_([a, a], [mk, mk], [0, 1]), ValueError,
         r"tensors\[0\] and tensors\[1\] overlap in memory"),
        ("apply_masks_ overlapping views", lambda: P.apply_masks_([a[2:6], a[:4]], [mk[:4], mk[:4]], [0, 1]), ValueError,
         "overlap in memory"),
    ]

    # ---- entropy
    act = torch.randn(4, 3, 2, 2, **f32)
    act_nan = act.clone()
    act_nan[1, 2, 0, 1] = math.nan
    counts = torch.zeros(3, dtype=torch.int64, device=dev)
    nanc = torch.zeros((), dtype=torch.int64, device=dev)
    out += [
        ("entropy_counts int x", lambda: P.entropy_counts(act.int(), 1, False, False), TypeError, "x has dtype int32"),
        ("entropy_counts channel_dim", lambda: P.entropy_counts(act, 7, False, False), ValueError, "channel_dim=7"),
        ("entropy_counts 1-D", lambda: P.entropy_counts(act.flatten(), 0, False, False), ValueError, "at least 2 dimensions"),
        ("entropy_counts_add_ counts shape", lambda: P.entropy_counts_add_(counts[:2], nanc, act, 1, False, False), ValueError, "counts has shape"),
        ("entropy_counts_add_ counts dtype", lambda: P.entropy_counts_add_(counts.int(), nanc, act, 1, False, False), TypeError, "counts has dtype int32"),
        ("entropy_counts_add_ nan_count size",
         lambda: P.entropy_counts_add_(counts, torch.zeros(2, dtype=torch.int64, device=dev), act, 1, False, False), ValueError, "one element"),
        ("relu_count counts shape", lambda: P.relu_count(act, counts[:1], nanc, 1, False, False), ValueError, "counts has shape"),
        ("entropy_counts_add_many_ lengths", lambda: P.entropy_counts_add_many_([counts], nanc, [act, act], [1, 1], False, False),
         ValueError, "counts has 1 tensors and channel_dims 2 entries for 2 tensors"),
        ("entropy_counts_add_many_ counts shape",
         lambda: P.entropy_counts_add_many_([counts, counts[:2]], nanc, [act, act], [1, 1], False, False), ValueError,
         r"counts\[1\] has shape \(2,\) but must have shape \(3,\) \(one entry per channel of xs\[1\]\)"),
        ("entropy_counts_add_many_ channel_dim",
         lambda: P.entropy_counts_add_many_([counts, counts], nanc, [act, act], [1, 9], False, False), ValueError,
         r"channel_dims\[1\]=9 is out of range for xs\[1\]"),
        ("entropy_counts_add_many_ int x",
         lambda: P.entropy_counts_add_many_([counts], nanc, [act.int()], [1], False, False), TypeError, r"xs\[0\] has dtype int32"),
        ("entropy_counts_add_many_ nan_count size",
         lambda: P.entropy_counts_add_many_([counts], torch.zeros(2, dtype=torch.int64, device=dev), [act], [1], False, False),
         ValueError, "one element"),
        ("entropy_from_counts float counts", lambda: P.entropy_from_counts(counts.float(), 4, 0.0), TypeError, "counts has dtype float32"),
        ("entropy_from_counts n_samples", lambda: P.entropy_from_counts(counts, 0, 0.0), ValueError, "n_samples must be positive"),
        ("entropy_from_counts eps", lambda: P.entropy_from_counts(counts, 4, 0.7), ValueError, "eps must be"),
        ("entropy_counts wrapper NaN", lambda: ops.entropy_counts(act_nan), ValueError, "NaN"),
        ("relu_count wrapper x a list", lambda: ops.relu_count([1.0, 2.0], counts), TypeError,
         "x must be a torch.Tensor, got list"),
        # a meta tensor among real ones sends the call to the meta kernel, which must refuse it
        ("relu_count meta nan_count", lambda: P.relu_count(act, counts, nanc.to("meta"), 1, False, False), ValueError,
         "nan_count is on meta but x is on"),
        ("entropy_counts_add_ meta nan_count", lambda: P.entropy_counts_add_(counts, nanc.to("meta"), act, 1, False, False),
         ValueError, "nan_count is on meta"),
        ("entropy_from_counts count above n_samples (raw op)",
         lambda: (P.entropy_from_counts(torch.tensor([1, 9, 2], device=dev), 4, 0.0), sync_check()), ValueError,
         r"counts holds 9 at position 1, outside \[0, n_samples = 4\]"),
        ("entropy_from_counts negative count (raw op)",
         lambda: (P.entropy_from_counts(torch.tensor([-3, 1], device=dev), 4, 0.0), sync_check()), ValueError,
         r"counts holds -3 at position 0"),
        ("entropy_from_counts fractional n_samples", lambda: ops.entropy_from_counts(counts, 4.5), TypeError,
         "n_samples must be an integer"),
    ]
    if cuda:
        out += [("entropy_counts_add_ counts on cpu", lambda: P.entropy_counts_add_(counts.cpu(), nanc, act, 1, False, False),
                 ValueError, "counts is on cpu"),
                ("entropy_counts_add_many_ x on cpu",
                 lambda: P.entropy_counts_add_many_([counts, counts.cpu()], nanc, [act, act.cpu()], [1, 1], False, False),
                 ValueError, r"xs\[1\] is on cpu but xs\[0\] is on cuda")]

    # ---- sliced Wasserstein
    th = ops.random_directions(4, 6, device=dev, dtype=torch.float64)
    th_nan = th.clone()
    th_nan[2, 1] = math.nan
    cx1 = torch.randn(2, 5, 1, **f64)
    grad = torch.ones(2, **f64)
    win = torch.tensor([3, 0], device=dev)
    bx = torch.randn(2, 5, 6, **f64)

    def bwd_bad_win():
        P.sliced_wasserstein_bwd(grad, cx1, cx1, th, torch.tensor([4, 0], device=dev), True, True, True)
        sync_check()

    out += [
        # the segfault issue 11 reported on CUDA: mean mode given one column for four directions
        ("sliced_wasserstein_bwd mean with 1 column", lambda: P.sliced_wasserstein_bwd(grad, cx1, cx1, th, win, False, True, True),
         ValueError, "needs 4"),
        ("sliced_wasserstein_bwd win out of range", bwd_bad_win, ValueError, r"win\[0\] = 4 is not a direction"),
        ("sliced_wasserstein_bwd negative win",
         lambda: (P.sliced_wasserstein_bwd(grad, cx1, cx1, th, torch.tensor([0, -1], device=dev), True, True, False), sync_check()),
         ValueError, r"win\[1\] = -1"),
        ("sliced_wasserstein_bwd grad length", lambda: P.sliced_wasserstein_bwd(grad[:1], cx1, cx1, th, win, True, True, True),
         ValueError, "grad has 1 entries"),
        ("sliced_wasserstein_bwd dtype", lambda: P.sliced_wasserstein_bwd(grad.float(), cx1, cx1, th, win, True, True, True),
         TypeError, "grad has dtype float32"),
        ("sliced_wasserstein_bwd win dtype", lambda: P.sliced_wasserstein_bwd(grad, cx1, cx1, th, win.int(), True, True, True),
         TypeError, "win has dtype int32"),
        ("sliced_wasserstein_fwd theta dims", lambda: P.sliced_wasserstein_fwd(bx, bx, th[:, :3], 2.0, True, True), ValueError, "3 dims"),
        ("sliced_wasserstein_fwd p inf", lambda: P.sliced_wasserstein_fwd(bx, bx, th, math.inf, True, False), ValueError, "p = inf"),
        ("sliced_wasserstein_fwd p small", lambda: P.sliced_wasserstein_fwd(bx, bx, th, 0.5, True, False), ValueError, "p must be >= 1"),
        ("sliced_wasserstein_fwd x 2-D", lambda: P.sliced_wasserstein_fwd(bx[0], bx[0], th, 2.0, True, False), ValueError, "x must have 3"),
        ("sliced_wasserstein_fwd y shape", lambda: P.sliced_wasserstein_fwd(bx, bx[:, :3], th, 2.0, True, False), ValueError, "y has shape"),
        ("sliced_wasserstein p inf", lambda: ops.sliced_wasserstein(bx, bx, th, p=math.inf), ValueError, "p = inf"),
        ("sliced_wasserstein huge n_directions",
         lambda: ops.sliced_wasserstein(torch.randn(5, 3, **f32), torch.randn(5, 3, **f32), n_directions=10**7), ValueError, "working memory"),
        # reduce="max" must see a NaN in any direction, not only the first
        ("sliced_wasserstein NaN in a later direction", lambda: ops.sliced_wasserstein(bx, bx + 1, th_nan), ValueError,
         "directions contains NaN"),
    ]
    # the grouped op (LaCoOT's pairs): pairs (n, d_g), theta (K, sum d_g)
    gx = [torch.randn(5, 4, **f64), torch.randn(5, 2, **f64)]
    gth = torch.randn(3, 6, **f64)
    out += [
        ("sliced_wasserstein_grouped no pairs", lambda: P.sliced_wasserstein_grouped([], [], gth, 2.0, True, True),
         ValueError, "xs holds no pairs"),
        ("sliced_wasserstein_grouped ys count", lambda: P.sliced_wasserstein_grouped(gx, gx[:1], gth, 2.0, True, True),
         ValueError, "ys holds 1"),
        ("sliced_wasserstein_grouped point count",
         lambda: P.sliced_wasserstein_grouped(gx, [gx[0], gx[1][:3]], gth, 2.0, True, True), ValueError,
         r"ys\[1\] has shape \(3, 2\)"),
        ("sliced_wasserstein_grouped pair batch",
         lambda: P.sliced_wasserstein_grouped([gx[0], gx[1][:3]], [gx[0], gx[1][:3]], gth, 2.0, True, True),
         ValueError, r"xs\[1\] has 3 points but xs\[0\] has 5"),
        ("sliced_wasserstein_grouped theta dims", lambda: P.sliced_wasserstein_grouped(gx, gx, gth[:, :5], 2.0, True, True),
         ValueError, "theta has 5 dims per direction but the pairs have 6"),
        ("sliced_wasserstein_grouped dtype",
         lambda: P.sliced_wasserstein_grouped(gx, [gx[0].float(), gx[1]], gth, 2.0, True, True), TypeError,
         r"ys\[0\] has dtype float32"),
        ("sliced_wasserstein_grouped 3-D pair",
         lambda: P.sliced_wasserstein_grouped([gx[0][None]], [gx[0][None]], gth, 2.0, True, True), ValueError,
         r"xs\[0\] must have 2 dimensions"),
        ("sliced_wasserstein_grouped p inf", lambda: P.sliced_wasserstein_grouped(gx, gx, gth, math.inf, False, True),
         ValueError, "p = inf"),
        ("sliced_wasserstein_grouped wrapper directions",
         lambda: ops.sliced_wasserstein_grouped(gx, gx, [gth[:, :4], gth[:, :3]]), ValueError,
         r"directions\[1\] has 3 dims but pair 1's points have 2"),
        ("sliced_wasserstein_grouped wrapper direction width",
         lambda: ops.sliced_wasserstein_grouped(gx, gx, gth[:, :5]), ValueError, "directions have 5 dims but the pairs have 6"),
        ("sliced_wasserstein_grouped huge n_directions",
         lambda: ops.sliced_wasserstein_grouped(gx, gx, n_directions=10**8), ValueError, "working memory"),
        # not differentiable in the directions: refused at the call (the backward once read an empty
        # list of saved tensors)
        ("sliced_wasserstein_grouped theta requires grad",
         lambda: P.sliced_wasserstein_grouped(gx, gx, gth.clone().requires_grad_(), 2.0, True, True), ValueError,
         "not differentiable in the directions"),
        ("sliced_wasserstein directions require grad",
         lambda: ops.sliced_wasserstein(gx[0], gx[0], gth[:, :4].clone().requires_grad_()), ValueError,
         "not differentiable in the directions"),
        ("sliced_wasserstein generator not a Generator", lambda: ops.sliced_wasserstein(gx[0], gx[0], generator=3), TypeError,
         "generator must be a torch.Generator, got int"),
        ("sliced_wasserstein fractional n_directions",
         lambda: ops.sliced_wasserstein(gx[0], gx[0], n_directions=2.5), TypeError, "n_directions must be an integer"),
        ("sliced_wasserstein_fwd meta theta",
         lambda: P.sliced_wasserstein_fwd(gx[0][None], gx[0][None], gth[:, :4].to("meta"), 2.0, True, False), ValueError,
         "theta is on meta"),
    ]
    out += [
        ("fill_directions_ 1-D out", lambda: P.fill_directions_(torch.empty(6, **f32), 1, True), ValueError,
         "out must have 2 dimensions"),
        ("fill_directions_ int out", lambda: P.fill_directions_(torch.empty(2, 3, dtype=torch.int32, device=dev), 1, True),
         TypeError, "out has dtype int32"),
        ("fill_directions_ strided out", lambda: P.fill_directions_(torch.empty(3, 2, **f32).t(), 1, True), ValueError,
         "must be contiguous"),
        ("random_directions zero", lambda: ops.random_directions(0, 4, device=dev), ValueError, "at least 1"),
        ("fill_directions_keyed_ int32 seed",
         lambda: P.fill_directions_keyed_(torch.empty(2, 3, **f32), torch.tensor(1, dtype=torch.int32), True), TypeError,
         "seed has dtype int32"),
        ("fill_directions_keyed_ two seeds",
         lambda: P.fill_directions_keyed_(torch.empty(2, 3, **f32), torch.tensor([1, 2]), True), ValueError,
         "seed must hold one element"),
        ("fill_directions_keyed_ meta seed",
         lambda: P.fill_directions_keyed_(torch.empty(2, 3, **f32), torch.tensor(1, device="meta"), True), ValueError,
         "seed is on meta but out is on cpu"),
        ("fill_directions_keyed_ strided out",
         lambda: P.fill_directions_keyed_(torch.empty(3, 2, **f32).t(), torch.tensor(1), True), ValueError,
         "must be contiguous"),
    ] if not cuda else [
        # CPU-only op: on CUDA the directions come from torch.randn on the device
        ("fill_directions_ on cuda", lambda: P.fill_directions_(torch.empty(2, 3, **f32), 1, True), NotImplementedError,
         "CUDA"),
    ]
    if cuda:
        out += [("sliced_wasserstein cpu generator for cuda data",
                 lambda: ops.sliced_wasserstein(bx, bx, generator=torch.Generator()), ValueError, "generator is on cpu")]
    return out


def good_calls(dev: torch.device) -> None:
    """Every op once on small valid inputs (for compute-sanitizer)."""
    g = torch.Generator(device=dev).manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 40, device=dev, generator=g).to(dt)
        w = torch.randn(9, 40, device=dev, generator=g).to(dt).requires_grad_(True)
        m = torch.rand(9, 40, device=dev, generator=g) > 0.5
        ops.masked_linear(x, w, m).sum().backward()
        with torch.no_grad():
            p = ops.pack_sparse(w.detach() * m)
            pb = ops.pack_sparse(w.detach() * m, format="bitmap")
            for rows in (1, 5, 16, 40, 80):
                ops.sparse_linear(torch.randn(rows, 40, device=dev, generator=g).to(dt), p)
                ops.sparse_linear(torch.randn(rows, 40, device=dev, generator=g).to(dt), pb)
            wb = torch.randn(100, 1000, device=dev, generator=g) * (torch.rand(100, 1000, device=dev, generator=g) < 0.1)
            ops.sparse_linear(torch.randn(3, 1000, device=dev, generator=g).to(dt), ops.pack_sparse(wb.to(dt), format="bitmap"))
        t = [w.detach().clone()]
        ops.apply_masks_(t, [m])
        a = torch.randn(6, 5, 7, 3, device=dev, generator=g).to(dt)
        ops.entropy_counts(a)
        ops.entropy_counts(a.to(memory_format=torch.channels_last))
        ops.entropy_counts(a, per_position=True)
        c = torch.zeros(5, dtype=torch.int64, device=dev)
        ops.entropy_counts_add_(c, a)
        ops.entropy_counts_add_many_([c, c, c], [a, a.to(memory_format=torch.channels_last), a[:, :, 1:]], [1, 1, 1])
        ops.relu_count(a, c)
        ops.entropy_from_counts(c, 6 * 7 * 3 * 3)
    for reduce in ("max", "mean"):
        for n in (17, 600, 9000):
            xx = torch.randn(2, n, 5, device=dev, generator=g, requires_grad=True)
            yy = torch.randn(2, n, 5, device=dev, generator=g)
            ops.sliced_wasserstein(xx, yy, n_directions=6, reduce=reduce, generator=g).sum().backward()
        xs = [torch.randn(9, d, device=dev, generator=g, requires_grad=True) for d in (5, 300, 9000)]
        ys = [torch.randn(9, d, device=dev, generator=g) for d in (5, 300, 9000)]
        ops.sliced_wasserstein_grouped(xs, ys, n_directions=7, reduce=reduce, generator=g).sum().backward()
        # two tiles of 64 points and of 64 directions, pairs cut into several chunks (CUDA kernels)
        xs = [torch.randn(130, d, device=dev, generator=g, requires_grad=True) for d in (70, 2100)]
        ys = [torch.randn(130, d, device=dev, generator=g, requires_grad=True) for d in (70, 2100)]
        ops.sliced_wasserstein_grouped(xs, ys, n_directions=70, reduce=reduce, generator=g).sum().backward()
    xl = torch.randn(1, 8, 16384, device=dev, generator=g, requires_grad=True)
    ops.sliced_wasserstein(xl, torch.randn(1, 8, 16384, device=dev, generator=g), n_directions=3, generator=g).backward()
    if dev.type == "cpu":
        ops.random_directions(7, 1000, generator=g)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        ops.check_device_errors(dev)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--good", action="store_true")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if not pyengine.HAS_NATIVE:
        print(json.dumps({"skip": "native extension not built"}), flush=True)
        return 0
    all_cases = cases(dev)
    if args.list:
        print(json.dumps({"n": len(all_cases), "names": [c[0] for c in all_cases]}), flush=True)
        return 0
    if args.good:
        good_calls(dev)
        print(json.dumps({"good": "ok"}), flush=True)
    import re

    # PYENGINE_CRASH_AT=N makes case N kill this process (checks that the isolation reports it)
    crash_at = int(os.environ.get("PYENGINE_CRASH_AT", "-1"))
    for i in range(args.start, len(all_cases)):
        name, fn, exc, pattern = all_cases[i]
        print(json.dumps({"start": i, "name": name}), flush=True)
        if i == crash_at:
            os.kill(os.getpid(), signal.SIGSEGV)
        rec = {"done": i, "name": name, "ok": False}
        try:
            fn()
            rec["error"] = "no exception"
        except Exception as e:  # noqa: BLE001 - any exception is inspected, not swallowed
            rec["type"] = type(e).__name__
            rec["msg"] = str(e).splitlines()[0][:300] if str(e) else ""
            rec["ok"] = isinstance(e, exc) and re.search(pattern, str(e)) is not None
            if not rec["ok"]:
                rec["error"] = f"expected {exc.__name__} matching {pattern!r}"
        if dev.type == "cuda":  # the context must still work, and no error may be left pending
            try:
                assert float(torch.ones(4, device=dev).sum()) == 4.0
                ops.check_device_errors(dev)
            except Exception as e:  # noqa: BLE001
                rec["ok"] = False
                rec["error"] = f"CUDA unusable or error left pending afterwards: {type(e).__name__}: {e}"
        print(json.dumps(rec), flush=True)
    print(json.dumps({"finished": len(all_cases)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
