"""The GPU table of issue 11, measured side by side in one run: the pure-PyTorch reference, pyengine,
the goal, and torch.compile of the reference (last column).

Every pyengine kernel is first checked against a float64 / plain-PyTorch reference on the same
inputs with its outputs poisoned (NaN-filled fresh allocations); a case whose check fails is
reported as FAIL and not timed, and the run goes on.

Timing (CUDA events, median of repeats, warm-up first): before each timed call a sleep kernel
keeps the GPU busy while the CPU enqueues the call, so the numbers are GPU time without launch
gaps - for pyengine and the baselines alike. Inputs larger than the L2 cache need no rotation;
the small sparse-GEMV cases are also timed as CUDA-graph replays after an L2 flush (cold L2), the
way issue 11 times the dense baseline. Training steps are timed back to back (throughput).

    python benchmarks/bench_gpu.py --json out.json [--budget-s 150] [--no-compile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pyengine  # noqa: E402
from _harness import KERNEL_VARIANTS, env_set, sparse_weight  # noqa: E402
from pyengine import ops  # noqa: E402

DEV = torch.device("cuda")
T0 = time.time()
DRY = False  # --dry: every case on the CPU with small shapes (a syntax and logic check without a GPU)


def sz(n: int) -> int:
    """A problem size; divided by 16 in a dry run."""
    return max(1, n // 16) if DRY else n


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


class Event:
    """torch.cuda.Event, or a host clock in a dry run."""

    def __init__(self):
        self.e = torch.cuda.Event(enable_timing=True) if DEV.type == "cuda" else None
        self.t = 0.0

    def record(self):
        if self.e is not None:
            self.e.record()
        else:
            self.t = time.perf_counter()

    def synchronize(self):
        if self.e is not None:
            self.e.synchronize()

    def elapsed_time(self, other):
        return self.e.elapsed_time(other.e) if self.e is not None else (other.t - self.t) * 1e3


# ------------------------------------------------------------------------------------ timing

class Timer:
    def __init__(self):
        self.flush = torch.empty(sz(256 << 20), dtype=torch.int8, device=DEV)
        self.cycles_per_ms = 1.0
        if DEV.type == "cuda":  # cycles of torch.cuda._sleep per millisecond at the current clock
            torch.cuda._sleep(1000)
            s, e = Event(), Event()
            s.record()
            torch.cuda._sleep(2_000_000)
            e.record()
            e.synchronize()
            self.cycles_per_ms = 2_000_000 / max(s.elapsed_time(e), 1e-3)

    def _busy(self, ms):
        if DEV.type == "cuda":
            torch.cuda._sleep(int(self.cycles_per_ms * ms))

    def time(self, fn, reps=30, warmup=3, cold=False, graph=False, busy_ms=1.0):
        """Median GPU milliseconds of fn() (or of its CUDA-graph replay)."""
        if DRY:
            reps, warmup = 2, 1
        if graph and DEV.type == "cuda":
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            call = g.replay
        else:
            call = fn
        for _ in range(warmup):
            call()
        sync()
        ts = []
        for _ in range(reps):
            if cold:
                self.flush.zero_()
            self._busy(busy_ms)
            a, b = Event(), Event()
            a.record()
            call()
            b.record()
            ts.append((a, b))
        sync()
        return statistics.median(x.elapsed_time(y) for x, y in ts)

    def time_rotating(self, fns, reps=30, warmup=3, busy_ms=1.0):
        """Median GPU milliseconds per call of a CUDA graph that calls fns[0], fns[1], ... in turn.

        Each fn reads its own inputs and together they are several times the L2 cache, so every call
        finds its inputs cold - with no flush before it (a flush by writes leaves the L2 full of dirty
        lines that the next reads must first write back) and with one graph launch shared by
        len(fns) calls (METHOD.md: rotate among input sets; capture many small launches in a graph).
        """
        def in_turn():
            for fn in fns:
                fn()

        return self.time(in_turn, reps=reps, warmup=warmup, graph=True, busy_ms=busy_ms) / len(fns)


def rotation_sets(nbytes: int) -> int:
    """How many input sets of nbytes each make three L2 caches (at least 2, at most 64)."""
    l2 = getattr(torch.cuda.get_device_properties(DEV), "L2_cache_size", 50 << 20) if DEV.type == "cuda" else 4 << 20
    return max(2, min(64, -(-3 * l2 // max(nbytes, 1))))


def steps_time(step, n=20, warmup=3):
    """Milliseconds per training step, steps run back to back (throughput)."""
    if DRY:
        n, warmup = 2, 1
    for _ in range(warmup):
        step()
    sync()
    a, b = Event(), Event()
    a.record()
    for _ in range(n):
        step()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    d = b.norm()
    return float((a - b).norm() / d) if d > 0 else float((a - b).norm())


class Poison:
    """NaN-fill every fresh allocation while checking, so an unwritten output element fails."""

    def __enter__(self):
        import torch.utils.deterministic as det

        self.det = det
        self.old = (det.fill_uninitialized_memory, torch.are_deterministic_algorithms_enabled())
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = True

    def __exit__(self, *a):
        self.det.fill_uninitialized_memory = self.old[0]
        torch.use_deterministic_algorithms(self.old[1])


# ------------------------------------------------------------------------------------ table

ROWS: list[dict] = []
CHECKS: list[dict] = []


def check(name, ok, detail):
    CHECKS.append({"check": name, "ok": bool(ok), "detail": detail})
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    return ok


def row(case, ref, ours, goal, compiled=None, note=""):
    r = {"case": case, "pytorch_ms": ref, "pyengine_ms": ours, "goal": goal, "compile_ms": compiled, "note": note}
    ROWS.append(r)
    f = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.4f}")  # noqa: E731
    print(f"ROW {case} | {f(ref)} | {f(ours)} | {goal} | {f(compiled)} {note}", flush=True)


def compiled_time(timer, ref_fn, args_budget):
    """torch.compile of the reference, timed like the others (None when out of budget or failing)."""
    if args_budget.no_compile or time.time() - T0 > args_budget.budget_s:
        return None
    try:
        c = torch.compile(ref_fn, dynamic=False)
        return timer.time(c, reps=20)
    except Exception as e:  # noqa: BLE001 - a compile failure is reported, not fatal
        print(f"torch.compile failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None


# ------------------------------------------------------------------------------------ cases

def ceilings(timer):
    a = torch.empty(sz(1 << 28), dtype=torch.float32, device=DEV)  # 1 GiB
    b = torch.empty_like(a)
    ms = timer.time(lambda: b.copy_(a), reps=10)
    bw = 2 * a.nbytes / ms / 1e9  # TB/s counting read + write
    del a, b
    print(f"device-to-device copy: {bw:.2f} TB/s (read + write)", flush=True)
    return bw


def case_entropy(timer, args, copy_bw):
    for dt, goal in ((torch.float32, "<= 0.145"), (torch.bfloat16, "<= 0.075")):
        x = torch.randn(sz(256), 512, 28, 28, device=DEV).to(dt)
        x.view(-1)[::7] = 0
        name = f"entropy counts {str(dt)[6:]} (256,512,28,28)"
        ref = lambda: ops.entropy_counts_reference(x, 1)  # noqa: E731
        ok = True
        with Poison():
            for t, cd, pp in ((x, 1, False), (x.to(memory_format=torch.channels_last), 1, False), (x[:8], 1, True),
                              (x.view(x.shape[0], 512, 784).transpose(1, 2), 2, False)):
                got = ops.entropy_counts(t, cd, pp, check_nan=False)
                exp = ops.entropy_counts_reference(t, cd, pp)
                ok &= check(f"{name} layout cd={cd} pp={pp} cl={not t.is_contiguous()}", torch.equal(got, exp), "exact")
            c = torch.zeros(512, dtype=torch.int64, device=DEV)
            nan = torch.zeros((), dtype=torch.int64, device=DEV)
            xn = x[:sz(16)].clone()
            xn[0, 5, 1, 1] = float("nan")
            ops.entropy_counts_add_(c, xn, nan_count=nan)
            ops.entropy_counts_add_(c, xn, nan_count=nan)
            ok &= check(f"{name} add_ twice + NaN count", torch.equal(c, 2 * ops.entropy_counts_reference(xn, 1)) and int(nan) == 2, "exact")
            c.zero_()
            y = ops.relu_count(xn, c)
            ok &= check(f"{name} relu_count", torch.equal(c, ops.entropy_counts_reference(xn, 1)) and torch.equal(
                y.nan_to_num(5.0), torch.relu(xn).nan_to_num(5.0)), "exact")
        floor = x.nbytes / (copy_bw * 1e12) * 1e3
        if not ok:
            row(name, timer.time(ref), "FAIL", goal, note="check failed: not timed")
            continue
        t_ref = timer.time(ref)
        t_ours = timer.time(lambda: ops.entropy_counts(x, 1, check_nan=False))
        c = torch.zeros(512, dtype=torch.int64, device=DEV)
        nan = torch.zeros((), dtype=torch.int64, device=DEV)
        t_add = timer.time(lambda: torch.ops.pyengine.entropy_counts_add_(c, nan, x, 1, False, False))
        t_relu = timer.time(lambda: torch.relu(x))
        t_fused = timer.time(lambda: torch.ops.pyengine.relu_count(x, c, nan, 1, False, False))
        note = f"floor {floor:.3f}; add_ {t_add:.4f}; relu {t_relu:.4f} vs relu_count {t_fused:.4f}"
        # the flat read order of the single-tensor count (opt-in until measured: entropy_cuda.cu)
        with env_set("PYENGINE_ENTROPY_ORDER", "stream"):
            xn = x[:sz(16)].clone()
            xn.view(-1)[3::1001] = float("nan")
            c = torch.full((512,), 2, dtype=torch.int64, device=DEV)
            nan.zero_()
            ops.entropy_counts_add_(c, xn, nan_count=nan)
            same = torch.equal(ops.entropy_counts(x, 1, check_nan=False), ops.entropy_counts_reference(x, 1))
            same &= torch.equal(c, 2 + ops.entropy_counts_reference(xn, 1)) and int(nan) == int(torch.isnan(xn).sum())
            if check(f"{name} stream order (PYENGINE_ENTROPY_ORDER=stream)", same, "exact"):
                t_stream = timer.time(lambda: ops.entropy_counts(x, 1, check_nan=False))
                t_stream_add = timer.time(lambda: torch.ops.pyengine.entropy_counts_add_(c, nan, x, 1, False, False))
                note += f"; stream order {t_stream:.4f} (add_ {t_stream_add:.4f})"
        if dt == torch.bfloat16:  # the raw-bit count of 16-bit vectors against the value-by-value one
            with env_set("PYENGINE_ENTROPY_RAW_BITS", "0"):
                same = torch.equal(ops.entropy_counts(x, 1, check_nan=False), ops.entropy_counts_reference(x, 1))
                check(f"{name} value by value (PYENGINE_ENTROPY_RAW_BITS=0)", same, "exact")
                t_values = timer.time(lambda: ops.entropy_counts(x, 1, check_nan=False))
            note += f"; value by value {t_values:.4f}"
        row(name, t_ref, t_ours, goal, compiled_time(timer, ref, args), note)
        del x


def case_sparse(timer, args):
    g = torch.Generator(device=DEV).manual_seed(1)
    n = k = sz(4096)
    w = sparse_weight(n, k, g, DEV)
    p = ops.pack_sparse(w)
    pb = ops.pack_sparse(w, format="bitmap")
    print(f"  sparse formats: dense {w.nbytes / 2**20:.1f} MiB, csr {p.nbytes() / 2**20:.1f} MiB, "
          f"bitmap {pb.nbytes() / 2**20:.1f} MiB", flush=True)
    for m in (1, 16):
        x = torch.randn(m, k, device=DEV, generator=g).bfloat16()
        ref64 = F.linear(x.double(), w.double())
        low = rel(F.linear(x, w), ref64)
        modes = {}
        for mode in ("auto", "smem", "global"):
            with env_set("PYENGINE_SPARSE_SKINNY", mode), Poison(), torch.no_grad():
                err = rel(ops.sparse_linear(x, p), ref64)
            if check(f"sparse_linear bf16 M={m} mode={mode}", err <= 2 * low + 1e-3, f"err {err:.2e} (dense bf16 {low:.2e})"):
                modes[mode] = None
        with torch.no_grad():
            dense = lambda: F.linear(x, w)  # noqa: E731
            d_warm = timer.time(dense)
            d_cold = timer.time(dense, cold=True, graph=True)
            res = {}
            for mode in modes:
                fn = lambda: ops.sparse_linear(x, p)  # noqa: E731
                with env_set("PYENGINE_SPARSE_SKINNY", mode):
                    res[mode] = (timer.time(fn), timer.time(fn, cold=True, graph=True))
        if "auto" not in res:
            row(f"sparse linear bf16 4096^2 90% M={m}", d_cold, "FAIL", ">= 2.5x dense", note="check failed")
        else:
            note = "; ".join(f"{md} {a:.4f} warm / {c:.4f} cold-graph" for md, (a, c) in res.items())
            row(f"sparse linear bf16 4096^2 90% M={m} (cold L2, graph)", d_cold, res["auto"][1], f"<= {d_cold / 2.5:.4f}",
                None, f"dense warm {d_warm:.4f}; {note}; speedup {d_cold / res['auto'][1]:.2f}x")
        # the same product from the 16 x 64 bitmap tiles (tensor-core kernel)
        with Poison(), torch.no_grad():
            err = rel(ops.sparse_linear(x, pb), ref64)
            ops.check_device_errors(x.device)
        name = f"sparse linear bf16 4096^2 90% M={m}, bitmap tiles (cold L2, graph)"
        if not check(f"sparse_linear bitmap bf16 M={m}", err <= 2 * low + 1e-3, f"err {err:.2e} (dense bf16 {low:.2e})"):
            row(name, d_cold, "FAIL", f"<= {d_cold / 2.5:.4f}", note="check failed: not timed")
            continue
        with torch.no_grad():
            fn = lambda: ops.sparse_linear(x, pb)  # noqa: E731
            b_warm, b_cold = timer.time(fn), timer.time(fn, cold=True, graph=True)
            # the kernel with its register budget for one block per SM (two waves for 256 row tiles)
            with env_set("PYENGINE_BITMAP_BLOCKS_PER_SM", "1"):
                one_warm, one_cold = timer.time(fn), timer.time(fn, cold=True, graph=True)
        row(name, d_cold, b_cold, f"<= {d_cold / 2.5:.4f}", None,
            f"warm {b_warm:.4f} (dense warm {d_warm:.4f}); speedup {d_cold / b_cold:.2f}x; "
            f"1 block/SM: {one_warm:.4f} warm / {one_cold:.4f} cold-graph")
    case_sparse_rotated(timer, g, n, k)


def case_sparse_rotated(timer, g, n, k):
    """The same products, each call on its own weight of a rotation three L2 caches large, one graph
    launch for the whole rotation (Timer.time_rotating): cold inputs without a flush's dirty lines,
    and launch costs shared - the dense baseline timed exactly like the sparse kernels. Every
    rotation (dense, each format, the one-element floor) makes the same number of calls, so the
    graph's fixed cost is shared out alike; a format with fewer distinct weights than calls cycles
    through them (each weight comes round again after three L2 caches of others)."""
    fmt_bytes = {}
    dense_w, packs = [], {"csr": [], "bitmap": []}
    w = sparse_weight(n, k, g, DEV)
    fmt_bytes["dense"] = w.nbytes
    fmt_bytes["csr"] = ops.pack_sparse(w).nbytes()
    fmt_bytes["bitmap"] = ops.pack_sparse(w, format="bitmap").nbytes()
    want = {f: rotation_sets(b) for f, b in fmt_bytes.items()}
    for i in range(max(want.values())):
        if i:
            w = sparse_weight(n, k, g, DEV)
        if i < want["dense"]:
            dense_w.append(w)
        for f in packs:
            if i < want[f]:
                packs[f].append(ops.pack_sparse(w, format=f))
    del w
    calls = max(want.values())

    def cycle(items):
        return [items[i % len(items)] for i in range(calls)]

    print(f"  rotation: {want['dense']} dense weights, {want['csr']} CSR, {want['bitmap']} bitmap "
          f"(each set three L2 caches or more), {calls} calls per graph for each", flush=True)
    for m in (1, 16):
        x = torch.randn(m, k, device=DEV, generator=g).bfloat16()
        with torch.no_grad():
            t_dense = timer.time_rotating([lambda w=w: F.linear(x, w) for w in cycle(dense_w)])
            one = torch.zeros(1, device=DEV)
            t_floor = timer.time_rotating([one.zero_] * calls)  # one tiny kernel per call
            print(f"  M={m}: dense {t_dense:.4f} ms per call; a one-element kernel in the same graph "
                  f"{t_floor:.4f} ms", flush=True)
            for f, ps in packs.items():
                name = f"sparse linear bf16 4096^2 90% M={m}, {f} (rotated weights, graph)"
                wl = ps[-1].to_dense()
                ref64 = F.linear(x.double(), wl.double())
                low = rel(F.linear(x, wl), ref64)
                with Poison():
                    got = ops.sparse_linear(x, ps[-1])
                    ops.check_device_errors(x.device)
                err = rel(got, ref64)
                if not check(f"sparse_linear {f} bf16 M={m} (rotation)", err <= 2 * low + 1e-3,
                             f"err {err:.2e} (dense bf16 {low:.2e})"):
                    row(name, t_dense, "FAIL", f"<= {t_dense / 2.5:.4f}", note="check failed: not timed")
                    continue
                t = timer.time_rotating([lambda p=p: ops.sparse_linear(x, p) for p in cycle(ps)])
                extra = ""
                for label, (var, val) in KERNEL_VARIANTS[f].items():  # other builds / modes, same rotation
                    with env_set(var, val):
                        with Poison():
                            same = rel(ops.sparse_linear(x, ps[-1]), ref64) <= 2 * low + 1e-3
                            ops.check_device_errors(x.device)
                        if check(f"sparse_linear {f} bf16 M={m} {label} (rotation)", same, "vs float64"):
                            tv = timer.time_rotating([lambda p=p: ops.sparse_linear(x, p) for p in cycle(ps)])
                            extra += f"; {label} {tv:.4f} ({t_dense / tv:.2f}x)"
                row(name, t_dense, t, f"<= {t_dense / 2.5:.4f}", None,
                    f"{len(ps)} weights of {fmt_bytes[f] / 2**20:.1f} MiB against {len(dense_w)} dense of "
                    f"{fmt_bytes['dense'] / 2**20:.1f} MiB; speedup {t_dense / t:.2f}x; dense at "
                    f"{fmt_bytes['dense'] / t_dense / 1e9:.2f} TB/s, {f} at {fmt_bytes[f] / t / 1e9:.2f} TB/s; "
                    f"one-element kernel {t_floor:.4f}{extra}")


def case_masked(timer, args):
    g = torch.Generator(device=DEV).manual_seed(2)
    # forward fp16 M=256 K=4096 N=11008
    m_, k_, n_ = sz(256), sz(4096), sz(11008)
    x = torch.randn(m_, k_, device=DEV, generator=g).half()
    w = torch.randn(n_, k_, device=DEV, generator=g).half()
    mk = torch.rand(n_, k_, device=DEV, generator=g) < 0.5
    with Poison(), torch.no_grad():
        ref64 = F.linear(x.double(), (w * mk).double())
        err = rel(ops.masked_linear(x, w, mk), ref64)
        low = rel(F.linear(x, w * mk), ref64)
    ok = check("masked_linear fp16 fwd", err <= 2 * low + 1e-3, f"err {err:.2e} (PyTorch {low:.2e})")
    with torch.no_grad():
        ref = lambda: F.linear(x, w * mk)  # noqa: E731
        t_ref = timer.time(ref)
        t_dense = timer.time(lambda: F.linear(x, w))
        if ok:
            t_hit = timer.time(lambda: ops.masked_linear(x, w, mk))

            def miss():
                torch.autograd.graph.increment_version(w)
                return ops.masked_linear(x, w, mk)

            t_miss = timer.time(miss)
            row("masked linear fp16 M=256 K=4096 N=11008 fwd", t_ref, t_hit, f"<= {1.1 * t_dense:.4f} (1.1x dense)",
                compiled_time(timer, ref, args), f"dense {t_dense:.4f}; W changed every call {t_miss:.4f}")
        else:
            row("masked linear fp16 M=256 K=4096 N=11008 fwd", t_ref, "FAIL", "", note="check failed")
    del x, w, mk
    # training step bf16 8192 x 4096 x 4096 fwd + bwd
    m_, k_, n_ = sz(8192), sz(4096), sz(4096)
    x = torch.randn(m_, k_, device=DEV, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(n_, k_, device=DEV, generator=g).bfloat16().requires_grad_(True)
    mk = torch.rand(n_, k_, device=DEV, generator=g) < 0.1
    gy = torch.randn(m_, n_, device=DEV, generator=g).bfloat16()

    def fb(fn, bump=False):
        def f():
            if bump:  # an optimiser step changed W: the masked weight must be made again
                torch.autograd.graph.increment_version(w)
            y = fn(x, w, mk)
            y.backward(gy)
            x.grad = w.grad = None
        return f

    outs = {}
    for name, fn, dt in (("ours", ops.masked_linear, torch.bfloat16), ("low", ops.masked_linear_reference, torch.bfloat16),
                         ("ref", ops.masked_linear_reference, torch.float64)):
        xx = x.detach().to(dt).requires_grad_(True)
        ww = w.detach().to(dt).requires_grad_(True)
        with Poison():
            y = fn(xx, ww, mk)
            y.backward(gy.to(dt))
        outs[name] = (y.detach(), xx.grad, ww.grad)
        del xx, ww, y
    ok = True
    for i, nm in enumerate(("y", "dx", "dW")):
        e, lo = rel(outs["ours"][i], outs["ref"][i]), rel(outs["low"][i], outs["ref"][i])
        ok &= check(f"masked_linear bf16 8192x4096x4096 {nm}", e <= 2 * lo + 1e-3, f"err {e:.2e} (PyTorch {lo:.2e})")
    ok &= check("masked_linear dW zero where pruned", bool((outs["ours"][2][~mk] == 0).all()), "exact")
    del outs
    ref = fb(ops.masked_linear_reference)
    t_ref = timer.time(ref, reps=15)
    t_dense = timer.time(fb(lambda a, b, c: F.linear(a, b)), reps=15)
    if ok:
        t_ours = timer.time(fb(ops.masked_linear, bump=True), reps=15)
        t_hit = timer.time(fb(ops.masked_linear), reps=15)
        row("masked linear bf16 8192x4096x4096 fwd+bwd", t_ref, t_ours, f"<= {1.05 * t_dense:.4f} (1.05x dense)",
            compiled_time(timer, ref, args), f"dense {t_dense:.4f}; W unchanged (cache hit) {t_hit:.4f}")
    else:
        row("masked linear bf16 8192x4096x4096 fwd+bwd", t_ref, "FAIL", "", note="check failed")


def case_sliced(timer, args):
    g = torch.Generator(device=DEV).manual_seed(3)
    cases = [(1, 8192, 1024, 256, False, "<= 0.15"), (1, 8192, 1024, 256, True, "<= 0.30"),
             (8, 8192, 512, 256, False, "<= 1.0"), (4, 128, 65536, 50, True, "<= 0.30")]
    for b, n, d, k, bwd, goal in cases:
        n, d, k = sz(n), sz(d), sz(k)
        x = torch.randn(b, n, d, device=DEV, generator=g)
        y = torch.randn(b, n, d, device=DEV, generator=g) * 1.3 + 0.2
        th = ops.random_directions(k, d, generator=g, device=DEV)
        name = f"max-sliced W B={b} n={n} d={d} K={k} {'fwd+bwd' if bwd else 'fwd'}"
        # check: distance and gradients against float64
        xx, yy = x.clone().requires_grad_(bwd), y.clone().requires_grad_(bwd)
        with Poison():
            got = ops.sliced_wasserstein(xx, yy, th)
            if bwd:
                gx, gy = torch.autograd.grad(got.sum(), [xx, yy])
        x64, y64 = x.double().requires_grad_(bwd), y.double().requires_grad_(bwd)
        r64 = ops.sliced_wasserstein_reference(x64, y64, th.double())
        ok = check(f"{name} dist", rel(got, r64) <= 1e-5, f"err {rel(got, r64):.2e}")
        if bwd:
            rx, ry = torch.autograd.grad(r64.sum(), [x64, y64])
            e = max(rel(gx, rx), rel(gy, ry))
            ok &= check(f"{name} grad", e <= 1e-3, f"err {e:.2e}")
        del x64, y64, r64
        if bwd:
            x.requires_grad_(True)
            y.requires_grad_(True)

        def step(fn):
            def f():
                if bwd:
                    x.grad = y.grad = None
                out = fn(x, y, th)
                if bwd:
                    out.sum().backward()
                return out
            return f

        ref = step(lambda a, c, t: ops.sliced_wasserstein_reference(a, c, t, 2.0, "max"))
        # no NaN check: it reads the result back (a host sync), which the reference does not do
        ours = step(lambda a, c, t: ops.sliced_wasserstein(a, c, t, check_nan=False))
        t_ref = timer.time(ref, reps=15)
        t_ours = timer.time(ours, reps=15) if ok else "FAIL"
        note = "" if ok else "check failed: not timed"
        if ok and DEV.type == "cuda":
            # the same with TF32 projections (torch.backends.cuda.matmul.allow_tf32), for ours and
            # the reference alike, and the error it costs against float64
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                with torch.no_grad():
                    d32 = ops.sliced_wasserstein(x, y, th)
                    r64 = ops.sliced_wasserstein_reference(x.double(), y.double(), th.double())
                    e32 = rel(d32, r64)
                    # the documented a-priori bound (ops.projection_error_bound), as a fraction of it
                    frac = float(((d32.double() - r64).abs() / ops.projection_error_bound(x, y, th)).max())
                check(f"{name} TF32 error within the bound", frac <= 1.0, f"{frac:.2e} of the bound")
                note = (f"TF32 projections: pytorch {timer.time(ref, reps=15):.4f}, pyengine {timer.time(ours, reps=15):.4f}, "
                        f"dist error vs float64 {e32:.1e} ({frac:.1e} of the a-priori bound)")
            finally:
                torch.backends.cuda.matmul.allow_tf32 = False
        row(name, t_ref, t_ours, goal, compiled_time(timer, ref, args) if not bwd else None, note)
        del x, y
    # the mean (all permutations) once, checked
    x = torch.randn(2, 3000, 64, device=DEV, generator=g, requires_grad=True)
    y = torch.randn(2, 3000, 64, device=DEV, generator=g, requires_grad=True)
    th = ops.random_directions(40, 64, generator=g, device=DEV)
    got = ops.sliced_wasserstein(x, y, th, reduce="mean")
    gx, = torch.autograd.grad(got.sum(), [x])
    x64, y64 = x.detach().double().requires_grad_(True), y.detach().double()
    r = ops.sliced_wasserstein_reference(x64, y64, th.double(), 2.0, "mean")
    rx, = torch.autograd.grad(r.sum(), [x64])
    # float32 projections can order near-ties differently from float64: a looser gradient bound
    check("sliced mean B=2 n=3000 K=40 dist+grad", rel(got, r) <= 1e-5 and rel(gx, rx) <= 1e-3,
          f"err {rel(got, r):.2e} / {rel(gx, rx):.2e}")


def _resnet():
    from pyengine.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10).to(DEV)


def case_train(timer, args):
    """Entropy collection on all 17 activations of a ResNet-18 CIFAR step (batch 128), as a ratio
    to the plain step. The variants are interleaved (plain, collector (batched: one count per
    forward), collector counting as it runs with fused ReLUs, the same with hooks only, add_ hooks,
    plain, ...) and
    each round's ratio is taken against the plain steps of the same round, so drift of the clock
    or of the host between variants does not enter the ratio. (LaCoOT's regulariser in the same
    step: benchmarks/bench_lacoot_step.py, which gpu_check.sh runs, with POT beside it.)"""
    from pyengine.models import activation_map
    from pyengine.nn.entropy import EntropyCollector

    x = torch.randn(sz(128), 3, 32, 32, device=DEV)
    yl = torch.randint(0, 10, (sz(128),), device=DEV)
    loss_fn = nn.CrossEntropyLoss()

    def make_step(model):
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), yl).backward()
            opt.step()
        return step

    steps = {"plain": make_step(_resnet())}
    # (a) the collector as pyengine's methods use it (pyengine.nn.EntropyCollector): activations
    # taken as the forward runs, all counted in one entropy_counts_add_many_ call at its end
    collectors = []
    for label, kw in (("collector", {}), ("collector inclusive", dict(inclusive=True)),
                      ("collector fused", dict(batched=False)), ("collector hooks", dict(batched=False, fused=False))):
        # z >= 0 (EASIER's rule, its in-training use): z is taken, the ReLU runs out of place;
        # (a') counting as each activation runs: the fused relu_count ReLUs; (a'') pre-hooks only
        m_col = _resnet()
        collectors.append(EntropyCollector(m_col, **kw).__enter__())
        steps[label] = make_step(m_col)
    # (b) the bare op in a hook: one kernel per activation, no allocation
    m = _resnet()
    sites = activation_map(m)
    acc = {}
    nan = torch.zeros((), dtype=torch.int64, device=DEV)

    def hook(name):
        def h(mod, a):
            z = a[0]
            c = acc.get(name)
            if c is None:
                c = acc[name] = torch.zeros(z.shape[1], dtype=torch.int64, device=DEV)
            torch.ops.pyengine.entropy_counts_add_(c, nan, z.detach(), 1, False, False)
        return h

    hs = [s.module.register_forward_pre_hook(hook(s.name)) for s in sites]
    steps["add_ hooks"] = make_step(m)
    rounds = 2 if DRY else 7
    times = {k: [] for k in steps}
    for k, f in steps.items():  # warm-up
        for _ in range(3):
            f()
    for _ in range(rounds):
        for k, f in steps.items():
            times[k].append(steps_time(f, n=10, warmup=1))
    for c in collectors:
        c.__exit__(None, None, None)
    for h in hs:
        h.remove()
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = {k: statistics.median(t / p for t, p in zip(v, times["plain"])) for k, v in times.items()}
    # check (b) and the collector against plain counting on one forward
    with torch.no_grad():
        for c in acc.values():
            c.zero_()
        ref = {}
        hs = [s.module.register_forward_pre_hook(hook(s.name)) for s in sites]
        hs += [s.module.register_forward_pre_hook(
            (lambda nm: lambda mod, a: ref.__setitem__(nm, ref.get(nm, 0) + ops.entropy_counts_reference(a[0], 1)))(s.name))
            for s in sites]
        with EntropyCollector(m) as fresh:  # the fused ReLUs, counting the same forward
            m(x)
        for h in hs:
            h.remove()
    with EntropyCollector(m) as batched:  # with autograd: taken, then counted in one call
        m(x)
    check("entropy_counts_add_ hooks on ResNet-18 == plain counts", all(torch.equal(acc[k], ref[k]) for k in ref),
          f"{len(ref)} activations")
    check("EntropyCollector (fused ReLUs) on ResNet-18 == plain counts",
          set(fresh.counts) == set(ref) and all(torch.equal(fresh.counts[k], ref[k]) for k in ref), f"{len(ref)} activations")
    check("EntropyCollector (batched, in a training forward) on ResNet-18 == plain counts",
          set(batched.counts) == set(ref) and all(torch.equal(batched.counts[k], ref[k]) for k in ref), f"{len(ref)} activations")
    row(f"entropy collection, {len(sites)} activations, ResNet-18 CIFAR step b128 (x plain step)",
        None, ratio["collector"], "<= 1.02", None,
        f"plain {med['plain']:.3f} ms; EntropyCollector x{ratio['collector']:.3f} (batched: one count per forward; "
        f"inclusive x{ratio['collector inclusive']:.3f}; "
        f"counting as it runs: fused ReLUs x{ratio['collector fused']:.3f}, hooks only x{ratio['collector hooks']:.3f}); "
        f"bare add_ hooks x{ratio['add_ hooks']:.3f} (medians of {rounds} interleaved rounds' ratios)")


def print_table(dev_name, copy_bw):
    f = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.4f}")  # noqa: E731
    print(f"\n## issue 11 GPU table - {dev_name}, torch {torch.__version__}, copy {copy_bw:.2f} TB/s")
    print("| case | PyTorch | pyengine | goal | torch.compile(ref) | notes |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        print(f"| {r['case']} | {f(r['pytorch_ms'])} | {f(r['pyengine_ms'])} | {r['goal']} | {f(r['compile_ms'])} | {r['note']} |")
    bad = [c["check"] for c in CHECKS if not c["ok"]]
    print(f"\nchecks: {len(CHECKS) - len(bad)}/{len(CHECKS)} passed" + (": FAILED " + "; ".join(bad) if bad else ""))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json")
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip torch.compile columns after this many seconds")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated subset: entropy,sparse,masked,sliced,train")
    ap.add_argument("--dry", action="store_true", help="CPU, small shapes: checks the script without a GPU")
    args = ap.parse_args()
    global DRY, DEV
    if args.dry:
        DRY, DEV = True, torch.device("cpu")
        args.no_compile = True
    elif not (torch.cuda.is_available() and pyengine.CUDA_COMPILED):
        sys.exit("needs a GPU and a build with the CUDA kernels")
    timer = Timer()
    copy_bw = ceilings(timer)
    only = set(filter(None, args.only.split(",")))
    for name, fn in (("entropy", case_entropy), ("sparse", case_sparse), ("masked", case_masked),
                     ("sliced", case_sliced), ("train", case_train)):
        if only and name not in only:
            continue
        t = time.time()
        try:
            fn(timer, args, copy_bw) if name == "entropy" else fn(timer, args)
        except Exception as e:  # noqa: BLE001 - one family failing must not end the run
            traceback.print_exc()
            check(f"{name} cases ran", False, f"{type(e).__name__}: {str(e)[:300]}")
        sync()
        print(f"[{name}: {time.time() - t:.1f} s, total {time.time() - T0:.1f} s]", flush=True)
    dev_name = torch.cuda.get_device_name() if DEV.type == "cuda" else "CPU (dry run)"
    print_table(dev_name, copy_bw)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": dev_name, "torch": torch.__version__, "copy_tb_s": copy_bw, "rows": ROWS,
                       "checks": CHECKS}, fh, indent=1)
    return 0 if all(c["ok"] for c in CHECKS) else 1


if __name__ == "__main__":
    sys.exit(main())
