"""Fused activation-state statistics for entropy-guided methods (EGP, NEPENTHE, EASIER, DSD2).

* ``entropy_counts(x, channel_dim, per_position, inclusive)`` counts, per neuron, the samples
  whose value is ON: ``x > 0`` (``x >= 0`` with ``inclusive=True``; EGP uses >, EASIER >=).
  A neuron is a channel (every other dimension is a sample: batch, spatial positions, tokens) or,
  with ``per_position=True``, a channel x position (every dimension but the first; only the
  batch is a sample). Works for NCHW, channels-last and (B, T, C) tensors in fp32/fp16/bf16/fp64
  in one pass, into exact int64 counts. NaN is never ON; the native op also counts NaNs so the
  wrapper can refuse them without a second pass.
* ``entropy_counts_add_(counts, x, ..., nan_count=None)`` adds the same counts into existing int64
  accumulators in place: one kernel, no allocation, no host sync - what a collector running during
  training needs (keep the counts and a NaN count on the device; check the NaN count once per
  epoch).
* ``entropy_counts_add_many_(counts, xs, channel_dims, ...)`` is ``entropy_counts_add_`` for a
  list of tensors in one call: one CUDA launch per dtype however many tensors there are (how
  ``pyengine.nn.EntropyCollector`` counts a whole forward pass during training).
* ``relu_count(x, counts, ...)`` returns ``relu(x)`` and adds x's ON counts into ``counts`` in
  the same pass over x (differentiable in x like ``torch.relu``).
* ``entropy_from_counts(counts, n_samples, eps)`` gives per-neuron binary entropy in bits with eps
  inside the logarithms only, H = -(p log2(p + eps) + (1-p) log2(1-p + eps)) with p = count /
  n_samples (the authors' formula; eps is never a clamp of p), exactly 0 for a constant neuron
  (count 0 or n_samples), and a float64 summary
  ``[mean over all neurons, mean over non-constant neurons (0 if none), #always ON, #always OFF]``.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from pyengine import _native
from pyengine.ops._checks import as_int, check_op_devices, check_tensor, nan_check_value

# --------------------------------------------------------------------------- references


def entropy_counts_reference(x, channel_dim=1, per_position=False, inclusive=False):
    on = (x >= 0) if inclusive else (x > 0)
    if per_position:
        return on.sum(0, dtype=torch.int64)
    c = x.shape[channel_dim]
    rest = x.numel() // c if c else 0
    return on.movedim(channel_dim, 0).reshape(c, rest).sum(1, dtype=torch.int64)


def entropy_from_counts_reference(counts, n_samples, eps=0.0):
    c = counts.to(torch.float64)
    p = c / n_samples
    h = -(torch.special.xlogy(p, p + eps) + torch.special.xlogy(1 - p, 1 - p + eps)) / math.log(2.0)
    on = counts == n_samples
    off = counts == 0
    nonconst = ~(on | off)
    h = torch.where(nonconst, h, torch.zeros_like(h))  # a constant neuron has exactly zero entropy
    mean_all = h.mean() if h.numel() else h.new_zeros(())
    mean_nc = h.sum() / nonconst.sum().clamp_min(1)  # h is 0 off nonconst; 0 if none (no data-dependent branch)
    summary = torch.stack(
        [mean_all, mean_nc, on.sum().to(torch.float64), off.sum().to(torch.float64)]
    )
    return h.to(torch.float32), summary


# --------------------------------------------------------------------------- wrappers


def _normalise_dim(channel_dim: int, ndim: int) -> int:
    channel_dim = as_int("channel_dim", channel_dim)  # 1.7 is refused, not truncated
    if not -ndim <= channel_dim < ndim:
        raise ValueError(f"channel_dim={channel_dim} is out of range for a tensor with {ndim} dimensions")
    return channel_dim % ndim


def entropy_counts(
    x: torch.Tensor,
    channel_dim: int = 1,
    per_position: bool = False,
    inclusive: bool = False,
    check_nan: bool = True,
) -> torch.Tensor:
    """Per-neuron ON counts of ``x`` as int64 (see the module docstring).

    channel_dim: 1 for NCHW / (N, C) tensors (any memory format), -1 for (B, T, C).
    With ``check_nan`` (default) a NaN in ``x`` raises ValueError; on CUDA that costs one sync.
    Under torch.compile the check is a runtime assertion on the CPU (RuntimeError, same message);
    on other devices a compiled call skips it (a failed device-side assertion would end the CUDA
    context), as sliced_wasserstein does.
    """
    check_tensor("x", x, min_ndim=2)
    channel_dim = _normalise_dim(channel_dim, x.dim())
    if per_position:
        channel_dim = 1
    x = x.detach()
    if _native.native_available(x.device):
        counts, nan_count = torch.ops.pyengine.entropy_counts(x, channel_dim, per_position, inclusive)
    else:
        counts = entropy_counts_reference(x, channel_dim, per_position, inclusive)
        nan_count = torch.isnan(x).sum() if check_nan else None
    if check_nan:
        _check_no_nan(nan_count)
    return counts


_NAN_MESSAGE = "NaN values; entropy counts need finite activations"


def _check_no_nan(nan_count: torch.Tensor) -> None:
    # an int() of a tensor is data-dependent under torch.compile, which fullgraph tracing refuses
    if torch.compiler.is_compiling():
        if nan_count.device.type == "cpu":
            torch._assert_async(nan_count == 0, f"x contains {_NAN_MESSAGE}")
        return
    n = nan_check_value(lambda: int(nan_count), "read the NaN count")
    if n > 0:
        raise ValueError(f"x contains {n} {_NAN_MESSAGE}")


def _counts_shape(x, channel_dim, per_position):
    return tuple(x.shape[1:]) if per_position else (x.shape[channel_dim],)


def entropy_counts_add_(
    counts: torch.Tensor,
    x: torch.Tensor,
    channel_dim: int = 1,
    per_position: bool = False,
    inclusive: bool = False,
    nan_count: torch.Tensor | None = None,
) -> None:
    """``counts += entropy_counts(x, ...)`` in place, and ``nan_count += #NaN in x`` when given.

    counts: contiguous int64 of the counts' shape on x's device; nan_count: a one-element int64
    tensor there. One kernel launch, no allocation and no host synchronisation, so a hook can call
    it on every activation of a training step; read nan_count (one sync) once per epoch.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(counts, torch.Tensor):
        raise TypeError("counts and x must be torch.Tensors")
    if nan_count is None:
        nan_count = torch.zeros((), dtype=torch.int64, device=x.device)
    if _native.native_available(x.device):
        torch.ops.pyengine.entropy_counts_add_(counts, nan_count, x.detach(), channel_dim, per_position, inclusive)
        return
    check_tensor("x", x, min_ndim=2)
    cd = 1 if per_position else _normalise_dim(channel_dim, x.dim())
    check_tensor("counts", counts, dtypes=(torch.int64,))
    if tuple(counts.shape) != _counts_shape(x, cd, per_position):
        raise ValueError(f"counts has shape {tuple(counts.shape)} but must have {_counts_shape(x, cd, per_position)}")
    # as the native op: one int64 element (a (2,) nan_count was broadcast into, a float one counted in float)
    check_tensor("nan_count", nan_count, dtypes=(torch.int64,))
    if nan_count.numel() != 1:
        raise ValueError(f"nan_count must hold one element, got shape {tuple(nan_count.shape)}")
    check_op_devices("entropy_counts_add_", x=x, counts=counts, nan_count=nan_count)
    x = x.detach()
    counts += entropy_counts_reference(x, cd, per_position, inclusive)
    nan_count += torch.isnan(x).sum()


