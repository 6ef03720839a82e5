"""Entropy of activation states, collected on every activation's input while the model runs.

A forward pre-hook (or, for nn.ReLU, the fused ReLU-and-count op swapped in for the module's
forward) counts, per neuron, the samples whose pre-activation is ON with a native op
(exact int64 counts kept on the device and accumulated over the whole loader, all-reduced under
DDP), then turns the counts into per-layer entropy (methods.md section 0).

A neuron is a channel for a convolution's output and a hidden unit for a linear layer's output:
the neuron dimension is taken from the activation's producer layer, so torchvision Swin's MLP
GELU on (B, H, W, C) is counted along C, not along H. With ``per_position`` a neuron is a channel
x position (DSD2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from pyengine.graph import activation_map
from pyengine.ops import (
    entropy_counts_add_,
    entropy_counts_add_many_,
    entropy_from_counts,
    relu_count,
    samples_per_neuron,
)
from pyengine.ops.entropy import _counts_shape


@dataclass
class LayerEntropy:
    name: str  # activation module path
    producer: str | None  # the layer feeding it
    mean: float  # mean binary entropy over all neurons (EASIER / NEPENTHE)
    mean_nonconstant: float  # mean over neurons that are not always ON/OFF (EGP)
    n_neurons: int
    n_always_on: int
    n_always_off: int
    n_samples: int

    def value(self, estimator: str) -> float:
        return self.mean_nonconstant if estimator == "egp" else self.mean

    def weight(self, estimator: str) -> int:
        """The number of neurons :meth:`value` averages over: the non-constant ones (egp) or all
        of them (easier). The weight of this activation in its producer's entropy
        (:func:`entropy_by_producer`)."""
        if estimator == "egp":
            return self.n_neurons - self.n_always_on - self.n_always_off
        return self.n_neurons


def entropy_by_producer(entropies, estimator: str) -> dict[str, float]:
    """The entropy of every producer layer, keyed by its module path, from the entropy of the
    activations it feeds (``LayerEntropy`` records; those without a producer are skipped).

    A layer feeding one activation gets that activation's entropy. A layer feeding several
    (``h = conv(x); a = relu(h); b = gelu(h)``, a Linear whose output two activations read)
    gets their mean weighted by the neurons each one's estimator averages over
    (:meth:`LayerEntropy.weight`): the mean binary entropy over the union of those neurons, which
    is what the estimator would give if the activations were one. So the layer's entropy is 0
    (collapsible) only when every activation it feeds has entropy 0, and it does not depend on
    the order of the records. With the egp estimator a layer none of whose activations has a
    non-constant neuron gets 0; under per-batch averaging the weights are the pooled counts'."""
    fed: dict[str, list[LayerEntropy]] = {}
    for e in entropies:
        if e.producer is not None:
            fed.setdefault(e.producer, []).append(e)
    out = {}
    for producer, acts in fed.items():
        if len(acts) == 1:  # its activation's value as it is (w * h / w may differ in the last bit)
            out[producer] = acts[0].value(estimator)
            continue
        total = sum(e.weight(estimator) for e in acts)
        # fsum: exactly rounded, so the value does not depend on the order of the records
        out[producer] = math.fsum(e.weight(estimator) * e.value(estimator) for e in acts) / total if total > 0 else 0.0
    return out


def neuron_dim_of(model: nn.Module, producer: str | None, ndim: int) -> int:
    """The neuron dimension of an activation input with ``ndim`` dimensions: dimension 1 after a
    convolution, the last one after a linear layer (tokens: (B, T, C), Swin: (B, H, W, C)).
    Without a producer: dimension 1, or the last one for a 3-D (B, T, C) tensor."""
    if producer:
        try:
            m = model.get_submodule(producer)
        except AttributeError:
            m = None
        if isinstance(m, nn.Linear):
            return ndim - 1
        if isinstance(m, nn.modules.conv._ConvNd):
            return 1
    return ndim - 1 if ndim == 3 else 1


