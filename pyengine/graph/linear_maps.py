"""Exact algebra of folding linear maps: BatchNorm into a layer, a layer into a layer, a 0/1 gate
into a layer, and the structural (mask) counterpart of each.

Every function either returns the folded layer or raises :class:`FoldRefused` with the reason
the result would not be exact. Nothing here crops or approximates a merged kernel: two k>1
convolutions whose second one zero-pads the intermediate map differ at the borders from any
single convolution, and are refused (methods.md section 7).

Arithmetic is done in float64 and cast back to the layers' dtype.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FoldRefused", "fold_bn_backward", "fold_bn_forward", "compose_layers", "compose_masks",
    "gate_rows", "gate_columns", "gate_mask_rows", "gate_mask_columns", "dense_conv_weight",
    "grouped_conv_weight", "layer_macs",
]

_Conv = nn.modules.conv._ConvNd


class FoldRefused(ValueError):
    """A fold that would not be exact (or is not supported); ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _is_conv(m: nn.Module) -> bool:
    return isinstance(m, _Conv)


def _numeric_padding(m: _Conv) -> tuple[int, ...] | None:
    """A convolution's padding as numbers: ``"valid"`` is 0, ``"same"`` the symmetric padding it
    equals when every dilated kernel extent is odd (None when it pads one side more)."""
    if not isinstance(m.padding, str):
        return tuple(m.padding)
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    total = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation)]
    return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None


def _check_plain_conv(m: nn.Module, name: str, padding: bool = True) -> None:
    if m.transposed:
        raise FoldRefused(f"{name} is a transposed convolution (not supported)")
    if padding and _numeric_padding(m) is None:
        raise FoldRefused(f"{name} uses padding={m.padding!r}, which pads one side more than the other "
                          "(not supported)")


def dense_conv_weight(w: Tensor, groups: int) -> Tensor:
    """(O, I/g, *k) grouped weight -> (O, I, *k) dense (block-diagonal) weight."""
    if groups == 1:
        return w
    out_c, in_per = w.shape[0], w.shape[1]
    out_per = out_c // groups
    dense = w.new_zeros((out_c, in_per * groups, *w.shape[2:]))
    for g in range(groups):
        dense[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per] = \
            w[g * out_per:(g + 1) * out_per]
    return dense


def grouped_conv_weight(dense: Tensor, groups: int) -> Tensor:
    """(O, I, *k) dense weight -> (O, I/g, *k), keeping the diagonal blocks."""
    if groups == 1:
        return dense
    out_c, in_c = dense.shape[0], dense.shape[1]
    out_per, in_per = out_c // groups, in_c // groups
    return torch.cat([dense[g * out_per:(g + 1) * out_per, g * in_per:(g + 1) * in_per]
                      for g in range(groups)], dim=0)


def _block_pattern(rows: int, cols: int, groups: int) -> Tensor:
    r = torch.arange(rows) // (rows // groups)
    c = torch.arange(cols) // (cols // groups)
    return r[:, None] == c[None, :]


def _merged_groups(out_c: int, mid_c: int, in_c: int, ga: int, gb: int) -> int:
    """The largest group count the composition of a (ga groups, in->mid) and a (gb groups,
    mid->out) convolution has, from the block structure alone (never from weight values)."""
    conn = (_block_pattern(out_c, mid_c, gb).double() @ _block_pattern(mid_c, in_c, ga).double()) > 0
    best = 1
    for g in range(1, math.gcd(out_c, in_c) + 1):
        if out_c % g or in_c % g:
            continue
        if not bool((conn & ~_block_pattern(out_c, in_c, g)).any()):
            best = g
    return best


def _out_size(h: int, k: int, s: int, p: int, d: int) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


def _new_conv(in_c: int, out_c: int, kernel, stride, padding, dilation, groups,
              bias: bool, padding_mode: str, weight: Tensor) -> _Conv:
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[weight.dim() - 2]
    conv = cls(in_c, out_c, tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), groups,
               bias, padding_mode, device=weight.device, dtype=weight.dtype)
    return conv