def entropy_counts_add_many_(
    counts: Sequence[torch.Tensor],
    xs: Sequence[torch.Tensor],
    channel_dims: Sequence[int],
    per_position: bool = False,
    inclusive: bool = False,
    nan_count: torch.Tensor | None = None,
) -> None:
    """``counts[i] += entropy_counts(xs[i], channel_dims[i], ...)`` for every i, and ``nan_count +=``
    the NaNs of all, in place: one native call (one kernel launch per dtype on CUDA), no
    allocation, no host synchronisation. Every argument is checked before anything is counted.
    """
    counts, xs, channel_dims = list(counts), list(xs), [as_int(f"channel_dims[{i}]", d) for i, d in enumerate(channel_dims)]
    for name, seq in (("counts", counts), ("xs", xs)):
        for i, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    if nan_count is None:
        dev = xs[0].device if xs else torch.device("cpu")
        nan_count = torch.zeros((), dtype=torch.int64, device=dev)
    if _native.native_available(xs[0].device if xs else nan_count.device):
        # an op without an autograd formula or outputs: tensors that require grad need no detach
        torch.ops.pyengine.entropy_counts_add_many_(counts, nan_count, xs, channel_dims, per_position, inclusive)
        return
    if len(counts) != len(xs) or len(channel_dims) != len(xs):
        raise ValueError(f"counts has {len(counts)} tensors and channel_dims {len(channel_dims)} entries for "
                         f"{len(xs)} tensors in xs; they must match")
    for i, (c, x, d) in enumerate(zip(counts, xs, channel_dims)):  # check all, then count
        check_tensor(f"xs[{i}]", x, min_ndim=2)
        cd = 1 if per_position else _normalise_dim(d, x.dim())
        check_tensor(f"counts[{i}]", c, dtypes=(torch.int64,))
        if tuple(c.shape) != _counts_shape(x, cd, per_position):
            raise ValueError(f"counts[{i}] has shape {tuple(c.shape)} but must have {_counts_shape(x, cd, per_position)}")
    for c, x, d in zip(counts, xs, channel_dims):
        entropy_counts_add_(c, x, d, per_position, inclusive, nan_count)


