#!/usr/bin/env bash
# GPU check, run from the repository root on the GPU machine (H100/H200, no network):
# builds pyengine._C with the CUDA kernels, checks the CUDA paths the unit tests do not reach,
# runs the CUDA tests, then the CUDA benchmarks. Logs and bench_cuda.json go to $OUT
# (default /tmp/pyengine_gpu); the exit status is non-zero when any step failed.
#   bash benchmarks/gpu_check.sh            # everything
#   QUICK=1 bash benchmarks/gpu_check.sh    # benchmarks with small shapes only
#   SKIP_BUILD=1 bash benchmarks/gpu_check.sh
set -euo pipefail

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/pyengine_gpu}
mkdir -p "$OUT"
status=0

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

if [[ "${SKIP_BUILD:-0}" != "1" ]]; then
  echo "== build (log: $OUT/build.log)"
  t0=$(date +%s)
  if ! PYENGINE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
      timeout 900 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    echo "BUILD FAILED"; tail -n 60 "$OUT/build.log"; exit 1
  fi
  echo "built in $(( $(date +%s) - t0 )) s"
fi
$PY -c "import pyengine._native as n, sys; print('HAS_NATIVE', n.HAS_NATIVE, 'CUDA_COMPILED', n.CUDA_COMPILED); sys.exit(0 if n.CUDA_COMPILED else 1)"

echo "== extra checks (log: $OUT/extra.log): tile pipelines, SpMM, densify+GEMM, long sorts, big layouts"
cat >"$OUT/extra_checks.py" <<'PYEOF'
import sys

import torch
import torch.nn.functional as F

from pyengine.ops import (apply_masks_, entropy_counts, entropy_counts_reference, masked_linear,
                          masked_linear_reference, pack_sparse, sliced_wasserstein,
                          sliced_wasserstein_reference, sparse_linear)
from pyengine.ops.masked import _pack_reference

dev = torch.device("cuda")
fails = []


def rel(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    d = b.norm()
    return float((a - b).norm() / d) if d > 0 else float((a - b).norm())


def check(name, err, tol):
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name:<60} err {err:.2e} tol {tol:.1e}", flush=True)
    if not ok:
        fails.append(name)


def tol_for(dt, lowp_err):
    return {torch.float32: 1e-5, torch.float64: 1e-12}.get(dt, 2 * lowp_err + 1e-3)


g = torch.Generator(device=dev).manual_seed(0)

# sparse_linear: skinny (m <= 16 / chunks of 16), SpMM (float32 m > 32), densify + GEMM (half
# types m > 64, dense-ish float32), float64, huge K (x staged with fewer rows per chunk)
with torch.no_grad():
    for dt, m, n, k, dens in [(torch.bfloat16, 1, 4096, 4096, 0.1), (torch.bfloat16, 16, 4096, 4096, 0.1),
                              (torch.float16, 40, 1000, 3000, 0.1), (torch.float32, 300, 1000, 777, 0.1),
                              (torch.float32, 200, 300, 500, 0.6), (torch.bfloat16, 200, 1000, 4096, 0.1),
                              (torch.float64, 100, 500, 300, 0.2), (torch.float16, 3, 300, 70000, 0.05)]:
        w = torch.randn(n, k, device=dev, generator=g).to(dt) * (torch.rand(n, k, device=dev, generator=g) < dens)
        x = torch.randn(m, k, device=dev, generator=g).to(dt)
        b = torch.randn(n, device=dev, generator=g).to(dt)
        p = pack_sparse(w)
        rp, ci, vals = _pack_reference(w)
        same = torch.equal(p.rowptr, rp) and torch.equal(p.colidx, ci) and torch.equal(p.values, vals)
        check(f"pack_sparse {dt} {n}x{k}", 0.0 if same else 1.0, 0.0)
        ref = F.linear(x.double(), w.double(), b.double())
        check(f"sparse_linear {dt} m={m} n={n} k={k} d={dens}", rel(sparse_linear(x, p, b), ref),
              tol_for(dt, rel(F.linear(x, w, b), ref)))

# masked_linear with several tiles in the forward, dx and dW pipelines
for dt, m, n, k in [(torch.bfloat16, 512, 4096, 2048), (torch.float32, 64, 3000, 1500), (torch.float16, 7, 5000, 1000)]:
    x = torch.randn(m, k, device=dev, generator=g).to(dt)
    w = torch.randn(n, k, device=dev, generator=g).to(dt)
    b = torch.randn(n, device=dev, generator=g).to(dt)
    mk = torch.rand(n, k, device=dev, generator=g) < 0.5
    dy = torch.randn(m, n, device=dev, generator=g).to(dt)
    outs = []
    for fn, t in ((masked_linear, dt), (masked_linear_reference, dt), (masked_linear_reference, torch.float64)):
        xx, ww, bb = (v.detach().to(t).clone().requires_grad_(True) for v in (x, w, b))
        y = fn(xx, ww, mk, bb)
        y.backward(dy.to(t))
        outs.append((y.detach(), xx.grad, ww.grad, bb.grad))
    for name, a, lo, r in zip(("y", "dx", "dW", "db"), *outs):
        check(f"masked_linear {dt} {m}x{k}x{n} {name}", rel(a, r), tol_for(dt, rel(lo, r)))
    check(f"masked_linear {dt} dW zero where pruned", float((outs[0][2][~mk] != 0).sum()), 0.0)

