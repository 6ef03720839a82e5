"""MOOFA's peak-memory model, MACs, and the measured peak on a GPU.

The model (Girard et al., arXiv 2409.05900; code ``PeakMemoryEfficiency``), in elements for one
image (batch 1):

* a convolution costs its input + its output + its weights (bias included);
* an inverted-residual block costs the largest of its convolutions (1x1 expand, depthwise,
  1x1 project); with an identity shortcut the block input is alive during the depthwise
  convolution, so that term also counts the block input;
* the network peak is the largest of the stem, every block and the final 1x1 expand. The
  feature-mix layer, the classifier, SE and BatchNorm are not counted (the authors leave the
  classifier out as task-specific).

Published values this reproduces (in_channels 3): the OFA largest subnet at 224 px, 1,509,984;
the OFA smallest subnet at 128 px, 262,912; the MOOFA largest subnet at 224 px, 696,192.

``peak_memory`` computes this from the subnet's layout (arithmetic on shapes);
``peak_memory_by_hooks`` measures the same quantities on a built static network with forward
hooks (the authors' way), as an independent check; ``measure_cuda_peak`` reports what the CUDA
caching allocator really held during a forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from pyengine.models.ofa_mbv3 import MBV3Arch, MobileNetV3Subnet, subnet_layout

__all__ = ["MemoryEstimate", "peak_memory", "peak_memory_of_layout", "peak_memory_by_hooks", "subnet_macs",
           "measure_cuda_peak", "dtype_size", "PUBLISHED_PEAKS"]

# (space, subnet, resolution) -> elements, from the MOOFA paper / repository README
PUBLISHED_PEAKS = {
    ("ofa", "max", 224): 1_509_984,
    ("ofa", "min", 128): 262_912,
    ("moofa", "max", 224): 696_192,
}


def dtype_size(dtype: str | torch.dtype) -> int:
    """Bytes per element of a dtype given as torch.dtype or name ("float32", "bf16", "int8")."""
    if isinstance(dtype, str):
        aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp64": "float64",
                   "double": "float64", "float": "float32"}
        name = aliases.get(dtype.lower(), dtype.lower())
        dt = getattr(torch, name, None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; e.g. float32, float16, bfloat16, int8")
        dtype = dt
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class MemoryEstimate:
    """The peak in elements, which layer or block sets it, and every counted term."""

    peak_elements: int
    argmax: str
    terms: list[dict] = field(default_factory=list)  # {"name", "elements", "convs": {...}}

    def bytes(self, dtype: str | torch.dtype = "float32") -> int:
        return self.peak_elements * dtype_size(dtype)

    def to_dict(self, dtype: str | torch.dtype = "float32") -> dict:
        return {"peak_elements": self.peak_elements, "peak_bytes": self.bytes(dtype),
                "dtype": str(dtype).replace("torch.", ""), "argmax": self.argmax, "terms": self.terms}


def _conv_out(side: int, stride: int) -> int:
    # "same" padding k // 2 with odd k: floor((H - 1) / s) + 1
    return (side - 1) // stride + 1


def peak_memory_of_layout(layout: Mapping[str, Any], resolution: int) -> MemoryEstimate:
    """The peak-memory model on a ``subnet_layout`` at ``resolution`` x ``resolution``."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    terms = []
    cin, side = layout["in_channels"], resolution
    c0, s1 = layout["first_conv"], _conv_out(resolution, 2)
    stem = cin * side * side + c0 * s1 * s1 + c0 * cin * 9
    terms.append({"name": "stem", "elements": stem, "convs": {"conv": stem}})
    side = s1
    for i, b in enumerate(layout["blocks"]):
        convs = {}
        x_in = b["in"] * side * side
        if b["expand"]:
            convs["expand"] = x_in + b["mid"] * side * side + b["mid"] * b["in"]
        out_side = _conv_out(side, b["stride"])
        dw = b["mid"] * side * side + b["mid"] * out_side * out_side + b["mid"] * b["kernel"] ** 2
        convs["dw"] = dw + (x_in if b["shortcut"] else 0)
        convs["project"] = b["mid"] * out_side * out_side + b["out"] * out_side * out_side + b["out"] * b["mid"]
        terms.append({"name": f"block{i}", "elements": max(convs.values()), "convs": convs})
        side = out_side
    c_last = layout["blocks"][-1]["out"]
    fe = c_last * side * side + layout["final_expand"] * side * side + layout["final_expand"] * c_last
    terms.append({"name": "final_expand", "elements": fe, "convs": {"conv": fe}})
    top = max(terms, key=lambda t: t["elements"])
    return MemoryEstimate(int(top["elements"]), top["name"], terms)


