"""Times the variant kernels of benchmarks/micro/variants.cu on a GPU, next to their baselines.

    nvcc -O3 -arch=sm_90 -shared -Xcompiler -fPIC -o /tmp/variants.so benchmarks/micro/variants.cu
    python benchmarks/micro/run_variants.py /tmp/variants.so [--json out.json]

Three questions of issue 11 (see benchmarks/results/gpu_notes.md):
- where the CSR GEMV's microseconds go (M = 1, bf16 4096 x 4096 at 90% zeros): each variant leaves
  one stage out, timed by the same rotation as bench_gpu.py (distinct weights three L2 caches
  large, one call per weight, one captured graph; median replay time / calls);
- where the M = 16 product's time goes (staging x in shared memory, the gathers, 16 products and
  warp sums per entry, the loads), and whether swizzled halves or the first row's loads issued
  before the staging gain;
- whether the bf16 entropy count gains from keeping loads in flight while it counts, or from bf16x2
  compares, against the read floor of the same access pattern, and which order of the same loads
  comes near a contiguous read of the tensor (wider column strips, blocks in step down the rows,
  row-major units interleaved across blocks).
Every variant that computes the product or the count is checked against a reference first.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys

import torch
import torch.nn.functional as F

DEV = torch.device("cuda")

CSR_VARIANTS = {  # id: (label, what it computes: "prod", "rowsum" or None for floors)
    0: ("production order (smem x, column check, rowptr)", "prod"),
    1: ("no gather (x = 1)", "rowsum"),
    2: ("no column check", "prod"),
    3: ("fixed rows, no rowptr load", "prod"),
    4: ("x read in place from global", "prod"),
    5: ("loads only (rowptr)", None),
    6: ("loads only, fixed rows", None),
    7: ("production, 128 threads/block", "prod"),
    8: ("production, 256 threads/block", "prod"),
    9: ("production, 1024 threads/block", "prod"),
    10: ("global x, 128 threads/block", "prod"),
    11: ("empty (store only)", None),
}
CSR16_VARIANTS = {  # M = 16: id: (label, what it computes: "prod", "rowsum" or None)
    0: ("production order (x staged, 16 products per entry)", "prod"),
    1: ("no staging (smem garbage)", None),
    2: ("staging alone", None),
    3: ("no gather (x = 1)", "rowsum"),
    4: ("loads only (x staged)", None),
    5: ("loads only, no staging", None),
    6: ("swizzled halves (all 32 banks)", "prod"),
    7: ("first row's entries loaded before staging", "prod"),
    8: ("swizzled + first row before staging", "prod"),
}
COUNT_MODES = {
    0: "production order (8 loads, then count; vset)",
    1: "two half batches in rotation (vset)",
    2: "production order, bf16x2 compares",
    3: "rotation + bf16x2 compares",
    4: "loads only (xor)",
    5: "contiguous stream, loads only",
    6: "loads only, strips 2x wider (16 KB)",
    7: "loads only, strips 4x wider (32 KB)",
    8: "loads only, strips 8x wider (64 KB)",
    9: "loads only, blocks in step down the rows",
    10: "loads only, row-major units interleaved",
}


def p(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def time_graph(calls, reps=30, warmup=3) -> float:
    """Median ms per call of a graph that makes every call in turn (one replay per timing)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    for _ in range(warmup):
        g.replay()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda._sleep(1_000_000)  # the GPU stays busy while the replay is queued
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(x.elapsed_time(y) for x, y in ts) / len(calls)


