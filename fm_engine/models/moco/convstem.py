"""Hybrid ConvStem ViT of the MoCo chest X-ray study (docs/MODELS.md 4).

Stem: three Conv2d 3x3 / stride 2 / padding 1 with bias and ReLU (channels in -> D/2 -> D -> D, no norm),
overall stride 8 (224 -> 28x28 = 784 tokens); learned CLS and position embedding [1, 785, D]
(trunc-normal 0.02); 12 **post-LN** encoder layers (``x = norm1(x + attn(x)); x = norm2(x + mlp(x))``,
6 heads, FFN 4D with ReLU, dropout 0.1, LN eps 1e-5), no final norm. Output: CLS -> Linear(D, 128) ->
ReLU -> Linear(128, 128) -> L2-normalised.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.models.vit import MLP, resample_pos_embed
from fm_engine.nn import Attention
from fm_engine.nn._backend_arg import refuse_backend_argument


@refuse_backend_argument
class PostLNLayer(nn.Module):
    """Post-LN encoder layer with dropout after attention and inside/after the MLP; x: [B, N, D]."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: dim {dim} must be divisible by heads {heads}")
        self.attn = Attention(dim, heads, head_dim=dim // heads, bias=True)
        self.drop = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = MLP(dim, mlp_dim, act="relu", dropout=dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x)))
        return self.norm2(x + self.mlp(x))


@refuse_backend_argument
class ConvStemViT(nn.Module):
    """images [B, in_chans, H, W] (H, W multiples of 8; other sizes than ``image_size`` resample the
    position table bicubically) ->
    ``forward``: L2-normalised embedding [B, out_dim]; ``forward_tokens``: [B, 1 + (H/8)(W/8), D]."""

    def __init__(
        self,
        image_size: int = 224,
        in_chans: int = 3,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        out_dim: int = 128,
    ) -> None:
        super().__init__()
        if image_size % 8 or dim % 2:
            raise ValueError(f"image_size: {image_size} must be a multiple of 8 (and dim {dim} even)")
        self.image_size, self.dim, self.patch = image_size, dim, 8
        self.grid = (image_size // 8, image_size // 8)
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, dim // 2, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim // 2, dim, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, stride=2, padding=1),
            nn.ReLU(inplace=True),
        )
        n = self.grid[0] * self.grid[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + n, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(PostLNLayer(dim, heads, mlp_ratio * dim, dropout) for _ in range(depth))
        self.head = nn.Sequential(nn.Linear(dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != self.stem[0].in_channels:
            raise ValueError(f"images: expected [B, {self.stem[0].in_channels}, H, W], got {tuple(images.shape)}")
        x = self.stem(images)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        pos = resample_pos_embed(self.pos_embed, self.grid, grid)  # identity at the native size
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        for layer in self.layers:
            x = layer(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.forward_tokens(images)[:, 0]), dim=1)
