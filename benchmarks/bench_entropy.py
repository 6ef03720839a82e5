"""Entropy counts: pyengine's fused one-pass kernel vs the pure-PyTorch reference."""
from __future__ import annotations

import torch

from _harness import Row, copies_for, main, time_fn
from pyengine.ops import entropy_counts, entropy_counts_reference

GPU_CASES = [  # kernels.md
    ("NCHW (256,512,28,28)", (256, 512, 28, 28), 1, False),
    ("channels-last (256,512,28,28)", (256, 512, 28, 28), 1, True),
    ("(B,T,C) (256,197,768)", (256, 197, 768), -1, False),
]
CPU_CASES = [  # ResNet-18 / CIFAR activations at batch 128, and a ViT block
    ("NCHW (128,64,32,32)", (128, 64, 32, 32), 1, False),
    ("channels-last (128,64,32,32)", (128, 64, 32, 32), 1, True),
    ("NCHW (128,256,8,8)", (128, 256, 8, 8), 1, False),
    ("(B,T,C) (64,65,512)", (64, 65, 512), -1, False),
]


def run(device, repeats=10, quick=False):
    cases = CPU_CASES if device.type == "cpu" else GPU_CASES
    if quick:
        cases = [("NCHW (8,16,8,8)", (8, 16, 8, 8), 1, False)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, shape, cdim, cl in cases:
            x = torch.randn(shape, device=device, dtype=dtype)
            if cl:
                x = x.to(memory_format=torch.channels_last)
            inputs = [(x,)] + [(x.clone(memory_format=torch.preserve_format),) for _ in range(copies_for(device, x.nbytes) - 1)]
            ref = time_fn(lambda t: entropy_counts_reference(t, cdim), inputs, device, repeats)
            ours = time_fn(lambda t: entropy_counts(t, cdim, check_nan=False), inputs, device, repeats)
            assert torch.equal(entropy_counts(x, cdim), entropy_counts_reference(x, cdim))
            rows.append(Row("entropy_counts", name, str(dtype).replace("torch.", ""), ref, ours))
            del x, inputs
    return rows


if __name__ == "__main__":
    main(run, "entropy counts", __doc__)
