"""The native ops under autograd and the dispatcher as a user meets them: what is differentiable
(and how often), in-place ops moving version counters on like ATen's, and a meta tensor among real
ones refused instead of answered with uninitialised memory."""
import pytest
import torch

from pyengine import ops
from pyengine.ops import random_directions, sliced_wasserstein, sliced_wasserstein_grouped

P = torch.ops.pyengine


# ------------------------------------------------------------------ sliced Wasserstein

@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_sliced_directions_requiring_grad_are_refused(device, reduce):
    x, y = torch.randn(6, 3, device=device), torch.randn(6, 3, device=device)
    th = torch.randn(4, 3, device=device, requires_grad=True)
    with pytest.raises(ValueError, match="not differentiable in the directions"):
        sliced_wasserstein(x, y, th, reduce=reduce)
    with pytest.raises(ValueError, match="not differentiable in the directions"):
        sliced_wasserstein_grouped([x], [y], th, reduce=reduce)
    with pytest.raises(ValueError, match="not differentiable in the directions"):
        sliced_wasserstein_grouped([x], [y], [th], reduce=reduce)
    # the raw ops too (the grouped one used to index an empty list of saved tensors)
    with pytest.raises(ValueError, match="not differentiable in the directions"):
        P.sliced_wasserstein_grouped([x], [y], th, 2.0, reduce == "max", False)
    with pytest.raises(ValueError, match="not differentiable in the directions"):
        P.sliced_wasserstein_fwd(x[None], y[None], th, 2.0, reduce == "max", False)[0].sum().backward()
    # detached, or without grad mode, they are fine
    want = ops.sliced_wasserstein_reference(x[None], y[None], th.detach(), 2.0, reduce)[0]
    torch.testing.assert_close(sliced_wasserstein(x, y, th.detach(), reduce=reduce), want)
    with torch.no_grad():
        torch.testing.assert_close(sliced_wasserstein(x, y, th, reduce=reduce), want)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_sliced_second_derivative_raises_instead_of_zero(device, reduce):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 6, 3, generator=g, dtype=torch.float64).to(device).requires_grad_()
    y = torch.randn(1, 6, 3, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(1, 6, 3, generator=g, dtype=torch.float64).to(device)
    th = torch.nn.functional.normalize(torch.randn(4, 3, generator=g, dtype=torch.float64), dim=1).to(device)
    (gx,) = torch.autograd.grad(sliced_wasserstein(x, y, th, reduce=reduce).sum(), x, create_graph=True)
    # the reference's second derivative (of <gradient, v>; |gradient|^2 is constant for the max at
    # p = 2) is not zero: a silent 0 would be wrong
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(ops.sliced_wasserstein_reference(xr, y, th, 2.0, reduce).sum(), xr, create_graph=True)
    assert torch.autograd.grad((gr * v).sum(), xr)[0].abs().max() > 1e-3
    torch.testing.assert_close(gx, gr.detach())
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((gx * v).sum(), x)


# ------------------------------------------------------------------ masked linear

def test_masked_linear_double_backward(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w = torch.randn(4, 5, generator=g, dtype=torch.float64).to(device).requires_grad_()
    b = torch.randn(4, generator=g, dtype=torch.float64).to(device).requires_grad_()
    m = (torch.rand(4, 5, generator=g) > 0.4).to(device)
    assert torch.autograd.gradgradcheck(lambda x, w, b: ops.masked_linear(x, w, m, b), (x, w, b))
    # a gradient penalty, against the same on the plain formula
    def penalty(fn):
        xx = x.detach().clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(xx).square().sum(), xx, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), w)[0]
    torch.testing.assert_close(penalty(lambda xx: ops.masked_linear(xx, w, m, b)),
                               penalty(lambda xx: torch.nn.functional.linear(xx, w * m, b)))


# ------------------------------------------------------------------ sparse linear

def test_sparse_linear_grad_rules(device):
    w = torch.randn(4, 6, device=device) * (torch.rand(4, 6, device=device) > 0.5)
    pk = ops.pack_sparse(w)
    x = torch.randn(2, 6, device=device, requires_grad=True)
    with torch.no_grad():  # a tensor that requires grad is fine where no graph is recorded
        torch.testing.assert_close(ops.sparse_linear(x, pk), x.detach() @ w.T)
    with torch.inference_mode():
        torch.testing.assert_close(ops.sparse_linear(x, pk), x.detach() @ w.T)
    with pytest.raises(RuntimeError, match="x require"):
        ops.sparse_linear(x, pk)
    pk.values.requires_grad_()
    with pytest.raises(RuntimeError, match="packed values require"):
        ops.sparse_linear(x.detach(), pk)


# ------------------------------------------------------------------ in-place ops: versions

