import math

import pytest
import torch

from pyengine.ops import (
    entropy_counts,
    entropy_counts_add_,
    entropy_counts_reference,
    entropy_from_counts,
    entropy_from_counts_reference,
    samples_per_neuron,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [
    ((7, 13, 5, 3), 1),  # odd NCHW
    ((1, 1, 1, 1), 1),
    ((16, 64, 8, 8), 1),
    ((5, 11), 1),  # (N, C) after a Linear
    ((3, 17, 33), -1),  # (B, T, C)
    ((2, 9, 70), 2),
    ((0, 4, 3, 3), 1),  # empty batch
    ((4, 0, 3, 3), 1),  # no channels
]


def _sample(shape, dtype, device, zeros=True):
    x = torch.randn(shape, device=device).to(dtype)
    if zeros and x.numel():
        x.view(-1)[:: 7] = 0  # exact zeros separate > from >=
        x.view(-1)[1::11] = -0.0
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cdim", SHAPES)
@pytest.mark.parametrize("inclusive", [False, True])
def test_counts_match_reference(device, poison, dtype, shape, cdim, inclusive):
    x = _sample(shape, dtype, device)
    got = entropy_counts(x, cdim, inclusive=inclusive)
    ref = entropy_counts_reference(x, cdim % x.dim(), inclusive=inclusive)
    assert got.dtype == torch.int64
    assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inclusive", [False, True])
def test_counts_channels_last_and_non_contiguous(device, poison, dtype, inclusive):
    x = _sample((6, 10, 7, 5), dtype, device)
    cl = x.to(memory_format=torch.channels_last)
    assert torch.equal(entropy_counts(cl, 1, inclusive=inclusive), entropy_counts_reference(x, 1, inclusive=inclusive))
    nc = _sample((10, 6, 5, 7), dtype, device).transpose(0, 1)  # neither layout
    assert torch.equal(entropy_counts(nc, 1, inclusive=inclusive), entropy_counts_reference(nc, 1, inclusive=inclusive))
    sl = _sample((6, 20, 7, 5), dtype, device)[:, ::2]
    assert torch.equal(entropy_counts(sl, 1), entropy_counts_reference(sl, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "btc"])
def test_counts_per_position(device, poison, dtype, layout):
    if layout == "btc":
        x = _sample((4, 9, 6), dtype, device)
    else:
        x = _sample((5, 3, 4, 7), dtype, device)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    got = entropy_counts(x, per_position=True)
    assert got.shape == x.shape[1:]
    assert torch.equal(got, entropy_counts_reference(x, per_position=True))


def test_counts_hand_computed(device):
    # channel 0: values 1, -1, 0, 2 -> 2 ON with >, 3 with >=; channel 1: all > 0.
    x = torch.tensor([[1.0, 3.0], [-1.0, 1.0], [0.0, 2.0], [2.0, 5.0]], device=device)
    assert entropy_counts(x, 1).tolist() == [2, 4]
    assert entropy_counts(x, 1, inclusive=True).tolist() == [3, 4]


def test_counts_large_plane_and_many_rows(device):
    x = torch.randn(3, 2, 300, 300, device=device)  # planes of 90000
    assert torch.equal(entropy_counts(x, 1), entropy_counts_reference(x, 1))
    r = torch.randn(40000, 3, device=device)
    assert torch.equal(entropy_counts(r, 1), entropy_counts_reference(r, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inclusive", [False, True])
def test_counts_stream_order(device, poison, monkeypatch, dtype, inclusive):
    """PYENGINE_ENTROPY_ORDER=stream (CUDA): the flat-order count of NCHW tensors with planes of
    >= 32 vectors, rows ending inside a warp's load, NaNs; and shapes it leaves to the strips."""
    monkeypatch.setenv("PYENGINE_ENTROPY_ORDER", "stream")
    for shape in ((9, 40, 28, 28), (5, 3, 16, 16), (3, 5, 11, 12), (4, 6, 5, 5), (2, 7, 31, 1)):
        x = _sample(shape, dtype, device)
        x.view(-1)[5::97] = float("nan")
        for cdim, pp in ((1, False), (1, True)):
            got = entropy_counts(x, cdim, pp, inclusive=inclusive, check_nan=False)
            assert torch.equal(got, entropy_counts_reference(x, cdim, pp, inclusive=inclusive)), (shape, pp)
        c = torch.full((shape[1],), 3, dtype=torch.int64, device=device)
        nan = torch.zeros((), dtype=torch.int64, device=device)
        entropy_counts_add_(c, x, nan_count=nan, inclusive=inclusive)
        assert torch.equal(c, 3 + entropy_counts_reference(x, 1, inclusive=inclusive))
        assert int(nan) == int(torch.isnan(x).sum())


def test_counts_reject_nan(device):
    x = torch.randn(4, 3, 2, 2, device=device)
    x[1, 2, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        entropy_counts(x)
    # NaN is never ON when the check is turned off
    got = entropy_counts(x, check_nan=False)
    assert torch.equal(got, entropy_counts_reference(x))


def test_counts_bad_input(device):
    with pytest.raises(TypeError, match="dtype"):
        entropy_counts(torch.ones(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="channel_dim"):
        entropy_counts(torch.ones(2, 3, device=device), channel_dim=4)
    with pytest.raises(ValueError, match="at least 2"):
        entropy_counts(torch.ones(5, device=device))
    with pytest.raises(TypeError, match="torch.Tensor"):
        entropy_counts([1.0, 2.0])


def _h(p, eps=0.0):
    """The authors' formula: eps inside the logarithms only; a constant neuron has exactly 0."""
    if p in (0.0, 1.0):
        return 0.0
    return -(p * math.log2(p + eps) + (1 - p) * math.log2(1 - p + eps))


@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_entropy_from_counts(device, poison, eps):
    n = 10
    counts = torch.tensor([0, 10, 5, 3, 10, 1], device=device)
    stats = entropy_from_counts(counts, n, eps)
    expect = [_h(c / n, eps) for c in counts.tolist()]
    assert torch.allclose(stats.per_neuron.cpu().double(), torch.tensor(expect, dtype=torch.float64), atol=1e-6)
    assert stats.mean == pytest.approx(sum(expect) / 6, abs=1e-12)
    assert stats.mean_nonconstant == pytest.approx((expect[2] + expect[3] + expect[5]) / 3, abs=1e-12)
    assert (stats.n_always_on, stats.n_always_off) == (2, 1)
    h_ref, s_ref = entropy_from_counts_reference(counts, n, eps)
    assert torch.allclose(stats.summary, s_ref, atol=1e-12)
    assert torch.allclose(stats.per_neuron, h_ref, atol=1e-7)


def test_entropy_eps_inside_the_logs_only(device):
    # constant neurons are exactly 0 even with eps (a clamp of p would give ~1.8e-4 bits); a p = 0.5
    # neuron gives -log2(0.5 + eps), computed by hand
    eps = 1e-5
    stats = entropy_from_counts(torch.tensor([0, 8, 4], device=device), 8, eps)
    h = stats.per_neuron.cpu()
    assert h[0].item() == 0.0 and h[1].item() == 0.0
    assert h[2].item() == pytest.approx(-math.log2(0.5 + eps), abs=1e-7)
    assert h[2].item() < 1.0


def test_entropy_from_counts_all_constant_and_empty(device):
    s = entropy_from_counts(torch.tensor([0, 4, 4], device=device), 4)
    assert s.mean == 0.0 and s.mean_nonconstant == 0.0 and (s.n_always_on, s.n_always_off) == (2, 1)
    e = entropy_from_counts(torch.zeros(0, dtype=torch.int64, device=device), 4)
    assert e.per_neuron.numel() == 0 and e.mean == 0.0


def test_entropy_from_counts_random_vs_reference(device):
    n = 997
    counts = torch.randint(0, n + 1, (3, 50), device=device)
    h, s = entropy_from_counts(counts, n)
    hr, sr = entropy_from_counts_reference(counts, n)
    assert torch.allclose(h, hr, atol=1e-6) and torch.allclose(s, sr, atol=1e-10)


def test_entropy_from_counts_bad_input(device):
    with pytest.raises(ValueError, match="n_samples"):
        entropy_from_counts(torch.tensor([1], device=device), 0)
    with pytest.raises(ValueError, match=r"counts must lie"):
        entropy_from_counts(torch.tensor([5], device=device), 4)
    with pytest.raises(TypeError, match="dtype"):
        entropy_from_counts(torch.tensor([0.5], device=device), 4)


def test_samples_per_neuron():
    assert samples_per_neuron((8, 16, 4, 4)) == 128
    assert samples_per_neuron((8, 16, 4, 4), per_position=True) == 8
    assert samples_per_neuron((2, 5, 7), channel_dim=2) == 10


def test_opcheck_and_compile(device):
    import pyengine

    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    x = torch.randn(4, 6, 3, 3, device=device)
    torch.library.opcheck(torch.ops.pyengine.entropy_counts.default, (x, 1, False, False))
    torch.library.opcheck(torch.ops.pyengine.entropy_counts.default, (x, 1, True, True))
    counts = entropy_counts(x)
    torch.library.opcheck(torch.ops.pyengine.entropy_from_counts.default, (counts, 36, 0.0))

    def f(t):
        c, _ = torch.ops.pyengine.entropy_counts(t, 1, False, False)
        return c * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), entropy_counts_reference(x) * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "btc", "per_position", "per_position_cl", "strided"])
def test_counts_add_and_relu_count(device, poison, dtype, layout):
    from pyengine.ops import entropy_counts_add_, relu_count

    x = _sample((6, 10, 7, 5), dtype, device)
    cd, pp = 1, False
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "btc":
        x, cd = _sample((4, 9, 24), dtype, device), 2
    elif layout == "per_position":
        pp = True
    elif layout == "per_position_cl":
        x, pp = x.to(memory_format=torch.channels_last), True
    elif layout == "strided":
        x = _sample((6, 20, 7, 5), dtype, device)[:, ::2]
    x[(0,) * x.dim()] = float("nan")  # one NaN: never ON, counted apart
    ref = entropy_counts_reference(x, cd, pp)
    shape = x.shape[1:] if pp else (x.shape[cd],)
    counts = torch.full(shape, 3, dtype=torch.int64, device=device)  # accumulates onto what is there
    nan = torch.zeros((), dtype=torch.int64, device=device)
    entropy_counts_add_(counts, x, cd, pp, nan_count=nan)
    entropy_counts_add_(counts, x, cd, pp, nan_count=nan)
    assert torch.equal(counts, 3 + 2 * ref) and int(nan) == 2
    counts.zero_()
    y = relu_count(x, counts, nan, cd, pp)
    assert torch.equal(counts, ref) and int(nan) == 3
    expect = torch.relu(x)
    assert y.shape == x.shape and torch.equal(y.nan_to_num(9.0), expect.nan_to_num(9.0))


def test_relu_count_gradient(device):
    from pyengine.ops import relu_count

    x = torch.randn(4, 6, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    counts = torch.zeros(6, dtype=torch.int64, device=device)
    y = relu_count(x, counts)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    xr = x.detach().clone().requires_grad_(True)
    (rx,) = torch.autograd.grad(torch.relu(xr), xr, g)
    assert torch.equal(gx, rx) and torch.equal(counts, entropy_counts_reference(x.detach(), 1))
    assert torch.autograd.gradcheck(lambda t: relu_count(t, torch.zeros(6, dtype=torch.int64, device=device)),
                                    (x[:1, :, :1, :2].detach().clone().requires_grad_(True),))


def test_counts_add_opcheck(device):
    import pyengine

    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    x = torch.randn(4, 6, 3, 3, device=device)
    c = torch.zeros(6, dtype=torch.int64, device=device)
    n = torch.zeros((), dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.pyengine.entropy_counts_add_.default, (c, n, x, 1, False, False))
    torch.library.opcheck(torch.ops.pyengine.relu_count.default, (x, c, n, 1, False, True))
    # with a gradient: the op's C++ autograd node
    torch.library.opcheck(torch.ops.pyengine.relu_count.default,
                          (x.double().requires_grad_(), c, n, 1, False, True))


@pytest.mark.parametrize("inclusive", [False, True])
@pytest.mark.parametrize("per_position", [False, True])
def test_counts_add_many_matches_one_by_one(device, poison, inclusive, per_position):
    """entropy_counts_add_many_ over a forward pass's worth of tensors - NCHW, channels-last,
    (B, T, C), strided, unaligned, empty, four dtypes, more than one launch's worth - adds exactly
    what entropy_counts_reference gives for each, and every NaN once."""
    from pyengine.ops import entropy_counts_add_many_

    torch.manual_seed(3)
    xs, dims = [], []
    for i in range(48):  # 12 of every kind and dtype, then 36 aligned float32 NCHW: two launches of 32 at most
        dtype = DTYPES[i % 4] if i < 12 else torch.float32
        kind = i % 6 if i < 12 else 0
        if kind == 0:
            x, d = _sample((3 + i % 4, 5, 4, 3), dtype, device), 1
        elif kind == 1:
            x, d = _sample((2, 6, 3, 5), dtype, device).to(memory_format=torch.channels_last), 1
        elif kind == 2:
            x, d = _sample((3, 7, 8 + i % 3), dtype, device), -1
        elif kind == 3:
            x, d = _sample((4, 12, 3, 3), dtype, device)[:, ::2], 1
        elif kind == 4:
            x, d = _sample((31,), dtype, device)[1:].view(5, 6), 1  # one element in: not 16-byte aligned
        else:
            x, d = _sample((0, 4, 2), dtype, device), 1
        xs.append(x)
        dims.append(d)
    xs[0][0, 0, 0, 0] = float("nan")
    xs[3][1, 1] = float("nan")
    refs = [entropy_counts_reference(x, 1 if per_position else d % x.dim(), per_position, inclusive) for x, d in zip(xs, dims)]
    counts = [torch.full_like(r, 2) for r in refs]
    nan = torch.full((), 5, dtype=torch.int64, device=device)
    entropy_counts_add_many_(counts, xs, dims, per_position, inclusive, nan_count=nan)
    for i, (c, r) in enumerate(zip(counts, refs)):
        assert torch.equal(c, r + 2), i
    assert int(nan) == 5 + 1 + (xs[3][1, 1].numel())
    # nothing is counted when one argument is bad
    before = [c.clone() for c in counts]
    with pytest.raises(ValueError, match=r"counts\[2\] has shape"):
        entropy_counts_add_many_(counts[:2] + [counts[2][:1]] + counts[3:], xs, dims, per_position, inclusive, nan)
    assert all(torch.equal(a, b) for a, b in zip(before, counts))


def test_counts_add_many_opcheck(device):
    import pyengine

    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    xs = [torch.randn(4, 6, 3, 3, device=device), torch.randn(2, 5, 7, device=device, dtype=torch.bfloat16)]
    cs = [torch.zeros(6, dtype=torch.int64, device=device), torch.zeros(7, dtype=torch.int64, device=device)]
    n = torch.zeros((), dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.pyengine.entropy_counts_add_many_.default, (cs, n, xs, [1, -1], False, True))
    torch.library.opcheck(torch.ops.pyengine.entropy_counts_add_many_.default, ([], n, [], [], False, False))


def test_integer_arguments_are_not_truncated():
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(TypeError, match="channel_dim must be an integer"):
        entropy_counts(x, 1.7)
    with pytest.raises(TypeError, match=r"channel_dims\[0\] must be an integer"):
        from pyengine.ops import entropy_counts_add_many_
        entropy_counts_add_many_([torch.zeros(3, dtype=torch.int64)], [x], [1.0])
    with pytest.raises(TypeError, match="n_samples must be an integer"):
        entropy_from_counts(torch.tensor([1, 2]), 4.9)
    assert entropy_counts(x, torch.tensor(1)).tolist() == entropy_counts_reference(x, 1).tolist()  # an int tensor is fine


def test_default_checks_compile_fullgraph():
    # entropy_counts' NaN check and entropy_from_counts' range check read a tensor into a Python
    # int: under torch.compile(fullgraph=True) tracing failed ("Could not guard on data-dependent
    # expression"); compiled, they are runtime assertions (the native kernel's own check for the range)
    from pyengine.ops import entropy_counts, entropy_from_counts

    count = torch.compile(lambda a: entropy_counts(a), fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 2, 2)
    assert torch.equal(count(x), entropy_counts_reference(x))
    x[1, 2, 0, 1] = float("nan")
    with pytest.raises(RuntimeError, match="x contains NaN values; entropy counts need finite activations"):
        count(x)
    stats = torch.compile(lambda c: entropy_from_counts(c, 4).summary, fullgraph=True, backend="aot_eager")
    c = torch.tensor([0, 1, 2, 4])
    assert torch.allclose(stats(c), entropy_from_counts_reference(c, 4)[1])
    with pytest.raises((ValueError, RuntimeError), match=r"counts holds 5 at position 1, outside \[0, n_samples = 4\]"):
        stats(torch.tensor([0, 5, 2, 4]))


def test_vmap_over_counts_and_entropy():
    # under torch.vmap the wrappers' checks read tensors into Python ints: entropy_from_counts
    # failed with torch's ".item() ... not supported" whatever its input, and entropy_counts'
    # NaN check did not say which argument to change
    x = torch.randn(4, 5, 3)
    v = torch.vmap(lambda a: entropy_counts(a, check_nan=False))(x)
    assert torch.equal(v, torch.stack([entropy_counts_reference(a) for a in x]))
    with pytest.raises(ValueError, match="pass check_nan=False"):
        torch.vmap(lambda a: entropy_counts(a))(x)
    c = torch.tensor([[0, 1, 5, 2], [5, 5, 0, 3], [1, 2, 3, 4]])
    s = torch.vmap(lambda row: entropy_from_counts(row, 5).summary)(c)
    assert torch.allclose(s, torch.stack([entropy_from_counts_reference(row, 5)[1] for row in c]))
    with pytest.raises(ValueError, match=r"counts holds 6 at position 2, outside \[0, n_samples = 5\]"):
        torch.vmap(lambda row: entropy_from_counts(row, 5).summary)(c + 1)  # the native kernel's check
