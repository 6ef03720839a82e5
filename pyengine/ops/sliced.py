"""Batched random-projection (max-)sliced Wasserstein distance (LaCoOT's regulariser).

For pairs of point sets X_b, Y_b (n points each, d dims) and K directions theta_k (rows of a
(K, d) matrix; random ones are unit vectors):

    S[b, k] = (1/n) sum_i |sort(X_b theta_k)_i - sort(Y_b theta_k)_i|^p
    dist[b] = (max_k S[b, k])^(1/p)     reduce="max"  (POT max_sliced_wasserstein_distance)
    dist[b] = (mean_k S[b, k])^(1/p)    reduce="mean" (POT sliced_wasserstein_distance)

Differentiable in X and Y, once (not in the directions, and no second derivative: a double
backward raises). The gradient needs only each projection's
sort permutation (for the max, only the winning direction's); where S = 0 the gradient is taken
as 0 rather than the infinite derivative of t^(1/p) at 0. Half-precision inputs are computed
in float32 and the result is float32. p must be finite (p = inf is refused). A NaN in any
input makes the result NaN, which the wrapper reports as a ValueError.

Memory: a call needs about ``sliced_work_bytes(B, n, d, K)`` bytes of working memory (the
directions and the projections of x and y with their sort permutations); above
``MAX_WORK_BYTES`` (1 GiB; raise it if you mean it) the call is refused with a clear message
instead of quietly allocating - e.g. n_directions=10**7 on a handful of points.

On CUDA the projections are cuBLAS GEMMs in the precision torch.backends.cuda.matmul allows:
float32 by default, TF32 if you enable it (``torch.backends.cuda.matmul.allow_tf32 = True`` or
``torch.set_float32_matmul_precision("high")``). With TF32 the distance stays within
``projection_error_bound(x, y, directions)`` of the exact one - an a-priori bound that holds for
any input (derivation in its docstring); on random data the error is far smaller (3-8e-5 relative
on an H100, benchmarks/results/gpu_h100.md). The grouped op projects with its own float32 kernels
and is not affected by the setting.
"""
from __future__ import annotations

import math

import torch

from pyengine import _native
from pyengine.ops._checks import (
    as_int,
    check_op_devices,
    check_same_device,
    check_tensor,
    nan_check_value,
    same_device,
)

_SW_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

MAX_WORK_BYTES = 1 << 30


def sliced_work_bytes(b: int, n: int, d: int, k: int, elem_size: int = 4) -> int:
    """Working memory of one call, roughly: the K x d directions and their draw, and the 2 B K n
    projections held about twice (product and sorted copy) with their int32 sort permutations."""
    return elem_size * 2 * k * d + 2 * b * k * n * (2 * elem_size + 4)


def sliced_wasserstein_reference(x, y, theta, p=2.0, reduce="max"):
    px = x @ theta.T  # (B, n, K)
    py = y @ theta.T
    sx = px.sort(dim=-2).values
    sy = py.sort(dim=-2).values
    s = (sx - sy).abs().pow(p).mean(-2)  # (B, K)
    r = s.max(-1).values if reduce == "max" else s.mean(-1)
    return r.pow(1.0 / p)


