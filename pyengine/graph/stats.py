"""Size, depth, MACs and latency of a network, dense or folded.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` rather than the forward
hooks of ``pyengine.models.flops``: it sees every matmul/convolution the network really runs at
the ATen level (merged kernels at their merged size, layers applied functionally such as the
weights torchvision's Swin attention passes to a function, the attention matmuls), it needs no
per-module-type rule for GraphModules or user models, and this package sits below
``pyengine.models`` (which it must not import).
"""
from __future__ import annotations


import torch
import torch.fx
from torch import Tensor, nn

from pyengine.graph.trace import is_weight_layer, trace

__all__ = ["network_stats", "measure_latency", "count_macs", "network_depth"]


def _extra_flop_formulas() -> dict:
    """FLOP formulas FlopCounterMode lacks: the CPU kernel of ``scaled_dot_product_attention``
    (the CUDA ones are registered; without it a ViT's attention products counted 0 on the CPU)."""
    import torch.utils.flop_counter as fc

    out = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None and hasattr(fc, "sdpa_flop_count"):
        if cpu_sdpa not in fc.flop_registry:  # keyed by the op packet, as FlopCounterMode looks ops up
            def sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
                return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

            out[cpu_sdpa] = sdpa_cpu_flop
    return out


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Multiply-accumulates per sample of one eval-mode forward on ``example_input``
    (every matmul, convolution and attention product; FlopCounterMode's FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    # with gradients on (and an input that wants them), nn.MultiheadAttention and
    # nn.TransformerEncoderLayer take their ordinary path instead of the fused inference kernels,
    # which FlopCounterMode does not count (their projections and attention products counted 0)
    # (not a leaf, so that a forward may still work on its input in place)
    x = example_input.detach().requires_grad_() + 0 if example_input.is_floating_point() else example_input
    try:
        with torch.enable_grad(), FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
            model(x)
    finally:
        model.train(was)
    batch = example_input.shape[0] if example_input.dim() > 0 else 1
    return int(counter.get_total_flops()) // 2 // max(batch, 1)


def _weight_layers_inside(module: nn.Module) -> int:
    # nn.MultiheadAttention's input projection is a bare parameter (in_proj_weight), not a Linear
    return sum(1 for m in module.modules() if is_weight_layer(m)) + \
        sum(1 for m in module.modules() if isinstance(m, nn.MultiheadAttention))


def network_depth(model: nn.Module) -> int:
    """Weight layers (Conv/Linear) on the longest input -> output path of the traced graph.

    A module kept whole by the tracer (e.g. torchvision's Swin attention) counts its weight
    layers as applied one after the other. Functional convolutions/linears count one each.
    """
    import torch.nn.functional as F

    gm = model if isinstance(model, torch.fx.GraphModule) else trace(model)
    functional = {F.linear, F.conv1d, F.conv2d, F.conv3d}
    depth: dict[torch.fx.Node, int] = {}
    best = 0
    for node in gm.graph.nodes:
        here = 0
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            here = 1 if is_weight_layer(m) else _weight_layers_inside(m)
        elif node.op == "call_function" and node.target in functional:
            here = 1
        d = here + max((depth[i] for i in node.all_input_nodes), default=0)
        depth[node] = d
        best = max(best, d)
    return best


def network_stats(model: nn.Module, example_input: Tensor) -> dict:
    """Depth, layer counts, parameters and MACs of ``model``:

    ``{"depth", "conv_layers", "linear_layers", "params", "nonzero_params", "macs"}`` where
    depth is :func:`network_depth`, params count each shared tensor once, and macs is
    :func:`count_macs` (per sample).
    """
    convs = sum(1 for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    linears = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    params = list({id(p): p for p in model.parameters()}.values())
    return {
        "depth": network_depth(model),
        "conv_layers": convs,
        "linear_layers": linears,
        "params": sum(p.numel() for p in params),
        "nonzero_params": sum(int(torch.count_nonzero(p.detach())) for p in params),
        "macs": count_macs(model, example_input),
    }


def _benchmark_timer():
    """torch.utils.benchmark's Timer, imported without the "No CUDA runtime is found, using
    CUDA_HOME" line that its import of cpp_extension logs on every machine without a GPU."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(level)
    return Timer


def measure_latency(model: nn.Module, example_input: Tensor, device: str | torch.device | None = None,
                    *, warmup: int = 3, min_run_time: float = 0.5) -> float:
    """Median time in milliseconds of one eval-mode, no-grad forward on ``example_input``.

    ``warmup`` calls run first (allocator, cuDNN autotuning, lazy init); then
    ``torch.utils.benchmark.Timer.blocked_autorange`` times blocks of calls for at least
    ``min_run_time`` seconds, synchronising the accelerator around each block, with the current
    intra-op thread count. ``device`` (default: the model's) receives a copy of the input; the
    model must already be on it.
    """
    Timer = _benchmark_timer()

    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    x = example_input.to(device)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for _ in range(max(0, int(warmup))):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            def forward():
                with torch.no_grad():
                    model(x)

            timer = Timer(stmt="forward()", globals={"forward": forward},
                          num_threads=torch.get_num_threads())
            measurement = timer.blocked_autorange(min_run_time=min_run_time)
    finally:
        model.train(was)
    return float(measurement.median) * 1e3
