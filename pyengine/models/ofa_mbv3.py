"""Once-for-all MobileNetV3: the elastic supernet and the static networks extracted from it.

Macro-architecture (OFA, Cai et al. ICLR 2020; code ``OFAMobileNetV3``): a 3x3 stride-2 stem
(BN, h-swish), one static inverted-residual block with expand ratio 1, five stages of up to
``max(depths)`` elastic blocks (1x1 expand -> BN -> act, depthwise k x k -> BN -> act [-> SE],
1x1 project -> BN, identity shortcut when shape allows), a 1x1 final expand (BN, h-swish),
global average pooling, a 1x1 feature-mix conv (no BN, h-swish), dropout and the classifier.

A *subnet* is ``{"ks": [...], "e": [...], "d": [...]}``: a kernel size and expand ratio per
block slot (``n_stages * max(depths)`` slots, stage-major; slots beyond a stage's depth are
ignored) and a depth per stage (the first d blocks are kept). ``MBV3Arch`` holds the macro
architecture as data; ``OFA_ARCH`` and ``MOOFA_ARCH`` are the two published ones (MOOFA widths:
Girard et al., arXiv 2409.05900; pyengine.methods.ofa.spaces derives them from the
memory-balancing rule and a test checks they agree).

    net = ofa_mbv3(num_classes=10, arch="moofa", width_mult=0.5)
    net.set_active({"ks": 5, "e": 3, "d": 2})      # uniform values or per-slot lists
    small = net.extract()                          # a static nn.Module with copied weights
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from pyengine.nn.elastic import (
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticDepthwiseConv2d,
    ElasticSE,
    importance_order,
    make_divisible,
    same_conv2d,
)

__all__ = [
    "MBV3Arch", "OFA_ARCH", "MOOFA_ARCH", "ARCH_PRESETS", "get_arch", "scale_arch",
    "normalize_subnet", "subnet_layout", "OFAMobileNetV3", "MobileNetV3Subnet", "ofa_mbv3",
]

ACTIVATIONS = ("relu", "h_swish")


@dataclass(frozen=True)
class MBV3Arch:
    """The macro-architecture of a once-for-all MobileNetV3 (widths, strides, activations, SE
    placement) and its elastic choices (kernel sizes, expand ratios, depths)."""

    first_conv: int
    first_block: int
    stage_widths: tuple[int, ...]
    final_expand: int
    last_channel: int
    stage_strides: tuple[int, ...]
    stage_acts: tuple[str, ...]
    stage_se: tuple[bool, ...]
    first_block_act: str = "relu"
    first_block_se: bool = False
    first_block_stride: int = 1
    kernel_sizes: tuple[int, ...] = (3, 5, 7)
    expand_ratios: tuple[float, ...] = (3, 4, 6)
    depths: tuple[int, ...] = (2, 3, 4)
    divisor: int = 8
    se_reduction: int = 4
    dropout: float = 0.1
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    kernel_transform: bool = True

    def __post_init__(self) -> None:
        n = len(self.stage_widths)
        for name in ("stage_strides", "stage_acts", "stage_se"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, stage_widths has {n}")
        for a in (*self.stage_acts, self.first_block_act):
            if a not in ACTIVATIONS:
                raise ValueError(f"activation {a!r} is not one of {ACTIVATIONS}")
        for name in ("kernel_sizes", "expand_ratios", "depths"):
            vals = getattr(self, name)
            if not vals or list(vals) != sorted(set(vals)):
                raise ValueError(f"{name} must be a non-empty, sorted list of distinct values, got {list(vals)}")
        if any(k % 2 != 1 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd, got {list(self.kernel_sizes)}")
        if min(self.depths) < 1 or min(self.expand_ratios) <= 0:
            raise ValueError("depths must be >= 1 and expand_ratios > 0")
        if min(self.stage_widths + (self.first_conv, self.first_block, self.final_expand, self.last_channel)) < 1:
            raise ValueError("every width must be >= 1")

    @property
    def n_stages(self) -> int:
        return len(self.stage_widths)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @property
    def n_slots(self) -> int:
        return self.n_stages * self.max_depth

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MBV3Arch":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KeyError(f"unknown architecture field(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# OFA (code: OFAMobileNetV3, base_stage_width [16, 16, 24, 40, 80, 112, 160, 960, 1280])
OFA_ARCH = MBV3Arch(
    first_conv=16, first_block=16, stage_widths=(24, 40, 80, 112, 160), final_expand=960, last_channel=1280,
    stage_strides=(2, 2, 2, 1, 2), stage_acts=("relu", "relu", "h_swish", "h_swish", "h_swish"),
    stage_se=(False, True, False, True, True), expand_ratios=(3, 4, 6),
)

# MOOFA (code: OFAMobileNetV3CtV3): every stage at stride 2, widths from the memory-balancing
# rule [3, 8, 24, 96, 288, 360, 384, 392, 392]; activations and SE placement as in that code.
MOOFA_ARCH = MBV3Arch(
    first_conv=3, first_block=8, stage_widths=(24, 96, 288, 360, 384), final_expand=392, last_channel=392,
    stage_strides=(2, 2, 2, 2, 2), stage_acts=("h_swish", "h_swish", "h_swish", "relu", "h_swish"),
    stage_se=(False, True, True, False, True), expand_ratios=(2, 3, 4),
)

ARCH_PRESETS: dict[str, MBV3Arch] = {"ofa": OFA_ARCH, "moofa": MOOFA_ARCH}


def _scale_width(w: int, mult: float, divisor: int) -> int:
    if mult == 1.0:
        return w
    if w <= divisor:  # MOOFA's 3-channel stem and 8-channel first block: already minimal
        return w
    return make_divisible(w * mult, divisor)


def scale_arch(arch: MBV3Arch, width_mult: float = 1.0, divisor: int | None = None) -> MBV3Arch:
    """Every width times ``width_mult``, rounded to a multiple of ``divisor`` (default the
    arch's); widths not above the divisor (MOOFA's 3-channel stem) are kept as they are."""
    if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not math.isfinite(width_mult) \
            or width_mult <= 0:
        raise ValueError(f"width_mult must be a finite number > 0, got {width_mult!r}")
    d = arch.divisor if divisor is None else int(divisor)
    if d < 1:
        raise ValueError(f"divisor must be >= 1, got {divisor}")
    s = lambda w: _scale_width(w, width_mult, d)  # noqa: E731
    return replace(arch, first_conv=s(arch.first_conv), first_block=s(arch.first_block),
                   stage_widths=tuple(s(w) for w in arch.stage_widths), final_expand=s(arch.final_expand),
                   last_channel=s(arch.last_channel), divisor=d)


def get_arch(arch: str | MBV3Arch | Mapping[str, Any] = "ofa", width_mult: float = 1.0,
             divisor: int | None = None) -> MBV3Arch:
    """A preset name ("ofa", "moofa"), an ``MBV3Arch`` or its dict, scaled by ``width_mult``."""
    if isinstance(arch, str):
        if arch not in ARCH_PRESETS:
            raise KeyError(f"unknown arch {arch!r}; presets: {', '.join(ARCH_PRESETS)}")
        arch = ARCH_PRESETS[arch]
    elif isinstance(arch, Mapping):
        arch = MBV3Arch.from_dict(arch)
    elif not isinstance(arch, MBV3Arch):
        raise TypeError(f"arch must be a preset name, an MBV3Arch or a dict, got {type(arch).__name__}")
    return scale_arch(arch, width_mult, divisor)


# ---------------------------------------------------------------------------------- subnets


def _as_list(name: str, value, n: int, choices: Sequence, cast) -> list:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        vals = [value] * n
    elif isinstance(value, (list, tuple)):
        vals = list(value) * n if len(value) == 1 else list(value)  # one value broadcasts like a number
    else:
        raise ValueError(f"subnet {name!r} must be a number or a list of {n}, got {value!r}")
    if len(vals) != n:
        raise ValueError(f"subnet {name!r} needs 1 or {n} values, got {len(vals)}")
    out = []
    for v in vals:
        try:
            v = cast(v)
        except (TypeError, ValueError):
            raise ValueError(f"subnet {name!r}: {v!r} is not a number") from None
        if v not in choices:
            raise ValueError(f"subnet {name!r}: {v!r} is not one of {list(choices)}")
        out.append(v)
    return out


def _num(v):
    f = float(v)
    return int(f) if f.is_integer() else f


def normalize_subnet(arch: MBV3Arch, subnet: Mapping[str, Any] | None = None) -> dict:
    """A complete, validated subnet dict (``ks``, ``e`` per slot, ``d`` per stage); missing keys
    take the largest choice, uniform numbers (or one-element lists) are broadcast, extra keys (e.g. ``r``) are kept."""
    subnet = dict(subnet or {})
    unknown = sorted(set(subnet) - {"ks", "e", "d", "r"})
    if unknown:
        raise KeyError(f"unknown subnet key(s) {unknown}; use ks, e, d (and r for the resolution)")
    out = {
        "ks": _as_list("ks", subnet.get("ks", max(arch.kernel_sizes)), arch.n_slots, arch.kernel_sizes, int),
        "e": _as_list("e", subnet.get("e", max(arch.expand_ratios)), arch.n_slots, arch.expand_ratios, _num),
        "d": _as_list("d", subnet.get("d", max(arch.depths)), arch.n_stages, arch.depths, int),
    }
    if "r" in subnet:
        r = subnet["r"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"subnet 'r' (resolution) must be a positive integer, got {r!r}")
        out["r"] = r
    return out


def active_slots(arch: MBV3Arch, subnet: Mapping[str, Any]) -> list[int]:
    """Indices of the block slots a subnet keeps (the first d of each stage)."""
    return [s * arch.max_depth + i for s, d in enumerate(subnet["d"]) for i in range(d)]


def canonical_subnet(arch: MBV3Arch, subnet: Mapping[str, Any]) -> dict:
    """The subnet with inactive slots set to the smallest choice, so equal networks compare
    equal (and hash equal as JSON)."""
    sub = normalize_subnet(arch, subnet)
    keep = set(active_slots(arch, sub))
    for i in range(arch.n_slots):
        if i not in keep:
            sub["ks"][i], sub["e"][i] = min(arch.kernel_sizes), min(arch.expand_ratios)
    return sub


def mid_channels(in_channels: int, expand: float, divisor: int) -> int:
    return make_divisible(round(in_channels * expand), divisor)


def subnet_layout(arch: MBV3Arch, subnet: Mapping[str, Any] | None = None, in_channels: int = 3,
                  num_classes: int = 1000) -> dict:
    """The static network a subnet describes, as plain JSON data: every block's input, middle
    and output channels, kernel, stride, activation, SE width and shortcut."""
    sub = normalize_subnet(arch, subnet)
    blocks = []
    c = arch.first_block
    for slot in active_slots(arch, sub):
        stage, i = divmod(slot, arch.max_depth)
        out, stride = arch.stage_widths[stage], arch.stage_strides[stage] if i == 0 else 1
        mid = mid_channels(c, sub["e"][slot], arch.divisor)
        blocks.append({
            "slot": slot, "in": c, "mid": mid, "out": out, "kernel": sub["ks"][slot], "stride": stride,
            "act": arch.stage_acts[stage], "expand": True,
            "se_mid": make_divisible(mid // arch.se_reduction, arch.divisor) if arch.stage_se[stage] else 0,
            "shortcut": stride == 1 and c == out,
        })
        c = out
    fb = arch.first_block_stride
    first_block = {
        "slot": -1, "in": arch.first_conv, "mid": arch.first_conv, "out": arch.first_block, "kernel": 3,
        "stride": fb, "act": arch.first_block_act, "expand": False,
        "se_mid": make_divisible(arch.first_conv // arch.se_reduction, arch.divisor) if arch.first_block_se else 0,
        "shortcut": fb == 1 and arch.first_conv == arch.first_block,
    }
    return {
        "in_channels": in_channels, "num_classes": num_classes, "first_conv": arch.first_conv,
        "blocks": [first_block] + blocks, "final_expand": arch.final_expand, "last_channel": arch.last_channel,
        "dropout": arch.dropout, "bn_momentum": arch.bn_momentum, "bn_eps": arch.bn_eps,
    }


# ---------------------------------------------------------------------------------- modules


def _act(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.Hardswish()


class SqueezeExcite(nn.Module):
    """Static squeeze-and-excitation: mean -> reduce (bias) -> ReLU -> expand (bias) -> h-sigmoid."""

    def __init__(self, channels: int, mid: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(mid, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise k x k convolution with "same" padding that skips the taps which only meet
    padding on inputs smaller than the kernel (exact; see ``same_conv2d``)."""

    def __init__(self, channels: int, kernel: int, stride: int) -> None:
        super().__init__(channels, channels, kernel, stride, kernel // 2, groups=channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return same_conv2d(x, self.weight, self.bias, self.stride[0], self.groups)


class ConvBNAct(nn.Sequential):
    """conv -> BN [-> activation]; children ``conv``, ``bn``, ``act``."""

    def __init__(self, conv: nn.Module, bn: nn.Module, act: str | None) -> None:
        super().__init__()
        self.conv, self.bn = conv, bn
        if act is not None:
            self.act = _act(act)


class MBConvBlock(nn.Module):
    """A static inverted-residual block: ``expand`` (absent for expand ratio 1), ``dw``
    (with ``dw.se`` when it has SE), ``project``; identity shortcut when ``shortcut``."""

    def __init__(self, spec: Mapping[str, Any], bn_momentum: float = 0.1, bn_eps: float = 1e-5) -> None:
        super().__init__()
        cin, mid, cout, k, s = spec["in"], spec["mid"], spec["out"], spec["kernel"], spec["stride"]

        def bn(c):
            return nn.BatchNorm2d(c, eps=bn_eps, momentum=bn_momentum)

        if spec["expand"]:
            self.expand = ConvBNAct(nn.Conv2d(cin, mid, 1, bias=False), bn(mid), spec["act"])
        self.dw = ConvBNAct(DepthwiseConv2d(mid, k, s), bn(mid), spec["act"])
        if spec["se_mid"]:
            self.dw.se = SqueezeExcite(mid, spec["se_mid"])
        self.project = ConvBNAct(nn.Conv2d(mid, cout, 1, bias=False), bn(cout), None)
        self.use_shortcut = bool(spec["shortcut"])

    def forward(self, x: Tensor) -> Tensor:
        y = self.expand(x) if hasattr(self, "expand") else x
        y = self.project(self.dw(y))
        return y + x if self.use_shortcut else y


class _Head(nn.Module):
    """final expand 1x1 (BN, h-swish) -> global average -> feature mix 1x1 (h-swish) ->
    dropout -> classifier, shared by the supernet and its static subnets."""

    def __init__(self, cin: int, final_expand: int, last_channel: int, num_classes: int, dropout: float,
                 bn_momentum: float, bn_eps: float) -> None:
        super().__init__()
        self.final_expand = ConvBNAct(nn.Conv2d(cin, final_expand, 1, bias=False),
                                      nn.BatchNorm2d(final_expand, eps=bn_eps, momentum=bn_momentum), "h_swish")
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_mix = nn.Sequential()
        self.feature_mix.conv = nn.Conv2d(final_expand, last_channel, 1, bias=False)
        self.feature_mix.act = nn.Hardswish()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(last_channel, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.feature_mix(self.pool(self.final_expand(x)))
        return self.classifier(self.dropout(x.flatten(1)))


def _stem(cin: int, cout: int, bn_momentum: float, bn_eps: float) -> ConvBNAct:
    return ConvBNAct(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout, eps=bn_eps, momentum=bn_momentum),
                     "h_swish")


def _init(model: nn.Module) -> None:
    # OFA's "he_fout": conv N(0, sqrt(2 / (k*k*out))), BN (1, 0), linear U(+-1/sqrt(in)), biases 0
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            bound = m.weight.shape[1] ** -0.5
            nn.init.uniform_(m.weight, -bound, bound)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MobileNetV3Subnet(nn.Module):
    """A static MobileNetV3 built from ``subnet_layout`` data (every activation its own module):
    ``stem``, ``blocks`` (MBConvBlock), ``head`` (final_expand, pool, feature_mix, dropout,
    classifier). ``layout`` is kept as the network's JSON description."""

    def __init__(self, layout: Mapping[str, Any]) -> None:
        super().__init__()
        self.layout = copy.deepcopy(dict(layout))
        mom, eps = layout["bn_momentum"], layout["bn_eps"]
        self.stem = _stem(layout["in_channels"], layout["first_conv"], mom, eps)
        self.blocks = nn.Sequential(*[MBConvBlock(b, mom, eps) for b in layout["blocks"]])
        self.head = _Head(layout["blocks"][-1]["out"], layout["final_expand"], layout["last_channel"],
                          layout["num_classes"], layout["dropout"], mom, eps)
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class ElasticMBConv(nn.Module):
    """An elastic inverted-residual block: kernel size, expand ratio (channels of the middle
    layer, importance-sorted) chosen at run time; input and output widths are fixed."""

    def __init__(self, cin: int, cout: int, stride: int, act: str, se: bool, arch: MBV3Arch) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = cin, cout, stride
        self.expand_ratios, self.divisor = tuple(arch.expand_ratios), arch.divisor
        max_mid = mid_channels(cin, max(arch.expand_ratios), arch.divisor)

        def bn(c):
            return ElasticBatchNorm2d(c, eps=arch.bn_eps, momentum=arch.bn_momentum)

        self.expand = ConvBNAct(ElasticConv2d(cin, max_mid), bn(max_mid), act)
        self.dw = ConvBNAct(ElasticDepthwiseConv2d(max_mid, arch.kernel_sizes, stride, arch.kernel_transform),
                            bn(max_mid), act)
        if se:
            self.dw.se = ElasticSE(max_mid, arch.se_reduction, arch.divisor)
        self.project = ConvBNAct(ElasticConv2d(max_mid, cout), bn(cout), None)
        self.use_shortcut = stride == 1 and cin == cout
        self.active_kernel = max(arch.kernel_sizes)
        self.active_expand = max(arch.expand_ratios)

    def set_active(self, kernel: int, expand: float) -> None:
        self.active_kernel, self.active_expand = kernel, expand

    @property
    def active_mid(self) -> int:
        return mid_channels(self.in_channels, self.active_expand, self.divisor)

    def forward(self, x: Tensor) -> Tensor:
        self.expand.conv.active_out_channels = self.active_mid
        self.dw.conv.active_kernel_size = self.active_kernel
        y = self.project(self.dw(self.expand(x)))
        return y + x if self.use_shortcut else y

    @torch.no_grad()
    def reorganize_middle_channels(self, stage: int = 0) -> None:
        """Permute the middle channels so the most important (L1 norm of the project weights
        reading them) come first; ``stage`` keeps the groups of widths already trained."""
        widths = [mid_channels(self.in_channels, e, self.divisor) for e in sorted(self.expand_ratios, reverse=True)]
        imp = self.project.conv.weight.abs().sum((0, 2, 3))
        idx = importance_order(imp, widths, stage)
        pw, dw, ew = self.project.conv.weight, self.dw.conv.weight, self.expand.conv.weight
        pw.copy_(pw.index_select(1, idx))
        dw.copy_(dw.index_select(0, idx))
        ew.copy_(ew.index_select(0, idx))
        for bn in (self.dw.bn, self.expand.bn):
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                t.copy_(t.index_select(0, idx))
        if hasattr(self.dw, "se"):
            se = self.dw.se
            se.expand_weight.copy_(se.expand_weight.index_select(0, idx))
            se.expand_bias.copy_(se.expand_bias.index_select(0, idx))
            se.reduce_weight.copy_(se.reduce_weight.index_select(1, idx))
            # then the SE hidden units by the L1 norm of the expand weights reading them
            sidx = importance_order(se.expand_weight.abs().sum((0, 2, 3)))
            se.expand_weight.copy_(se.expand_weight.index_select(1, sidx))
            se.reduce_weight.copy_(se.reduce_weight.index_select(0, sidx))
            se.reduce_bias.copy_(se.reduce_bias.index_select(0, sidx))

    @torch.no_grad()
    def copy_into(self, block: MBConvBlock) -> None:
        """Copy the active weights into a static block of the active shape."""
        cin, mid = self.in_channels, self.active_mid
        block.expand.conv.weight.copy_(self.expand.conv.active_weight(mid, cin))
        block.dw.conv.weight.copy_(self.dw.conv.active_weight(mid, self.active_kernel))
        block.project.conv.weight.copy_(self.project.conv.active_weight(self.out_channels, mid))
        for src, dst in ((self.expand.bn, block.expand.bn), (self.dw.bn, block.dw.bn), (self.project.bn, block.project.bn)):
            n = dst.num_features
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst, name).copy_(getattr(src, name)[:n])
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
        if hasattr(self.dw, "se"):
            se, dst = self.dw.se, block.dw.se
            smid = se.mid_channels(mid)
            dst.reduce.weight.copy_(se.reduce_weight[:smid, :mid])
            dst.reduce.bias.copy_(se.reduce_bias[:smid])
            dst.expand.weight.copy_(se.expand_weight[:mid, :smid])
            dst.expand.bias.copy_(se.expand_bias[:mid])


