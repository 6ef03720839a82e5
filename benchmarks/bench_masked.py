"""Masked linear (training) and packed sparse linear (inference; CSR and bitmap tiles) vs pure PyTorch.

Reference for masked linear: F.linear(x, W * M) (forward + backward). Reference for the sparse
path: dense F.linear on the same (pruned) weight, and torch's CSR matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from _harness import Row, main, time_fn
from pyengine.ops import masked_linear, masked_linear_reference, pack_sparse, sparse_linear


def _mask(n, k, density, device, g):
    return torch.rand(n, k, device=device, generator=g) < density


def run(device, repeats=10, quick=False):
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    if device.type == "cpu":
        train_cases = [(256, 2048, 2048, torch.float32)]
        sparse_cases = [(256, 2048, 2048, torch.float32, s) for s in (0.9, 0.95, 0.99)]
        sparse_cases += [(8, 4096, 4096, torch.float32, 0.9)]
    else:
        train_cases = [(8192, 4096, 4096, torch.bfloat16), (256, 4096, 11008, torch.float16)]
        sparse_cases = [(m, 4096, 4096, torch.bfloat16, 0.9) for m in (1, 8, 16)]
        sparse_cases += [(4096, 4096, 4096, torch.float32, s) for s in (0.9, 0.95)]
    if quick:
        train_cases = [(16, 64, 32, torch.float32)]
        sparse_cases = [(16, 64, 32, torch.float32, 0.9)]

    for m, k, n, dtype in train_cases:
        x = torch.randn(m, k, device=device, dtype=dtype, generator=None).requires_grad_(True)
        w = torch.randn(n, k, device=device, dtype=dtype).requires_grad_(True)
        mask = _mask(n, k, 0.1, device, g)

        def fb(fn):
            def f(x, w, mask):
                y = fn(x, w, mask)
                y.backward(torch.ones_like(y))
                x.grad = w.grad = None
            return f

        ref = time_fn(fb(masked_linear_reference), [(x, w, mask)], device, repeats)
        ours = time_fn(fb(masked_linear), [(x, w, mask)], device, repeats)
        dense = time_fn(fb(lambda x, w, mask: F.linear(x, w)), [(x, w, mask)], device, repeats)
        dt = str(dtype).replace("torch.", "")
        rows.append(Row("masked_linear fwd+bwd", f"M={m} K={k} N={n} vs W*M", dt, ref, ours))
        rows.append(Row("masked_linear fwd+bwd", f"M={m} K={k} N={n} vs dense", dt, dense, ours))

    for m, k, n, dtype, sparsity in sparse_cases:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) * _mask(n, k, 1 - sparsity, device, g)
        packed = pack_sparse(w)
        with torch.no_grad():
            dense = time_fn(lambda x, w: F.linear(x, w), [(x, w)], device, repeats)
            ours = time_fn(lambda x, p: sparse_linear(x, p), [(x, packed)], device, repeats)
            err = (sparse_linear(x, packed).float() - F.linear(x, w).float()).norm() / F.linear(x, w).float().norm()
            assert err < (1e-4 if dtype == torch.float32 else 2e-2), err
        dt = str(dtype).replace("torch.", "")
        case = f"M={m} K={k} N={n} {sparsity:.0%} sparse"
        rows.append(Row("sparse_linear vs dense", case, dt, dense, ours))
        bitmap = pack_sparse(w, format="bitmap")
        with torch.no_grad():
            t_bitmap = time_fn(lambda x, p: sparse_linear(x, p), [(x, bitmap)], device, repeats)
            err = (sparse_linear(x, bitmap).float() - F.linear(x, w).float()).norm() / F.linear(x, w).float().norm()
            assert err < (1e-4 if dtype == torch.float32 else 2e-2), err
        rows.append(Row("sparse_linear bitmap tiles vs dense", case, dt, dense, t_bitmap))
        if dtype == torch.float32:
            csr = w.to_sparse_csr()
            with torch.no_grad():
                t_csr = time_fn(lambda x, c: (c @ x.T).T, [(x, csr)], device, repeats)
            rows.append(Row("sparse_linear vs CSR", case, dt, t_csr, ours))
    return rows


if __name__ == "__main__":
    main(run, "masked / sparse linear", __doc__)
