import numpy as np
import pytest
import torch

import pyengine
from conftest import CUDA_OK
from pyengine.ops import random_directions, sliced_wasserstein, sliced_wasserstein_reference

ot = pytest.importorskip("ot")


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("n,d,k", [(1, 1, 1), (17, 5, 7), (64, 33, 50), (301, 12, 3)])
def test_matches_pot(device, poison, reduce, p, n, d, k):
    g = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, d, generator=g, dtype=torch.float64) * 2 + 0.5
    theta = random_directions(k, d, generator=g, dtype=torch.float64)
    fn = ot.sliced.max_sliced_wasserstein_distance if reduce == "max" else ot.sliced.sliced_wasserstein_distance
    expect = fn(x.numpy(), y.numpy(), n_projections=k, p=p, projections=theta.T.numpy())
    got = sliced_wasserstein(x.to(device), y.to(device), theta.to(device), p=p, reduce=reduce)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(float(got), float(expect), rtol=1e-10, atol=1e-12)
    got32 = sliced_wasserstein(x.float().to(device), y.float().to(device), theta.float().to(device), p=p, reduce=reduce)
    np.testing.assert_allclose(float(got32), float(expect), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_batched_equals_each_pair(device, poison, reduce):
    b, n, d, k = 5, 40, 9, 11
    x = torch.randn(b, n, d, device=device)
    y = torch.randn(b, n, d, device=device) + 0.3
    theta = random_directions(k, d, device=device)
    batched = sliced_wasserstein(x, y, theta, reduce=reduce)
    assert batched.shape == (b,)
    for i in range(b):
        single = sliced_wasserstein(x[i], y[i], theta, reduce=reduce)
        assert torch.allclose(batched[i], single, rtol=1e-6)
    assert torch.allclose(batched, sliced_wasserstein_reference(x, y, theta, 2.0, reduce), rtol=1e-5)


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("p", [1.5, 2.0])
def test_gradients_match_reference(device, reduce, p):
    b, n, d, k = 3, 25, 6, 8
    x = torch.randn(b, n, d, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.randn(b, n, d, device=device, dtype=torch.float64, requires_grad=True)
    theta = random_directions(k, d, device=device, dtype=torch.float64)
    w = torch.rand(b, device=device, dtype=torch.float64)
    gx, gy = torch.autograd.grad((sliced_wasserstein(x, y, theta, p=p, reduce=reduce) * w).sum(), [x, y])
    rx, ry = torch.autograd.grad((sliced_wasserstein_reference(x, y, theta, p, reduce) * w).sum(), [x, y])
    assert torch.allclose(gx, rx, atol=1e-10) and torch.allclose(gy, ry, atol=1e-10)


@pytest.mark.parametrize("n", [3, 32, 33, 200])  # the CPU sorts rows of <= 32 by comparison, longer ones by radix
def test_float32_sort_paths_match_float64(device, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(2, n, 6, generator=g, dtype=torch.float64)
    y = torch.randn(2, n, 6, generator=g, dtype=torch.float64) + 0.4
    theta = random_directions(9, 6, generator=g, dtype=torch.float64)
    for reduce in ("max", "mean"):
        xa = x.float().to(device).requires_grad_()
        ya = y.float().to(device).requires_grad_()
        got = sliced_wasserstein(xa, ya, theta.float().to(device), reduce=reduce)
        ref = sliced_wasserstein_reference(x, y, theta, 2.0, reduce)
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-5, atol=1e-6)
        gx, gy = torch.autograd.grad(got.sum(), [xa, ya])
        xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
        rx, ry = torch.autograd.grad(sliced_wasserstein_reference(xr, yr, theta, 2.0, reduce).sum(), [xr, yr])
        torch.testing.assert_close(gx.double().cpu(), rx, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gy.double().cpu(), ry, rtol=1e-4, atol=1e-5)
    # ties: integer points on axis directions project to many equal values; the distance does not
    # depend on how ties are ordered
    xi = torch.randint(-3, 4, (1, n, 4), generator=g).double()
    yi = torch.randint(-2, 5, (1, n, 4), generator=g).double()
    eye = torch.eye(4, dtype=torch.float64)
    got = sliced_wasserstein(xi.float().to(device), yi.float().to(device), eye.float().to(device), reduce="max")
    torch.testing.assert_close(got.double().cpu(), sliced_wasserstein_reference(xi, yi, eye, 2.0, "max"), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_gradcheck(reduce):
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    theta = random_directions(5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: sliced_wasserstein(a, b, theta, p=2.0, reduce=reduce), (x, y))


def test_half_inputs_compute_in_float32(device):
    x = torch.randn(30, 8, device=device)
    y = torch.randn(30, 8, device=device)
    theta = random_directions(6, 8, device=device)
    out = sliced_wasserstein(x.bfloat16(), y.bfloat16(), theta)
    ref = sliced_wasserstein_reference(x.bfloat16().float()[None], y.bfloat16().float()[None], theta)[0]
    assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-5)


def test_identical_sets_give_zero_and_finite_grad(device):
    x = torch.randn(10, 4, device=device, requires_grad=True)
    d = sliced_wasserstein(x, x.detach().clone(), n_directions=5)
    assert float(d.detach()) == 0.0
    d.backward()
    assert torch.isfinite(x.grad).all()


def test_random_directions_seeded_and_unit(device):
    g1 = torch.Generator(device=device).manual_seed(3)
    g2 = torch.Generator(device=device).manual_seed(3)
    a = random_directions(10, 7, generator=g1, device=device)
    b = random_directions(10, 7, generator=g2, device=device)
    assert torch.equal(a, b)
    assert torch.allclose(a.norm(dim=1), torch.ones(10, device=device), atol=1e-6)
    x = torch.randn(9, 7, device=device)
    y = torch.randn(9, 7, device=device)
    s1 = sliced_wasserstein(x, y, generator=torch.Generator(device=device).manual_seed(5))
    s2 = sliced_wasserstein(x, y, generator=torch.Generator(device=device).manual_seed(5))
    assert torch.equal(s1, s2)


def test_bad_input(device):
    x = torch.randn(5, 3, device=device)
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein(x, torch.randn(6, 3, device=device))
    with pytest.raises(ValueError, match="p must be"):
        sliced_wasserstein(x, x, p=0.5)
    with pytest.raises(ValueError, match="reduce"):
        sliced_wasserstein(x, x, reduce="sum")
    with pytest.raises(ValueError, match="dims"):
        sliced_wasserstein(x, x, torch.randn(4, 2, device=device))
    with pytest.raises(TypeError, match="dtype"):
        sliced_wasserstein(x.long(), x.long())
    with pytest.raises(ValueError, match="no points"):
        sliced_wasserstein(x[:0], x[:0])
    with pytest.raises(ValueError, match="flatten"):
        sliced_wasserstein(torch.randn(2, 3, 4, 5, device=device), torch.randn(2, 3, 4, 5, device=device))
    if device.type == "cpu" and torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            sliced_wasserstein(x, x.cuda())


def test_opcheck_and_compile(device):
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    x = torch.randn(2, 12, 5, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 12, 5, device=device, dtype=torch.float64, requires_grad=True)
    theta = random_directions(4, 5, device=device, dtype=torch.float64)
    for use_max in (True, False):
        torch.library.opcheck(torch.ops.pyengine.sliced_wasserstein_fwd.default, (x, y, theta, 2.0, use_max, True))

    class Reg(torch.nn.Module):
        def forward(self, a, b):
            return sliced_wasserstein(a, b, theta, p=2.0)

    compiled = torch.compile(Reg(), fullgraph=True, backend="aot_eager")
    out = compiled(x, y)
    assert torch.allclose(out, sliced_wasserstein_reference(x, y, theta))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_nan_rejected(device):
    x = torch.randn(5, 3, device=device)
    y = x.clone()
    y[2, 1] = float("nan")
    with pytest.raises(ValueError, match="y contains NaN"):
        sliced_wasserstein(x, y)


def _bwd_formula(grad, cx, cy, theta, win, use_max):
    """float64 d dist / d (x, y) from the forward's per-point coefficients."""
    g = grad.double()[:, None, None]
    th = theta.double()[win][:, None, :] if use_max else theta.double()
    if use_max:
        return g * cx.double() * th, g * cy.double() * th
    return g * (cx.double() @ th), g * (cy.double() @ th)


needs_native = pytest.mark.skipif(not pyengine.HAS_NATIVE, reason="native extension not built")


@needs_native
@pytest.mark.parametrize("use_max", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b,n,d,k", [(1, 1, 1, 1), (3, 7, 13, 5), (1, 64, 33000, 3)])
def test_backward_op_matches_formula(device, poison, use_max, dtype, b, n, d, k):
    # the last shape is 8 MiB per output: large enough for the huge-page allocation path
    g = torch.Generator(device=device).manual_seed(3)
    theta = random_directions(k, d, generator=g, device=device, dtype=dtype)
    kg = 1 if use_max else k
    cx = torch.randn(b, n, kg, generator=g, device=device, dtype=dtype)
    cy = torch.randn(b, n, kg, generator=g, device=device, dtype=dtype)
    grad = torch.randn(b, generator=g, device=device, dtype=dtype)
    win = torch.randint(0, k, (b,), generator=g, device=device)
    rx, ry = _bwd_formula(grad, cx, cy, theta, win, use_max)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for need_x, need_y in [(True, True), (True, False), (False, True)]:
        gx, gy = torch.ops.pyengine.sliced_wasserstein_bwd(grad, cx, cy, theta, win, use_max, need_x, need_y)
        for need, out, ref in ((need_x, gx, rx), (need_y, gy, ry)):
            if need:
                assert out.shape == ref.shape and out.dtype == dtype
                assert torch.allclose(out.double(), ref, rtol=tol, atol=tol)
            else:
                assert out.numel() == 0


@needs_native
def test_backward_op_opcheck_and_bad_input(device):
    theta = random_directions(4, 6, device=device, dtype=torch.float64)
    cx = torch.randn(2, 5, 1, device=device, dtype=torch.float64)
    grad = torch.ones(2, device=device, dtype=torch.float64)
    win = torch.tensor([3, 0], device=device)
    op = torch.ops.pyengine.sliced_wasserstein_bwd.default
    torch.library.opcheck(op, (grad, cx, cx.clone(), theta, win, True, True, True))
    torch.library.opcheck(op, (grad, torch.randn(2, 5, 4, device=device, dtype=torch.float64), torch.randn(2, 5, 4, device=device, dtype=torch.float64), theta, win, False, True, False))
    with pytest.raises(ValueError, match="columns per point, but the mean over 4 directions needs 4"):
        op(grad, cx, cx, theta, win, False, True, True)
    with pytest.raises(ValueError, match="grad has 1 entries"):
        op(grad[:1], cx, cx, theta, win, True, True, True)
    with pytest.raises(TypeError, match="dtype"):
        op(grad.float(), cx, cx, theta, win, True, True, True)
    with pytest.raises(ValueError, match=r"win\[0\] = 4 is not a direction"):
        op(grad, cx, cx, theta, torch.tensor([4, 0], device=device), True, True, True)
        pyengine.ops.check_device_errors(device)  # CUDA checks win on the device: raised at this sync


@needs_native
def test_max_propagates_nan_from_any_direction(device):
    # a NaN cost in any direction (here only direction 2's) makes the max NaN, as torch.max does
    x = torch.randn(2, 9, 5, device=device, dtype=torch.float64)
    y = torch.randn(2, 9, 5, device=device, dtype=torch.float64)
    theta = random_directions(4, 5, device=device, dtype=torch.float64)
    theta[2, 3] = float("nan")
    ref = sliced_wasserstein_reference(x, y, theta, 2.0, "max")
    assert torch.isnan(ref).all()
    for need_grad in (False, True):
        dist = torch.ops.pyengine.sliced_wasserstein_fwd(x, y, theta, 2.0, True, need_grad)[0]
        assert torch.isnan(dist).all()
    with pytest.raises(ValueError, match="directions contains NaN"):
        sliced_wasserstein(x, y, theta)


def test_p_inf_and_huge_direction_counts_are_refused(device):
    x = torch.randn(5, 3, device=device)
    with pytest.raises(ValueError, match="p = inf"):
        sliced_wasserstein(x, x + 1, p=float("inf"))
    with pytest.raises(ValueError, match="working memory"):
        sliced_wasserstein(x, x + 1, n_directions=10**7)


def test_generators_on_the_data_device_are_accepted(device):
    x = torch.randn(9, 7, device=device)
    y = torch.randn(9, 7, device=device)
    names = ["cpu"] if device.type == "cpu" else ["cuda", f"cuda:{torch.cuda.current_device()}"]
    outs = [sliced_wasserstein(x, y, generator=torch.Generator(device=nm).manual_seed(5)) for nm in names]
    assert all(torch.equal(o, outs[0]) for o in outs)
    for nm in names:
        a = random_directions(4, 7, generator=torch.Generator(device=nm).manual_seed(1), device=device)
        assert a.device == x.device
    if device.type == "cuda":
        with pytest.raises(ValueError, match="generator is on cpu"):
            sliced_wasserstein(x, y, generator=torch.Generator())


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_gradient_to_one_input_only(device, reduce):
    x = torch.randn(2, 9, 6, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 9, 6, device=device, dtype=torch.float64)
    theta = random_directions(5, 6, device=device, dtype=torch.float64)
    sliced_wasserstein(x, y, theta, reduce=reduce).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    sliced_wasserstein_reference(xr, y, theta, 2.0, reduce).sum().backward()
    assert y.grad is None and torch.allclose(x.grad, xr.grad, atol=1e-12)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_create_graph_gives_the_same_gradient(device, reduce):
    # create_graph=True takes the differentiable formula instead of the fused kernel
    x = torch.randn(2, 9, 6, device=device, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 9, 6, device=device, dtype=torch.float64, requires_grad=True)
    theta = random_directions(5, 6, device=device, dtype=torch.float64)
    a = torch.autograd.grad(sliced_wasserstein(x, y, theta, reduce=reduce).sum(), [x, y])
    b = torch.autograd.grad(sliced_wasserstein(x, y, theta, reduce=reduce).sum(), [x, y], create_graph=True)
    assert all(torch.allclose(u, v, atol=1e-12) for u, v in zip(a, b))


# ----------------------------------------------------------------- the grouped op (LaCoOT's pairs)

def _grouped_pairs(device, dtype, n=9, dims=(24, 8, 1, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
          for d in dims]
    ys = [(x.detach() * 0.5 + torch.randn(n, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype))
          .requires_grad_() for x, d in zip(xs, dims)]
    return xs, ys, list(dims)


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_grouped_matches_pot_per_pair_with_gradients(device, poison, reduce, p):
    """G pairs of different dimensions in one call: each distance is POT's for that pair's block of
    the directions, and every gradient is the per-pair op's (float64, both reductions)."""
    from pyengine.ops import sliced_wasserstein_grouped

    xs, ys, dims = _grouped_pairs(device, torch.float64)
    theta = torch.randn(13, sum(dims), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    blocks = list(theta.split(dims, dim=1))
    fn = ot.sliced.max_sliced_wasserstein_distance if reduce == "max" else ot.sliced.sliced_wasserstein_distance
    pot = [fn(x.detach().cpu().numpy(), y.detach().cpu().numpy(), p=p, projections=b.T.numpy())
           for x, y, b in zip(xs, ys, blocks)]
    got = sliced_wasserstein_grouped(xs, ys, theta.to(device), p=p, reduce=reduce)
    assert got.shape == (4,) and got.dtype == torch.float64
    np.testing.assert_allclose(got.detach().cpu().numpy(), np.array(pot, dtype=np.float64), rtol=1e-10, atol=1e-12)
    # the same directions given as a list of blocks
    torch.testing.assert_close(sliced_wasserstein_grouped(xs, ys, [b.to(device) for b in blocks], p=p, reduce=reduce),
                               got, rtol=0, atol=0)
    w = torch.tensor([0.3, -1.2, 2.0, 0.7], dtype=torch.float64, device=device)
    per = torch.stack([sliced_wasserstein(x, y, b.to(device), p=p, reduce=reduce) for x, y, b in zip(xs, ys, blocks)])
    g_grouped = torch.autograd.grad((got * w).sum(), xs + ys)
    g_per = torch.autograd.grad((per * w).sum(), xs + ys)
    for a, b in zip(g_grouped, g_per):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_grouped_split_reduction_equals_one_gemm(monkeypatch, reduce):
    """The CUDA path splits a long projection (d >= 8192) into strided pieces of theta's column
    block and sums them (sliced_project.h). PYENGINE_SPLIT_K_ON_CPU=1 runs that arithmetic on the
    CPU: distances and gradients equal the single-GEMM ones, and POT's."""
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    from pyengine.ops import sliced_wasserstein_grouped

    g = torch.Generator().manual_seed(4)
    dims = [3, 16384, 9000]  # pieces: 1, 8, 4
    xs = [torch.randn(12, d, generator=g, dtype=torch.float64, requires_grad=True) for d in dims]
    ys = [torch.randn(12, d, generator=g, dtype=torch.float64, requires_grad=True) for d in dims]
    theta = torch.randn(7, sum(dims), generator=g, dtype=torch.float64)
    runs = {}
    for split in ("0", "1"):
        monkeypatch.setenv("PYENGINE_SPLIT_K_ON_CPU", split)
        d = sliced_wasserstein_grouped(xs, ys, theta, reduce=reduce)
        runs[split] = (d.detach(), torch.autograd.grad(d.sum(), xs + ys))
    torch.testing.assert_close(runs["1"][0], runs["0"][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(runs["1"][1], runs["0"][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    fn = ot.sliced.max_sliced_wasserstein_distance if reduce == "max" else ot.sliced.sliced_wasserstein_distance
    for i, blk in enumerate(theta.split(dims, dim=1)):
        want = fn(xs[i].detach().numpy(), ys[i].detach().numpy(), p=2, projections=blk.T.numpy())
        np.testing.assert_allclose(runs["1"][0][i].item(), want, rtol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels in this build")
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_grouped_cuda_kernels_match_the_cpu_at_lacoot_sizes(reduce):
    # the CUDA projections (chunked partial products, their ordered sum, the block norms) and the
    # max's one-launch backward against the ATen path on the CPU in float64: LaCoOT's ResNet-18
    # pairs (n = 128, d = 16384 ... 2048, K = 50), and more than one 64-wide tile of points and
    # directions (n = 130, K = 70); float32 values within 1e-4
    g = torch.Generator().manual_seed(3)
    for n, dims, k in ((128, [16384, 8192, 4096, 2048], 50), (130, [700, 3, 2500], 70)):
        xs = [torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True) for d in dims]
        ys = [(x.detach() * 0.7 + torch.randn(n, d, generator=g, dtype=torch.float64)).requires_grad_() for x, d in
              zip(xs, dims)]
        theta = torch.randn(k, sum(dims), generator=g, dtype=torch.float64)
        op = torch.ops.pyengine.sliced_wasserstein_grouped
        use_max = reduce == "max"
        for normalize in (True, False):
            ref = op(xs, ys, theta, 2.0, use_max, normalize)
            gref = torch.autograd.grad(ref.sum(), xs + ys)
            xc = [x.detach().cuda().requires_grad_() for x in xs]
            yc = [y.detach().cuda().requires_grad_() for y in ys]
            got = op(xc, yc, theta.cuda(), 2.0, use_max, normalize)
            ggot = torch.autograd.grad(got.sum(), xc + yc)
            assert torch.allclose(got.cpu(), ref, rtol=1e-10, atol=1e-12)
            for a, b in zip(ggot, gref):
                assert torch.allclose(a.cpu(), b, rtol=1e-9, atol=1e-12)
            with torch.no_grad():
                f32 = op([x.float().cuda() for x in xs], [y.float().cuda() for y in ys], theta.float().cuda(), 2.0,
                         use_max, normalize)
            assert torch.allclose(f32.cpu().double(), ref.detach(), rtol=1e-4)
    pyengine.ops.check_device_errors(torch.device("cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_OK, reason="no CUDA device or no CUDA kernels in this build")
def test_grouped_cuda_more_pairs_than_one_launch_takes():
    # 40 pairs (the kernels take up to 32 per launch): the ATen path, the same values
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(6, 3 + i % 5, generator=g, dtype=torch.float64) for i in range(40)]
    ys = [torch.randn_like(x) for x in xs]
    theta = torch.randn(9, sum(x.shape[1] for x in xs), generator=g, dtype=torch.float64)
    ref = torch.ops.pyengine.sliced_wasserstein_grouped(xs, ys, theta, 2.0, True, True)
    got = torch.ops.pyengine.sliced_wasserstein_grouped([x.cuda() for x in xs], [y.cuda() for y in ys], theta.cuda(),
                                                        2.0, True, True)
    assert torch.allclose(got.cpu(), ref, rtol=1e-12)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_grouped_drawn_directions_are_unit_blocks(device, reduce):
    """With no directions the op draws (K, sum d) from the generator and scales each block to a unit
    vector: the values of grouped_directions for the same generator state (float32 as well)."""
    from pyengine.ops import grouped_directions, sliced_wasserstein_grouped

    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        xs, ys, dims = _grouped_pairs(device, dtype)
        got = sliced_wasserstein_grouped(xs, ys, n_directions=20, reduce=reduce,
                                         generator=torch.Generator(device).manual_seed(5))
        theta = grouped_directions(dims, 20, generator=torch.Generator(device).manual_seed(5), device=device,
                                   dtype=dtype)
        for b in theta.split(dims, dim=1):
            torch.testing.assert_close(b.norm(dim=1), torch.ones(20, dtype=dtype, device=device), rtol=tol, atol=tol)
        expect = torch.stack([sliced_wasserstein_reference(x.detach()[None], y.detach()[None], b, 2.0, reduce)[0]
                              for x, y, b in zip(xs, ys, theta.split(dims, dim=1))])
        torch.testing.assert_close(got.detach(), expect, rtol=tol, atol=tol)
        again = sliced_wasserstein_grouped(xs, ys, n_directions=20, reduce=reduce,
                                           generator=torch.Generator(device).manual_seed(5))
        other = sliced_wasserstein_grouped(xs, ys, n_directions=20, reduce=reduce,
                                           generator=torch.Generator(device).manual_seed(6))
        assert torch.equal(got, again) and not torch.equal(got, other)


def test_grouped_gradient_to_some_inputs_inference_and_no_double_backward(device):
    from pyengine.ops import sliced_wasserstein_grouped

    xs, ys, dims = _grouped_pairs(device, torch.float64)
    theta = torch.randn(6, sum(dims), dtype=torch.float64, device=device)
    ys = [y.detach() for y in ys]  # only xs take a gradient
    d = sliced_wasserstein_grouped(xs, ys, theta)
    gx = torch.autograd.grad(d.sum(), xs)
    per = [torch.autograd.grad(sliced_wasserstein(x, y, b), x)[0] for x, y, b in zip(xs, ys, theta.split(dims, 1))]
    for a, b in zip(gx, per):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with torch.inference_mode():
        xi = [x.detach().clone() for x in xs]
        torch.testing.assert_close(sliced_wasserstein_grouped(xi, ys, theta), d.detach(), rtol=0, atol=0)
    with torch.no_grad():
        assert not sliced_wasserstein_grouped(xs, ys, theta).requires_grad
    d = sliced_wasserstein_grouped(xs, ys, theta)
    with pytest.raises(ValueError, match="double backward"):
        torch.autograd.grad(d.sum(), xs, create_graph=True)


def test_grouped_half_inputs_nan_and_opcheck(device):
    from pyengine.ops import sliced_wasserstein_grouped

    xs, ys, dims = _grouped_pairs(device, torch.float32)
    theta = torch.randn(5, sum(dims), device=device)
    half = sliced_wasserstein_grouped([x.detach().bfloat16() for x in xs], [y.detach().bfloat16() for y in ys], theta)
    assert half.dtype == torch.float32
    ref = sliced_wasserstein_grouped([x.detach().bfloat16().float() for x in xs],
                                     [y.detach().bfloat16().float() for y in ys], theta)
    torch.testing.assert_close(half, ref, rtol=0, atol=0)
    bad = [y.detach().clone() for y in ys]
    bad[2][3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"pair\(s\) \[2\]"):
        sliced_wasserstein_grouped(xs, bad, theta)
    assert torch.isnan(sliced_wasserstein_grouped(xs, bad, theta, check_nan=False)[2])
    if pyengine.HAS_NATIVE:
        x64 = [x.detach().double().requires_grad_() for x in xs]
        y64 = [y.detach().double().requires_grad_() for y in ys]
        for use_max in (True, False):
            for normalize in (True, False):
                torch.library.opcheck(torch.ops.pyengine.sliced_wasserstein_grouped.default,
                                      (x64, y64, theta.double(), 2.0, use_max, normalize))


def test_grouped_zero_direction_block_gives_zero_not_nan(device):
    """A direction whose block for one pair is all zeros projects that pair on nothing: distance 0
    there (not 0 * inf = NaN from the unit scaling), the other pairs unchanged (float32 and 64)."""
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    for dtype in (torch.float32, torch.float64):
        xs, ys, dims = _grouped_pairs(device, dtype)
        theta = torch.randn(4, sum(dims), device=device, dtype=dtype)
        theta[:, dims[0]:dims[0] + dims[1]] = 0
        d = torch.ops.pyengine.sliced_wasserstein_grouped(xs, ys, theta, 2.0, True, True)
        assert torch.isfinite(d).all() and float(d[1].detach()) == 0.0
        d.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in xs + ys)


# ------------------------------------------------ reduced-precision projections: the documented bound

def _round_mantissa(t: torch.Tensor, bits: int, nearest: bool) -> torch.Tensor:
    """float32 values rounded to ``bits`` explicit mantissa bits (TF32: 10), by truncation or to
    nearest - what a tensor core does to a GEMM operand - returned as float64."""
    drop = 23 - bits
    i = t.float().contiguous().view(torch.int32)
    if nearest:
        i = i + (1 << (drop - 1))
    return (i & ~((1 << drop) - 1)).view(torch.float32).double()


def _parallel_points(d=1024, n=16):
    """The bound's worst case: one direction with every coordinate just under a TF32 step above a
    power of two (truncation loses almost u of each), points along it (Cauchy-Schwarz is an equality)
    and y = 0 (its projections are exact)."""
    step = 1.0 + 2.0**-10 - 2.0**-20
    theta = torch.full((1, d), step * 2.0**-5, dtype=torch.float32)
    x = torch.full((1, n, d), step, dtype=torch.float32)
    return x, torch.zeros_like(x), theta


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0])
def test_projection_error_bound_holds_and_is_tight(reduce, p):
    from pyengine.ops import projection_error_bound

    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 50, 300, generator=g) * torch.rand(3, 50, 1, generator=g) * 4
    y = torch.randn(3, 50, 300, generator=g) + 0.7
    theta = random_directions(20, 300, generator=g)
    exact = sliced_wasserstein_reference(x.double(), y.double(), theta.double(), p, reduce)
    bound = projection_error_bound(x, y, theta)
    assert bound.shape == (3,) and bound.dtype == torch.float64
    for nearest in (False, True):
        for bits in (10, 7):  # TF32, bfloat16
            r = lambda t: _round_mantissa(t, bits, nearest)  # noqa: E731
            got = sliced_wasserstein_reference(r(x), r(y), r(theta), p, reduce)
            err = (got - exact).abs()
            assert (err <= projection_error_bound(x, y, theta, mantissa_bits=bits)).all(), (bits, nearest, err)
            assert (err > 0).all()  # the rounding did change the result: the check is not vacuous
    # the worst case comes within 4% of the bound (the rest is the float32 summation term, not
    # emulated here), so a smaller bound would fail here
    x, y, theta = _parallel_points()
    exact = sliced_wasserstein_reference(x.double(), y.double(), theta.double(), p, reduce)
    got = sliced_wasserstein_reference(_round_mantissa(x, 10, False), y.double(), _round_mantissa(theta, 10, False), p, reduce)
    bound = projection_error_bound(x, y, theta)
    assert 0.96 * bound <= (got - exact).abs() <= bound
    with pytest.raises(ValueError, match="mantissa_bits"):
        projection_error_bound(x, y, theta, mantissa_bits=0)
    with pytest.raises(ValueError, match="directions"):
        projection_error_bound(x, y, theta[:, :5])


def test_float32_projections_by_default_tf32_within_the_bound(device):
    # by default the projections are float32: the worst case of TF32 truncation is far from reached;
    # with TF32 allowed (CUDA) the op stays within the bound on it and on random data
    from pyengine.ops import projection_error_bound

    x, y, theta = (t.to(device) for t in _parallel_points())
    g = torch.Generator().manual_seed(3)
    xr = torch.randn(2, 4096, 512, generator=g).to(device)
    yr = (torch.randn(2, 4096, 512, generator=g) * 1.3).to(device)
    tr = random_directions(64, 512, generator=g).to(device)
    cases = [(x, y, theta), (xr, yr, tr)]

    def errors():
        out = []
        for a, b, t in cases:
            exact = sliced_wasserstein_reference(a.double(), b.double(), t.double())
            out.append(((sliced_wasserstein(a, b, t) - exact).abs(), projection_error_bound(a, b, t)))
        return out

    for err, bound in errors():
        assert (err <= 0.1 * bound).all(), (err, bound)  # TF32 truncation would reach 0.97 of it
    if device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            for err, bound in errors():
                assert (err <= bound * (1 + 1e-5)).all(), (err, bound)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before


def test_grouped_refuses_mixed_dtypes_and_mismatched_pairs(device):
    # the wrapper cast every pair to xs[0]'s working dtype: a float64 pair after a float32 xs[0] was
    # silently computed in float32 (and a float32 one after a float64 xs[0] in float64); the
    # fallback path also accepted pairs of different point counts and x / y shapes
    from pyengine.ops import sliced_wasserstein_grouped

    a, b = torch.randn(6, 3, device=device), torch.randn(6, 2, device=device)
    th = torch.randn(4, 5, device=device)
    with pytest.raises(TypeError, match=r"xs\[1\] has dtype torch.float64 but xs\[0\] has torch.float32"):
        sliced_wasserstein_grouped([a, b.double()], [a, b.double()], th)
    with pytest.raises(TypeError, match=r"ys\[0\] has dtype torch.float32 but xs\[0\] has torch.float64"):
        sliced_wasserstein_grouped([a.double(), b.double()], [a, b.double()], th.double())
    with pytest.raises(ValueError, match=r"xs\[1\] has 3 points but xs\[0\] has 6"):
        sliced_wasserstein_grouped([a, b[:3]], [a, b[:3]], th)
    with pytest.raises(ValueError, match=r"ys\[1\] has shape \(6, 3\) but xs\[1\] has \(6, 2\)"):
        sliced_wasserstein_grouped([a, b], [a, a], th)
    with pytest.raises(ValueError, match="directions is empty"):
        sliced_wasserstein_grouped([a, b], [a, b], th[:0])
    # half inputs of one dtype are still computed in float32, as by sliced_wasserstein
    d = sliced_wasserstein_grouped([a.half(), b.half()], [b[:, :1].repeat(1, 3).half(), a[:, :2].half()], th)
    assert d.dtype == torch.float32 and d.shape == (2,)


def test_direction_arguments_are_checked():
    from pyengine.ops import grouped_directions

    with pytest.raises(TypeError, match="dim must be an integer"):
        random_directions(3, 2.5)  # was torch.empty's "failed to unpack the object at pos 2"
    for dtype in (torch.int64, torch.complex64):  # "normal_kernel_cpu not implemented" / complex directions
        with pytest.raises(TypeError, match="dtype must be a floating dtype"):
            random_directions(3, 4, dtype=dtype)
        with pytest.raises(TypeError, match="dtype must be a floating dtype"):
            grouped_directions([2, 3], 3, dtype=dtype)
    with pytest.raises(TypeError, match=r"dims\[0\] must be an integer"):
        grouped_directions([2.5, 3], 3)  # was truncated to 2
    assert random_directions(3, torch.tensor(4)).shape == (3, 4)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_autocast_does_not_lower_the_projection_precision(device, reduce):
    # under torch.autocast the op's projection GEMM came back in bfloat16 / float16 and the CPU
    # kernel raised "expected scalar type Float but found BFloat16"; the distance is computed in
    # the inputs' dtype, as the grouped op does
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(2, 40, 9, generator=g).to(device), torch.randn(2, 40, 9, generator=g).to(device)
    th = random_directions(5, 9, generator=g).to(device)
    x1 = x.clone().requires_grad_(True)
    ref = sliced_wasserstein(x1, y, th, reduce=reduce)
    ref.sum().backward()
    for dtype in (torch.bfloat16, torch.float16):
        x2 = x.clone().requires_grad_(True)
        with torch.autocast(device.type, dtype=dtype):
            d = sliced_wasserstein(x2, y, th, reduce=reduce)
        d.sum().backward()
        assert d.dtype == torch.float32 and torch.equal(d, ref)
        assert torch.equal(x2.grad, x1.grad)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_grouped_backward_inside_autocast_keeps_the_inputs_dtype(device, reduce):
    # a backward run inside torch.autocast computed the mean's per-pair gradient GEMMs in bfloat16
    # (about 2e-4 off here); the forward already excluded autocast
    from pyengine.ops import sliced_wasserstein_grouped

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(30, 7, generator=g).to(device), torch.randn(30, 5, generator=g).to(device)]
    ys = [torch.randn(30, 7, generator=g).to(device), torch.randn(30, 5, generator=g).to(device)]
    th = torch.randn(6, 12, generator=g).to(device)
    a = [x.clone().requires_grad_(True) for x in xs]
    sliced_wasserstein_grouped(a, ys, th, reduce=reduce).sum().backward()
    b = [x.clone().requires_grad_(True) for x in xs]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        sliced_wasserstein_grouped(b, ys, th, reduce=reduce).sum().backward()
    assert all(torch.equal(u.grad, v.grad) for u, v in zip(a, b))


# ------------------------------------------------------- CPU results independent of the thread count

_THREADS = (1, 2, 3, 4, 8)


def _per_thread_count(fn):
    """fn() under torch.set_num_threads(t) for each t of _THREADS; the thread count is restored."""
    before = torch.get_num_threads()
    try:
        out = {}
        for t in _THREADS:
            torch.set_num_threads(t)
            out[t] = [v.detach().clone() for v in fn()]
        return out
    finally:
        torch.set_num_threads(before)


def _assert_bitwise_same(runs, what):
    for t in _THREADS[1:]:
        for i, (a, b) in enumerate(zip(runs[_THREADS[0]], runs[t])):
            assert torch.equal(a, b), (f"{what}: output {i} on {t} threads differs from {_THREADS[0]} thread(s) "
                                       f"by up to {float((a.double() - b.double()).abs().max()):.3g}")


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("b,n,d,k,dtype", [
    (1, 128, 1000, 50, torch.float32),
    (3, 33, 1000, 300, torch.float32),
    (2, 40, 16384, 9, torch.float32),
    (1, 128, 16384, 50, torch.float64),
    (1, 64, 65536, 50, torch.float32),
    (2, 5, 65536, 3, torch.float32),
])
def test_cpu_result_is_the_same_on_any_thread_count(reduce, b, n, d, k, dtype):
    """The projections' float sums (split across threads for long rows, and split by BLAS by its
    thread count) run in one order whatever torch.set_num_threads says: distances and gradients
    are bitwise equal on 1, 2, 3, 4 and 8 threads."""
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(d + n + k)
    x = torch.randn(b, n, d, generator=g, dtype=dtype)
    y = torch.randn(b, n, d, generator=g, dtype=dtype) * 1.3 + 0.2
    theta = random_directions(k, d, generator=g, dtype=dtype)

    def run():
        xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        dist = sliced_wasserstein(xx, yy, theta, reduce=reduce)
        return [dist, *torch.autograd.grad((dist * torch.arange(1.0, b + 1, dtype=dtype)).sum(), [xx, yy])]

    _assert_bitwise_same(_per_thread_count(run), f"B={b} n={n} d={d} K={k} {reduce}")
    # drawn directions too (the draw itself is thread-independent)
    _assert_bitwise_same(_per_thread_count(
        lambda: [sliced_wasserstein(x, y, n_directions=k, reduce=reduce, generator=torch.Generator().manual_seed(3))]),
        "drawn directions")


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,n,d,k", [(2, 200, 9000, 70), (1, 64, 2000, 300), (2, 100, 20000, 40)])
def test_cpu_tiled_products_match_float64_reference(reduce, dtype, b, n, d, k):
    """The CPU products are cut into tiles by shape (sliced_gemm_cpu.h): reduction pieces with a
    remainder and several column tiles (the first case, and its mean's backward), several row tiles
    (the second), pieces of a packed operand shared by four products (the third; float32 takes
    MKL's packed GEMM where torch has it); every tile lands where it belongs."""
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(d)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    y = torch.randn(b, n, d, generator=g, dtype=torch.float64) * 1.2 + 0.1
    theta = random_directions(k, d, generator=g, dtype=torch.float64)
    w = torch.rand(b, generator=g, dtype=torch.float64) + 0.5
    x, y, theta = x.to(dtype).requires_grad_(True), y.to(dtype).requires_grad_(True), theta.to(dtype)
    got = sliced_wasserstein(x, y, theta, reduce=reduce)
    # the reference in float64 on the same (rounded) values
    x64, y64 = x.detach().double().requires_grad_(True), y.detach().double().requires_grad_(True)
    want = sliced_wasserstein_reference(x64, y64, theta.double(), 2.0, reduce)
    exact = dtype == torch.float64
    torch.testing.assert_close(got.double(), want, rtol=1e-12 if exact else 2e-5, atol=0)
    for a, r in zip(torch.autograd.grad((got * w.to(dtype)).sum(), [x, y]),
                    torch.autograd.grad((want * w).sum(), [x64, y64])):
        scale = float(r.abs().max())
        torch.testing.assert_close(a.double(), r, rtol=1e-9 if exact else 1e-3, atol=1e-13 if exact else 1e-4 * scale)


@pytest.mark.parametrize("bn,k,d", [(64, 2048, 64), (8, 20000, 16), (128, 50, 4096)])
def test_cpu_backward_op_is_the_same_on_any_thread_count(bn, k, d):
    # the mean's backward is one (B n, K) x (K, d) product: with many directions and a small output
    # BLAS splits the sum over K by its thread count
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    g = torch.Generator().manual_seed(k)
    theta = random_directions(k, d, generator=g)
    cx, cy = torch.randn(2, bn, k, generator=g), torch.randn(2, bn, k, generator=g)
    grad = torch.rand(2, generator=g)
    runs = _per_thread_count(lambda: torch.ops.pyengine.sliced_wasserstein_bwd(
        grad, cx, cy, theta, torch.empty(0, dtype=torch.long), False, True, True))
    _assert_bitwise_same(runs, f"backward B n={2 * bn} K={k} d={d}")


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("dims,k,drawn", [
    ((1000, 16384, 3), 50, True),
    ((65536, 20000), 50, False),
    ((65536,), 1, True),
    ((64, 48), 3000, False),
])
def test_grouped_cpu_result_is_the_same_on_any_thread_count(reduce, dims, k, drawn):
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    from pyengine.ops import sliced_wasserstein_grouped

    g = torch.Generator().manual_seed(sum(dims) + k)
    xs = [torch.randn(24, d, generator=g) for d in dims]
    ys = [torch.randn(24, d, generator=g) * 0.7 + 0.1 for d in dims]
    theta = None if drawn else torch.randn(k, sum(dims), generator=g)

    def run():
        a = [x.clone().requires_grad_(True) for x in xs]
        b = [y.clone().requires_grad_(True) for y in ys]
        dist = sliced_wasserstein_grouped(a, b, theta, n_directions=k, reduce=reduce,
                                          generator=torch.Generator().manual_seed(1))
        return [dist, *torch.autograd.grad((dist * torch.arange(1.0, len(dims) + 1)).sum(), a + b)]

    _assert_bitwise_same(_per_thread_count(run), f"grouped dims={dims} K={k} {reduce}")


def test_cpu_long_rows_under_inference_mode():
    # the projection's pieces of a long reduction ran on worker threads outside inference mode and
    # wrote into inference tensors: "Inplace update to inference tensor outside InferenceMode"
    # (d >= 16384 on 2+ threads)
    if not pyengine.HAS_NATIVE:
        pytest.skip("native extension not built")
    from pyengine.ops import sliced_wasserstein_grouped

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 16, 65536, generator=g), torch.randn(2, 16, 65536, generator=g)
    theta = random_directions(5, 65536, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        want = sliced_wasserstein(x, y, theta)
        want_g = sliced_wasserstein_grouped(list(x), list(y), n_directions=5, generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            got = sliced_wasserstein(x, y, theta)
            got_g = sliced_wasserstein_grouped(list(x), list(y), n_directions=5,
                                               generator=torch.Generator().manual_seed(1))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, want) and torch.equal(got_g, want_g)