def peak_memory(arch: MBV3Arch, subnet: Mapping[str, Any] | None, resolution: int | None = None,
                in_channels: int = 3) -> MemoryEstimate:
    """The peak-memory model of a subnet (its ``r`` is the resolution unless given)."""
    r = resolution if resolution is not None else (subnet or {}).get("r")
    if r is None:
        raise ValueError("peak_memory needs a resolution (argument or the subnet's 'r')")
    return peak_memory_of_layout(subnet_layout(arch, subnet, in_channels), r)


@torch.no_grad()
def peak_memory_by_hooks(net: MobileNetV3Subnet, resolution: int) -> MemoryEstimate:
    """The same model measured on a built network: forward hooks record the element counts of
    every convolution's input and output tensors on a 1-image input, weights are counted from
    the parameters."""
    sizes: dict[nn.Module, tuple[int, int]] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.__setitem__(m, (i[0].numel(), o.numel())))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    p = next(net.parameters())
    was = net.training
    try:
        net.eval()
        net(torch.zeros(1, net.layout["in_channels"], resolution, resolution, device=p.device, dtype=p.dtype))
    finally:
        net.train(was)
        for h in hooks:
            h.remove()

    def cost(conv: nn.Conv2d) -> int:
        i, o = sizes[conv]
        return i + o + sum(q.numel() for q in conv.parameters())

    terms = [{"name": "stem", "elements": cost(net.stem.conv), "convs": {"conv": cost(net.stem.conv)}}]
    for i, blk in enumerate(net.blocks):
        convs = {}
        if hasattr(blk, "expand"):
            convs["expand"] = cost(blk.expand.conv)
        block_input = sizes[blk.expand.conv if hasattr(blk, "expand") else blk.dw.conv][0]
        convs["dw"] = cost(blk.dw.conv) + (block_input if blk.use_shortcut else 0)
        convs["project"] = cost(blk.project.conv)
        terms.append({"name": f"block{i}", "elements": max(convs.values()), "convs": convs})
    fe = cost(net.head.final_expand.conv)
    terms.append({"name": "final_expand", "elements": fe, "convs": {"conv": fe}})
    top = max(terms, key=lambda t: t["elements"])
    return MemoryEstimate(int(top["elements"]), top["name"], terms)


def subnet_macs(layout: Mapping[str, Any], resolution: int) -> int:
    """Multiply-accumulates of one image through every conv and linear layer (SE, feature mix
    and classifier included), as ``pyengine.models.count_flops`` counts them."""
    cin, side = layout["in_channels"], _conv_out(resolution, 2)
    macs = side * side * layout["first_conv"] * cin * 9
    for b in layout["blocks"]:
        if b["expand"]:
            macs += side * side * b["mid"] * b["in"]
        side = _conv_out(side, b["stride"])
        macs += side * side * b["mid"] * b["kernel"] ** 2
        if b["se_mid"]:
            macs += 2 * b["mid"] * b["se_mid"]
        macs += side * side * b["out"] * b["mid"]
    c = layout["blocks"][-1]["out"]
    macs += side * side * layout["final_expand"] * c
    macs += layout["final_expand"] * layout["last_channel"] + layout["last_channel"] * layout["num_classes"]
    return int(macs)


@torch.no_grad()
def measure_cuda_peak(net: nn.Module, resolution: int, in_channels: int, device: str | torch.device = "cuda",
                      dtype: torch.dtype = torch.float32) -> dict | None:
    """What the CUDA caching allocator held during one forward of one image, in bytes, or None
    without a CUDA device.

    ``activation_bytes`` is the peak allocated during the forward minus what was allocated
    before it (weights, buffers) plus the input image: the memory activations and temporaries
    really took, to compare with the model's figure (which also counts the weights of the layer
    at the peak). Convolution workspaces chosen by cuDNN are included: disable cuDNN
    benchmarking for figures close to the model.
    """
    if not torch.cuda.is_available():
        return None
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"measure_cuda_peak needs a CUDA device, got {device}")
    net = net.to(device=device, dtype=dtype).eval()
    x = torch.randn(1, in_channels, resolution, resolution, device=device, dtype=dtype)
    net(x)  # warm-up: cuDNN algorithm choice and lazy initialisation allocate once
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    net(x)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    weights = sum(t.numel() * t.element_size() for t in list(net.parameters()) + list(net.buffers()))
    return {"activation_bytes": int(peak - before + x.numel() * x.element_size()), "peak_allocated_bytes": int(peak),
            "weights_bytes": int(weights), "dtype": str(dtype).replace("torch.", ""), "device": torch.cuda.get_device_name(device)}
