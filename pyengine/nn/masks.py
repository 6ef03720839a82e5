"""Exact pruning masks for a whole model.

A :class:`MaskSet` owns one bool mask per prunable weight (Conv/Linear weights; biases and
normalisation layers are never pruned). After every optimiser step ``maskset.apply(optimizer)``
zeroes, in one native call, the pruned entries of every weight, its gradient and its optimiser
buffers (SGD momentum, Adam moments), so pruned weights stay exactly 0 through training.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch
import torch.nn as nn

from pyengine.ops import apply_masks_



def prunable_parameters(model: nn.Module, layers: str = "conv+linear") -> list[tuple[str, nn.Parameter]]:
    """The weights pruning acts on, in registration order.

    layers: "conv+linear" (CNNs: stem and classifier included), "linear" (ViT/Swin) or "conv".
    """
    if layers not in ("conv+linear", "linear", "conv"):
        raise ValueError(f"layers must be 'conv+linear', 'linear' or 'conv', got {layers!r}")
    kinds: tuple[type, ...] = ()
    if "conv" in layers:
        kinds += (nn.modules.conv._ConvNd,)
    if "linear" in layers:
        kinds += (nn.Linear,)
    out, seen = [], set()
    for mname, m in model.named_modules():
        w = getattr(m, "weight", None)
        # a weight that several layers share (tied) is one parameter: listed once, under its first
        # name, as named_parameters() lists it
        if isinstance(m, kinds) and w is not None and id(w) not in seen:
            seen.add(id(w))
            out.append((f"{mname}.weight" if mname else "weight", w))
    return out


def _optimizer_buffers(optimizer: torch.optim.Optimizer | None, p: torch.Tensor) -> list[torch.Tensor]:
    """The optimiser's per-entry state of ``p``: every floating tensor of p's shape (SGD momentum,
    Adam's moments, Adamax's exp_inf, ASGD's averaged weights, Rprop's prev and step sizes, ...)."""
    state = optimizer.state.get(p) if optimizer is not None else None
    if not state:
        return []
    return [b for b in state.values()
            if isinstance(b, torch.Tensor) and b.shape == p.shape and (b.is_floating_point() or b.is_complex())]


def _dense_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation that makes a dense, non-overlapping ``t`` contiguous (channels-last weights,
    their gradients and buffers), the identity for a contiguous one, None for any other layout."""
    if t.is_contiguous():
        return tuple(range(t.dim()))
    order = tuple(sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d))))
    return order if t.permute(order).is_contiguous() else None