def test_in_place_ops_move_versions_on(device):
    w = torch.randn(4, 4, device=device, requires_grad=True)
    m = torch.rand(4, 4, device=device) > 0.5
    a = w * 1.0
    y = (a * a).sum()  # saves a
    v = a._version
    ops.apply_masks_([a], [m])
    assert a._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()

    x = torch.randn(3, 5, 2, 2, device=device)
    c = torch.zeros(5, dtype=torch.int64, device=device)
    nan = torch.zeros((), dtype=torch.int64, device=device)
    vc, vn = c._version, nan._version
    ops.entropy_counts_add_(c, x, nan_count=nan)
    assert c._version > vc and nan._version > vn
    vc = c._version
    ops.entropy_counts_add_many_([c], [x], [1], nan_count=nan)
    assert c._version > vc
    vc = c._version
    ops.relu_count(x, c, nan_count=nan)
    assert c._version > vc
    if device == "cpu":  # fill_directions_ is a CPU kernel (torch.randn draws on CUDA)
        out = torch.empty(3, 4)
        vo = out._version
        P.fill_directions_(out, 7, True)
        assert out._version > vo
        vo = out._version
        P.fill_directions_keyed_(out, torch.tensor(7), True)
        assert out._version > vo
    with torch.inference_mode():  # inference tensors have no version: still fine
        ci = torch.zeros(5, dtype=torch.int64, device=device)
        ops.entropy_counts_add_(ci, x)
        assert torch.equal(ci, ops.entropy_counts_reference(x, 1))


# ------------------------------------------------------------------ a meta tensor among real ones

def test_meta_tensor_among_real_ones_is_refused(device):
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    x = torch.randn(3, 5, 2, 2, device=device)
    c = torch.zeros(5, dtype=torch.int64, device=device)
    nan = torch.zeros((), dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="same device"):
        ops.relu_count(x, c, nan_count=meta(nan))
    with pytest.raises(ValueError, match="same device"):
        P.entropy_counts_add_(c, meta(nan), x, 1, False, False)
    with pytest.raises(ValueError, match="same device"):
        P.entropy_counts_add_many_([c], meta(nan), [x], [1], False, False)
    w, xm = torch.randn(4, 6, device=device), torch.randn(2, 6, device=device)
    mask = torch.rand(4, 6, device=device) > 0.5
    with pytest.raises(ValueError, match="same device"):
        P.masked_linear(xm, w, meta(mask), None)
    with pytest.raises(ValueError, match="same device"):
        P.apply_masks_([w], [meta(mask)], [0])
    pk = ops.pack_sparse(w * mask)
    with pytest.raises(ValueError, match="same device"):
        P.sparse_linear(xm, pk.rowptr, pk.colidx, pk.values, 6, meta(torch.zeros(4, device=device)))
    with pytest.raises(ValueError, match="same device"):
        P.sliced_wasserstein_fwd(xm[None], xm[None], meta(w[:, :6]), 2.0, True, False)
    # all on meta: shapes only, as torch.compile's tracing needs
    assert P.masked_linear(meta(xm), meta(w), meta(mask), None).shape == (2, 4)


def test_torch_func_transforms_on_masked_linear_and_sliced_wasserstein():
    # torch.func.grad / jacrev over the ops raised torch's "In order to use an autograd.Function with
    # functorch transforms ... it must override the setup_context staticmethod" (the registered
    # autograd of a library op); under a transform the ops now compute through their references
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dtype=torch.float64, generator=g)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    m = torch.rand(4, 5, generator=g) > 0.5
    gx = torch.func.grad(lambda a: ops.masked_linear(a, w, m, b).square().sum())(x)
    xr = x.clone().requires_grad_(True)
    ops.masked_linear_reference(xr, w, m, b).square().sum().backward()
    assert torch.allclose(gx, xr.grad, rtol=1e-12, atol=1e-12)
    jw = torch.func.jacrev(lambda v: ops.masked_linear(x, v, m, b))(w)
    assert torch.allclose(jw, torch.func.jacrev(lambda v: ops.masked_linear_reference(x, v, m, b))(w))
    assert (jw[..., ~m] == 0).all()  # the pruned weights take no gradient
    assert torch.allclose(torch.vmap(lambda a: ops.masked_linear(a, w, m, b))(x), ops.masked_linear(x, w, m, b))

    p, q = torch.randn(2, 7, 5, dtype=torch.float64, generator=g), torch.randn(7, 5, dtype=torch.float64, generator=g)
    th = ops.random_directions(6, 5, dtype=torch.float64, generator=g)
    gp = torch.func.grad(lambda a: ops.sliced_wasserstein(a, q, th))(p[0])
    pr = p[0].clone().requires_grad_(True)
    ops.sliced_wasserstein(pr, q, th).backward()  # the native backward
    assert torch.allclose(gp, pr.grad, rtol=1e-10, atol=1e-12)
    batched = torch.vmap(lambda a: ops.sliced_wasserstein(a, q, th, check_nan=False))(p)
    assert torch.allclose(batched, ops.sliced_wasserstein(p, q.expand(2, 7, 5), th))
    with pytest.raises(ValueError, match="check_nan cannot look at the result under torch.vmap"):
        torch.vmap(lambda a: ops.sliced_wasserstein(a, q, th))(p)
