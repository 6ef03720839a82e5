"""Hardware counters of the kernels behind issue 11's unmet rows, under Nsight Compute (ncu).

Each target (pyengine's op and the dense / pure-PyTorch baseline it is compared to) runs a few
times to warm up, then once between cudaProfilerStart / Stop, so that ncu profiles exactly those
launches. ncu flushes the caches before each kernel (cold L2, as in the table) and leaves the
clocks alone (--clock-control none, METHOD.md). The summary gives, per kernel, its duration, DRAM
and SM throughput against peak, achieved occupancy, registers, and the stall reasons that cost the
most: what the timings of bench_gpu.py cannot say (a kernel's own time without launch costs, and
whether it is bound by memory, latency or issue).

    ncu -o prof --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section LaunchStats --section Occupancy --section WarpStateStats \\
        python benchmarks/profile_kernels.py [--only sparse,entropy,sliced]
    ncu --import prof.ncu-rep --csv --page raw --print-units base > ncu.csv
    python benchmarks/profile_kernels.py --summarize ncu.csv

Each case's launches follow one marker kernel (PyTorch's sleep kernel, a few cycles), so the
summary labels every kernel with the case that launched it; the run writes the case names, in
order, to --cases (gpu_check.sh passes the same file to --summarize).

benchmarks/gpu_check.sh runs both. --dry runs the targets on the CPU with small shapes (a check of
the script without a GPU); --summarize reads the CSV on any machine.
"""
from __future__ import annotations

import argparse
import csv
import io
import re
import sys
from collections import OrderedDict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def targets(dev, dry):
    """(name, fn) pairs; every fn runs one op on inputs made once."""
    import torch
    import torch.nn.functional as F

    from _harness import KERNEL_VARIANTS, env_set, sparse_weight
    from pyengine import ops

    def with_env(var, val, fn):
        with env_set(var, val):
            return fn()

    s = 16 if dry else 1
    g = torch.Generator(device=dev).manual_seed(0)
    out = {}

    def sparse():
        n = k = 4096 // s
        w = sparse_weight(n, k, g, dev)
        packs = {"csr": ops.pack_sparse(w), "bitmap": ops.pack_sparse(w, format="bitmap")}
        csr, bm = packs["csr"], packs["bitmap"]
        res = []
        for m in (1, 16):
            x = torch.randn(m, k, device=dev, generator=g).bfloat16()
            res += [(f"dense linear bf16 M={m}", lambda x=x: F.linear(x, w)),
                    (f"sparse_linear csr M={m}", lambda x=x: ops.sparse_linear(x, csr)),
                    (f"sparse_linear bitmap M={m}", lambda x=x: ops.sparse_linear(x, bm))]
            # the other builds / modes bench_gpu.py times (read from the environment at each call)
            for f, variants in KERNEL_VARIANTS.items():
                for label, (var, val) in variants.items():
                    res.append((f"sparse_linear {f} {label} M={m}",
                                lambda x=x, var=var, val=val, p=packs[f]: with_env(var, val, lambda: ops.sparse_linear(x, p))))
        return res

    def entropy():
        res = []
        for dt in (torch.float32, torch.bfloat16):
            x = torch.randn(256 // s, 512, 28, 28, device=dev, generator=g).to(dt)
            res += [(f"entropy_counts {str(dt)[6:]}", lambda x=x: ops.entropy_counts(x, 1, check_nan=False)),
                    (f"entropy_counts stream order {str(dt)[6:]}",
                     lambda x=x: with_env("PYENGINE_ENTROPY_ORDER", "stream", lambda: ops.entropy_counts(x, 1, check_nan=False))),
                    (f"reference count {str(dt)[6:]}", lambda x=x: ops.entropy_counts_reference(x, 1))]
        return res

    def sliced():
        n, d, k = 8192 // s, 1024 // s, 256 // s
        x = torch.randn(1, n, d, device=dev, generator=g)
        y = torch.randn(1, n, d, device=dev, generator=g) * 1.3 + 0.2
        th = ops.random_directions(k, d, generator=g, device=dev)
        return [("sliced_wasserstein fwd fp32 n=8192 d=1024 K=256",
                 lambda: ops.sliced_wasserstein(x, y, th, check_nan=False))]

    out["sparse"], out["entropy"], out["sliced"] = sparse, entropy, sliced
    return out


MARKER = "spin_kernel"  # torch.cuda._sleep's kernel: the mark ahead of each case's launches


def run(only, dry, cases_out=None, deadline_s=None):
    import json
    import time

    import torch

    import pyengine

    t0 = time.monotonic()
    dev = torch.device("cpu" if dry else "cuda")
    if not dry and not (torch.cuda.is_available() and pyengine.CUDA_COMPILED):
        sys.exit("needs a GPU and a build with the CUDA kernels")
    families = targets(dev, dry)
    chosen = [f for f in families if not only or f in only]
    cases = [c for f in chosen for c in families[f]()]
    done = []
    with torch.no_grad():
        for _, fn in cases:
            for _ in range(3):
                fn()
        if not dry:
            torch.cuda.synchronize()
        for name, fn in cases:  # the kernels of each case, in this order, are the summary's rows
            if deadline_s is not None and time.monotonic() - t0 > deadline_s:
                # stop while ncu can still write its report (a run killed at the limit loses it)
                print(f"# deadline of {deadline_s:.0f} s reached: {len(cases) - len(done)} case(s) not profiled",
                      file=sys.stderr, flush=True)
                break
            if not dry:
                torch.cuda.profiler.start()
                torch.cuda._sleep(1)
            fn()
            if not dry:
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
            done.append(name)
            print(f"# ran {name}", file=sys.stderr, flush=True)
    if cases_out:
        Path(cases_out).write_text(json.dumps(done))


# ------------------------------------------------------------------------------------ summary

# ncu's raw metric names (the four sections collect them): column of the summary, scale. A column
# may list other names for the same metric, in the order tried: the ncu on the device machines
# (2026-11) writes gpu__dram_throughput where older versions wrote dram__throughput.
WANT = OrderedDict([
    ("gpu__time_duration.sum", "us"),
    (("dram__throughput.avg.pct_of_peak_sustained_elapsed",
      "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed"), "dram %"),
    ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "sm %"),
    ("sm__warps_active.avg.pct_of_peak_sustained_active", "occ %"),
    ("launch__registers_per_thread", "regs"),
    ("launch__grid_size", "grid"),
    ("launch__block_size", "block"),
])
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
TIME_UNITS = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def _num(v: str) -> float | None:
    try:
        return float(v.replace(",", ""))
    except (AttributeError, ValueError):
        return None


