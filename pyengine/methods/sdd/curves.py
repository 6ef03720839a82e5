"""Double-descent curves: one row per sparsity from a run's rounds, written as CSV and JSON, and the
dip and second peak found in them.

The shape the papers report (methods.md section 6): from the dense network, test accuracy falls
to a dip, rises to a second peak (near 98-99.5% sparsity on CIFAR with label noise), then falls.
:func:`detect_double_descent` finds the deepest valley of a curve: the point d whose drop below
the best point before it *and* below the best point after it is largest (its prominence); it is a
double descent when that prominence reaches ``tol`` (accuracy points). The second peak is the best
point after the dip. The same rule on the test loss (lower is better) finds a loss peak, the worst
loss between two better regions. A loss peak counts (and is marked on the plots) only when

- its prominence reaches :data:`LOSS_PEAK_FRACTION` (10%) of the loss curve's range (max - min over
  the curve): a bump of noise height is no peak. The loss has no natural unit like the accuracy
  point, so the tolerance is relative; see :func:`loss_tolerance`; and
- the same curve's test accuracy shows a double descent by the rule above (``tol`` points), so a
  loss peak is reported exactly on the runs that the report, the terminal table and the
  accuracy plot call a double descent.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["CURVE_COLUMNS", "LOSS_PEAK_FRACTION", "curve_rows", "detect_double_descent", "loss_tolerance", "analyse",
           "write_curve", "read_curve"]

LOSS_PEAK_FRACTION = 0.1  # a test-loss peak must rise this fraction of the loss curve's range above both sides

CURVE_COLUMNS = ("round", "sparsity", "remaining", "target_sparsity", "kept", "total", "test_acc", "test_loss",
                 "train_acc", "train_loss", "train_clean_acc", "train_clean_loss", "entropy_mean",
                 "entropy_mean_neurons")


def curve_rows(rounds: list[dict]) -> list[dict]:
    """One flat row per round (a report's ``rounds``); per-layer entropies become ``H:<layer>``."""
    rows = []
    for r in rounds:
        row = {k: r.get(k) for k in CURVE_COLUMNS if k != "remaining"}
        row["remaining"] = 1.0 - float(r["sparsity"])
        for name, h in (r.get("entropy") or {}).items():  # network order
            row[f"H:{name}"] = h
        rows.append(row)
    return rows


def detect_double_descent(sparsity: list[float], values: list[float], *, higher_is_better: bool = True,
                          tol: float = 1.0) -> dict:
    """The deepest valley of ``values`` along increasing ``sparsity`` (see the module docstring).

    Returns {"double_descent", "prominence", "dip", "peak", "before", "final_drop"}; dip / peak /
    before are {"index", "sparsity", "value"} (None when there is no double descent).
    """
    if len(sparsity) != len(values):
        raise ValueError(f"sparsity and values differ in length ({len(sparsity)} vs {len(values)})")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    sign = 1.0 if higher_is_better else -1.0
    v = [sign * float(x) for x in values]
    best_depth, dip = -math.inf, None
    for d in range(1, len(v) - 1):
        depth = min(max(v[:d]) - v[d], max(v[d + 1:]) - v[d])
        if depth > best_depth + 1e-12:
            best_depth, dip = depth, d
    out = {"double_descent": False, "prominence": None, "dip": None, "peak": None, "before": None,
           "final_drop": None}
    if dip is None:
        return out
    out["prominence"] = best_depth
    if best_depth < tol or best_depth <= 0:
        return out
    before = max(range(dip), key=lambda i: (v[i], -i))
    peak = max(range(dip + 1, len(v)), key=lambda i: (v[i], -i))

    def point(i):
        return {"index": i, "sparsity": float(sparsity[i]), "value": float(values[i])}

    out.update(double_descent=True, dip=point(dip), peak=point(peak), before=point(before),
               final_drop=sign * (v[peak] - v[-1]))
    return out


def loss_tolerance(losses: list[float]) -> float:
    """The prominence a test-loss peak needs: :data:`LOSS_PEAK_FRACTION` of the curve's range."""
    vals = [float(v) for v in losses if v is not None and math.isfinite(float(v))]
    return LOSS_PEAK_FRACTION * (max(vals) - min(vals)) if vals else 0.0


def analyse(rows: list[dict], tol: float = 1.0) -> dict:
    """Dip / peak of the test accuracy and the test-loss peak of one curve, plus its best point.

    The accuracy dip needs a prominence of ``tol`` points; the loss peak needs
    :func:`loss_tolerance` of the loss curve *and* a double descent of the accuracy (module
    docstring). ``loss_tol`` in the result is the loss tolerance used."""
    sp = [r["sparsity"] for r in rows]
    acc = [r["test_acc"] for r in rows]
    loss = [r["test_loss"] for r in rows]
    loss_tol = loss_tolerance(loss)
    res = {"test_acc": detect_double_descent(sp, acc, tol=tol),
           "test_loss": detect_double_descent(sp, loss, higher_is_better=False, tol=loss_tol)}
    if res["test_loss"]["double_descent"] and not res["test_acc"]["double_descent"]:
        res["test_loss"].update(double_descent=False, dip=None, peak=None, before=None, final_drop=None)
    if rows:
        b = max(range(len(rows)), key=lambda i: (acc[i], -i))
        res["best"] = {"index": b, "sparsity": sp[b], "test_acc": acc[b]}
        res["dense_acc"] = acc[0]
        res["final"] = {"sparsity": sp[-1], "test_acc": acc[-1]}
    res["tol"] = tol
    res["loss_tol"] = loss_tol
    return res


def write_curve(rows: list[dict], folder: str | Path, name: str, meta: dict | None = None,
                tol: float = 1.0) -> tuple[Path, Path]:
    """``<folder>/<name>.csv`` (one row per sparsity) and ``<name>.json`` (rows, detection, meta)."""
    from pyengine.train.checkpoint import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cols = list(CURVE_COLUMNS) + list(dict.fromkeys(k for r in rows for k in r if k.startswith("H:")))
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join("" if r.get(c) is None else repr(r[c])
                              for c in cols))
    csv_path, json_path = folder / f"{name}.csv", folder / f"{name}.json"
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    atomic_write_text(json_path, json.dumps({"name": name, "meta": meta or {}, "analysis": analyse(rows, tol),
                                             "rows": rows}, indent=1))
    return csv_path, json_path


def read_curve(path: str | Path) -> list[dict]:
    """Rows of a curve CSV written by :func:`write_curve` (numbers as floats, round as int)."""
    out = []
    with open(path, newline="") as f:
        for rec in csv.DictReader(f):
            row = {}
            for k, v in rec.items():
                row[k] = None if v == "" else (int(v) if k in ("round", "kept", "total") else float(v))
            out.append(row)
    return out