class EntropyCollector:
    """Counts every activation's ON states while the model runs; a context manager around forward
    passes.

    inclusive: count ``z >= 0`` as ON (EASIER) instead of ``z > 0`` (EGP).
    per_position: neuron = channel x position (DSD2) instead of channel.
    batched: while autograd records (a training step), the activations are only taken as the
    forward runs and all of them are counted at the end of the model's forward in one native call
    (``entropy_counts_add_many_``: one CUDA launch per dtype), so a step with 17 activations pays
    one launch instead of 17 - what matters when the step is bound by launch and host time. The
    counts are the same. Exclusive counts (z > 0) are taken from the ReLU's output (relu(z) > 0
    exactly where z > 0), which autograd keeps for the backward anyway; inclusive counts need z
    itself, so the ReLU runs out of place and z stays alive until the count: at most
    ``max_pending_mb`` of taken activations wait before a count is forced. Other in-place
    activations (``ReLU6(inplace=True)``, ...) are counted as they run. A taken tensor changed in
    place before its count raises RuntimeError (use ``batched=False`` for such a model). Without
    autograd (measurement passes under ``no_grad``) every activation is counted as it runs.
    fused: counted as it runs, an ``nn.ReLU`` site runs the fused ``relu_count`` op (its forward is
    swapped for one op that applies the ReLU and counts in the same pass, with ReLU's own gradient;
    not in place, even for ``inplace=True``); every other activation gets a forward pre-hook that
    counts its input. Both give the same counts.
    Counts stay on the device: no host synchronisation per activation or per batch.
    per_batch: also average the layer entropies of each forward pass (the authors' per-batch
    averaging, for reproducing their numbers: methods.md section 0): :meth:`results` then gives
    those averages as ``mean`` / ``mean_nonconstant``, while the always-ON / always-OFF counts (what
    decides a collapse) stay those of the pooled counts. It costs one host read per forward.
    """

    def __init__(self, model: nn.Module, names: list[str] | None = None, *, inclusive: bool = False,
                 per_position: bool = False, sites=None, fused: bool = True, batched: bool = True,
                 max_pending_mb: float = 1024.0, per_batch: bool = False):
        self.model = model
        sites = sites if sites is not None else activation_map(model)
        if names is not None:
            wanted = set(names)
            sites = [s for s in sites if s.name in wanted]
        self.sites = sites
        self.inclusive = inclusive
        self.per_position = per_position
        self.fused = fused
        self.batched = batched
        if not max_pending_mb > 0:
            raise ValueError(f"max_pending_mb must be positive, got {max_pending_mb}")
        self._max_pending = int(max_pending_mb * 2**20)
        self.counts: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self._dims: dict[str, int] = {}
        self._handles = []
        self._swapped: list[tuple[nn.Module, object]] = []
        self._nan_counts: dict[torch.device, torch.Tensor] = {}
        # taken, not yet counted: (tensor, its counts, neuron dim, its version when taken, site)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int, int, str]] = []
        self._pending_bytes = 0
        self.per_batch = per_batch
        # per_batch: counts and samples at the end of the previous forward, and per activation the
        # sums over forwards of the batch's mean entropy (all neurons, non-constant ones) and their number
        self._prev_counts: dict[str, torch.Tensor] = {}
        self._prev_samples: dict[str, int] = {}
        self.batch_sums: dict[str, list[float]] = {}

    def _nan(self, device) -> torch.Tensor:
        t = self._nan_counts.get(device)
        if t is None:
            t = self._nan_counts[device] = torch.zeros((), dtype=torch.int64, device=device)
        return t

    def _prepare(self, site):
        """For one site: z -> (its counts tensor, neuron dim), recording the samples z adds. The
        counts and the samples per call are looked up once per input shape (this runs on every
        activation of every training step)."""
        name = site.name
        cache = [None, None, None, 0]  # input shape, counts, neuron dim, samples per call

        def prepare(z):
            shape = z.shape
            counts = self.counts.get(name)
            if counts is None or shape != cache[0] or counts is not cache[1]:
                cdim = self._dims.get(name)
                if cdim is None:
                    moved = getattr(site, "dim", None)  # the producer's dimension moved by a transpose, ...
                    cdim = self._dims[name] = moved if moved is not None and moved < z.dim() else \
                        neuron_dim_of(self.model, site.producer, z.dim())
                if counts is None:
                    counts = self.counts[name] = torch.zeros(_counts_shape(z, cdim, self.per_position),
                                                             dtype=torch.int64, device=z.device)
                cache[:] = shape, counts, cdim, samples_per_neuron(shape, cdim % z.dim(), self.per_position)
            samples = self.samples
            samples[name] = samples.get(name, 0) + cache[3]
            return counts, cache[2]

        return prepare

    def _take(self, t: torch.Tensor, counts: torch.Tensor, cdim: int, name: str) -> None:
        self._pending.append((t, counts, cdim, t._version, name))
        self._pending_bytes += t.nbytes
        if self._pending_bytes >= self._max_pending:
            self.flush()

    def flush(self) -> None:
        """Counts every activation taken since the last count: one native call (per device)."""
        pending = self._pending
        if not pending:
            return
        self._pending, self._pending_bytes = [], 0
        for t, _, _, version, name in pending:
            if t._version != version:
                raise RuntimeError(
                    f"the activation taken at '{name}' was modified in place before the entropy collector counted "
                    "it; collect with EntropyCollector(..., batched=False) for this model")
        by_device: dict[torch.device, list] = {}  # a model spread over devices: one call per device
        for p in pending:
            by_device.setdefault(p[1].device, []).append(p)
        for dev, group in by_device.items():
            entropy_counts_add_many_([p[1] for p in group], [p[0] for p in group], [p[2] for p in group],
                                     self.per_position, self.inclusive, self._nan(dev))

    def _hook(self, site):
        prepare = self._prepare(site)
        name = site.name

        def hook(module, args):
            z = args[0]
            counts, cdim = prepare(z)
            # an in-place activation (ReLU6(inplace=True), ...) is about to overwrite z: count it now
            if self.batched and torch.is_grad_enabled() and not getattr(module, "inplace", False):
                self._take(z, counts, cdim, name)
                return
            # one in-place kernel: no allocation after the first batch, no host synchronisation
            entropy_counts_add_(counts, z, cdim, self.per_position, self.inclusive, nan_count=self._nan(z.device))

        return hook

    def _relu_forward(self, site, module: nn.ReLU):
        prepare = self._prepare(site)
        name = site.name
        inplace = module.inplace

        def forward(input):  # nn.ReLU.forward's own signature  # noqa: A002
            counts, cdim = prepare(input)
            if self.batched and torch.is_grad_enabled():
                if self.inclusive:  # z >= 0 needs z itself: it must survive the ReLU
                    y = torch.relu(input)
                    self._take(input, counts, cdim, name)
                else:  # relu(z) > 0 exactly where z > 0 (and NaN stays NaN): count the output
                    y = torch.relu_(input) if inplace else torch.relu(input)
                    self._take(y, counts, cdim, name)
                return y
            if self.fused:
                return relu_count(input, counts, self._nan(input.device), cdim, self.per_position, self.inclusive)
            entropy_counts_add_(counts, input, cdim, self.per_position, self.inclusive, nan_count=self._nan(input.device))
            return torch.relu_(input) if inplace else torch.relu(input)

        return forward

    def __enter__(self):
        for s in self.sites:
            m = s.module
            if (self.fused or self.batched) and type(m) is nn.ReLU and "forward" not in vars(m):
                fwd = self._relu_forward(s, m)
                m.forward = fwd  # an instance attribute: the class's forward comes back when it is deleted
                self._swapped.append((m, fwd))
            else:
                self._handles.append(m.register_forward_pre_hook(self._hook(s)))
        if self.batched or self.per_batch:  # at the end of the model's forward: count what was taken
            self._handles.append(self.model.register_forward_hook(lambda mod, args, out: self._forward_done()))
        return self

    def _forward_done(self) -> None:
        if self.per_batch:
            self.close_batch()  # flushes first
        else:
            self.flush()

    def close_batch(self) -> None:
        """Per-batch averaging: the entropy of what was counted since the last call is one batch's."""
        self.flush()
        for name, counts in self.counts.items():
            n = self.samples.get(name, 0) - self._prev_samples.get(name, 0)
            if n <= 0:
                continue
            prev = self._prev_counts.get(name)
            delta = counts - prev if prev is not None else counts
            st = entropy_from_counts(delta, n)
            acc = self.batch_sums.setdefault(name, [0.0, 0.0, 0])
            acc[0] += st.mean
            acc[1] += st.mean_nonconstant
            acc[2] += 1
            if prev is not None:
                prev.copy_(counts)  # no allocation per forward after the first
            else:
                self._prev_counts[name] = counts.clone()
            self._prev_samples[name] = self.samples[name]

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m, fwd in self._swapped:
            if vars(m).get("forward") is fwd:
                del m.forward
        self._swapped.clear()
        self.flush()

    def reset(self) -> None:
        self.counts.clear()
        self.samples.clear()
        self._nan_counts.clear()
        self._prev_counts.clear()
        self._prev_samples.clear()
        self.batch_sums.clear()
        self._pending, self._pending_bytes = [], 0

    def all_reduce(self) -> None:
        """Sum counts and sample numbers over torch.distributed ranks."""
        import torch.distributed as dist

        self.flush()
        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in sorted(self.counts):
            dist.all_reduce(self.counts[name])
            n = torch.tensor([self.samples[name]], dtype=torch.int64, device=self.counts[name].device)
            dist.all_reduce(n)
            self.samples[name] = int(n)
            if self.per_batch:  # every rank's batches count: sum the sums and the batch numbers
                acc = torch.tensor(self.batch_sums.get(name, [0.0, 0.0, 0]), dtype=torch.float64,
                                   device=self.counts[name].device)
                dist.all_reduce(acc)
                self.batch_sums[name] = [float(acc[0]), float(acc[1]), int(acc[2])]
        self._prev_counts = {k: v.clone() for k, v in self.counts.items()}  # a later batch's delta is its own
        self._prev_samples = dict(self.samples)

    def state_dict(self) -> dict:
        """Counts and sample numbers, to carry a collection across a checkpoint."""
        self.flush()
        st = {"counts": {k: v.detach().cpu() for k, v in self.counts.items()}, "samples": dict(self.samples)}
        if self.per_batch:
            st["batch_sums"] = {k: list(v) for k, v in self.batch_sums.items()}
        return st

    def load_state_dict(self, state: dict, device=None) -> None:
        self._pending, self._pending_bytes = [], 0
        self.counts = {k: v.to(device) if device is not None else v.clone() for k, v in state["counts"].items()}
        self.samples = {k: int(v) for k, v in state["samples"].items()}
        self.batch_sums = {k: [float(v[0]), float(v[1]), int(v[2])] for k, v in state.get("batch_sums", {}).items()}
        self._prev_counts = {k: v.clone() for k, v in self.counts.items()}
        self._prev_samples = dict(self.samples)

    def results(self, eps: float = 0.0) -> dict[str, LayerEntropy]:
        """Per-activation entropy; raises ValueError when an activation input held NaN (checked
        here, once, not per batch)."""
        self.flush()
        nans = sum(int(t) for t in self._nan_counts.values())
        if nans > 0:
            raise ValueError(f"{nans} NaN value(s) reached the activations while measuring entropy; "
                             "the model or its input diverged")
        out = {}
        for s in self.sites:
            if s.name not in self.counts:
                continue
            counts = self.counts[s.name]
            if counts.is_floating_point():
                raise TypeError("entropy counts must be integers")
            st = entropy_from_counts(counts, self.samples[s.name], eps)
            mean, mean_nc = st.mean, st.mean_nonconstant
            if self.per_batch:
                acc = self.batch_sums.get(s.name)
                if acc is None or acc[2] == 0:
                    raise RuntimeError(f"per-batch entropy of {s.name}: no forward was closed; the collector must "
                                       "be entered (with ...) around the model's forwards")
                mean, mean_nc = acc[0] / acc[2], acc[1] / acc[2]
            out[s.name] = LayerEntropy(
                s.name, s.producer, mean, mean_nc, counts.numel(), st.n_always_on,
                st.n_always_off, self.samples[s.name],
            )
        return out


