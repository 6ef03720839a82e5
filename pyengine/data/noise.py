"""Symmetric label noise (methods.md section 6)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["apply_label_noise"]


def apply_label_noise(targets: Sequence[int] | np.ndarray | torch.Tensor, num_classes: int,
                      eps: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a seeded ``eps`` fraction of labels by a uniformly random *different* class.

    Exactly ``round(eps * N)`` labels are changed (Python's ``round``). Which labels, and their
    new classes, depend only on ``(N, num_classes, eps, seed)``: a new label is
    ``(y + k) mod num_classes`` with ``k`` uniform in ``1 .. num_classes - 1``, so every other
    class is equally likely and none equals the original.

    Returns:
        ``(new_targets, noisy_indices)``: a new int64 tensor (the input is not modified) and the
        sorted int64 positions of the changed labels.
    """
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label noise eps must be in [0, 1], got {eps}")
    y = torch.as_tensor(np.asarray(targets) if not isinstance(targets, torch.Tensor) else targets)
    y = y.to(torch.int64).clone().reshape(-1)
    n = y.numel()
    if n and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"targets must lie in [0, {num_classes}), "
                         f"got range [{int(y.min())}, {int(y.max())}]")
    count = int(round(eps * n))
    if count == 0:
        return y, torch.empty(0, dtype=torch.int64)
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:count].sort().values
    shift = torch.randint(1, num_classes, (count,), generator=gen)
    y[idx] = (y[idx] + shift) % num_classes
    return y, idx
