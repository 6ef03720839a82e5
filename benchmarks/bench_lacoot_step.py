"""The cost of LaCoOT's regulariser inside a ResNet-18 (CIFAR) training step, side by side in one run:

- plain: cross-entropy, backward, SGD step;
- pyengine: + lambda * mean over the 4 monitored block pairs (layerN.0 -> layerN.1) of the
  max-sliced Wasserstein distance with K = 50 directions drawn afresh each step, exactly as
  ``--method lacoot`` trains (its StepCallback: hooks, seeded generator, and the four pairs in one
  native call with one autograd node, ``sliced_wasserstein_grouped``);
- pyengine ATen (CUDA only): the grouped op with its projections and backward as ATen calls
  (``PYENGINE_GROUPED_ATEN=1``: per-pair GEMMs, split-K sums, norms) instead of its CUDA kernels;
- pyengine per pair: the same with one native call per pair (``packed=False``);
- POT: the same term computed with ``ot.sliced.max_sliced_wasserstein_distance`` (torch backend,
  ``seed=None``), as the authors' training script does.

The variants are interleaved (plain, pyengine, pyengine per pair, POT, plain, ...) so that the load of a shared
machine affects them alike; the table gives the median step time, its ratio to the plain step, the
median of the per-block ratios to the plain block timed just before ("paired"), and the
regulariser timed alone on one forward's block outputs (the most stable estimate on a noisy VM).
The authors' CIFAR ResNet-18 keeps the 3x3/2 max-pool after the stem (``--no-maxpool``: without),
so the pairs have d = 64*16*16, 128*8*8, 256*4*4 and 512*2*2.

    python benchmarks/bench_lacoot_step.py --threads 1 --json benchmarks/results/cpu_lacoot_step.json
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import time

import torch
import torch.nn.functional as F

from _harness import env_set, machine_name
from pyengine.methods.depth.lacoot import BlockCapture


def _model(device, maxpool):
    from pyengine.models import build_model

    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10, maxpool=maxpool).to(device)


def _grouped_aten(on):
    """PYENGINE_GROUPED_ATEN=1 while on: the grouped op takes its ATen path on CUDA."""
    return env_set("PYENGINE_GROUPED_ATEN", "1") if on else contextlib.nullcontext()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Variant:
    def __init__(self, name, device, maxpool, lam, k):
        self.name, self.device = name, device
        self.model = _model(device, maxpool)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        self.cb = None
        self.cap = None
        if name.startswith("pyengine"):
            from pyengine import Compressor

            comp = Compressor(self.model, "lacoot", example_input=torch.zeros(1, 3, 32, 32, device=device),
                              options={"lambda_reg": lam, "directions": k}, log=lambda *a: None)
            self.cb = comp.step_callbacks()[0]
            if name == "pyengine per pair":
                self.cb.packed = False
            self.cb.on_train_start(self.model)
            self.cb.on_epoch_start(0, 1)
            self.pairs = comp.method.pairs
        elif name == "POT":
            from pyengine.methods.depth.lacoot import find_block_pairs

            _, self.pairs = find_block_pairs(self.model)
            self.cap = BlockCapture(self.model, self.pairs).__enter__()
        self.lam, self.k = lam, k
        self.model.train()
        self.steps = 0

    def step(self, x, y):
        with _grouped_aten(self.name == "pyengine ATen"):
            self._step(x, y)

    def _step(self, x, y):
        import ot

        if self.cb is not None:
            self.cb.on_batch_start(self.steps, x, y)
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = F.cross_entropy(out, y)
        if self.cb is not None:
            loss = loss + self.cb.extra_loss(out, y, x)
        elif self.cap is not None:
            d = [ot.sliced.max_sliced_wasserstein_distance(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1),
                                                           n_projections=self.k, seed=None)
                 for a, b in self.cap.take()]
            loss = loss + self.lam * torch.stack(d).mean()
        loss.backward()
        self.opt.step()
        self.steps += 1


def run(device, batch, steps, repeats, maxpool, lam=5.0, k=50):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    names = ["plain", "pyengine"] + (["pyengine ATen"] if device.type == "cuda" else []) + ["pyengine per pair"]
    if importlib.util.find_spec("ot") is not None:
        names.append("POT")
    else:
        print("POT is not installed (pip install pot): its column is skipped")
    variants = [_Variant(n, device, maxpool, lam, k) for n in names]
    for v in variants:  # warm-up (allocator, lazy init, first-call costs)
        for _ in range(2):
            v.step(x, y)
    times = {n: [] for n in names}
    for _ in range(repeats):
        for v in variants:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                v.step(x, y)
            _sync(device)
            times[v.name].append((time.perf_counter() - t0) / steps * 1e3)
    med = {n: statistics.median(t) for n, t in times.items()}
    alone = _term_alone(variants[1], x, device, k, names, repeats)
    # each block against the plain block timed just before it: drift of a shared machine cancels
    paired = {n: statistics.median(t / p for t, p in zip(times[n], times["plain"])) for n in names}
    rows = [{"variant": n, "ms_per_step": med[n], "ratio_to_plain": med[n] / med["plain"],
             "paired_ratio_median": paired[n],
             "term_alone_ms": alone.get(n),
             "ratio_from_term_alone": 1 + alone[n] / med["plain"] if n in alone else None,
             "all_ms": times[n]} for n in names]
    d = [p.block for p in variants[1].pairs]
    return rows, d


def _block_tensors(v, x):
    """The monitored pairs' tensors of one forward of x, as leaves that take a gradient."""
    cap = BlockCapture(v.model, v.pairs).__enter__()
    v.model(x)
    pairs = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()) for a, b in cap.take()]
    cap.__exit__(None, None, None)
    return pairs, [t for p in pairs for t in p]


def _term_alone(v, x, device, k, names, repeats):
    """The regulariser alone (forward + backward into both point sets) on one forward's block tensors:
    step-to-step noise of a shared CPU is larger than this cost, so it is also timed by itself."""
    import pyengine.methods.depth.lacoot as lc

    pairs, leaves = _block_tensors(v, x)
    gen = torch.Generator(device=device)

    def ours(i, packed=None):
        gen.manual_seed(lc._mixed_seed(0, 0, 0, i))
        m, _ = lc.lacoot_regulariser(pairs, n_directions=k, generator=gen, packed=packed, check_nan=False)
        torch.autograd.grad(m, leaves)

    def aten(i):
        with _grouped_aten(True):
            ours(i)

    def pot(i):
        import ot

        d = [ot.sliced.max_sliced_wasserstein_distance(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1),
                                                       n_projections=k, seed=None) for a, b in pairs]
        torch.autograd.grad(torch.stack(d).mean(), leaves)

    out = {"plain": 0.0}
    for name, fn in (("pyengine", ours), ("pyengine ATen", aten), ("pyengine per pair", lambda i: ours(i, packed=False)),
                     ("POT", pot)):
        if name not in names:
            continue
        fn(0)
        ts = []
        for r in range(max(5, repeats)):
            _sync(device)
            t0 = time.perf_counter()
            for i in range(5):
                fn(i)
            _sync(device)
            ts.append((time.perf_counter() - t0) / 5 * 1e3)
        out[name] = statistics.median(ts)
    return out


def profile_term(device, batch, maxpool, k=50, steps=10):
    """Where the regulariser's time goes: torch.profiler over `steps` calls of the term as training calls it
    (forward and backward) on one forward's block tensors, sorted by host (self CPU) time - on a
    launch-bound GPU step the host side is the cost."""
    from torch.profiler import ProfilerActivity, profile

    import pyengine.methods.depth.lacoot as lc

    v = _Variant("pyengine", device, maxpool, 5.0, k)
    g = torch.Generator().manual_seed(1)
    pairs, leaves = _block_tensors(v, torch.randn(batch, 3, 32, 32, generator=g).to(device))
    gen = torch.Generator(device=device)

    def term(i):
        gen.manual_seed(i)
        m, _ = lc.lacoot_regulariser(pairs, n_directions=k, generator=gen, check_nan=False)
        torch.autograd.grad(m, leaves)

    for i in range(3):
        term(i)
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            term(i)
        _sync(device)
    print(f"\nprofile of the regulariser as training calls it (the pairs grouped), {steps} calls (forward + backward), "
          "by self host time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 on CPU, 128 on CUDA")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed block")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved blocks per variant")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads on CPU (default: torch's)")
    ap.add_argument("--no-maxpool", action="store_true", help="ResNet-18 without the stem max-pool")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="also profile the regulariser alone (host and device time per op, torch.profiler)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (128 if dev.type == "cuda" else 32)
    rows, pairs = run(dev, batch, args.steps, args.repeats, not args.no_maxpool)
    if args.profile:
        profile_term(dev, batch, not args.no_maxpool)
    machine = machine_name(dev)
    print(f"\nLaCoOT regulariser in a ResNet-18 CIFAR training step (batch {batch}, K=50, pairs {', '.join(pairs)}, "
          f"max-pool {'off' if args.no_maxpool else 'on'}) on {machine}")
    print(f"{'variant':<18} {'ms/step':>10} {'x plain':>8} {'paired':>7} {'term alone ms':>14} "
          f"{'x plain (plain + term)':>23}   per-block medians (ms/step)")
    for r in rows:
        alone = "-" if r["term_alone_ms"] is None else f"{r['term_alone_ms']:.1f}"
        est = "-" if r["ratio_from_term_alone"] is None else f"{r['ratio_from_term_alone']:.3f}"
        print(f"{r['variant']:<18} {r['ms_per_step']:>10.1f} {r['ratio_to_plain']:>8.3f} {r['paired_ratio_median']:>7.3f} "
              f"{alone:>14} {est:>23}   "
              + " ".join(f"{t:.0f}" for t in r["all_ms"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "device": str(dev), "torch": torch.__version__, "batch": batch,
                       "directions": 50, "pairs": pairs, "maxpool": not args.no_maxpool, "steps": args.steps,
                       "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
