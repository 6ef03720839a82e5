"""pyengine.graph stats: depth, layer counts, parameters, MACs (hand-computed) and latency."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pyengine.graph import count_macs, fold_network, measure_latency, network_depth, network_stats
from pyengine.models import build_model, count_flops

pytestmark = pytest.mark.usefixtures("one_thread")


class _TwoPaths(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)
        self.c = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.b(self.a(x)) + self.c(x)
        return self.fc(y.mean((2, 3)))


def test_stats_hand_computed():
    m = _TwoPaths()
    x = torch.randn(2, 3, 8, 8)
    s = network_stats(m, x)
    assert s["depth"] == 3  # a -> b -> fc (c is on the shorter path)
    assert (s["conv_layers"], s["linear_layers"]) == (3, 1)
    assert s["params"] == (4 * 3 * 9 + 4) + (16 + 4) + (12 + 4) + (20 + 5)
    # per sample: 64 positions x weights for each conv, 20 for the linear
    assert s["macs"] == 64 * (4 * 3 * 9) + 64 * 16 + 64 * 12 + 20
    m.b.weight.data[0].zero_()
    assert network_stats(m, x)["nonzero_params"] == s["params"] - 4


def test_macs_agree_with_the_hook_counter_and_see_swin_attention():
    r = build_model("resnet18", 10, width=8).eval()
    x = torch.randn(2, 3, 16, 16)
    assert count_macs(r, x) == count_flops(r, (3, 16, 16))
    swin = build_model("swin_t", 10, image_size=16, embed_dim=8, depths=(1, 1),
                       num_heads=(1, 2), window_size=4, patch_size=2).eval()
    # the flop counter also counts the attention products (QK^T, AV) the hooks leave out
    assert count_macs(swin, x) > count_flops(swin, (3, 16, 16))


def test_folded_resnet_is_smaller_and_shallower():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=8).eval()
    for b in model.layer3:
        b.conv1.weight.data.zero_()
        b.conv2.weight.data.zero_()
    x = torch.randn(2, 3, 8, 8)
    folded, _, _ = fold_network(model, x)
    dense, small = network_stats(model, x), network_stats(folded, x)
    # both bodies (2 convs each) leave the longest path; layer3.0's 1x1 shortcut joins it
    assert (dense["depth"], small["depth"]) == (18, 18 - 4 + 1)
    assert small["conv_layers"] == dense["conv_layers"] - 4
    assert small["params"] < dense["params"] and small["macs"] < dense["macs"]
    assert network_depth(folded) == small["depth"]


def test_measure_latency_is_a_positive_median():
    m = _TwoPaths()
    t = measure_latency(m, torch.randn(2, 3, 8, 8), "cpu", warmup=1, min_run_time=0.05)
    assert isinstance(t, float) and 0 < t < 1000
    assert m.training  # the mode is restored


def test_macs_count_the_attention_products_of_the_cpu_kernel():
    # FlopCounterMode has no formula for scaled_dot_product_attention's CPU kernel: the ViT's
    # QK^T and AV counted 0 on the CPU (and not on CUDA), against the docstring's "every attention product"
    class Attention(nn.Module):
        def forward(self, q):
            return nn.functional.scaled_dot_product_attention(q, q, q)

    q = torch.randn(2, 4, 9, 8)  # (batch, heads, tokens, head dim)
    assert count_macs(Attention(), q) == 2 * 4 * 9 * 9 * 8  # QK^T and AV, per sample
    vit = build_model("vit", 10, image_size=8, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32).eval()
    x = torch.randn(2, 3, 8, 8)
    tokens = (8 // 4) ** 2 + 1
    assert count_macs(vit, x) == count_flops(vit, (3, 8, 8)) + 2 * 2 * tokens * tokens * 16


def test_macs_of_torch_attention_modules_in_eval_mode():
    # in eval mode without gradients nn.MultiheadAttention and nn.TransformerEncoderLayer run
    # fused inference kernels that FlopCounterMode does not count: their MACs came out as 0
    tokens, d, ff = 5, 16, 32
    attention = 2 * tokens * tokens * d  # QK^T and AV
    mha = nn.MultiheadAttention(d, 2, batch_first=True)

    class Self(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    x = torch.randn(2, tokens, d)
    assert count_macs(Self(), x) == tokens * d * 3 * d + attention + tokens * d * d
    enc = nn.TransformerEncoderLayer(d, 2, ff, dropout=0.0, batch_first=True).eval()
    for p in enc.parameters():  # frozen weights too
        p.requires_grad_(False)
    assert count_macs(enc, x) == tokens * d * 3 * d + attention + tokens * d * d + 2 * tokens * d * ff
    assert not enc.training and all(not p.requires_grad for p in enc.parameters())


def test_depth_counts_the_input_projection_of_multihead_attention():
    # kept whole by the tracer, nn.MultiheadAttention counted only its out_proj (a Linear); its
    # input projection is a bare parameter: q/k/v projection -> attention -> out_proj is 2 deep
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))

    assert network_depth(Block()) == 3
    enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    assert network_depth(nn.Sequential(enc, nn.Linear(8, 2))) == 5  # in_proj, out_proj, linear1, linear2, head
