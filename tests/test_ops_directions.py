"""pyengine::fill_directions_ - the CPU generator of random projection directions - against an
independent float64 reference: Philox4x32-10 written here in numpy (checked against Random123's
published known-answer vectors) and Box-Muller with numpy's log / cos / sin, in the value layout
documented in csrc/sliced/directions_simd.inc."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyengine
from pyengine.ops import random_directions

pytestmark = pytest.mark.skipif(not pyengine.HAS_NATIVE, reason="native extension not built")

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key):
    """Vectorised over numpy arrays of counters; every word a uint64 holding 32 bits."""
    c = [np.asarray(v, dtype=np.uint64) for v in ctr]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(_M0) * c[0]
        p1 = np.uint64(_M1) * c[2]
        c = [((p1 >> np.uint64(32)) ^ c[1] ^ k0) & _MASK, p1 & _MASK, ((p0 >> np.uint64(32)) ^ c[3] ^ k1) & _MASK, p0 & _MASK]
        k0, k1 = (k0 + np.uint64(_W0)) & _MASK, (k1 + np.uint64(_W1)) & _MASK
    return c


def reference_normals(k: int, d: int, seed: int) -> np.ndarray:
    key = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    chunks = -(-d // 32)
    out = np.empty((k, d))
    for r in range(k):
        lanes = np.arange(chunks * 8, dtype=np.uint64)
        w = philox4x32_10([lanes, np.full_like(lanes, r), np.zeros_like(lanes), np.zeros_like(lanes)], key)
        vals = np.empty((chunks, 4, 8))
        for pair in range(2):
            u1 = ((w[2 * pair] >> np.uint64(8)) + np.uint64(1)).astype(np.float64) * 2.0**-24
            u2 = (w[2 * pair + 1] >> np.uint64(8)).astype(np.float64) * 2.0**-24
            rad, ang = np.sqrt(-2.0 * np.log(u1)), 2.0 * np.pi * u2
            vals[:, 2 * pair, :] = (rad * np.cos(ang)).reshape(chunks, 8)
            vals[:, 2 * pair + 1, :] = (rad * np.sin(ang)).reshape(chunks, 8)
        out[r] = vals.reshape(-1)[:d]
    return out


def _fill(k, d, seed, dtype=torch.float32, normalize=False):
    out = torch.empty(k, d, dtype=dtype)
    torch.ops.pyengine.fill_directions_(out, seed, normalize)
    return out


@pytest.mark.parametrize(
    "ctr,key,want",
    [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ],
)
def test_reference_philox_known_answers(ctr, key, want):
    assert tuple(int(v) for v in philox4x32_10(ctr, key)) == want


# shapes: d below one chunk, not a multiple of 32, many rows (row-parallel path), one long row
# (block-parallel path); seeds with both key words used, and negative (two's complement)
@pytest.mark.parametrize("k,d", [(3, 5), (4, 70), (40, 333), (1, 20000)])
@pytest.mark.parametrize("seed", [0, 0x1234_5678_9ABC_DEF0 >> 1, -7])
def test_normals_match_float64_reference(k, d, seed):
    ref = reference_normals(k, d, seed & (2**64 - 1))
    got64 = _fill(k, d, seed, torch.float64).numpy()
    np.testing.assert_allclose(got64, ref, rtol=0, atol=1e-12)
    got32 = _fill(k, d, seed, torch.float32).double().numpy()
    # float32 log / sin / cos polynomials: ~1e-7 relative; |value| <= 5.8 (u1 >= 2^-24)
    np.testing.assert_allclose(got32, ref, rtol=0, atol=2e-6)


def test_directions_are_normalised_reference_rows():
    k, d, seed = 6, 1000, 99
    ref = reference_normals(k, d, seed)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    for dtype, tol in ((torch.float64, 1e-14), (torch.float32, 5e-7)):
        got = _fill(k, d, seed, dtype, normalize=True).double().numpy()
        np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=tol * 10)


def test_rows_do_not_depend_on_shape_or_threads():
    d, seed = 5000, 4242
    many = _fill(64, d, seed, normalize=True)  # row-parallel path
    few = _fill(1, d, seed, normalize=True)  # block-parallel path
    assert torch.equal(many[:1], few)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fill(64, d, seed, normalize=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, many)


def test_baseline_kernels_agree_with_avx2():
    """The same values from the baseline (non-AVX2) build of the kernels, in a child process."""
    code = (
        "import torch, pyengine; o = torch.empty(5, 777); "
        "torch.ops.pyengine.fill_directions_(o, 31337, False); torch.save(o, __import__('sys').argv[1])"
    )
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pyengine_dirs_{os.getpid()}.pt")
    try:
        env = dict(os.environ, PYENGINE_DISABLE_AVX2="1")
        subprocess.run([sys.executable, "-c", code, path], check=True, env=env, timeout=120)
        base = torch.load(path, weights_only=True)
    finally:
        if os.path.exists(path):
            os.remove(path)
    here = _fill(5, 777, 31337)
    np.testing.assert_allclose(base.double().numpy(), reference_normals(5, 777, 31337), rtol=0, atol=2e-6)
    assert (base - here).abs().max().item() < 2e-6


def test_samples_are_standard_normal():
    stats = pytest.importorskip("scipy.stats")
    z = _fill(64, 32768, 2024).double().numpy().ravel()  # 2M values
    assert abs(z.mean()) < 5e-3
    assert abs(z.var() - 1.0) < 5e-3
    assert abs(stats.kurtosis(z, fisher=False) - 3.0) < 0.02
    assert stats.kstest(z, "norm").statistic < 2e-3
    # the tails: a 24-bit u1 caps |z| at sqrt(2 * 24 * ln 2) = 5.77
    assert np.abs(z).max() <= np.sqrt(2 * 24 * np.log(2)) + 1e-6
    assert (np.abs(z) > 4).mean() == pytest.approx(6.3e-5, rel=0.35)
    # consecutive values and neighbouring rows are uncorrelated
    zz = z.reshape(64, 32768)
    assert abs(np.corrcoef(zz[:, :-1].ravel(), zz[:, 1:].ravel())[0, 1]) < 3e-3
    assert abs(np.corrcoef(zz[:-1].ravel(), zz[1:].ravel())[0, 1]) < 3e-3


def test_random_directions_uniform_on_sphere():
    g = torch.Generator().manual_seed(0)
    th = random_directions(20000, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(th.norm(dim=1), torch.ones(20000, dtype=torch.float64), atol=1e-12)
    # uniform on S^2: mean 0, second moment I/3, and each coordinate uniform on [-1, 1] (Archimedes)
    assert th.mean(0).abs().max() < 0.02
    assert torch.allclose(th.T @ th / 20000, torch.eye(3, dtype=torch.float64) / 3, atol=0.01)
    hist = torch.histc(th[:, 2], bins=10, min=-1, max=1) / 20000
    assert hist.sub(0.1).abs().max() < 0.01


def test_random_directions_seeded_and_independent_draws():
    a = random_directions(5, 100, generator=torch.Generator().manual_seed(1))
    b = random_directions(5, 100, generator=torch.Generator().manual_seed(1))
    c = random_directions(5, 100, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(1)
    first, second = random_directions(5, 100, generator=g), random_directions(5, 100, generator=g)
    assert not torch.equal(first, second)  # a fresh key per call
    torch.manual_seed(8)
    d1 = random_directions(3, 10)
    torch.manual_seed(8)
    assert torch.equal(d1, random_directions(3, 10))  # torch's default generator when none is given


@pytest.mark.parametrize(
    "make,exc,msg",
    [
        (lambda: torch.empty(10), ValueError, "out must have 2 dimensions"),
        (lambda: torch.empty(3, 4, dtype=torch.int32), TypeError, "out has dtype int32"),
        (lambda: torch.empty(3, 4, dtype=torch.float16), TypeError, "out has dtype float16"),
        (lambda: torch.empty(4, 3).t(), ValueError, "out must be contiguous"),
    ],
)
def test_bad_input(make, exc, msg):
    with pytest.raises(exc, match=msg):
        torch.ops.pyengine.fill_directions_(make(), 1, True)


def test_empty_shapes_are_a_no_op():
    for shape in ((0, 5), (5, 0)):
        torch.ops.pyengine.fill_directions_(torch.empty(shape), 1, True)


def test_opcheck_and_compile():
    torch.library.opcheck(torch.ops.pyengine.fill_directions_.default, (torch.empty(3, 40), 5, True))

    def draw(out):
        torch.ops.pyengine.fill_directions_(out, 11, True)
        return out * 2

    a = torch.compile(draw, fullgraph=True, backend="aot_eager")(torch.empty(4, 50))
    assert torch.equal(a, draw(torch.empty(4, 50)))


def test_drawn_directions_compile_fullgraph_with_the_eager_values():
    # random_directions (and sliced_wasserstein without directions) draw a key from the generator;
    # read as a Python int it was data-dependent under torch.compile and fullgraph tracing failed
    # ("Expected a value of type 'int' for argument 'seed' but instead found type 'SymInt'")
    from pyengine.ops import random_directions, sliced_wasserstein

    x, y = torch.randn(2, 6, 5, dtype=torch.float64), torch.randn(2, 6, 5, dtype=torch.float64)
    for draw in (lambda: random_directions(3, 5, dtype=torch.float64),
                        lambda: sliced_wasserstein(x, y, n_directions=4)):
        torch.manual_seed(3)
        eager = draw()
        torch.manual_seed(3)
        compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")()
        assert torch.equal(compiled, eager)
    torch.library.opcheck(torch.ops.pyengine.fill_directions_keyed_.default, (torch.empty(3, 40), torch.tensor(5), True))
    out = torch.empty(4, 9)
    torch.ops.pyengine.fill_directions_keyed_(out, torch.tensor(-12345), True)
    ref = torch.empty(4, 9)
    torch.ops.pyengine.fill_directions_(ref, -12345, True)
    assert torch.equal(out, ref)