class MaskSet:
    """One bool mask per prunable weight of ``model``; all True (dense) at the start."""

    def __init__(self, model: nn.Module, layers: str | Iterable[str] = "conv+linear", allow_empty: bool = False):
        """layers: "conv+linear", "linear" or "conv" (every such weight), or an explicit list of
        weight names (``"layer1.0.conv1.weight"``, ...)."""
        self.model = model
        if isinstance(layers, str):
            self.layers: str | list[str] = layers
            self.params: dict[str, nn.Parameter] = dict(prunable_parameters(model, layers))
        else:
            self.layers = list(layers)
            named = dict(model.named_parameters())
            missing = [n for n in self.layers if n not in named]
            if missing:
                raise KeyError(f"{type(model).__name__} has no parameter(s) {missing}")
            self.params = {n: named[n] for n in self.layers}
        if not self.params and not allow_empty:
            raise ValueError(f"{type(model).__name__} has no prunable {layers} weights")
        # contiguous whatever the weight's memory format (a channels-last conv included)
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones(p.shape, dtype=torch.bool, device=p.device) for n, p in self.params.items()
        }

    # ------------------------------------------------------------------ upkeep

    @property
    def names(self) -> list[str]:
        return list(self.params)

    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero pruned weights, their gradients and optimiser buffers, in one call. Tensors in
        another memory format (channels-last) are masked through their contiguous permutation."""
        masks: list[torch.Tensor] = [self.masks[n] for n in self.params]
        tensors, index = [], []
        variants: dict[tuple[int, tuple[int, ...]], int] = {}  # (mask, permutation) -> position
        strided: list[tuple[torch.Tensor, int]] = []  # neither contiguous nor a permutation of it

        def add(t: torch.Tensor, j: int) -> None:
            order = _dense_order(t)
            if order is None:
                strided.append((t, j))
            elif order == tuple(range(t.dim())):
                tensors.append(t)
                index.append(j)
            else:  # a view, so the zeros land in t (and its version counter moves)
                k = variants.get((j, order))
                if k is None:
                    k = variants[(j, order)] = len(masks)
                    masks.append(masks[j].permute(order).contiguous())
                tensors.append(t.permute(order))
                index.append(k)

        # each parameter once (a tied weight is one entry of prunable_parameters / named_parameters)
        for j, p in enumerate(self.params.values()):
            # p.detach(), not p.data: it shares p's version counter, so the in-place zeroing moves
            # p's version on (autograd's saved-tensor check and the CUDA masked-weight cache see it)
            add(p.detach(), j)
            if p.grad is not None:
                add(p.grad, j)
            for buf in _optimizer_buffers(optimizer, p):
                add(buf, j)
        with torch.no_grad():
            apply_masks_(tensors, masks, index)
            for t, j in strided:
                t.masked_fill_(~masks[j], 0)

    def to(self, device) -> "MaskSet":
        self.masks = {n: m.to(device) for n, m in self.masks.items()}
        return self

    # ------------------------------------------------------------------ statistics

    def layer_stats(self) -> list[dict]:
        """Per weight: name, numel, nonzeros (kept), sparsity."""
        rows = []
        for n, m in self.masks.items():
            total = m.numel()
            kept = int(m.sum())
            rows.append({"name": n, "numel": total, "kept": kept, "sparsity": 1 - kept / total if total else 0.0})
        return rows

    def kept(self) -> int:
        return sum(int(m.sum()) for m in self.masks.values())

    def total(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def sparsity(self) -> float:
        total = self.total()
        return 1.0 - self.kept() / total if total else 0.0

    def empty_layers(self) -> list[str]:
        return [n for n, m in self.masks.items() if not bool(m.any())]

    # ------------------------------------------------------------------ edits

    def prune(self, name: str, count: int) -> int:
        """Remove the ``count`` smallest-magnitude remaining weights of one layer (exactly
        ``count``, ties broken by position). Returns how many were removed."""
        m = self.masks[name]
        w = self.params[name].detach()
        remaining = int(m.sum())
        count = max(0, min(int(count), remaining))
        if count == 0:
            return 0
        flat_idx = m.flatten().nonzero().squeeze(1)
        scores = w.flatten()[flat_idx].abs().float()
        order = torch.argsort(scores, stable=True)[:count]
        m.view(-1)[flat_idx[order]] = False
        return count

    def prune_global(self, count: int, names: Iterable[str] | None = None) -> dict[str, int]:
        """Remove the ``count`` smallest-magnitude remaining weights across ``names`` (default:
        all layers) by one global ranking. Returns removals per layer."""
        names = list(names) if names is not None else self.names
        scores, owners = [], []
        for i, n in enumerate(names):
            m = self.masks[n].flatten()
            scores.append(self.params[n].detach().flatten()[m].abs().float().cpu())
            owners.append(torch.full((scores[-1].numel(),), i, dtype=torch.int32))
        all_scores = torch.cat(scores)
        count = max(0, min(int(count), all_scores.numel()))
        if count == 0:
            return {n: 0 for n in names}
        order = torch.argsort(all_scores, stable=True)[:count]
        per_layer = torch.bincount(torch.cat(owners)[order].long(), minlength=len(names))
        # Within a layer the global order and the layer's own order agree, so removing the
        # per-layer count of smallest weights removes exactly the globally selected ones
        # (up to ties of equal magnitude).
        return {n: self.prune(n, int(per_layer[i])) for i, n in enumerate(names)}

    # ------------------------------------------------------------------ persistence

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().cpu().clone() for n, m in self.masks.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.masks) - set(state)
        extra = set(state) - set(self.masks)
        if missing or extra:
            raise KeyError(f"mask names differ: missing {sorted(missing)}, unexpected {sorted(extra)}")
        for n, m in state.items():
            if tuple(m.shape) != tuple(self.masks[n].shape):
                raise ValueError(f"mask {n} has shape {tuple(m.shape)}, expected {tuple(self.masks[n].shape)}")
            self.masks[n] = m.to(device=self.masks[n].device, dtype=torch.bool).clone()

    def fingerprint(self) -> str:
        """A digest of every mask: equal on every rank when the masks are identical."""
        h = hashlib.sha256()
        for n, m in self.masks.items():
            h.update(n.encode())
            h.update(m.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    def check_ranks_agree(self) -> None:
        """Under torch.distributed, raise if any rank's masks differ from rank 0's."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = self.fingerprint()
        gathered: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        bad = [r for r, f in enumerate(gathered) if f != gathered[0]]
        if bad:
            raise RuntimeError(f"pruning masks differ between rank 0 and ranks {bad}")

    def broadcast_(self, src: int = 0) -> None:
        """Under torch.distributed, copy rank ``src``'s masks to every rank."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for m in self.masks.values():
            buf = m.to(torch.uint8)
            dist.broadcast(buf, src)
            m.copy_(buf.bool())
