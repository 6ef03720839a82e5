"""The offline sparse double descent sweep of benchmarks/results/sdd_digits.md (CPU, minutes).

ResNet-18 of width 8 on the 8x8 digits (quick preset: SGD 0.01, cosine, batch 32, wd 5e-4), 10 epochs
per round, IMP with r = 0.4 over 10 rounds (99.4% sparsity), DSD2 entropy at every sparsity:

  A: label noise 0 and 0.2, vanilla and distilled from each dense network (two worker processes)
  B: label noise 0.2 with 10x the weight decay (5e-3): the l2 remedy

then one figure with the four noise-0.2 / noise-0 curves, their entropies, and the table.

    OMP_NUM_THREADS=1 python benchmarks/sdd_digits.py [--out runs/sdd_digits] [--results benchmarks/results]

Both sweeps resume when started again.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pyengine

COMMON = ["--model", "resnet18", "--width-grid", "8", "--dataset", "digits", "--image-size", "8", "--epochs", "10",
          "--rounds", "10", "--rate", "0.4", "--entropy", "--no-progress"]


def main(argv=None) -> int:
    from pyengine.cli import main as cli
    from pyengine.methods.sdd import analyse, read_curve
    from pyengine.methods.sdd.plots import plot_curves, plot_entropy
    from pyengine.methods.sdd.sweep import format_table

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sdd_digits")
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--devices", default="cpu,cpu")
    a = ap.parse_args(argv)
    out, res = Path(a.out), Path(a.results)
    sweeps = {
        "A": COMMON + ["--noise-grid", "0,0.2", "--kd-teacher", "dense", "--devices", a.devices],
        "B": COMMON + ["--noise", "0.2", "--weight-decay", "5e-3", "--device", "cpu"],
    }
    for name, args in sweeps.items():
        folder = out / name
        rc = cli(["sdd", *args, "--out", str(folder)] + (["--resume"] if (folder / "sweep.json").exists() else []))
        if rc:
            return rc
    runs = [("noise 0, vanilla", out / "A" / "curves" / "noise0_wd0.0005_seed0_width8-vanilla.csv"),
            ("noise 0.2, vanilla", out / "A" / "curves" / "noise0.2_wd0.0005_seed0_width8-vanilla.csv"),
            ("noise 0.2, l2 (wd 5e-3)", out / "B" / "curves" / "noise0.2_wd0.005_seed0_width8-vanilla.csv"),
            ("noise 0.2, KD", out / "A" / "curves" / "noise0.2_wd0.0005_seed0_width8-kd.csv"),
            ("noise 0, KD", out / "A" / "curves" / "noise0_wd0.0005_seed0_width8-kd.csv")]
    curves = []
    dest = res / "sdd_digits"
    dest.mkdir(parents=True, exist_ok=True)
    for label, path in runs:
        rows = read_curve(path)
        curves.append({"label": label, "name": label, "rows": rows, "analysis": analyse(rows, tol=1.0)})
        shutil.copyfile(path, dest / path.name)
    title = "ResNet-18 (width 8) on 8x8 digits, IMP r = 0.4, 10 epochs per round"
    plot_curves(curves, res / "sdd_digits_accuracy.png", title)
    plot_entropy(curves, res / "sdd_digits_entropy.png")
    print(format_table(curves))
    for c in curves:
        r = c["rows"]
        print(f"{c['label']:<26} train acc (noisy labels) dense {r[0]['train_acc']:.2f}  clean labels "
              f"{r[0]['train_clean_acc']:.2f}  entropy dense {r[0]['entropy_mean']:.3f} -> last "
              f"{r[-1]['entropy_mean']:.3f}")
    print(f"written {res / 'sdd_digits_accuracy.png'}, {res / 'sdd_digits_entropy.png'}, {dest}/*.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
