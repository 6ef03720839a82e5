"""Entropy of activation states, collected with hooks on every activation's input.

The hook counts, per neuron, the samples whose pre-activation is ON with the native fused
op (exact int64 counts accumulated over the whole loader, all-reduced under DDP), then turns
the counts into per-layer entropy (methods.md section 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from pyengine.models import activation_map
from pyengine.ops import entropy_counts, entropy_from_counts, samples_per_neuron


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


def _channel_dim(x: torch.Tensor) -> int:
    return -1 if x.dim() == 3 else 1  # (B, T, C) tokens; (N, C, ...) otherwise


class EntropyCollector:
    """Forward pre-hooks on activations; use as a context manager around forward passes.

    inclusive: count ``z >= 0`` as ON (EASIER) instead of ``z > 0`` (EGP).
    per_position: neuron = channel x position (DSD2) instead of channel.
    """

    def __init__(self, model: nn.Module, names: list[str] | None = None, *, inclusive: bool = False,
                 per_position: bool = False):
        self.model = model
        sites = activation_map(model)
        if names is not None:
            wanted = set(names)
            sites = [s for s in sites if s.name in wanted]
        self.sites = sites
        self.inclusive = inclusive
        self.per_position = per_position
        self.counts: dict[str, torch.Tensor] = {}
        self.samples: dict[str, int] = {}
        self._handles = []

    def _hook(self, name):
        def hook(module, args):
            z = args[0]
            cdim = _channel_dim(z)
            c = entropy_counts(z, cdim, self.per_position, self.inclusive, check_nan=False)
            if name in self.counts:
                self.counts[name] += c
            else:
                self.counts[name] = c.clone()
            self.samples[name] = self.samples.get(name, 0) + samples_per_neuron(z.shape, cdim % z.dim(), self.per_position)

        return hook

    def __enter__(self):
        for s in self.sites:
            self._handles.append(s.module.register_forward_pre_hook(self._hook(s.name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.counts.clear()
        self.samples.clear()

    def all_reduce(self) -> None:
        """Sum counts and sample numbers over torch.distributed ranks."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for name in sorted(self.counts):
            dist.all_reduce(self.counts[name])
            n = torch.tensor([self.samples[name]], dtype=torch.int64, device=self.counts[name].device)
            dist.all_reduce(n)
            self.samples[name] = int(n)

    def results(self, eps: float = 0.0) -> dict[str, LayerEntropy]:
        out = {}
        for s in self.sites:
            if s.name not in self.counts:
                continue
            counts = self.counts[s.name]
            st = entropy_from_counts(counts, self.samples[s.name], eps)
            out[s.name] = LayerEntropy(
                s.name, s.producer, st.mean, st.mean_nonconstant, counts.numel(), st.n_always_on,
                st.n_always_off, self.samples[s.name],
            )
        return out


@torch.no_grad()
def measure_entropy(model: nn.Module, loader, device, *, inclusive: bool = False, per_position: bool = False,
                    train_mode: bool = False, names: list[str] | None = None, max_batches: int | None = None,
                    progress=None) -> dict[str, LayerEntropy]:
    """Per-activation entropy over a loader (eval mode by default, as EGP does)."""
    was_training = model.training
    model.train(train_mode)
    col = EntropyCollector(model, names, inclusive=inclusive, per_position=per_position)
    with col:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x = batch[0].to(device, non_blocking=True)
            model(x)
            if progress is not None:
                progress.update(1)
    col.all_reduce()
    model.train(was_training)
    return col.results()
