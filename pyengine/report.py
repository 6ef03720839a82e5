"""Run reports: the summary table on the terminal and the plots (PNG)."""
from __future__ import annotations

from pathlib import Path


def _fmt_int(n) -> str:
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _fmt2(v) -> str:
    """A latency in ms or an accuracy in %: two decimals, '-' when missing."""
    return "-" if v is None else f"{v:.2f}"


def network_table(networks: dict) -> list[str]:
    """Depth, layers, parameters, MACs, latency and accuracy of the dense, pruned and folded networks."""
    devs = sorted({d for n in networks.values() for d in (n.get("latency_ms_batch32") or {})})
    head = f"{'network':<8} {'depth':>5} {'layers':>6} {'params':>9} {'nonzero':>9} {'MACs':>9}"
    head += "".join(f" {('ms/32 ' + d):>11}" for d in devs) + f" {'test acc %':>10}"
    lines = [head]
    for name in ("dense", "pruned", "folded"):
        n = networks.get(name)
        if n is None:
            continue
        lat = n.get("latency_ms_batch32") or {}
        acc = n.get("test_acc")
        lines.append(f"{name:<8} {n.get('depth', '-'):>5} {n.get('layers', '-'):>6} {_fmt_int(n.get('params', 0)):>9} "
                     f"{_fmt_int(n.get('params_nonzero', 0)):>9} {_fmt_int(n.get('macs', 0)):>9}"
                     + "".join(f" {_fmt2(lat.get(d)):>11}" for d in devs)
                     + f" {_fmt2(acc):>10}")
    return lines


def depth_tables(report: dict) -> list[str]:
    """The depth methods' tables: per iteration (EASIER, NEPENTHE: activations removed and the folded
    network's depth, parameters, MACs, latency) and per block removed (LaCoOT)."""
    lines: list[str] = []
    rounds = report["rounds"]
    if any("activations_total" in r for r in rounds):
        lines += ["", "per iteration (depth, params, MACs and latency of the round's network once folded)",
                  f"{'iter':>4} {'val acc %':>9} {'test acc %':>10} {'act. removed':>12} {'depth':>5} {'params':>9} "
                  f"{'MACs':>9} {'ms/32':>8}"]
        for r in rounds:
            mark = " <- result" if r["round"] == report.get("selected_round") else ""
            rem = f"{r.get('activations_removed', 0)}/{r.get('activations_total', '?')}"
            lat = r.get("folded_latency_ms_batch32")
            lines.append(f"{r['round']:>4} {_fmt2(r.get('val_acc')):>9} {_fmt2(r.get('test_acc')):>10} {rem:>12} "
                         f"{r.get('folded_depth', '-'):>5} {_fmt_int(r.get('folded_params', 0)):>9} "
                         f"{_fmt_int(r.get('folded_macs', 0)):>9} {_fmt2(lat):>8}{mark}")
    mr = report.get("method_result")
    if isinstance(mr, dict) and mr.get("table"):
        dist = mr.get("distances") or {}
        lines += ["", f"blocks removed without fine-tuning, closest to the identity first (distance on "
                  f"{mr.get('scored_on', 'val')})",
                  f"{'removed':>7} {'block':<16} {'distance':>9} {'val acc %':>9} {'test acc %':>10} {'depth':>5} "
                  f"{'params':>9} {'MACs':>9} {'ms/32':>8}"]
        for row in mr["table"]:
            k = row["blocks_removed"]
            mark = " <- result" if k == mr.get("blocks_removed") else ""
            d = dist.get(row["removed"]) if row["removed"] else None
            lines.append(f"{k:>3}/{mr.get('blocks_total', '?'):<3} {str(row['removed'] or '-')[:16]:<16} "
                         f"{('-' if d is None else f'{d:.4g}'):>9} {_fmt2(row.get('val_acc')):>9} "
                         f"{_fmt2(row.get('test_acc')):>10} {row['depth']:>5} {_fmt_int(row['params']):>9} "
                         f"{_fmt_int(row['macs']):>9} {_fmt2(row.get('latency_ms_batch32')):>8}{mark}")
    return lines


