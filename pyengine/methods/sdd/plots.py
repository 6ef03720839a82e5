"""PNG plots of double-descent curves: accuracy (and loss) against the fraction of weights left on
a log axis (sparsity grows to the right, as in the papers), several runs overlaid, the dip and the
second peak marked; entropy curves; accuracy against model width."""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_curves", "plot_entropy", "plot_model_size"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _sparsity_axis(ax, rows_list) -> None:
    ax.set_xscale("log")
    ax.invert_xaxis()  # 100% of the weights on the left, sparser to the right
    ax.set_xlabel("weights remaining (log scale; sparsity grows to the right)")
    ax.grid(alpha=0.3, which="both")
    lo = min((max(r["remaining"], 1e-9) for rows in rows_list for r in rows), default=1.0)
    ticks = [t for t in (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4)
             if t >= lo * 0.99]
    if len(ticks) > 8:
        ticks = [t for t in ticks if t not in (0.8, 0.6, 0.4, 0.3)]
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(ticks)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticklabels([f"{t:.3g}\n({1 - t:.1%})" for t in ticks], fontsize=7)


def plot_curves(curves: list[dict], path: str | Path, title: str = "", with_loss: bool = True,
                with_train: bool = True) -> Path:
    """``curves``: [{"label", "rows", "analysis"}] (analysis from curves.analyse). Test accuracy
    (train accuracy dashed) and, with ``with_loss``, test loss in a second panel; the dip (v) and
    the second peak (^) of each curve that shows a double descent are marked, and the test-loss
    peak (^) where the analysis found one: a peak at least ``curves.LOSS_PEAK_FRACTION`` of the
    loss curve's range high, on a curve whose accuracy shows a double descent (the rule of
    ``curves.analyse``, so the plot marks what the report and the table say)."""
    plt = _plt()
    n = 2 if with_loss else 1
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.3), squeeze=False)
    ax = axes[0][0]
    for i, c in enumerate(curves):
        rows = c["rows"]
        x = [max(r["remaining"], 1e-9) for r in rows]
        color = f"C{i % 10}"
        ax.plot(x, [r["test_acc"] for r in rows], marker="o", ms=3, color=color, label=c["label"])
        if with_train and all(r.get("train_acc") is not None for r in rows):
            ax.plot(x, [r["train_acc"] for r in rows], ls="--", lw=0.9, color=color, alpha=0.6)
        det = (c.get("analysis") or {}).get("test_acc") or {}
        if det.get("double_descent"):
            for key, marker in (("dip", "v"), ("peak", "^")):
                p = det[key]
                ax.plot([x[p["index"]]], [p["value"]], marker=marker, ms=11, color=color, mec="black", ls="none")
    _sparsity_axis(ax, [c["rows"] for c in curves])
    ax.set_ylabel("accuracy (%) - test solid, train dashed")
    ax.set_title(title or "test accuracy vs sparsity (v dip, ^ second peak)", fontsize=9)
    ax.legend(fontsize=7)
    if with_loss:
        ax = axes[0][1]
        for i, c in enumerate(curves):
            rows = c["rows"]
            x = [max(r["remaining"], 1e-9) for r in rows]
            ax.plot(x, [r["test_loss"] for r in rows], marker="o", ms=3, color=f"C{i % 10}", label=c["label"])
            det = (c.get("analysis") or {}).get("test_loss") or {}
            if det.get("double_descent"):
                p = det["dip"]  # the worst loss between the two good regions
                ax.plot([x[p["index"]]], [p["value"]], marker="^", ms=11, color=f"C{i % 10}", mec="black", ls="none")
        _sparsity_axis(ax, [c["rows"] for c in curves])
        ax.set_ylabel("test loss (cross-entropy)")
        ax.set_title("test loss vs sparsity (^ loss peak)", fontsize=9)
    return _save(fig, Path(path))


def plot_entropy(curves: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Mean layer entropy against sparsity for each run (left) and, for the first run with
    entropies, one line per layer (right). None when no curve has entropies."""
    have = [c for c in curves if any(r.get("entropy_mean") is not None for r in c["rows"])]
    if not have:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.3))
    for i, c in enumerate(have):
        rows = [r for r in c["rows"] if r.get("entropy_mean") is not None]
        a.plot([max(r["remaining"], 1e-9) for r in rows], [r["entropy_mean"] for r in rows], marker="o", ms=3,
               color=f"C{i % 10}", label=c["label"])
    _sparsity_axis(a, [c["rows"] for c in have])
    a.set_ylabel("mean layer entropy (bits)")
    a.set_title(title or "DSD2 entropy (neuron = channel x position)", fontsize=9)
    a.legend(fontsize=7)
    first = have[0]
    layers = list(dict.fromkeys(k for r in first["rows"] for k in r if k.startswith("H:")))  # network order
    cmap = plt.get_cmap("viridis")
    for j, k in enumerate(layers):
        rows = [r for r in first["rows"] if r.get(k) is not None]
        b.plot([max(r["remaining"], 1e-9) for r in rows], [r[k] for r in rows], lw=1,
               color=cmap(j / max(1, len(layers) - 1)), label=k[2:])
    _sparsity_axis(b, [first["rows"]])
    b.set_ylabel("layer entropy (bits)")
    b.set_title(f"per layer: {first['label']} (dark = first layer)", fontsize=9)
    if len(layers) <= 12:
        b.legend(fontsize=6)
    return _save(fig, Path(path))


def plot_model_size(points: list[dict], path: str | Path, title: str = "") -> Path:
    """Model-size curves: ``points`` = [{"label", "width", "dense_acc", "best_acc"}]; one line per
    label, dense accuracy solid and best sparse accuracy dashed, width on a log2 axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.3))
    labels = list(dict.fromkeys(p["label"] for p in points))
    for i, lab in enumerate(labels):
        ps = sorted((p for p in points if p["label"] == lab), key=lambda p: p["width"])
        w = [p["width"] for p in ps]
        ax.plot(w, [p["dense_acc"] for p in ps], marker="o", color=f"C{i % 10}", label=f"{lab} dense")
        ax.plot(w, [p["best_acc"] for p in ps], marker="s", ls="--", color=f"C{i % 10}", label=f"{lab} best sparse")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("width")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or "model-size double descent", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(path))