def projection_error_bound(
    x: torch.Tensor, y: torch.Tensor, directions: torch.Tensor, *, mantissa_bits: int = 10
) -> torch.Tensor:
    """A-priori bound on |distance - exact distance| per pair when the projections are GEMMs whose
    operands are rounded to ``mantissa_bits`` explicit mantissa bits (TF32: 10, the default;
    truncated or rounded to nearest) and whose products are summed in float32 in any order (split-K
    included). x, y: (n, d) or (B, n, d); directions: (K, d). Returns float64, a scalar or (B,).

    Derivation. Rounding an operand changes it by a factor (1 + e) with |e| <= u = 2^-mantissa_bits,
    so a product is off by at most (2u + u^2) of its size, and summing d of them in float32 adds at
    most gamma_d = d 2^-24 / (1 - d 2^-24) of the sum of their sizes. So each projection
    <x_i, theta_k> is off by at most c = (1 + u)^2 (1 + gamma_d) - 1 times sum_j |x_ij theta_kj|,
    which is <= |x_i| |theta_k| (Cauchy-Schwarz). Sorting moves no value by more than the largest
    perturbation of its column, and both reductions are normalised l_p norms of the sorted
    differences (the max: over one direction's n; the mean: over all K n), so by the triangle
    inequality the distance moves by at most the largest error of an x projection plus the largest
    of a y projection: c max_k |theta_k| (max_i |x_i| + max_i |y_i|). The bound is tight: points
    parallel to a direction whose coordinates all lose just under u to truncation come within 4% of
    it at d = 1024 (tests/test_ops_sliced.py). Rounding of the float32 cost sums (relative, about n
    2^-24) is not included.
    """
    if not isinstance(mantissa_bits, int) or not 1 <= mantissa_bits <= 52:
        raise ValueError(f"mantissa_bits must be an int in [1, 52], got {mantissa_bits!r}")
    check_tensor("x", x, min_ndim=2)
    check_tensor("y", y, min_ndim=2)
    check_tensor("directions", directions, ndim=2)
    check_same_device(x=x, y=y, directions=directions)
    if x.shape != y.shape or x.dim() > 3 or directions.shape[1] != x.shape[-1]:
        raise ValueError(
            f"x and y must both be (n, d) or (B, n, d) and directions (K, d); got {tuple(x.shape)}, "
            f"{tuple(y.shape)} and {tuple(directions.shape)}"
        )
    if directions.shape[0] == 0 or x.shape[-2] == 0:
        raise ValueError(f"directions and points must not be empty; got {directions.shape[0]} direction(s) "
                         f"and {x.shape[-2]} point(s)")
    d = x.shape[-1]
    u = 2.0 ** -mantissa_bits
    # float32 sums of 2^24 or more terms have no such bound (gamma_d is infinite)
    gamma = d * 2.0**-24 / (1.0 - d * 2.0**-24) if d < 2**24 else math.inf
    c = (1.0 + u) ** 2 * (1.0 + gamma) - 1.0
    norm = lambda t: t.detach().double().norm(dim=-1).amax(dim=-1)  # noqa: E731 - the largest row norm
    return c * float(norm(directions)) * (norm(x) + norm(y))


def _check_work(b: int, n: int, d: int, k: int, work: torch.dtype, what: str) -> None:
    """Refuses a call whose working memory (``sliced_work_bytes``) is above ``MAX_WORK_BYTES``."""
    need = sliced_work_bytes(b, n, d, k, 8 if work == torch.float64 else 4)
    if need > MAX_WORK_BYTES:
        raise ValueError(
            f"{k} directions for {what} need about {need / 2**30:.2f} GiB of working memory, above "
            f"pyengine.ops.sliced.MAX_WORK_BYTES = {MAX_WORK_BYTES / 2**30:.2f} GiB; use fewer directions (or raise "
            "the limit if you mean it)"
        )


def _check_p_reduce(p, reduce: str) -> float:
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    p = float(p)
    if math.isinf(p):
        raise ValueError("p = inf (the largest |difference| of sorted projections) is not supported; use a finite p >= 1")
    if not p >= 1.0:
        raise ValueError(f"p must be >= 1, got {p}")
    return p


def _check_directions_grad(directions) -> None:
    if isinstance(directions, torch.Tensor) and directions.requires_grad and torch.is_grad_enabled():
        raise ValueError("directions require grad, but the distance is not differentiable in the directions "
                         "(only in x and y); pass directions.detach()")


