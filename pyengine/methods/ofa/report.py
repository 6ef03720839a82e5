"""Tables, JSON and the accuracy-vs-peak-memory plot of OFA / MOOFA runs and searches."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["fmt_count", "subnet_summary", "format_train_table", "format_search_table", "format_memory",
           "format_search_markdown", "write_search_report", "plot_accuracy_vs_memory", "NONE_FITS"]


def fmt_count(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def subnet_summary(sub: Mapping[str, Any], max_depth: int | None = None) -> str:
    """"r32 d[2,3,4,2,2] k5.0 e3.2": resolution, depths, mean kernel and expand of the active blocks."""
    d = list(sub["d"])
    md = max_depth or (len(sub["ks"]) // max(1, len(d)))
    act = [s * md + i for s, n in enumerate(d) for i in range(n)]
    k = sum(sub["ks"][i] for i in act) / len(act)
    e = sum(sub["e"][i] for i in act) / len(act)
    return f"r{sub.get('r', '?')} d[{','.join(str(x) for x in d)}] k{k:.1f} e{e:.1f}"


def format_train_table(report: Mapping[str, Any]) -> str:
    cfg, sp = report["config"], report["space"]
    lines = ["", f"pyengine ofa train: {sp['name']} space (width x{cfg['width_mult']}) on {cfg['dataset']} "
             f"({report['device']}, {report['world_size']} process(es))", "",
             f"{'subnet':<34} {'peak mem':>10} {'MACs':>9} {'test acc %':>10}"]
    for row in report["final"]:
        lines.append(f"{subnet_summary(row['subnet']):<34} {row['peak_memory']:>10,} {fmt_count(row['macs']):>9} {row['acc']:>10.2f}")
    if report.get("wall_seconds"):
        lines.append(f"\nwall time {report['wall_seconds']:.0f} s; supernet in {cfg.get('out') or '-'}/supernet")
    return "\n".join(lines) + "\n"


def format_memory(est: Mapping[str, Any], header: str = "") -> str:
    lines = [header] if header else []
    lines.append(f"peak memory: {est['peak_elements']:,} elements = {est['peak_bytes']:,} bytes ({est['dtype']}), "
                 f"at {est['argmax']}")
    if est.get("cuda"):
        c = est["cuda"]
        lines.append(f"measured on {c['device']}: activations {c['activation_bytes']:,} bytes at the peak "
                     f"(allocator peak {c['peak_allocated_bytes']:,}, weights {c['weights_bytes']:,})")
    return "\n".join(lines)


NONE_FITS = "none fits"


def _grid(results: Sequence[Mapping[str, Any]], spaces: Sequence[str] | None, budgets: Sequence[int] | None):
    """The spaces and budgets searched (those of ``results`` plus any given) and the result of each pair."""
    names = list(dict.fromkeys([*(spaces or ()), *(r["space"] for r in results)]))
    bs = sorted({*(int(b) for b in budgets or ()), *(r["budget"] for r in results)})
    return names, bs, {(r["space"], r["budget"]): r for r in results}


def format_search_table(results: Sequence[Mapping[str, Any]], spaces: Sequence[str] | None = None,
                        budgets: Sequence[int] | None = None) -> str:
    """One row per (space, budget); a pair without a result (no subnet meets the budget) says
    "none fits". ``spaces`` / ``budgets``: what was searched (default: what ``results`` holds)."""
    names, bs, by = _grid(results, spaces, budgets)
    lines = [f"{'space':<6} {'budget':>10} {'peak mem':>10} {'MACs':>9} {'pred acc':>8} {'test acc':>8} "
             f"{'sampled':>8}  subnet", "-" * 105]
    for s in names:
        for b in bs:
            r = by.get((s, b))
            if r is None:
                lines.append(f"{s:<6} {b:>10,} {'-':>10} {'-':>9} {'-':>8} {'-':>8} {'-':>8}  {NONE_FITS} "
                             "(the budget is below the smallest subnet)")
                continue
            best = r.get("best_sampled")
            sampled = f"{best['test_acc']:>8.2f}" if best else f"{'-':>8}"
            lines.append(f"{r['space']:<6} {r['budget']:>10,} {r['peak_memory']:>10,} {fmt_count(r['macs']):>9} "
                         f"{r['predicted_acc']:>8.2f} {r['test_acc']:>8.2f} {sampled}  {subnet_summary(r['subnet'])}")
    lines.append("test acc: the searched subnet on the test split (BN recalibrated); sampled: the best of the subnets "
                 "measured for the predictor that fits the budget, on the test split (-: none of them fits)")
    return "\n".join(lines)


def format_search_markdown(results: Sequence[Mapping[str, Any]], spaces: Sequence[str] | None = None,
                           budgets: Sequence[int] | None = None) -> str:
    names, bs, by = _grid(results, spaces, budgets)
    if not names or not bs:
        return "No search results."
    head = ("| peak-memory budget (elements) | "
            + " | ".join(f"{s.upper()} test acc % (peak, MACs; best sampled)" for s in names) + " |")
    lines = [head, "|" + "---|" * (len(names) + 1)]
    for b in bs:
        cells = []
        for s in names:
            r = by.get((s, b))
            if r is None:
                cells.append(NONE_FITS)
            else:
                best = r.get("best_sampled")
                extra = f"; best sampled {best['test_acc']:.2f}" if best else ""
                cells.append(f"{r['test_acc']:.2f} ({r['peak_memory']:,}, {fmt_count(r['macs'])}{extra})")
        lines.append(f"| {b:,} | " + " | ".join(cells) + " |")
    if any(by.get((s, b)) is None for s in names for b in bs):
        lines.append("")
        lines.append(f"{NONE_FITS}: the budget is below the smallest subnet of that space.")
    return "\n".join(lines)


def plot_accuracy_vs_memory(results: Sequence[Mapping[str, Any]], data: Mapping[str, Sequence[Mapping[str, Any]]],
                            path: str | Path) -> Path:
    """Test accuracy of the searched subnets against their peak memory, one line per space,
    with the predictor's measured subnets as faint points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    colors = {}
    for space in sorted({r["space"] for r in results} | set(data)):
        pts = data.get(space, [])
        line = None
        rows = sorted([r for r in results if r["space"] == space], key=lambda r: r["budget"])
        if rows:
            (line,) = ax.plot([r["peak_memory"] for r in rows], [r["test_acc"] for r in rows], marker="o",
                              label=f"{space.upper()} searched (test)")
            colors[space] = line.get_color()
        if pts:
            ax.scatter([p["peak_memory"] for p in pts], [p["acc"] for p in pts], s=6, alpha=0.25,
                       color=colors.get(space), label=f"{space.upper()} sampled subnets (hold-out)")
    for b in sorted({r["budget"] for r in results}):
        ax.axvline(b, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("peak memory (elements, batch 1)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs peak memory")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_search_report(results: Sequence[Mapping[str, Any]], extra: Mapping[str, Any], data, out: str | Path, *,
                        spaces: Sequence[str] | None = None, budgets: Sequence[int] | None = None) -> dict:
    """search.json, search.md and accuracy_vs_peak_memory.png in ``out`` (``spaces`` /
    ``budgets``: what was searched, so pairs without a result show as "none fits")."""
    from pyengine.train.checkpoint import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = {**extra, "results": list(results)}
    atomic_write_text(out / "search.json", json.dumps(record, indent=2, default=str))
    atomic_write_text(out / "search.md", format_search_markdown(results, spaces, budgets) + "\n")
    plot_accuracy_vs_memory(results, data, out / "accuracy_vs_peak_memory.png")
    return record
