"""Parameter and multiply-accumulate counts.

FLOPs here are multiply-accumulates (MACs) of convolution and linear layers for one sample,
measured with forward hooks on a dummy input. Biases, normalisation, activations, pooling and the
attention matmuls (QK^T, AV) are not counted. The *effective* count keeps only the MACs of nonzero
weights: a layer's MACs scaled by its weight density, which is exact for unstructured sparsity
(each output position uses every nonzero weight once).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

__all__ = ["count_params", "count_flops", "count_effective_flops"]


def count_params(model: nn.Module, nonzero: bool = False, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor once); ``nonzero=True`` counts nonzero entries."""
    total = 0
    for p in model.parameters():
        if trainable_only and not p.requires_grad:
            continue
        total += int(torch.count_nonzero(p.detach())) if nonzero else p.numel()
    return total


def _weight_count(weight: torch.Tensor, effective: bool) -> int:
    return int(torch.count_nonzero(weight.detach())) if effective else weight.numel()


def _swin_attention_class():
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention
        return ShiftedWindowAttention
    except Exception:  # noqa: BLE001 - torchvision missing or changed
        return None


def count_flops(model: nn.Module, input_shape: Sequence[int] | torch.Tensor,
                effective: bool = False, by_layer: bool = False) -> int | dict[str, int]:
    """Multiply-accumulates per sample of every Conv/Linear layer on an input of ``input_shape``.

    Args:
        input_shape: the shape of ONE sample, without the batch dimension: (C, H, W) for
            images, (D,) for vectors, (N, D) for token sequences. An example input tensor
            (with its batch dimension) is accepted instead; counts are per sample either way.
        effective: count only the MACs of nonzero weights (layer MACs x weight density).
        by_layer: return ``{layer path: MACs}`` instead of the total.

    Layers that torchvision's Swin attention applies functionally (``qkv``, ``proj`` of
    ``ShiftedWindowAttention``) are counted through their parent module, on the window-padded
    token grid the attention really processes.
    """
    example = input_shape if isinstance(input_shape, torch.Tensor) else None
    shape = None if example is not None else (1,) + tuple(int(s) for s in input_shape)
    per_layer: dict[str, int] = {}
    handles = []
    swin_cls = _swin_attention_class()

    def add(name: str, macs: int) -> None:
        per_layer[name] = per_layer.get(name, 0) + macs

    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            # every input position meets every weight once
            def hook(mod, inp, out, _n=name):
                positions = inp[0].numel() // (inp[0].shape[0] * mod.in_channels)
                add(_n, positions * _weight_count(mod.weight, effective))
        elif isinstance(m, nn.modules.conv._ConvNd):
            def hook(mod, inp, out, _n=name):
                positions = out.numel() // (out.shape[0] * mod.out_channels)
                add(_n, positions * _weight_count(mod.weight, effective))
        elif isinstance(m, nn.Linear):
            def hook(mod, inp, out, _n=name):
                rows = out.numel() // (out.shape[0] * mod.out_features)
                add(_n, rows * _weight_count(mod.weight, effective))
        elif swin_cls is not None and isinstance(m, swin_cls):
            def hook(mod, inp, out, _n=name):
                _, h, w, _c = inp[0].shape
                wh, ww = mod.window_size
                tokens = math.ceil(h / wh) * wh * math.ceil(w / ww) * ww
                for sub in ("qkv", "proj"):
                    add(f"{_n}.{sub}", tokens * _weight_count(getattr(mod, sub).weight, effective))
        else:
            continue
        handles.append(m.register_forward_hook(hook))

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            if example is None:
                example = torch.zeros(shape, device=device, dtype=dtype)
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if by_layer:
        return per_layer
    return sum(per_layer.values())


def count_effective_flops(model: nn.Module, input_shape: Sequence[int] | torch.Tensor,
                          by_layer: bool = False) -> int | dict[str, int]:
    """``count_flops(..., effective=True)``: MACs of the nonzero weights only."""
    return count_flops(model, input_shape, effective=True, by_layer=by_layer)