def _check_generator(generator, device):
    """The device the draw goes to: ``device``, else the generator's; a generator elsewhere is refused."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if device is None:
            return torch.device(generator.device)
        if not same_device(generator.device, device):
            raise ValueError(f"generator is on {generator.device} but the directions go to {torch.device(device)}; "
                             "pass a generator on the data's device")
    # torch.get_default_device() cannot be traced by torch.compile; a new tensor's device is the default
    return torch.device(device) if device is not None else torch.empty(0).device


def _check_direction_dtype(dtype) -> None:
    if dtype not in _SW_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in _SW_DTYPES)
        raise TypeError(f"dtype must be a floating dtype ({allowed}) for unit directions, got {dtype}")


def _gaussians(rows: int, cols: int, generator, dev: torch.device, dtype, normalize: bool) -> torch.Tensor:
    """(rows, cols) standard normals (each row scaled to a unit vector when ``normalize``): on the CPU
    (float32 / float64, native build) from pyengine's counter-based generator keyed by one draw
    from ``generator``, elsewhere ``torch.randn`` on the device."""
    if dev.type == "cpu" and dtype in (torch.float32, torch.float64) and _native.native_available(dev):
        # the key stays a tensor: under torch.compile an int read from it would be data-dependent
        key = torch.randint(-(2**63), 2**63 - 1, (), generator=generator, dtype=torch.int64)
        theta = torch.empty(rows, cols, dtype=dtype)
        torch.ops.pyengine.fill_directions_keyed_(theta, key, normalize)
        return theta
    theta = torch.randn(rows, cols, generator=generator, device=dev, dtype=dtype)
    return theta / theta.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny) if normalize else theta


def random_directions(n_directions: int, dim: int, *, generator=None, device=None, dtype=torch.float32):
    """K unit vectors drawn uniformly on the sphere (normalised Gaussians) on ``device``.

    On the CPU (float32 / float64, native build) the Gaussians come from pyengine's counter-based
    generator (Philox4x32-10 and Box-Muller, ``fill_directions_``): every thread fills rows, the
    normalisation follows while a row is in cache, and the values depend only on one 64-bit key
    drawn from ``generator`` (torch's default generator when None) - the same directions on any
    thread count; LaCoOT's 50 x 30720 directions take 2.3x less time than ``torch.randn`` plus
    normalisation on one thread, 4.5-6.6x less on two (2-core CPU VM). Elsewhere ``torch.randn``
    draws them on the device.
    """
    n_directions = as_int("n_directions", n_directions)
    if n_directions < 1:
        raise ValueError(f"n_directions must be at least 1, got {n_directions}")
    dim = as_int("dim", dim)
    if dim < 1:
        raise ValueError(f"dim must be at least 1, got {dim}")
    _check_direction_dtype(dtype)
    return _gaussians(n_directions, dim, generator, _check_generator(generator, device), dtype, True)


def grouped_directions(dims, n_directions: int, *, generator=None, device=None, dtype=torch.float32):
    """(K, sum d): row k holds, in the column block of every pair g, an independent unit vector of
    dimension d_g (normalised Gaussians) - the directions :func:`sliced_wasserstein_grouped` draws
    when given none: the same generator state gives the same values."""
    dims = [as_int(f"dims[{i}]", d) for i, d in enumerate(dims)]
    n_directions = as_int("n_directions", n_directions)
    _check_direction_dtype(dtype)
    if n_directions < 1:
        raise ValueError(f"n_directions must be at least 1, got {n_directions}")
    if not dims or min(dims) < 1:
        raise ValueError(f"dims must be one or more sizes >= 1, got {dims}")
    theta = _gaussians(n_directions, sum(dims), generator, _check_generator(generator, device), dtype, False)
    return torch.cat(_unit_blocks(theta, dims), dim=1)


def _unit_blocks(theta: torch.Tensor, dims) -> list[torch.Tensor]:
    """The column blocks of ``theta`` of widths ``dims``, every row of each scaled to a unit vector."""
    tiny = torch.finfo(theta.dtype).tiny
    return [b / b.norm(dim=1, keepdim=True).clamp_min(tiny) for b in theta.split(list(dims), dim=1)]


def sliced_wasserstein(
    x: torch.Tensor,
    y: torch.Tensor,
    directions: torch.Tensor | None = None,
    *,
    n_directions: int = 50,
    p: float = 2.0,
    reduce: str = "max",
    generator: torch.Generator | None = None,
    check_nan: bool = True,
) -> torch.Tensor:
    """(Max-)sliced Wasserstein distance between x and y.

    x, y: (n, d) for one pair or (B, n, d) for B pairs (flatten per-point feature maps first,
    e.g. ``x.flatten(1)`` for LaCoOT's (n, C, H, W) block activations).
    directions: (K, d), used as given; when None, ``n_directions`` random unit vectors are drawn
    with ``generator`` (which must live on x's device). Returns a scalar for one pair, (B,) else.
    check_nan: raise ValueError when the result is NaN (a NaN in x, y or the directions). On CUDA
    that reads the result back - a host sync that stalls the launch queue - so training loops pass
    False and get NaN in the result instead (as the reference does), checking it when they log.
    Under torch.func transforms (grad, jacrev, vmap, ...) the distance is computed by
    :func:`sliced_wasserstein_reference`; under vmap pass check_nan=False.
    """
    check_tensor("x", x, dtypes=_SW_DTYPES, min_ndim=2)
    check_tensor("y", y, dtypes=_SW_DTYPES, min_ndim=2)
    p = _check_p_reduce(p, reduce)
    check_same_device(x=x, y=y, directions=directions)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape (equal point counts), got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() > 3:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; pass (n, d) or (B, n, d) - flatten per-point features first"
        )
    _check_directions_grad(directions)
    single = x.dim() == 2
    if single:
        x, y = x.unsqueeze(0), y.unsqueeze(0)
    if x.shape[1] == 0:
        raise ValueError("x and y hold no points")
    if x.shape[2] == 0:
        raise ValueError("x and y have zero features")
    if x.dtype != y.dtype:
        raise TypeError(f"x has dtype {x.dtype} but y has {y.dtype}; they must match")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(work), y.to(work)
    b, n, d = x.shape
    k = as_int("n_directions", n_directions) if directions is None else int(directions.shape[0]) if isinstance(directions, torch.Tensor) else 0
    _check_work(b, n, d, k, work, f"{b} pair(s) of {n} points in {d} dims")
    if directions is None:  # random_directions refuses a generator on another device than x
        theta = random_directions(n_directions, d, generator=generator, device=x.device, dtype=work)
    else:
        check_tensor("directions", directions, ndim=2)
        if directions.shape[1] != d:
            raise ValueError(f"directions have {directions.shape[1]} dims but the points have {d}")
        if directions.shape[0] == 0:
            raise ValueError("directions is empty")
        theta = directions.to(work)
    # torch.func transforms (grad, jacrev, vmap, ...) cannot run the op's registered autograd (torch
    # raised a confusing "must override the setup_context staticmethod"): they get the reference
    if _native.native_available(x.device) and not torch._C._are_functorch_transforms_active():
        need_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
        out = torch.ops.pyengine.sliced_wasserstein_fwd(
            x.contiguous(), y.contiguous(), theta.contiguous(), p, reduce == "max", need_grad
        )[0]
    else:
        out = sliced_wasserstein_reference(x, y, theta, p, reduce)
    # NaN anywhere in x, y or the directions reaches the result; checking the B results is far
    # cheaper than scanning the inputs (a data-dependent check: eager mode only)
    if check_nan and not torch.compiler.is_compiling() and nan_check_value(
            lambda: bool(torch.isnan(out).any()), "look at the result", " and test the distances for NaN yourself"):
        bad = [name for name, t in (("x", x), ("y", y), ("directions", theta)) if bool(torch.isnan(t).any())]
        if bad:
            raise ValueError(f"{' and '.join(bad)} contain{'s' if len(bad) == 1 else ''} NaN")
        raise ValueError("the distance is NaN though x, y and the directions hold no NaN: an infinity in them, or "
                         "projections that overflow float32")
    return out[0] if single else out


def sliced_wasserstein_grouped(
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    directions: torch.Tensor | list[torch.Tensor] | None = None,
    *,
    n_directions: int = 50,
    p: float = 2.0,
    reduce: str = "max",
    generator: torch.Generator | None = None,
    check_nan: bool = True,
) -> torch.Tensor:
    """(G,) (max-)sliced Wasserstein distances of G pairs ``(xs[g], ys[g])`` whose points have
    different dimensions d_g but one count n - LaCoOT's block pairs - in one native call with one
    autograd node: the same values as G calls of :func:`sliced_wasserstein`, a fraction of the
    host work (what a launch-bound GPU training step pays for).

    xs[g], ys[g]: (n, d_g) (flatten per-sample features first). directions: (K, sum d_g) with pair
    g using its column block of every row, or a list of G (K, d_g) tensors, used as given; when
    None, ``n_directions`` rows are drawn from ``generator`` with each block scaled to a unit
    vector (:func:`grouped_directions` gives the same values). check_nan as for
    :func:`sliced_wasserstein`. Like it, differentiable once in xs and ys, not in the directions."""
    if not isinstance(xs, (list, tuple)) or not isinstance(ys, (list, tuple)):
        raise TypeError("xs and ys must be lists of tensors, one per pair")
    if not xs or len(xs) != len(ys):
        raise ValueError(f"xs and ys must hold the same number (>= 1) of pairs, got {len(xs)} and {len(ys)}")
    p = _check_p_reduce(p, reduce)
    if isinstance(directions, (list, tuple)):
        for t in directions:
            _check_directions_grad(t)
    else:
        _check_directions_grad(directions)
    for i, (x, y) in enumerate(zip(xs, ys)):
        check_tensor(f"xs[{i}]", x, dtypes=_SW_DTYPES, ndim=2)
        check_tensor(f"ys[{i}]", y, dtypes=_SW_DTYPES, ndim=2)
        # one dtype for all (as sliced_wasserstein wants x and y alike): a float64 pair among
        # float32 ones must not be computed in float32 because xs[0] is float32, or the reverse
        for name, t in ((f"xs[{i}]", x), (f"ys[{i}]", y)):
            if t.dtype != xs[0].dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but xs[0] has {xs[0].dtype}; every pair must have one dtype")
        if y.shape != x.shape:
            raise ValueError(f"ys[{i}] has shape {tuple(y.shape)} but xs[{i}] has {tuple(x.shape)}; they must match")
        if x.shape[0] != xs[0].shape[0]:
            raise ValueError(f"xs[{i}] has {x.shape[0]} points but xs[0] has {xs[0].shape[0]}; every pair needs the same count")
    x0 = xs[0]
    work = torch.float64 if x0.dtype == torch.float64 else torch.float32
    xs = [x if x.dtype == work else x.to(work) for x in xs]
    ys = [y if y.dtype == work else y.to(work) for y in ys]
    dims = [x.shape[1] for x in xs]
    normalize = directions is None
    if directions is None:
        k = as_int("n_directions", n_directions)
        if k < 1:
            raise ValueError(f"n_directions must be at least 1, got {k}")
        _check_work(len(xs), x0.shape[0], sum(dims), k, work,
                    f"{len(xs)} pairs of {x0.shape[0]} points in {sum(dims)} dims in all")
        theta = _gaussians(k, sum(dims), generator, _check_generator(generator, x0.device), work, False)
    else:
        if isinstance(directions, (list, tuple)):
            if len(directions) != len(xs):
                raise ValueError(f"directions holds {len(directions)} tensors for {len(xs)} pairs")
            for i, (t, d) in enumerate(zip(directions, dims)):
                check_tensor(f"directions[{i}]", t, ndim=2)
                if t.shape[1] != d:
                    raise ValueError(f"directions[{i}] has {t.shape[1]} dims but pair {i}'s points have {d}")
            if len({t.shape[0] for t in directions}) != 1:
                raise ValueError(f"every pair needs the same number of directions, got "
                                 f"{[t.shape[0] for t in directions]}")
            directions = torch.cat([t.to(device=x0.device, dtype=work) for t in directions], dim=1)
        check_tensor("directions", directions, ndim=2)
        if directions.shape[0] == 0:
            raise ValueError("directions is empty")
        if directions.shape[1] != sum(dims):
            raise ValueError(f"directions have {directions.shape[1]} dims but the pairs have {sum(dims)} in all")
        theta = directions.to(work)
    if _native.native_available(x0.device):
        out = torch.ops.pyengine.sliced_wasserstein_grouped(xs, ys, theta, p, reduce == "max", normalize)
    else:
        check_same_device(**{f"xs[{i}]": x for i, x in enumerate(xs)}, **{f"ys[{i}]": y for i, y in enumerate(ys)},
                          directions=theta)
        blocks = _unit_blocks(theta, dims) if normalize else theta.split(dims, dim=1)
        out = torch.stack([sliced_wasserstein_reference(x[None], y[None], b, p, reduce)[0]
                           for x, y, b in zip(xs, ys, blocks)])
    if check_nan and not torch.compiler.is_compiling() and bool(torch.isnan(out).any()):
        bad = [i for i, v in enumerate(out.tolist()) if math.isnan(v)]
        raise ValueError(f"the distance of pair(s) {bad} is NaN: their points or directions contain NaN")
    return out


# --------------------------------------------------------------------------- registration

if _native.HAS_NATIVE:

    @torch.library.register_fake("pyengine::sliced_wasserstein_fwd")
    def _sw_fake(x, y, theta, p, use_max, need_grad):
        check_op_devices("sliced_wasserstein_fwd", x=x, y=y, theta=theta)
        b, n, _ = x.shape
        kg = (1 if use_max else theta.shape[0]) if need_grad else 0
        return (
            x.new_empty((b,)),
            x.new_empty((b, n, kg) if need_grad else (0,)),
            x.new_empty((b, n, kg) if need_grad else (0,)),
            x.new_empty((b,) if (need_grad and use_max) else (0,), dtype=torch.int64),
        )

    @torch.library.register_fake("pyengine::sliced_wasserstein_grouped")
    def _swg_fake(xs, ys, theta, p, use_max, normalize):
        check_op_devices("sliced_wasserstein_grouped", xs=xs, ys=ys, theta=theta)
        return theta.new_empty((len(xs),))

    @torch.library.register_fake("pyengine::fill_directions_")
    def _fill_directions_fake(out, seed, normalize):
        return None

    @torch.library.register_fake("pyengine::fill_directions_keyed_")
    def _fill_directions_keyed_fake(out, seed, normalize):
        check_op_devices("fill_directions_keyed_", out=out, seed=seed)  # a meta seed must not skip the fill
        return None

    @torch.library.register_fake("pyengine::sliced_wasserstein_bwd")
    def _sw_bwd_fake(grad, cx, cy, theta, win, use_max, need_x, need_y):
        check_op_devices("sliced_wasserstein_bwd", grad=grad, cx=cx, cy=cy, theta=theta, win=win)
        b, n, _ = cx.shape
        shape = (b, n, theta.shape[1])
        return cx.new_empty(shape if need_x else (0,)), cx.new_empty(shape if need_y else (0,))

    class _FirstOrderOnly(torch.autograd.Function):
        """Identity whose backward refuses: marks where a second derivative of sliced_wasserstein
        would be needed."""

        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("sliced_wasserstein has no second derivative: a gradient of its gradient in x or y "
                               "(double backward, e.g. a gradient penalty or a Hessian) is not supported")

    def _sw_setup(ctx, inputs, output):
        x, y, theta, p, use_max, need_grad = inputs
        _, cx, cy, win = output
        ctx.use_max = use_max
        ctx.need_grad = need_grad
        ctx.save_for_backward(theta, cx, cy, win)

    def _sw_backward(ctx, g_dist, g_cx, g_cy, g_win):
        theta, cx, cy, win = ctx.saved_tensors
        if ctx.needs_input_grad[2]:
            raise ValueError("sliced_wasserstein is not differentiable in the directions (only in x and y); "
                             "pass directions.detach()")
        if not ctx.need_grad:
            raise RuntimeError("sliced_wasserstein_fwd was called with need_grad=False but x or y requires grad")
        need_x, need_y = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not torch.is_grad_enabled():  # the usual case: one native pass, no graph kept
            gx, gy = torch.ops.pyengine.sliced_wasserstein_bwd(g_dist, cx, cy, theta, win, ctx.use_max, need_x, need_y)
            return (gx if need_x else None), (gy if need_y else None), None, None, None, None
        # create_graph=True: the same formula in torch ops, differentiable in g_dist; cx / cy enter
        # through _FirstOrderOnly, so that a gradient of this gradient in x or y raises instead of
        # coming out 0 (their derivative through the sorts is not provided)
        g = g_dist[:, None, None]
        cx, cy = _FirstOrderOnly.apply(cx), _FirstOrderOnly.apply(cy)
        if ctx.use_max:
            th = theta[win][:, None, :]  # (B, 1, d): only the winning direction
            gx, gy = (g * cx) * th, (g * cy) * th  # rank-1 products
        else:
            gx, gy = g * (cx @ theta), g * (cy @ theta)
        return (gx if need_x else None), (gy if need_y else None), None, None, None, None

    torch.library.register_autograd("pyengine::sliced_wasserstein_fwd", _sw_backward, setup_context=_sw_setup)