def relu_count(
    x: torch.Tensor,
    counts: torch.Tensor,
    nan_count: torch.Tensor | None = None,
    channel_dim: int = 1,
    per_position: bool = False,
    inclusive: bool = False,
) -> torch.Tensor:
    """``torch.relu(x)``, adding x's ON counts (x > 0, or >= 0) into ``counts`` in the same pass.

    The fused activation + count: the activation is read once instead of twice (ReLU, then the
    count). counts / nan_count as in :func:`entropy_counts_add_`. Differentiable in x.
    """
    check_tensor("x", x)  # before x.device is read: relu_count([1.0], ...) said "'list' object has no attribute 'device'"
    if nan_count is None:
        nan_count = torch.zeros((), dtype=torch.int64, device=x.device)
    if _native.native_available(x.device):
        # differentiable through the op's C++ autograd node (csrc/entropy/entropy_autograd.cpp)
        return torch.ops.pyengine.relu_count(x, counts, nan_count, channel_dim, per_position, inclusive)
    entropy_counts_add_(counts, x, channel_dim, per_position, inclusive, nan_count)
    return torch.relu(x)


def samples_per_neuron(x_shape, channel_dim: int = 1, per_position: bool = False) -> int:
    """How many samples one call of :func:`entropy_counts` adds per neuron for this shape."""
    if per_position:
        return int(x_shape[0])
    total = 1
    for s in x_shape:
        total *= int(s)
    c = int(x_shape[channel_dim])
    return total // c if c else 0


class EntropyStats(NamedTuple):
    per_neuron: torch.Tensor  # float32, counts' shape, bits
    summary: torch.Tensor  # float64 [mean_all, mean_nonconstant, n_always_on, n_always_off]

    @property
    def mean(self) -> float:
        return float(self.summary[0])

    @property
    def mean_nonconstant(self) -> float:
        return float(self.summary[1])

    @property
    def n_always_on(self) -> int:
        return int(self.summary[2])

    @property
    def n_always_off(self) -> int:
        return int(self.summary[3])


def entropy_from_counts(counts: torch.Tensor, n_samples: int, eps: float = 0.0) -> EntropyStats:
    """Per-neuron binary entropy and the per-layer summary from ON counts."""
    check_tensor("counts", counts, dtypes=(torch.int64, torch.int32))
    n_samples = as_int("n_samples", n_samples)
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    eps = float(eps)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must be in [0, 0.5), got {eps}")
    native = _native.native_available(counts.device)
    # compiled, or under torch.func transforms (vmap cannot read a value), the native kernel checks the range
    if not torch.compiler.is_compiling() and not (native and torch._C._are_functorch_transforms_active()):
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > n_samples):
            raise ValueError(f"counts must lie in [0, n_samples={n_samples}]")
    elif not native and counts.device.type == "cpu":  # compiled: the native op checks the range itself
        torch._assert_async(((counts >= 0) & (counts <= n_samples)).all(), f"counts must lie in [0, n_samples={n_samples}]")
    counts = counts.to(torch.int64)
    if native:
        h, summary = torch.ops.pyengine.entropy_from_counts(counts.contiguous(), n_samples, float(eps))
    else:
        h, summary = entropy_from_counts_reference(counts, n_samples, eps)
    return EntropyStats(h, summary)


# --------------------------------------------------------------------------- registration

if _native.HAS_NATIVE:

    @torch.library.register_fake("pyengine::entropy_counts")
    def _entropy_counts_fake(x, channel_dim, per_position, inclusive):
        shape = tuple(x.shape[1:]) if per_position else (x.shape[channel_dim],)
        return x.new_empty(shape, dtype=torch.int64), x.new_empty((), dtype=torch.int64)

    @torch.library.register_fake("pyengine::entropy_counts_add_")
    def _entropy_counts_add_fake(counts, nan_count, x, channel_dim, per_position, inclusive):
        check_op_devices("entropy_counts_add_", x=x, counts=counts, nan_count=nan_count)
        return None

    @torch.library.register_fake("pyengine::entropy_counts_add_many_")
    def _entropy_counts_add_many_fake(counts, nan_count, xs, channel_dims, per_position, inclusive):
        check_op_devices("entropy_counts_add_many_", xs=xs, counts=counts, nan_count=nan_count)
        return None

    @torch.library.register_fake("pyengine::relu_count")
    def _relu_count_fake(x, counts, nan_count, channel_dim, per_position, inclusive):
        check_op_devices("relu_count", x=x, counts=counts, nan_count=nan_count)
        return torch.empty_like(x)

    @torch.library.register_fake("pyengine::entropy_from_counts")
    def _entropy_from_counts_fake(counts, n_samples, eps):
        return counts.new_empty(counts.shape, dtype=torch.float32), counts.new_empty((4,), dtype=torch.float64)