def time_plain(fn, reps=20, warmup=3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        torch.cuda._sleep(1_000_000)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        ts.append((a, b))
    torch.cuda.synchronize()
    return statistics.median(x.elapsed_time(y) for x, y in ts)


def csr_of(w: torch.Tensor):
    mask = w != 0
    counts = mask.sum(1)
    rowptr = torch.zeros(w.shape[0] + 1, dtype=torch.int32, device=w.device)
    rowptr[1:] = counts.cumsum(0).to(torch.int32)
    cols = mask.nonzero()[:, 1].to(torch.int16)
    vals = w[mask].contiguous()
    return rowptr, cols.contiguous(), vals


def rotation(nbytes: int) -> int:
    l2 = getattr(torch.cuda.get_device_properties(DEV), "L2_cache_size", 50 << 20)
    return max(2, min(64, -(-3 * l2 // nbytes)))


def csr_table(lib, g, results):
    n = k = 4096
    x = torch.randn(1, k, device=DEV, generator=g).bfloat16()
    err = torch.zeros(1, dtype=torch.int32, device=DEV)
    fixed = 410

    def random_w():
        return (torch.randn(n, k, device=DEV, generator=g) * (torch.rand(n, k, device=DEV, generator=g) < 0.1)).bfloat16()

    def uniform_w():  # every row exactly `fixed` entries
        cols = torch.rand(n, k, device=DEV, generator=g).argsort(dim=1)[:, :fixed]
        w = torch.zeros(n, k, device=DEV)
        w.scatter_(1, cols, torch.randn(n, fixed, device=DEV, generator=g))
        return w.bfloat16()

    dense_calls = rotation(n * k * 2)
    dense_w = [random_w() for _ in range(dense_calls)]
    t_dense = time_graph([lambda w=w: F.linear(x, w) for w in dense_w])
    del dense_w
    results["dense_ms"] = t_dense
    print(f"dense F.linear bf16 M=1 4096^2, rotated ({dense_calls} weights): {t_dense * 1e3:.2f} us")
    for data in ("random", "uniform"):
        w0 = random_w() if data == "random" else uniform_w()
        rp, ci, va = csr_of(w0)
        nnz = int(va.numel())
        nbytes = rp.numel() * 4 + ci.numel() * 2 + va.numel() * 2
        calls = rotation(nbytes)
        packs = [(rp.clone(), ci.clone(), va.clone()) for _ in range(calls)]
        out = torch.empty(n, dtype=torch.bfloat16, device=DEV)
        ref = (x.double() @ w0.double().t()).flatten()
        rowsum = w0.double().sum(1)
        print(f"\nCSR ({data} rows, nnz {nnz}, {nbytes / 2**20:.2f} MiB per pack, {calls} packs in rotation)")
        for vid, (label, what) in CSR_VARIANTS.items():
            if vid in (3, 6) and data != "uniform":
                continue
            out.fill_(float("nan"))
            rc = lib.csr_variant(vid, p(x), k, p(rp), p(ci), p(va), nnz, fixed, p(out), n, p(err),
                                 ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
            torch.cuda.synchronize()
            ok = rc == 0 and int(err.item()) == 0
            if ok and what is not None:
                want = ref if what == "prod" else rowsum
                rel = float((out.double() - want).norm() / want.norm())
                ok = rel < 1e-2
            else:
                rel = float("nan")

            def call(pk, vid=vid):
                lib.csr_variant(vid, p(x), k, p(pk[0]), p(pk[1]), p(pk[2]), nnz, fixed, p(out), n, p(err),
                                ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))

            t = time_graph([lambda pk=pk: call(pk) for pk in packs]) if rc == 0 else float("nan")
            results.setdefault("csr", []).append(
                {"data": data, "id": vid, "label": label, "us": t * 1e3, "ok": ok, "rel": rel,
                 "speedup_vs_dense": t_dense / t, "tb_s": nbytes / t / 1e9})
            print(f"  {vid:2d} {label:<50} {t * 1e3:6.2f} us  {t_dense / t:5.2f}x dense  "
                  f"{nbytes / t / 1e9:5.2f} TB/s  {'ok' if ok else 'CHECK FAILED'}")
        del packs


def csr16_table(lib, g, results):
    """Where the M = 16 product's time goes (production: 0.0162 ms rotated on an H100, 1.02x
    dense): staging x, the gathers, the 16 products and sums per entry, the loads."""
    n = k = 4096
    x = torch.randn(16, k, device=DEV, generator=g).bfloat16()

    def random_w():
        return (torch.randn(n, k, device=DEV, generator=g) * (torch.rand(n, k, device=DEV, generator=g) < 0.1)).bfloat16()

    dense_calls = rotation(n * k * 2)
    dense_w = [random_w() for _ in range(dense_calls)]
    t_dense = time_graph([lambda w=w: F.linear(x, w) for w in dense_w])
    del dense_w
    results["dense16_ms"] = t_dense
    w0 = random_w()
    rp, ci, va = csr_of(w0)
    nnz = int(va.numel())
    nbytes = rp.numel() * 4 + ci.numel() * 2 + va.numel() * 2
    calls = rotation(nbytes)
    packs = [(rp.clone(), ci.clone(), va.clone()) for _ in range(calls)]
    out = torch.empty(16, n, dtype=torch.bfloat16, device=DEV)
    ref = x.double() @ w0.double().t()
    rowsum = w0.double().sum(1).expand(16, n)
    print(f"\nCSR M=16 (nnz {nnz}, {calls} packs in rotation): dense F.linear {t_dense * 1e3:.2f} us")
    stream = lambda: ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)  # noqa: E731
    for vid, (label, what) in CSR16_VARIANTS.items():
        out.fill_(float("nan"))
        rc = lib.csr16_variant(vid, p(x), k, p(rp), p(ci), p(va), nnz, p(out), n, stream())
        torch.cuda.synchronize()
        ok = rc == 0
        rel = float("nan")
        if ok and what is not None:
            want = ref if what == "prod" else rowsum
            rel = float((out.double() - want).norm() / want.norm())
            ok = rel < 1e-2
        t = time_graph([lambda pk=pk, vid=vid: lib.csr16_variant(vid, p(x), k, p(pk[0]), p(pk[1]), p(pk[2]), nnz,
                                                                  p(out), n, stream()) for pk in packs]) if rc == 0 else float("nan")
        results.setdefault("csr16", []).append({"id": vid, "label": label, "us": t * 1e3, "ok": ok, "rel": rel,
                                                "speedup_vs_dense": t_dense / t})
        print(f"  {vid:2d} {label:<50} {t * 1e3:6.2f} us  {t_dense / t:5.2f}x dense  {'ok' if ok else 'CHECK FAILED'}")
    del packs


def count_table(lib, g, results):
    x = torch.randn(256, 512, 28, 28, device=DEV, generator=g).bfloat16()
    rows, cvec = 256, 512 * 28 * 28 // 8
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    total = torch.zeros(1, dtype=torch.int64, device=DEV)
    nan_flag = torch.zeros(1, dtype=torch.int64, device=DEV)
    want = int((x > 0).sum())
    nbytes = x.numel() * 2
    t_copy = time_plain(lambda: x.clone())
    t_cmp = time_plain(lambda: (x > 0).sum())
    print(f"\nentropy counts bf16 (256,512,28,28), {nbytes / 1e6:.1f} MB: clone {t_copy * 1e3:.1f} us "
          f"({2 * nbytes / t_copy / 1e6:.0f} GB/s r+w), (x > 0).sum() {t_cmp * 1e3:.1f} us")
    results["count_clone_ms"] = t_copy
    for mode, label in COUNT_MODES.items():
        regs = lib.count_regs(mode)
        ntiles = -(-cvec // 512)
        # production holds 128 registers: one block per SM; mode 9 takes whole row ranges per tile
        for occ in ((1, 2) if regs <= 64 else (1,)) if mode < 5 else (1, 2):
            grid = sms * occ if mode != 9 else ntiles * (occ + 1)
            total.zero_()
            nan_flag.zero_()
            rc = lib.count_variant(mode, p(x), rows, cvec, p(total), p(nan_flag), grid,
                                   ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
            torch.cuda.synchronize()
            ok = rc == 0 and (mode >= 4 or (int(total.item()) == want and int(nan_flag.item()) == 0))
            t = time_plain(lambda: lib.count_variant(mode, p(x), rows, cvec, p(total), p(nan_flag), grid,
                                                     ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)))
            results.setdefault("count", []).append(
                {"mode": mode, "label": label, "us": t * 1e3, "ok": ok, "regs": regs, "grid": grid,
                 "tb_s": nbytes / t / 1e9})
            print(f"  {mode} {label:<48} grid {grid:4d} {t * 1e3:6.1f} us  {nbytes / t / 1e6:6.0f} GB/s  "
                  f"regs {regs}  {'ok' if ok else 'CHECK FAILED'}")
    # a NaN must be seen by every counting mode
    x.view(-1)[123457] = float("nan")
    want = int((x > 0).sum())
    for mode in range(4):
        total.zero_()
        nan_flag.zero_()
        lib.count_variant(mode, p(x), rows, cvec, p(total), p(nan_flag), sms,
                          ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        torch.cuda.synchronize()
        good = int(total.item()) == want and int(nan_flag.item()) > 0
        results.setdefault("count_nan_check", []).append({"mode": mode, "ok": good})
        print(f"  NaN check mode {mode}: {'ok' if good else 'FAILED'}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("so")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=["csr", "csr16", "count"], default=None, help="one of the tables")
    a = ap.parse_args()
    lib = ctypes.CDLL(a.so)
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.csr_variant.argtypes = [ctypes.c_int, vp, i64, vp, vp, vp, i64, ctypes.c_int, vp, i64, vp, vp]
    lib.count_variant.argtypes = [ctypes.c_int, vp, i64, i64, vp, vp, ctypes.c_int, vp]
    lib.count_regs.argtypes = [ctypes.c_int]
    lib.csr16_variant.argtypes = [ctypes.c_int, vp, i64, vp, vp, vp, i64, vp, i64, vp]
    g = torch.Generator(device=DEV)
    g.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(DEV), "torch": torch.__version__}
    print(results["device"], "torch", torch.__version__, file=sys.stderr)
    if a.only in (None, "csr"):
        csr_table(lib, g, results)
    if a.only in (None, "csr16"):
        csr16_table(lib, g, results)
    if a.only in (None, "count"):
        count_table(lib, g, results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