class OFAMobileNetV3(nn.Module):
    """The once-for-all supernet. ``set_active`` / ``sample`` choose a subnet, ``forward`` runs
    it with sliced weights, ``extract`` copies it into a standalone ``MobileNetV3Subnet``."""

    def __init__(self, arch: MBV3Arch = OFA_ARCH, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.arch, self.num_classes, self.in_channels = arch, num_classes, in_channels
        mom, eps = arch.bn_momentum, arch.bn_eps
        self.stem = _stem(in_channels, arch.first_conv, mom, eps)
        layout = subnet_layout(arch, None, in_channels, num_classes)
        self.first_block = MBConvBlock(layout["blocks"][0], mom, eps)
        blocks, c = [], arch.first_block
        for s, (w, stride) in enumerate(zip(arch.stage_widths, arch.stage_strides)):
            for i in range(arch.max_depth):
                blocks.append(ElasticMBConv(c, w, stride if i == 0 else 1, arch.stage_acts[s], arch.stage_se[s], arch))
                c = w
        self.blocks = nn.ModuleList(blocks)
        self.head = _Head(c, arch.final_expand, arch.last_channel, num_classes, arch.dropout, mom, eps)
        _init(self)
        self._subnet = normalize_subnet(arch)

    # ------------------------------------------------------------------ choosing a subnet

    def set_active(self, subnet: Mapping[str, Any] | None = None) -> dict:
        """Activate a subnet (missing keys: the largest choice); returns the normalised dict."""
        sub = normalize_subnet(self.arch, subnet)
        for blk, k, e in zip(self.blocks, sub["ks"], sub["e"]):
            blk.set_active(k, e)
        self._subnet = sub
        return copy.deepcopy(sub)

    def set_max(self) -> dict:
        return self.set_active({})

    def set_min(self) -> dict:
        a = self.arch
        return self.set_active({"ks": min(a.kernel_sizes), "e": min(a.expand_ratios), "d": min(a.depths)})

    @property
    def active_subnet(self) -> dict:
        return copy.deepcopy(self._subnet)

    def sample(self, rng: random.Random, kernel_sizes: Sequence[int] | None = None,
               expand_ratios: Sequence[float] | None = None, depths: Sequence[int] | None = None) -> dict:
        """Draw a subnet uniformly from the given choices (default: all) with ``rng`` and
        activate it. The same rng state gives the same subnet on every process."""
        a = self.arch
        ks = list(kernel_sizes or a.kernel_sizes)
        es = list(expand_ratios or a.expand_ratios)
        ds = list(depths or a.depths)
        sub = {"ks": [rng.choice(ks) for _ in range(a.n_slots)],
               "e": [rng.choice(es) for _ in range(a.n_slots)],
               "d": [rng.choice(ds) for _ in range(a.n_stages)]}
        return self.set_active(sub)

    def layout(self, subnet: Mapping[str, Any] | None = None) -> dict:
        return subnet_layout(self.arch, self._subnet if subnet is None else subnet, self.in_channels, self.num_classes)

    # ------------------------------------------------------------------ running it

    def active_blocks(self) -> list[ElasticMBConv]:
        return [self.blocks[i] for i in active_slots(self.arch, self._subnet)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.first_block(self.stem(x))
        for blk in self.active_blocks():
            x = blk(x)
        return self.head(x)

    @torch.no_grad()
    def extract(self, subnet: Mapping[str, Any] | None = None) -> MobileNetV3Subnet:
        """A standalone static network with the (given or active) subnet's weights, on the
        supernet's device and dtype, in the supernet's train/eval mode."""
        if subnet is not None:
            previous = self._subnet
            self.set_active(subnet)
        try:
            ref = next(self.parameters())
            net = MobileNetV3Subnet(self.layout()).to(device=ref.device, dtype=ref.dtype)
            net.stem.load_state_dict(self.stem.state_dict())
            net.blocks[0].load_state_dict(self.first_block.state_dict())
            net.head.load_state_dict(self.head.state_dict())
            for dst, src in zip(list(net.blocks)[1:], self.active_blocks()):
                src.copy_into(dst)
            net.train(self.training)
            return net
        finally:
            if subnet is not None:
                self.set_active(previous)

    def reorganize_middle_channels(self, stage: int = 0) -> None:
        for blk in self.blocks:
            blk.reorganize_middle_channels(stage)


def ofa_mbv3(num_classes: int = 1000, in_channels: int = 3, arch: str | Mapping[str, Any] = "ofa",
             width_mult: float = 1.0, divisor: int | None = None, subnet: Mapping[str, Any] | None = None,
             dropout: float | None = None) -> nn.Module:
    """The once-for-all MobileNetV3 supernet (``arch`` "ofa" or "moofa", or a full arch dict), or,
    with ``subnet``, the static network of that subnet (random weights; load a state dict)."""
    a = get_arch(arch, width_mult, divisor)
    if dropout is not None:
        a = replace(a, dropout=dropout)
    if subnet is not None:
        return MobileNetV3Subnet(subnet_layout(a, subnet, in_channels, num_classes))
    return OFAMobileNetV3(a, num_classes, in_channels)
