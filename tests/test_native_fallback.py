"""Without a built extension pyengine still imports, warns once with the build command, and
every op answers through its pure-PyTorch reference."""
import subprocess
import sys
import textwrap


def test_import_without_extension_falls_back_with_clear_message():
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["pyengine._C"] = None  # makes `from pyengine import _C` raise ImportError
        import torch
        import pyengine
        from pyengine import ops
        assert not pyengine.HAS_NATIVE
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            x = torch.randn(4, 3, 2, 2)
            c = ops.entropy_counts(x)
            ops.entropy_counts(x)
        msgs = [str(m.message) for m in w]
        assert len(msgs) == 1, msgs
        assert "pip install --no-build-isolation -e ." in msgs[0], msgs[0]
        assert torch.equal(c, ops.entropy_counts_reference(x))
        cs = [torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
        ops.entropy_counts_add_many_(cs, [x, x], [1, -1])
        assert torch.equal(cs[0], c) and torch.equal(cs[1], ops.entropy_counts_reference(x, 3))
        try:
            ops.entropy_counts_add_many_(cs, [x, x], [1, 1])
        except ValueError as e:
            assert "counts[1] has shape" in str(e), e
        else:
            raise AssertionError("a wrong counts shape was accepted")
        # the references' checks and summary compile with fullgraph=True too
        stats = torch.compile(lambda c: ops.entropy_from_counts(c, 4).summary, fullgraph=True, backend="aot_eager")
        cc = torch.tensor([0, 1, 3, 4])
        assert torch.equal(stats(cc), ops.entropy_from_counts_reference(cc, 4)[1])
        xc = torch.compile(lambda a: ops.entropy_counts(a), fullgraph=True, backend="aot_eager")
        assert torch.equal(xc(x), c)
        for bad, msg in ((torch.zeros(2, dtype=torch.int64), "one element"), (torch.zeros(()), "nan_count has dtype")):
            try:  # the native op's checks: a (2,) nan_count was broadcast into, a float one accepted
                ops.entropy_counts_add_(torch.zeros(3, dtype=torch.int64), x, nan_count=bad)
            except (ValueError, TypeError) as e:
                assert msg in str(e), e
            else:
                raise AssertionError(f"nan_count {bad!r} was accepted")
        from pyengine.nn import EntropyCollector
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
        with EntropyCollector(net) as col:
            net(x).sum().backward()  # batched: counted at the end of the forward
        assert torch.equal(col.counts["1"], ops.entropy_counts_reference(net[0](x)))
        wt, m = torch.randn(5, 3), torch.rand(5, 3) > 0.5
        assert torch.allclose(ops.masked_linear(torch.ones(2, 3), wt, m), torch.ones(2, 3) @ (wt * m).T, atol=1e-6)
        p = ops.pack_sparse(wt * m)
        with torch.no_grad():
            assert torch.allclose(ops.sparse_linear(torch.ones(2, 3), p), torch.ones(2, 3) @ (wt * m).T, atol=1e-6)
            pb = ops.pack_sparse(wt * m, format="bitmap")
            assert torch.allclose(ops.sparse_linear(torch.ones(2, 3), pb), torch.ones(2, 3) @ (wt * m).T, atol=1e-6)
        t = [torch.randn(5, 3)]
        ops.apply_masks_(t, [m])
        assert (t[0][~m] == 0).all()
        a, b = torch.randn(8, 4), torch.randn(8, 4)
        th = ops.random_directions(3, 4)
        assert torch.allclose(ops.sliced_wasserstein(a, b, th), ops.sliced_wasserstein_reference(a[None], b[None], th)[0])
        a2, b2 = torch.randn(8, 2, requires_grad=True), torch.randn(8, 2)
        thg = torch.randn(3, 6)
        d = ops.sliced_wasserstein_grouped([a, a2], [b, b2], thg)
        d.sum().backward()
        assert a2.grad is not None
        assert torch.allclose(d, torch.stack([ops.sliced_wasserstein(a, b, thg[:, :4]),
                                              ops.sliced_wasserstein(a2, b2, thg[:, 4:])]))
        g = ops.sliced_wasserstein_grouped([a, a2], [b, b2], generator=torch.Generator().manual_seed(0))
        assert g.shape == (2,)
        try:  # the reference path checks the pairs as the native op does
            ops.sliced_wasserstein_grouped([a, a2[:3]], [b, b2[:3]], thg)
        except ValueError as e:
            assert "xs[1] has 3 points but xs[0] has 8" in str(e), e
        else:
            raise AssertionError("pairs of different point counts were accepted")
        print("fallback ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout
