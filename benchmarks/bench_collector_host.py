"""Host cost of entropy collection per activation: what EntropyCollector adds to a training step
when the step is bound by host time and kernel launches (small tensors, as in a ResNet-18 CIFAR
step on a fast GPU behind a slow host).

A chain of 17 activations (16 ReLUs and one GELU, the pattern of a ResNet-18 plus a head) on tiny
tensors, forward + backward, timed per step with the variants interleaved round by round:
plain (no collector), batched (the default during training: activations taken as the forward runs,
all counted in one entropy_counts_add_many_ call when it returns), batched inclusive (z >= 0: z is
taken and the ReLU runs out of place), fused (counting as each activation runs, ReLUs swapped for
the fused relu_count op) and hooks (counting as each runs, pre-hooks only).
Reported: the extra microseconds per activation over the plain step (median over rounds), and the
counts of every variant checked against plain PyTorch counting first.

    python benchmarks/bench_collector_host.py [--device cuda] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn as nn

from _harness import machine_name
from pyengine.nn.entropy import EntropyCollector
from pyengine.ops import entropy_counts_reference

N_ACT = 17
VARIANTS = {"batched": {}, "batched inclusive": dict(inclusive=True), "fused": dict(batched=False),
            "hooks": dict(batched=False, fused=False)}


def _chain(device):
    torch.manual_seed(0)
    layers = []
    for i in range(N_ACT):
        layers += [nn.Conv2d(4, 4, 1), nn.GELU() if i == N_ACT - 1 else nn.ReLU()]
    return nn.Sequential(*layers).to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device, rounds=9, steps=200):
    x = torch.randn(2, 4, 3, 3, device=device)
    models = {"plain": _chain(device)}
    collectors = {}
    for name, kw in VARIANTS.items():
        models[name] = _chain(device)
        collectors[name] = EntropyCollector(models[name], **kw).__enter__()

    def step(m):
        m.zero_grad(set_to_none=True)
        m(x).sum().backward()

    # counts first: one step of each variant against plain PyTorch counting of the same inputs
    seen = {}
    ref_model = models["plain"]
    hs = [mod.register_forward_pre_hook(lambda mod, a, n=n: seen.__setitem__(n, a[0].detach().clone()))
          for n, mod in ref_model.named_modules() if isinstance(mod, (nn.ReLU, nn.GELU))]
    step(ref_model)
    for h in hs:
        h.remove()
    ref = {n: entropy_counts_reference(z, 1) for n, z in seen.items()}
    ref_incl = {n: entropy_counts_reference(z, 1, False, True) for n, z in seen.items()}
    for name, col in collectors.items():
        step(models[name])
        col.flush()
        want = ref_incl if col.inclusive else ref
        assert set(col.counts) == set(want) and all(torch.equal(col.counts[k], want[k]) for k in want), name
        col.reset()

    times = {k: [] for k in models}
    for m in models.values():  # warm-up
        for _ in range(20):
            step(m)
    for _ in range(rounds):
        for k, m in models.items():
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                step(m)
            _sync(device)
            times[k].append((time.perf_counter() - t0) / steps * 1e6)
    for col in collectors.values():
        col.__exit__(None, None, None)
    plain = times["plain"]
    rows = [{"variant": "plain", "step_us": statistics.median(plain), "extra_us_per_activation": 0.0}]
    for k in VARIANTS:
        extra = statistics.median((t - p) / N_ACT for t, p in zip(times[k], plain))
        rows.append({"variant": k, "step_us": statistics.median(times[k]), "extra_us_per_activation": extra})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # host cost, not kernel parallelism
    rows = run(device, args.rounds, args.steps)
    machine = machine_name(device)
    print(f"## entropy collection host cost, {N_ACT} activations, tiny tensors - {machine}")
    print("| variant | step (us) | extra per activation (us) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['step_us']:.1f} | {r['extra_us_per_activation']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "torch": torch.__version__, "activations": N_ACT, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
