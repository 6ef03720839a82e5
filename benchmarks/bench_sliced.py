"""Sliced Wasserstein: pyengine's fused project-sort-compare vs the pure-PyTorch reference."""
from __future__ import annotations

import torch

from _harness import Row, main, time_fn
from pyengine.ops import random_directions, sliced_wasserstein, sliced_wasserstein_reference

GPU_CASES = [  # kernels.md: (pairs, n, d, K, backward)
    (1, 8192, 1024, 256, False),
    (1, 8192, 1024, 256, True),
    (8, 8192, 512, 256, False),
    (1, 128, 65536, 50, True),
]
CPU_CASES = [
    (1, 128, 65536, 50, True),  # LaCoOT on ResNet-18 stage 1: batch 128 of 64x32x32 maps
    (4, 128, 16384, 50, True),
    (1, 2048, 256, 256, False),
    (1, 2048, 256, 256, True),
    (8, 1024, 128, 128, False),
]


def run(device, repeats=10, quick=False):
    cases = CPU_CASES if device.type == "cpu" else GPU_CASES
    if quick:
        cases = [(2, 64, 32, 16, True)]
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for b, n, d, k, bwd in cases:
        x = torch.randn(b, n, d, device=device, generator=g)
        y = torch.randn(b, n, d, device=device, generator=g) * 1.3 + 0.2
        theta = random_directions(k, d, generator=g, device=device)
        if bwd:
            x.requires_grad_(True)
            y.requires_grad_(True)

        def step(fn):
            def f(x, y, theta):
                if bwd:  # as a training step does (zero_grad(set_to_none=True))
                    x.grad = y.grad = None
                out = fn(x, y, theta)
                if bwd:
                    out.sum().backward()
                return out
            return f

        ref = time_fn(step(lambda x, y, t: sliced_wasserstein_reference(x, y, t, 2.0, "max")), [(x, y, theta)], device, repeats)
        ours = time_fn(step(lambda x, y, t: sliced_wasserstein(x, y, t, p=2.0, reduce="max")), [(x, y, theta)], device, repeats)
        with torch.no_grad():
            a = sliced_wasserstein(x, y, theta)
            r = sliced_wasserstein_reference(x, y, theta)
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5), (a, r)
        case = f"B={b} n={n} d={d} K={k} {'fwd+bwd' if bwd else 'fwd'}"
        rows.append(Row("max_sliced_w", case, "float32", ref, ours))
    return rows


if __name__ == "__main__":
    main(run, "max-sliced Wasserstein", __doc__)