class FrozenNormStats:
    """Restores every normalisation layer's running statistics on exit, so a measurement in train
    mode (batch statistics) leaves the model exactly as it was."""

    def __init__(self, model: nn.Module):
        self.saved = []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
                self.saved.append((m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None}))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, bufs in self.saved:
                for k, v in bufs.items():
                    getattr(m, k).copy_(v)


@torch.no_grad()
def collect_counts(model: nn.Module, loader, device, *, inclusive: bool = False, per_position: bool = False,
                   train_mode: bool = False, names: list[str] | None = None, max_batches: int | None = None,
                   progress=None, sites=None, per_batch: bool = False) -> EntropyCollector:
    """Runs ``loader`` through ``model`` and returns the collector holding every activation's ON
    counts (all-reduced under DDP). In train mode BatchNorm uses batch statistics, but its running
    statistics are restored afterwards: measuring entropy never changes the model. ``per_batch``:
    layer entropies averaged over the batches (EntropyCollector)."""
    was_training = model.training
    model.train(train_mode)
    col = EntropyCollector(model, names, inclusive=inclusive, per_position=per_position, sites=sites,
                           per_batch=per_batch)
    try:
        seen = 0
        with FrozenNormStats(model), col:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x.to(device, non_blocking=True))
                seen += 1
                if progress is not None:
                    progress.update(1)
    finally:
        model.train(was_training)
    if not seen:  # an entropy of nothing would read as "no activation" and quietly do nothing
        raise ValueError("the loader gave no batch to measure entropy on" +
                         (f" (max_batches = {max_batches})" if max_batches is not None and max_batches < 1 else ""))
    col.all_reduce()
    return col


def measure_entropy(model: nn.Module, loader, device, **kw) -> dict[str, LayerEntropy]:
    """Per-activation entropy over a loader (eval mode by default, as EGP does); keyword
    arguments as :func:`collect_counts`."""
    return collect_counts(model, loader, device, **kw).results()