# sliced Wasserstein: block sorts at their size limits, CUB segmented sort beyond, many directions
for dt, bsz, n, d, k in [(torch.float32, 2, 9000, 16, 8), (torch.float64, 2, 5000, 7, 5), (torch.float32, 3, 8192, 32, 16),
                         (torch.float64, 1, 4096, 9, 4), (torch.float32, 4, 1000, 20, 300), (torch.float32, 2, 2000, 8, 6)]:
    for reduce in ("max", "mean"):
        x = torch.randn(bsz, n, d, device=dev, dtype=dt, generator=g).requires_grad_(True)
        y = (torch.randn(bsz, n, d, device=dev, dtype=dt, generator=g) * 1.5 + 0.2).requires_grad_(True)
        th = F.normalize(torch.randn(k, d, device=dev, dtype=dt, generator=g), dim=1)
        wts = torch.rand(bsz, device=dev, dtype=dt, generator=g)
        got = sliced_wasserstein(x, y, th, p=2.0, reduce=reduce)
        gx, gy = torch.autograd.grad((got * wts).sum(), [x, y])
        x64 = x.detach().double().requires_grad_(True)
        y64 = y.detach().double().requires_grad_(True)
        ref = sliced_wasserstein_reference(x64, y64, th.double(), 2.0, reduce)
        rx, ry = torch.autograd.grad((ref * wts.double()).sum(), [x64, y64])
        tol = 1e-5 if dt == torch.float32 else 1e-10
        check(f"sliced {dt} B={bsz} n={n} K={k} {reduce} dist", rel(got, ref), tol)
        # float32 projections can tie, and tied points may swap gradients: a looser bound there
        check(f"sliced {dt} B={bsz} n={n} K={k} {reduce} grad", max(rel(gx, rx), rel(gy, ry)), 100 * tol)

# entropy counts on the benchmark-sized layouts
for dt in (torch.float32, torch.bfloat16):
    x = torch.randn(64, 512, 28, 28, device=dev, generator=g).to(dt)
    ref = entropy_counts_reference(x, 1)
    for cl in (False, True):
        xx = x.to(memory_format=torch.channels_last) if cl else x
        check(f"entropy_counts {dt} channels_last={cl}", float((entropy_counts(xx, 1) != ref).sum()), 0.0)
    check(f"entropy_counts {dt} per_position",
          float((entropy_counts(x, per_position=True) != entropy_counts_reference(x, per_position=True)).sum()), 0.0)
    t = torch.randn(4, 1000, 4096, device=dev, generator=g).to(dt)
    check(f"entropy_counts {dt} (B,T,C)", float((entropy_counts(t, -1) != entropy_counts_reference(t, 2)).sum()), 0.0)

# apply_masks_ with more tensors than one launch takes
shapes = [(i % 7 + 1, 1000 + 37 * i) for i in range(300)]
ts = [torch.randn(s, device=dev, generator=g) for s in shapes]
ms = [torch.rand(s, device=dev, generator=g) > 0.5 for s in shapes]
exp = [t.masked_fill(~m, 0) for t, m in zip(ts, ms)]
apply_masks_(ts, ms)
check("apply_masks_ 300 tensors", float(sum(int((a != e).sum()) for a, e in zip(ts, exp))), 0.0)

print(f"{len(fails)} failed" + (": " + ", ".join(fails) if fails else ""))
sys.exit(1 if fails else 0)
PYEOF
if timeout 600 $PY "$OUT/extra_checks.py" >"$OUT/extra.log" 2>&1; then
  tail -n 1 "$OUT/extra.log"
else
  status=1; echo "EXTRA CHECKS FAILED"; grep -E "^FAIL|Error" "$OUT/extra.log" | head -n 40 || true; tail -n 5 "$OUT/extra.log"
fi

echo "== tests (log: $OUT/pytest.log)"
if timeout 900 $PY -m pytest -q --maxfail=20 tests -k cuda -p no:cacheprovider >"$OUT/pytest.log" 2>&1; then
  tail -n 3 "$OUT/pytest.log"
else
  status=1; echo "TESTS FAILED"; grep -E "^(FAILED|ERROR)|Error" "$OUT/pytest.log" | head -n 40 || true; tail -n 5 "$OUT/pytest.log"
fi

echo "== benchmarks (log: $OUT/bench.log)"
bench_args=(--device cuda --json "$OUT/bench_cuda.json")
if [[ "${QUICK:-0}" == "1" ]]; then bench_args+=(--quick); fi
if timeout 900 $PY benchmarks/run_all.py "${bench_args[@]}" >"$OUT/bench.log" 2>&1; then
  $PY - "$OUT/bench_cuda.json" <<'PYEOF'
import json, sys
rec = json.load(open(sys.argv[1]))
print(f"{rec.get('machine')}  torch {rec.get('torch')}")
print(f"{'op':<22} {'case':<40} {'dtype':<9} {'ref ms':>9} {'ours ms':>9} {'speedup':>8}")
for r in rec.get("rows", []):
    print(f"{r['op']:<22} {str(r['case'])[:40]:<40} {r['dtype']:<9} {r['ref_ms']:>9.3f} {r['pyengine_ms']:>9.3f} {r['speedup']:>7.2f}x")
PYEOF
else
  status=1; echo "BENCHMARKS FAILED"; tail -n 40 "$OUT/bench.log"
fi
exit $status
