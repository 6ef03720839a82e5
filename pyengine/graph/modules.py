"""The small modules structural edits put into a network.

All of them are childless, so :func:`pyengine.graph.trace` keeps each as one graph node, and all
are rebuilt from an edit's JSON arguments alone (their tensors then come from a state-dict load),
which is what :func:`pyengine.graph.replay` needs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

__all__ = ["ChannelGate", "ConstantZero", "AddBias", "AddConstant", "Constant"]


def _broadcast_shape(ndim: int, dim: int, size: int) -> list[int]:
    shape = [1] * ndim
    shape[dim] = size
    return shape


class ChannelGate(nn.Module):
    """Multiplies dimension ``dim`` of its input by a fixed vector of per-channel factors: a
    diagonal linear map, folded into the neighbouring layer by ``fold_network``. Two edits make
    one:

    - ``constant`` with ``args["on"]``: a ReLU/ReLU6 whose neurons are each either always ON
      (factor 1: identity) or always OFF (factor 0: the constant output 0) - a 0/1 gate, as the
      constructor builds it from ``on``;
    - ``linearise`` with ``args["scale"]``: an activation that is exactly linear in the state
      its neurons stay in, with any factors - e.g. a LeakyReLU always OFF (its negative slope),
      a SELU always ON (its scale), a LeakyReLU partly ON (1 where ON, the slope where OFF), or
      a PReLU's weights. The edit sets ``gate`` to those factors after construction (a single
      factor on an activation without a producer layer is a one-channel gate, broadcast).

    Buffers: ``gate`` of shape (num_channels,): the factors (0/1 for a ReLU's gate).
    """

    def __init__(self, num_channels: int, dim: int, on: Sequence[int]) -> None:
        super().__init__()
        self.num_channels = int(num_channels)
        self.dim = int(dim)
        gate = torch.zeros(self.num_channels)
        if len(on):
            gate[torch.as_tensor(list(on), dtype=torch.long)] = 1.0
        self.register_buffer("gate", gate)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate
        if gate.dtype != x.dtype and x.is_floating_point():  # a gate made in the model's first dtype
            gate = gate.to(x.dtype)  # keeps a float16 activation float16 (the next layer expects it)
        return x * gate.view(_broadcast_shape(x.dim(), self.dim, -1))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, dim={self.dim}, on={int(self.gate.count_nonzero())}"


class ConstantZero(nn.Module):
    """The edit of a ReLU/ReLU6 whose input is always OFF: it outputs 0 whatever its input
    (``torch.zeros_like``). The constant is propagated and the layers feeding it are dropped by
    ``fold_network`` (``remove_branch``), which keeps every other module path valid until then."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class AddBias(nn.Module):
    """``x + bias`` with a trainable bias of a broadcastable shape such as (1, C, 1, 1) or
    (1, 1, C): where a removed branch's per-channel constant goes when no layer before the sum
    has a bias to absorb it (e.g. an identity shortcut)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros([int(s) for s in shape]))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias

    def extra_repr(self) -> str:
        return f"shape={tuple(self.bias.shape)}"


class AddConstant(nn.Module):
    """``x + value`` with a fixed buffer recorded at one input resolution: a removed branch
    whose constant output varies over positions (zero padding makes border values differ). The
    network then only accepts inputs of that resolution."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros([int(s) for s in shape]))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.value

    def extra_repr(self) -> str:
        return f"shape={tuple(self.value.shape)}"


class Constant(nn.Module):
    """An input-independent tensor, materialised: returns ``value`` (recorded with batch size 1)
    expanded to the batch size of ``ref`` (the network's input)."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros([int(s) for s in shape]))

    def forward(self, ref: Tensor) -> Tensor:
        return self.value.expand(ref.shape[0], *self.value.shape[1:])

    def extra_repr(self) -> str:
        return f"shape={tuple(self.value.shape)}"