def print_summary(report: dict, out: Path, log=print) -> None:
    rounds = report["rounds"]
    cfg = report["config"]
    lines = [
        "",
        f"pyengine prune: {cfg['model']} / {cfg['method']} on {cfg['dataset']} ({report['device']})",
        "",
        f"{'round':>5} {'test acc %':>10} {'sparsity':>9} {'all layers':>10} {'zero-H act.':>11} {'emptied':>7}",
    ]
    for r in rounds:
        mark = " <- result" if r["round"] == report.get("selected_round") and len(rounds) > 1 and r is not rounds[-1] else ""
        lines.append(f"{r['round']:>5} {r['test_acc']:>10.2f} {r['sparsity']:>9.2%} {r.get('sparsity_all_layers', 0):>10.2%} "
                     f"{len(r['zero_entropy']):>11} {len(r['emptied']):>7}{mark}")
    last = next((r for r in rounds if r["round"] == report.get("selected_round")), rounds[-1])
    if any(row["entropy"] is not None for row in last["layers"]):
        lines += ["", f"{'layer':<34} {'sparsity':>9} {'entropy':>8} {'on':>5} {'off':>5}"]
        for row in last["layers"]:
            ent = "-" if row["entropy"] is None else f"{row['entropy']:.3f}"
            on = "-" if row["always_on"] is None else str(row["always_on"])
            off = "-" if row["always_off"] is None else str(row["always_off"])
            lines.append(f"{row['layer'][:34]:<34} {row['sparsity']:>9.2%} {ent:>8} {on:>5} {off:>5}")
    lines += depth_tables(report)
    lines += ["", *network_table(report["networks"]), ""]
    lines.append(f"accuracy     dense {report['dense_acc']:.2f}%  ->  result {report['final_acc']:.2f}% "
                 f"(sparsity {report['final_sparsity']:.2%} of the pruned layers, "
                 f"{report.get('final_sparsity_all_layers', 0):.2%} of all weights)")
    lines.append(f"collapsed    zero-entropy activations: {', '.join(report['zero_entropy_layers']) or 'none'}")
    lines.append(f"             emptied layers: {', '.join(report['emptied_layers']) or 'none'}")
    fold = report.get("fold")
    if fold is not None:
        lines.append(f"folding      {len(fold['collapse_edits'])} collapse edit(s), {len(fold['folds'])} exact fold(s)")
        described = fold.get("described") or [f"{e.get('kind')} {e.get('target')}" for e in fold["collapse_edits"] + fold["folds"]]
        routine = {"fold_bn": "BatchNorm layers folded into their conv/linear",
                   "remove_identity": "identity / dropout modules removed"}
        counts: dict[str, int] = {}
        for e, text in zip(fold["collapse_edits"] + fold["folds"], described):
            if e.get("kind") in routine:
                counts[e["kind"]] = counts.get(e["kind"], 0) + 1
            else:
                lines.append(f"               {text}")
        for kind, n in counts.items():
            lines.append(f"               {n} {routine[kind]}")
        if any((e.get("args") or {}).get("resolution_dependent") for e in fold["collapse_edits"] + fold["folds"]):
            lines.append("             note: constant(s) that vary over positions (zero padding) were folded as buffers: "
                         "the folded network only accepts inputs of the run's image size")
        for r in fold["refused"]:
            into = f" into {r['into']}" if r.get("into") else ""
            lines.append(f"             refused: {r.get('kind', 'edit')} {r.get('target')}{into}: {r.get('reason')}")
    elif report["config"].get("no_fold"):
        kept = {}
        for e in report.get("edits") or []:
            kept[e.get("kind")] = kept.get(e.get("kind"), 0) + 1
        if kept:  # the method's own structural edits (EASIER's identities, LaCoOT's removed blocks) stay
            lines.append("folding      off (--no-fold): no exact folds; the method's own edits are kept ("
                         + ", ".join(f"{n} {k}" for k, n in kept.items()) + ")")
        else:
            lines.append("folding      off (--no-fold): the network keeps its dense shape")
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
    paths += write_depth_plots(report, out)
    return paths


def write_depth_plots(report: dict, out: Path) -> list[Path]:
    """depth_per_iteration.png (EASIER, NEPENTHE) and accuracy_vs_macs.png (LaCoOT's removals)."""
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    rounds = [r for r in report["rounds"] if "activations_total" in r]
    if rounds:
        it = [r["round"] for r in rounds]
        fig, axes = plt.subplots(2, 2, figsize=(9, 6))
        ax = axes[0][0]
        for key, label in (("val_acc", "validation"), ("test_acc", "test")):
            ys = [r.get(key) for r in rounds]
            if any(y is not None for y in ys):
                ax.plot(it, [float("nan") if y is None else y for y in ys], marker="o", label=label)
        sel = report.get("selected_round")
        if sel in it:
            ax.axvline(sel, color="grey", ls="--", lw=1, label="result")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
        panels = [(axes[0][1], "activations_removed", "activations removed"),
                  (axes[1][0], "folded_macs", "MACs per sample (folded)"),
                  (axes[1][1], "folded_latency_ms_batch32", "ms per batch of 32 (folded)")]
        for ax, key, label in panels:
            ax.plot(it, [r.get(key, float("nan")) for r in rounds], marker="o")
            ax.set_ylabel(label)
        axes[0][1].axhline(rounds[0].get("activations_total", 0), color="grey", ls=":", lw=1)
        from matplotlib.ticker import MaxNLocator

        for ax in axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{report['config']['model']} / {report['method']}: per iteration")
        _save(fig, out / "depth_per_iteration.png", paths)
    mr = report.get("method_result")
    if isinstance(mr, dict) and mr.get("table"):
        rows = mr["table"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        for key, label in (("val_acc", "validation"), ("test_acc", "test")):
            if all(r.get(key) is not None for r in rows):
                ax.plot([r["macs"] for r in rows], [r[key] for r in rows], marker="o", label=label)
        for r in rows:
            ax.annotate(str(r["blocks_removed"]), (r["macs"], r.get("test_acc") or r.get("val_acc") or 0),
                        fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("MACs per sample")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("accuracy vs MACs (label: blocks removed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        _save(fig, out / "accuracy_vs_macs.png", paths)
    return paths
