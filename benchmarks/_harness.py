"""Side-by-side timing of a pyengine op and its pure-PyTorch reference, in one run.

CPU: wall clock (perf_counter), warm-up, median of repeats. CUDA: CUDA events, warm-up, median,
with the inputs rotated through several copies when one copy is smaller than the L2 cache.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    ref_ms: float
    pyengine_ms: float

    @property
    def speedup(self) -> float:
        return self.ref_ms / self.pyengine_ms if self.pyengine_ms > 0 else float("nan")


def time_fn(fn, inputs_list, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median milliseconds of fn(*inputs) cycling over inputs_list."""
    n = len(inputs_list)
    for i in range(warmup):
        fn(*inputs_list[i % n])
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for i in range(repeats):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs_list[i % n])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(*inputs_list[i % n])
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copies_for(device: torch.device, nbytes: int) -> int:
    """How many input copies to rotate through so a repeat does not hit a warm L2."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(8, (2 * l2) // max(1, nbytes) + 1))


@contextlib.contextmanager
def env_set(var: str, value: str):
    """The kernel variant that environment variable `var` = value selects, for the block's calls
    (the native ops read these switches at every call)."""
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = old


# the other builds / modes of each sparse kernel, timed (bench_gpu.py) and profiled
# (profile_kernels.py) beside the default: format -> label -> (variable, value)
KERNEL_VARIANTS = {
    "csr": {"global mode": ("PYENGINE_SPARSE_SKINNY", "global")},  # x through the caches (M=1: in place)
    "bitmap": {"2 row tiles per block": ("PYENGINE_BITMAP_ROW_TILES", "2"),
               "1 block/SM": ("PYENGINE_BITMAP_BLOCKS_PER_SM", "1")},
}


def sparse_weight(n: int, k: int, g: torch.Generator, device: torch.device) -> torch.Tensor:
    """A random (n, k) bf16 weight with 90% zeros (the issue's sparse GEMV case)."""
    return (torch.randn(n, k, device=device, generator=g) * (torch.rand(n, k, device=device, generator=g) < 0.1)).bfloat16()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}")
    head = f"{'op':<22} {'case':<40} {'dtype':<9} {'ref ms':>10} {'pyengine ms':>12} {'speedup':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.op:<22} {r.case:<40} {r.dtype:<9} {r.ref_ms:>10.3f} {r.pyengine_ms:>12.3f} {r.speedup:>7.2f}x")


def parse_args(description: str):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the table to this JSON file")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    return ap.parse_args()


def write_json(path: str, rows: list[Row], device: torch.device, extra: dict | None = None) -> None:
    record = {
        "machine": machine_name(device),
        "device": str(device),
        "torch": torch.__version__,
        "rows": [dict(asdict(r), speedup=r.speedup) for r in rows],
    }
    if extra:
        record.update(extra)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def main(run, title: str, doc: str) -> None:
    """The command line every op benchmark shares: run on --device, print, optionally --json."""
    args = parse_args(doc)
    dev = torch.device(args.device)
    rows = run(dev, args.repeats, args.quick)
    print_table(rows, f"{title} on {machine_name(dev)}")
    if args.json:
        write_json(args.json, rows, dev)
