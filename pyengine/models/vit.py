"""A small Vision Transformer for CIFAR-sized images, every layer a module.

Defaults follow the sparse-double-descent ViT (methods.md section 6): patch 4, dim 512, depth 6,
8 heads, MLP 512. Patches are embedded by a Linear layer on flattened patches (so that "prune
Linear layers only" covers the embedding), a class token is prepended, learned position
embeddings are added, then pre-norm blocks:

    x = x + attn.proj(attention(attn.qkv(norm1(x))))
    x = x + mlp.fc2(mlp.drop(mlp.act(mlp.fc1(norm2(x)))))

Each block's GELU is its own module (``blocks.i.mlp.act``), fed by ``blocks.i.mlp.fc1``. The
attention is written with Linear modules and ``scaled_dot_product_attention`` rather than
``nn.MultiheadAttention``, whose projection weights are bare parameters, not Linear modules.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Attention", "Mlp", "Block", "VisionTransformer", "vit"]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool = False,
                 attn_dropout: float = 0.0, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            qkv[0], qkv[1], qkv[2], dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.drop(self.proj(out))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0,
                 attn_dropout: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
                 patch_size: int = 4, dim: int = 512, depth: int = 6, heads: int = 8,
                 mlp_dim: int = 512, dropout: float = 0.0, emb_dropout: float = 0.0,
                 attn_dropout: float = 0.0, qkv_bias: bool = False) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        num_patches = (image_size // patch_size) ** 2
        self.patchify = nn.Unfold(kernel_size=patch_size, stride=patch_size)
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.emb_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.Sequential(*[
            Block(dim, heads, mlp_dim, dropout, attn_dropout, qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(self.patchify(x).transpose(1, 2))  # (B, N, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.blocks(self.emb_drop(x))
        return self.head(self.norm(x)[:, 0])


def vit(num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
        **opts) -> VisionTransformer:
    return VisionTransformer(num_classes, in_channels, image_size, **opts)