# --------------------------------------------------------------------------------------------
# BatchNorm
# --------------------------------------------------------------------------------------------

def _bn_affine(bn: nn.modules.batchnorm._BatchNorm, name: str) -> tuple[Tensor, Tensor]:
    """(scale, shift) of an eval-mode BatchNorm: y = scale * x + shift per channel."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise FoldRefused(f"{name} is a {type(bn).__name__}, not a BatchNorm")
    if bn.running_mean is None or bn.running_var is None:
        raise FoldRefused(f"{name} has no running statistics (track_running_stats=False): it "
                          "normalises with batch statistics, which no fixed layer reproduces")
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    scale = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _set_bias(layer: nn.Module, value: Tensor) -> None:
    value = value.to(dtype=layer.weight.dtype, device=layer.weight.device)
    if layer.bias is None:
        layer.bias = nn.Parameter(value.clone(), requires_grad=layer.weight.requires_grad)
    else:
        layer.bias.data = value.clone()


def fold_bn_backward(layer: nn.Module, bn: nn.Module, layer_name: str = "layer",
                     bn_name: str = "bn", structure_only: bool = False) -> None:
    """Fold ``bn`` into the Conv/Linear ``layer`` that feeds it (in place): W <- W * s,
    b <- (b - mean) * s + beta per output channel. Exact in eval mode."""
    out_c = layer.weight.shape[0]
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise FoldRefused(f"{bn_name} is a {type(bn).__name__}, not a BatchNorm")
    if bn.num_features != out_c:
        raise FoldRefused(f"{bn_name} normalises {bn.num_features} channels but {layer_name} "
                          f"outputs {out_c}")
    if _is_conv(layer):
        _check_plain_conv(layer, layer_name, padding=False)  # scaling output channels: any padding
    if structure_only:
        if layer.bias is None:
            _set_bias(layer, torch.zeros(out_c, dtype=layer.weight.dtype))
        return
    scale, shift = _bn_affine(bn, bn_name)
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(scale)
    layer.weight.data = (w * scale.view(-1, *([1] * (w.dim() - 1)))).to(layer.weight.dtype)
    _set_bias(layer, b * scale + shift)


def _padding_is_zero(layer: _Conv) -> bool:
    padding = _numeric_padding(layer)
    return padding is not None and all(p == 0 for p in padding)


def fold_bn_forward(bn: nn.Module, layer: nn.Module, bn_name: str = "bn",
                    layer_name: str = "layer", structure_only: bool = False) -> None:
    """Fold ``bn`` into the Conv/Linear ``layer`` it feeds (in place): W[:, i] <- W[:, i] s_i,
    b <- b + sum_i W[:, i] t_i. Exact only when ``layer`` does not pad (its zero padding would
    otherwise see 0 where the original saw the BN shift t)."""
    in_c = layer.in_channels if _is_conv(layer) else layer.in_features
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise FoldRefused(f"{bn_name} is a {type(bn).__name__}, not a BatchNorm")
    if bn.num_features != in_c:
        raise FoldRefused(f"{bn_name} normalises {bn.num_features} channels but {layer_name} "
                          f"takes {in_c}")
    if _is_conv(layer):
        _check_plain_conv(layer, layer_name)
        if not _padding_is_zero(layer):
            raise FoldRefused(f"{layer_name} zero-pads its input: the BN shift of {bn_name} "
                              "would be missing at the borders")
    out_c = layer.weight.shape[0]
    if structure_only:
        if layer.bias is None:
            _set_bias(layer, torch.zeros(out_c, dtype=layer.weight.dtype))
        return
    scale, shift = _bn_affine(bn, bn_name)
    groups = layer.groups if _is_conv(layer) else 1
    w = dense_conv_weight(layer.weight.detach().double(), groups)
    bshape = (1, -1) + (1,) * (w.dim() - 2)
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(out_c)
    b = b + (w * shift.view(bshape)).flatten(1).sum(1)
    w = w * scale.view(bshape)
    layer.weight.data = grouped_conv_weight(w, groups).to(layer.weight.dtype)
    _set_bias(layer, b)


# --------------------------------------------------------------------------------------------
# Gates (diagonal 0/1 maps)
# --------------------------------------------------------------------------------------------

def gate_rows(layer: nn.Module, gate: Tensor, structure_only: bool = False) -> None:
    """``gate * layer(x)`` -> one layer: output channel o scaled by gate[o] (weight and bias)."""
    if _is_conv(layer):
        _check_plain_conv(layer, "the layer", padding=False)
    if gate.numel() != layer.weight.shape[0]:
        raise FoldRefused(f"gate of {gate.numel()} channels after a layer of "
                          f"{layer.weight.shape[0]} outputs")
    if structure_only:
        return
    g = gate.detach().to(layer.weight.dtype)
    layer.weight.data = layer.weight.detach() * g.view(-1, *([1] * (layer.weight.dim() - 1)))
    if layer.bias is not None:
        layer.bias.data = layer.bias.detach() * g


def gate_columns(layer: nn.Module, gate: Tensor, structure_only: bool = False) -> None:
    """``layer(gate * x)`` -> one layer: input channel i scaled by gate[i]. Exact whatever the
    padding (a zero-padded 0 times any gate is 0)."""
    if _is_conv(layer):
        _check_plain_conv(layer, "the layer", padding=False)
    in_c = layer.in_channels if _is_conv(layer) else layer.in_features
    if gate.numel() != in_c:
        raise FoldRefused(f"gate of {gate.numel()} channels before a layer of {in_c} inputs")
    if structure_only:
        return
    groups = layer.groups if _is_conv(layer) else 1
    w = dense_conv_weight(layer.weight.detach(), groups)
    w = w * gate.detach().to(w.dtype).view(1, -1, *([1] * (w.dim() - 2)))
    layer.weight.data = grouped_conv_weight(w, groups)


# --------------------------------------------------------------------------------------------
# Layer composition
# --------------------------------------------------------------------------------------------

def _conv_plan(a: _Conv, b: _Conv, a_name: str, b_name: str) -> dict:
    """Geometry of the single convolution equal to ``b(a(x))``, or FoldRefused."""
    _check_plain_conv(a, a_name)
    _check_plain_conv(b, b_name)
    if a.weight.dim() != b.weight.dim():
        raise FoldRefused(f"{a_name} and {b_name} have different dimensionality")
    n = a.weight.dim() - 2
    ka, sa, pa, da = a.kernel_size, a.stride, _numeric_padding(a), a.dilation
    kb, sb, pb, db = b.kernel_size, b.stride, _numeric_padding(b), b.dilation
    a_pointwise = all(k == 1 for k in ka) and all(p == 0 for p in pa)
    if any(p > 0 for p in pb):
        # b zero-pads a's output. One conv reproduces that only if a maps a zero input to zero
        # at exactly those positions: a pointwise, unpadded, bias-free a.
        if not a_pointwise:
            raise FoldRefused(
                f"{b_name} zero-pads the output of {a_name} (kernels {tuple(ka)} then "
                f"{tuple(kb)}): a merged convolution differs at the borders; kept both layers")
        if a.bias is not None:
            raise FoldRefused(
                f"{b_name} zero-pads the output of {a_name}, whose bias is not zero there: a "
                "merged convolution differs at the borders; kept both layers")
        if b.padding_mode != "zeros":
            raise FoldRefused(f"{b_name} pads with mode {b.padding_mode!r} after {a_name}")
        padding_mode = "zeros"
    else:
        padding_mode = a.padding_mode
    kernel, dil, stride, pad, steps = [], [], [], [], []
    for d in range(n):
        used_a = da[d] if ka[d] > 1 else 0
        used_b = sa[d] * db[d] if kb[d] > 1 else 0
        dm = math.gcd(used_a, used_b) or 1
        span = da[d] * (ka[d] - 1) + sa[d] * db[d] * (kb[d] - 1)
        kernel.append(span // dm + 1)
        dil.append(dm)
        stride.append(sa[d] * sb[d])
        pad.append(pa[d] + sa[d] * pb[d])
        steps.append((da[d] // dm if ka[d] > 1 else 1, sa[d] * db[d] // dm if kb[d] > 1 else 1))
    for d in range(n):  # same output size for every input size (a guard on the algebra above)
        for h in range(1, 257):
            ha = _out_size(h, ka[d], sa[d], pa[d], da[d])
            if ha < 1:
                continue
            hb = _out_size(ha, kb[d], sb[d], pb[d], db[d])
            if hb < 1:
                continue
            hm = _out_size(h, kernel[d], stride[d], pad[d], dil[d])
            if hm != hb:
                raise FoldRefused(f"merging {a_name} and {b_name} changes the output size "
                                  f"(input {h}: {hb} vs {hm})")
    groups = _merged_groups(b.out_channels, a.out_channels, a.in_channels, a.groups, b.groups)
    return {"kernel": kernel, "dilation": dil, "stride": stride, "padding": pad,
            "steps": steps, "groups": groups, "padding_mode": padding_mode}


def _compose_conv_dense(wa: Tensor, ga: int, wb: Tensor, plan: dict) -> Tensor:
    """Dense (O, I, *K) kernel of b∘a from a's grouped kernel wa (M, I/ga, *ka) and b's dense
    kernel wb (O, M, *kb). a's groups are kept in the product (a depthwise a costs O*M*k^2 per
    tap, not O*M*I*k^2)."""
    mid, in_per = wa.shape[0], wa.shape[1]
    out_c = wb.shape[0]
    ka = wa.shape[2:]
    wa_g = wa.reshape(ga, mid // ga, in_per, *ka)
    out = wa.new_zeros((out_c, ga, in_per, *plan["kernel"]))
    for u in itertools.product(*[range(k) for k in wb.shape[2:]]):
        wb_u = wb[(slice(None), slice(None), *u)].reshape(out_c, ga, mid // ga)
        contrib = torch.einsum("ogm,gmi...->ogi...", wb_u, wa_g)
        index = [slice(None), slice(None), slice(None)]
        for d, ud in enumerate(u):
            step_a, step_b = plan["steps"][d]
            start = ud * step_b
            index.append(slice(start, start + step_a * (ka[d] - 1) + 1, step_a))
        out[tuple(index)] += contrib
    # (O, ga, I/ga, *K) -> dense (O, I, *K): group g holds input channels g*I/ga ...
    return out.reshape(out_c, ga * in_per, *plan["kernel"])


def compose_layers(a: nn.Module, b: nn.Module, a_name: str = "a", b_name: str = "b",
                   structure_only: bool = False) -> nn.Module:
    """A new layer equal to ``b(a(x))`` for two Linear layers or two convolutions, or
    FoldRefused (the reason says why it would not be exact).

    Exact cases: Linear∘Linear; conv∘conv when ``b`` does not pad (any kernels, strides,
    dilations, groups: the merged kernel has size da(ka-1) + sa db(kb-1) + 1, stride sa sb);
    conv∘conv when ``a`` is a bias-free, unpadded pointwise conv (the merged conv pads like ``b``,
    scaled by a's stride). Groups of the result come from the block structure (depthwise∘
    depthwise stays depthwise; depthwise∘pointwise becomes dense).
    """
    if isinstance(a, nn.Linear) and isinstance(b, nn.Linear):
        if b.in_features != a.out_features:
            raise FoldRefused(f"{b_name} takes {b.in_features} features, {a_name} gives "
                              f"{a.out_features}")
        has_bias = a.bias is not None or b.bias is not None
        new = nn.Linear(a.in_features, b.out_features, bias=has_bias, device=a.weight.device,
                        dtype=a.weight.dtype)
        if structure_only:
            return new
        wa, wb = a.weight.detach().double(), b.weight.detach().double()
        new.weight.data = (wb @ wa).to(a.weight.dtype)
        if has_bias:
            bias = b.bias.detach().double() if b.bias is not None else wb.new_zeros(b.out_features)
            if a.bias is not None:
                bias = bias + wb @ a.bias.detach().double()
            new.bias.data = bias.to(a.weight.dtype)
        return new
    if not (_is_conv(a) and _is_conv(b)):
        raise FoldRefused(f"{a_name} ({type(a).__name__}) and {b_name} ({type(b).__name__}) "
                          "are not two Linear layers or two convolutions")
    if b.in_channels != a.out_channels:
        raise FoldRefused(f"{b_name} takes {b.in_channels} channels, {a_name} gives "
                          f"{a.out_channels}")
    plan = _conv_plan(a, b, a_name, b_name)
    has_bias = a.bias is not None or b.bias is not None
    new = _new_conv(a.in_channels, b.out_channels, plan["kernel"], plan["stride"],
                    plan["padding"], plan["dilation"], plan["groups"], has_bias,
                    plan["padding_mode"], a.weight)
    if structure_only:
        return new
    wb = dense_conv_weight(b.weight.detach().double(), b.groups)
    dense = _compose_conv_dense(a.weight.detach().double(), a.groups, wb, plan)
    new.weight.data = grouped_conv_weight(dense, plan["groups"]).to(a.weight.dtype)
    if has_bias:
        bias = b.bias.detach().double() if b.bias is not None else wb.new_zeros(b.out_channels)
        if a.bias is not None:  # b sees a's bias at every (unpadded) position
            bias = bias + torch.einsum("om...,m->o", wb, a.bias.detach().double())
        new.bias.data = bias.to(a.weight.dtype)
    return new


def compose_masks(a: nn.Module, b: nn.Module, mask_a: Tensor | None, mask_b: Tensor | None
                  ) -> Tensor | None:
    """The structural nonzero pattern of the weight ``compose_layers(a, b)`` builds from weights
    restricted to ``mask_a`` / ``mask_b`` (a missing mask counts as all-True; both missing ->
    None). Computed on 0/1 values, so no cancellation can hide a connection."""
    if mask_a is None and mask_b is None:
        return None
    ma = (mask_a if mask_a is not None else torch.ones_like(a.weight, dtype=torch.bool)).double()
    mb = (mask_b if mask_b is not None else torch.ones_like(b.weight, dtype=torch.bool)).double()
    if isinstance(a, nn.Linear):
        return (mb @ ma) > 0
    plan = _conv_plan(a, b, "a", "b")
    dense = _compose_conv_dense(ma, a.groups, dense_conv_weight(mb, b.groups), plan)
    return grouped_conv_weight(dense, plan["groups"]) > 0


def gate_mask_rows(mask: Tensor, gate: Tensor) -> Tensor:
    """A layer's mask after ``gate_rows``: rows whose gate is 0 are structurally zero."""
    return mask & (gate != 0).view(-1, *([1] * (mask.dim() - 1))).to(mask.device)


def gate_mask_columns(mask: Tensor, gate: Tensor, groups: int) -> Tensor:
    """A layer's mask after ``gate_columns``."""
    dense = dense_conv_weight(mask, groups) if mask.dim() > 2 else mask
    keep = (gate != 0).view(1, -1, *([1] * (dense.dim() - 2))).to(mask.device)
    dense = dense & keep
    return grouped_conv_weight(dense, groups) if mask.dim() > 2 else dense


def layer_macs(layer: nn.Module, out_shape: Sequence[int]) -> int:
    """Multiply-accumulates of a Conv/Linear for one sample with output ``out_shape``
    (batch dimension included, ignored)."""
    out_c = layer.weight.shape[0]
    positions = math.prod(out_shape[1:]) // out_c if len(out_shape) > 1 else 1
    return positions * layer.weight.numel()