def short_name(name: str, width: int = 72) -> str:
    """A kernel's demangled name without its return type, namespaces and parameter list (template
    arguments kept: they say which build ran), cut to width."""
    name = re.sub(r"^void ", "", name.strip())
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # the parameter list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    name = re.sub(r"\b[\w]+::|\(anonymous namespace\)::", "", name)
    return name if len(name) <= width else name[: width - 3] + "..."


def summarize(text: str, cases: list[str] | None = None) -> str:
    """A table from ncu's `--csv --page raw` output: one line per profiled kernel, in launch order,
    labelled with its case where the marker kernels and the case list agree. Metrics the report
    lacks show as '-'."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    if len(lines) < 3:
        return "no ncu rows found (did ncu run, and was the range profiled?)"
    rd = list(csv.reader(io.StringIO("\n".join(lines))))
    head, units, body = rd[0], rd[1], rd[2:]
    col = {name: i for i, name in enumerate(head)}
    kname = (lambda r: r[col["Kernel Name"]]) if "Kernel Name" in col else (lambda r: "?")
    marks = sum(MARKER in kname(r) for r in body)
    label = cases is not None and marks == len(cases) and bool(body) and MARKER in kname(body[0])
    out = ["| # | case | kernel | " + " | ".join(WANT.values()) + " | top stalls (warp cycles per issued instruction) |",
           "|---" * (len(WANT) + 4) + "|"]
    if cases is not None and not label:
        out.insert(0, f"(case labels left out: {marks} marker kernels for {len(cases)} cases)\n")
    case, n, seen = "-", 0, 0
    for r in body:
        if label and MARKER in kname(r):
            case, seen = cases[seen], seen + 1
            continue
        name = short_name(kname(r))
        vals = []
        for names in WANT:
            metric = next((m for m in ((names,) if isinstance(names, str) else names) if m in col), None)
            v = _num(r[col[metric]]) if metric is not None else None
            if v is not None and metric == "gpu__time_duration.sum":
                v *= TIME_UNITS.get(units[col[metric]].strip(), 1.0)
            vals.append("-" if v is None else f"{v:.1f}")
        stalls = []
        for metric, i in col.items():
            m = STALL.match(metric)
            v = _num(r[i]) if m else None
            if v is not None and m.group(1) not in ("selected",):
                stalls.append((m.group(1), v))
        top = sorted(stalls, key=lambda kv: -kv[1])[:3]
        out.append(f"| {n} | {case} | {name} | " + " | ".join(vals) + " | "
                   + ", ".join(f"{a} {b:.1f}" for a, b in top) + " |")
        n += 1
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated: sparse,entropy,sliced")
    ap.add_argument("--dry", action="store_true", help="CPU, small shapes: checks the script without a GPU")
    ap.add_argument("--summarize", metavar="CSV", help="print the table of an ncu CSV and exit")
    ap.add_argument("--cases", metavar="JSON",
                    help="where the run writes the names of the cases it profiled, in order (and where "
                         "--summarize reads them)")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="profile no further case after this many seconds (so ncu can still write its report)")
    args = ap.parse_args()
    if args.summarize:
        import json

        cases = json.loads(Path(args.cases).read_text()) if args.cases and Path(args.cases).is_file() else None
        print(summarize(Path(args.summarize).read_text(errors="replace"), cases))
        return 0
    run(set(filter(None, args.only.split(","))), args.dry, args.cases, args.deadline_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
