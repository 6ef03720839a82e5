"""Run reports: the summary table on the terminal and the plots (PNG)."""
from __future__ import annotations

from pathlib import Path


def _fmt_int(n) -> str:
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def print_summary(report: dict, out: Path, log=print) -> None:
    rounds = report["rounds"]
    cfg = report["config"]
    lines = [
        "",
        f"pyengine prune: {cfg['model']} / {cfg['method']} on {cfg['dataset']} ({report['device']})",
        "",
        f"{'round':>5} {'test acc %':>10} {'sparsity':>9} {'zero-H layers':>13} {'emptied':>7}",
    ]
    for r in rounds:
        lines.append(f"{r['round']:>5} {r['test_acc']:>10.2f} {r['sparsity']:>9.2%} {len(r['zero_entropy']):>13} {len(r['emptied']):>7}")
    last = rounds[-1]
    lines += ["", f"{'layer':<34} {'sparsity':>9} {'entropy':>8} {'on':>5} {'off':>5}"]
    for row in last["layers"]:
        ent = "-" if row["entropy"] is None else f"{row['entropy']:.3f}"
        on = "-" if row["always_on"] is None else str(row["always_on"])
        off = "-" if row["always_off"] is None else str(row["always_off"])
        lines.append(f"{row['layer'][:34]:<34} {row['sparsity']:>9.2%} {ent:>8} {on:>5} {off:>5}")
    p, f = report["params"], report["flops"]
    lines += [
        "",
        f"accuracy     dense {report['dense_acc']:.2f}%  ->  pruned {report['final_acc']:.2f}%",
        f"parameters   dense {_fmt_int(p['dense'])}  ->  nonzero {_fmt_int(p['effective'])}",
        f"MACs/sample  dense {_fmt_int(f['dense'])}  ->  effective {_fmt_int(f['effective'])}",
        f"latency      {report['latency_ms_batch32']:.2f} ms per batch of 32 ({report['latency_note']})",
        f"collapsed    zero-entropy activations: {', '.join(report['zero_entropy_layers']) or 'none'}",
        f"             emptied layers: {', '.join(report['emptied_layers']) or 'none'}",
    ]
    if report.get("wall_seconds"):
        lines.append(f"wall time    {report['wall_seconds']:.0f} s")
    lines += [f"written      {out}/report.json, {out}/metrics.jsonl, {out}/*.png, {out}/final/", ""]
    log("\n".join(lines))


def _save(fig, path: Path, paths: list[Path]) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)


def write_plots(report: dict, out: Path) -> list[Path]:
    """entropy_per_layer.png (one line per round) and accuracy_vs_sparsity.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    paths = []
    rounds = report["rounds"]
    fig, ax = plt.subplots(figsize=(9, 4))
    for r in rounds:
        rows = [row for row in r["layers"] if row["entropy"] is not None]
        ax.plot(range(len(rows)), [row["entropy"] for row in rows], marker="o", label=f"round {r['round']} ({r['sparsity']:.0%})")
    if rounds:
        rows = [row for row in rounds[-1]["layers"] if row["entropy"] is not None]
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([row["layer"].removesuffix(".weight") for row in rows], rotation=70, fontsize=7)
    ax.set_ylabel("entropy (bits)")
    ax.set_title("activation entropy per layer")
    ax.legend(fontsize=7)
    _save(fig, out / "entropy_per_layer.png", paths)

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([100 * r["sparsity"] for r in rounds], [r["test_acc"] for r in rounds], marker="o")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy vs sparsity")
    ax.grid(alpha=0.3)
    _save(fig, out / "accuracy_vs_sparsity.png", paths)
    return paths
