"""Runs every op benchmark on one device and prints one table of ratios (and --json)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_entropy  # noqa: E402
import bench_masked  # noqa: E402
import bench_sliced  # noqa: E402
from _harness import machine_name, parse_args, print_table, write_json  # noqa: E402

import pyengine  # noqa: E402

if __name__ == "__main__":
    args = parse_args(__doc__)
    dev = torch.device(args.device)
    if not pyengine.HAS_NATIVE or (dev.type == "cuda" and not pyengine.CUDA_COMPILED):
        sys.exit(f"pyengine._C has no {dev.type} kernels here; build it first (pip install --no-build-isolation -e .)")
    rows = []
    for mod in (bench_entropy, bench_sliced, bench_masked):
        part = mod.run(dev, args.repeats, args.quick)
        print_table(part, f"{mod.__name__} on {machine_name(dev)}")
        rows += part
    print_table(rows, f"all ops on {machine_name(dev)}")
    if args.json:
        write_json(args.json, rows, dev)
