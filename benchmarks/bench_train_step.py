"""One ResNet-18 (CIFAR) training step: plain, with pyengine masks (90% sparse), with
torch.nn.utils.prune at 90%, with pyengine entropy collection on every activation, and with
plain-PyTorch entropy hooks - time and memory side by side in one run.

Memory: on CUDA the peak allocated bytes of one step; on CPU the bytes the method keeps alive
beyond the plain model (parameters, buffers and masks: prune's weight_orig + float masks vs
pyengine's bool masks), since CPU allocations are not tracked per tensor.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

from _harness import machine_name, parse_args
from pyengine.methods.prune.magnitude import prune_magnitude
from pyengine.models import activation_map, build_model
from pyengine.nn.entropy import EntropyCollector
from pyengine.nn.masks import MaskSet


def _model(device):
    torch.manual_seed(0)
    return build_model("resnet18", num_classes=10).to(device)


def _state_bytes(model, extra=()):
    ts = list(model.parameters()) + list(model.buffers()) + list(extra)
    return sum(t.numel() * t.element_size() for t in ts)


def _time_steps(model, opt, x, y, device, steps, after_step=None):
    loss_fn = nn.CrossEntropyLoss()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if after_step:
            after_step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return statistics.median(times), peak


def run(device, batch, steps):
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    rows = []

    def sgd(m):
        return torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    m = _model(device)
    base_bytes = _state_bytes(m)
    t, peak = _time_steps(m, sgd(m), x, y, device, steps)
    rows.append(("plain step", t, peak, 0))

    m = _model(device)
    masks = MaskSet(m).to(device)
    prune_magnitude(masks, 0.9)
    opt = sgd(m)
    masks.apply(opt)
    t, peak = _time_steps(m, opt, x, y, device, steps, after_step=lambda: masks.apply(opt))
    rows.append(("pyengine masks 90%", t, peak, _state_bytes(m, masks.masks.values()) - base_bytes))

    m = _model(device)
    params = [(mod, "weight") for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=0.9)
    t, peak = _time_steps(m, sgd(m), x, y, device, steps)
    extra = [getattr(mod, "weight") for mod, _ in params]  # the recomputed weight tensors
    rows.append(("torch.nn.utils.prune 90%", t, peak, _state_bytes(m, extra) - base_bytes))

    m = _model(device)
    col = EntropyCollector(m)
    with col:
        t, peak = _time_steps(m, sgd(m), x, y, device, steps)
    rows.append(("pyengine entropy hooks", t, peak, sum(c.numel() * 8 for c in col.counts.values())))

    m = _model(device)
    counts = {}

    def py_hook(name):
        def hook(mod, args):
            z = args[0].detach()
            c = (z > 0).transpose(0, 1).reshape(z.shape[1], -1).sum(1)
            counts[name] = counts.get(name, 0) + c
        return hook

    hs = [s.module.register_forward_pre_hook(py_hook(s.name)) for s in activation_map(m)]
    t, peak = _time_steps(m, sgd(m), x, y, device, steps)
    for h in hs:
        h.remove()
    rows.append(("python entropy hooks", t, peak, sum(c.numel() * 8 for c in counts.values())))

    # The added work alone, timed in isolation (step-to-step noise on a shared CPU is larger
    # than these costs): one fused mask upkeep call, and the counts of one forward's activations.
    def iso(fn, n=20):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1e3

    m = _model(device)
    masks = MaskSet(m).to(device)
    prune_magnitude(masks, 0.9)
    opt = sgd(m)
    _time_steps(m, opt, x, y, device, 1)
    rows.append(("  mask upkeep alone", iso(lambda: masks.apply(opt)), None, 0))
    acts = []
    hs = [s.module.register_forward_pre_hook(lambda mod, a: acts.append(a[0].detach())) for s in activation_map(m)]
    with torch.no_grad():
        m(x)
    for h in hs:
        h.remove()
    from pyengine.ops import entropy_counts

    rows.append(("  entropy counts alone", iso(lambda: [entropy_counts(a, check_nan=False) for a in acts]), None, 0))
    return rows


if __name__ == "__main__":
    args = parse_args(__doc__)
    dev = torch.device(args.device)
    batch = 128 if dev.type == "cuda" else 32
    if args.quick:
        batch = 4
    steps = args.repeats if not args.quick else 2
    rows = run(dev, batch, steps)
    base = rows[0][1]
    print(f"\nResNet-18 CIFAR training step, batch {batch}, {machine_name(dev)}")
    print(f"{'variant':<26} {'ms/step':>9} {'x plain':>8} {'peak MB':>9} {'extra state MB':>15}")
    for name, t, peak, extra in rows:
        pk = f"{peak / 2**20:.1f}" if peak is not None else "-"
        print(f"{name:<26} {t:>9.2f} {t / base:>8.3f} {pk:>9} {extra / 2**20:>15.2f}")
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"machine": machine_name(dev), "batch": batch, "rows": [
                {"variant": n, "ms": t, "ratio": t / base, "peak_bytes": p, "extra_state_bytes": e} for n, t, p, e in rows]}, f, indent=2)
