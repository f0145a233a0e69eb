"""MiT-UB transformer layers (docs/MODELS.md 1.3): pre-norm encoder and decoder layers, LayerScale, 3-D stem.

All matrix work goes through ``fm_engine.nn`` (``Attention`` -> op ``cross_attention``, ``ReLU2MLP`` -> op
``relu2_mlp``), so one model runs on the reference or a fast backend with the same weights. The encoder
layer, LayerScale and ``grid_positions`` live in ``fm_engine.nn`` (the M-JEPA objective builds its
predictor from them) and are re-exported here under the same names.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.nn import Attention, ReLU2MLP
from fm_engine.nn._backend_arg import refuse_backend_argument
from fm_engine.nn.tokens import grid_positions
from fm_engine.nn.transformer import EncoderLayer, LayerScale
from fm_engine.ops import conv_ieee

__all__ = ["DecoderLayer", "EncoderLayer", "LayerScale", "PatchEmbed3d", "grid_positions"]


@refuse_backend_argument
class DecoderLayer(nn.Module):
    """AViT decoder layer: self-attention, cross-attention to high-resolution tokens, MLP.

    ``x = x + ls1 * selfattn(norm1(x)); x = x + ls2 * crossattn(norm2(x), kv); x = x + ls3 * mlp(norm3(x))``.
    x: [B, N, dim]; kv: [B, Nk, kv_dim] (already normalised by the stem, so not normalised here);
    ``kv_padding_mask``: [B, Nk] bool, True = padding (never attended by the cross-attention) ->
    [B, N, dim]. Each LayerScale starts at ``layer_scale`` (1e-5), so a fresh layer is almost the identity.
    """

    def __init__(
        self,
        dim: int,
        kv_dim: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layer_scale: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.self_attn = Attention(dim, heads, kv_heads, head_dim=head_dim, dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.cross_attn = Attention(dim, heads, kv_heads, kv_dim=kv_dim, head_dim=head_dim, dropout=attn_dropout)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = ReLU2MLP(dim, mlp_ratio * dim, dropout=dropout)
        self.ls1 = LayerScale(dim, layer_scale)
        self.ls2 = LayerScale(dim, layer_scale)
        self.ls3 = LayerScale(dim, layer_scale)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, kv_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.self_attn(self.norm1(x)))
        x = x + self.ls2(self.cross_attn(self.norm2(x), kv, key_padding_mask=kv_padding_mask))
        return x + self.ls3(self.mlp(self.norm3(x)))


class PatchEmbed3d(nn.Module):
    """Volume stem: ``Conv3d(in_ch, dim, patch, stride=patch, bias=False)`` -> LayerNorm -> + position.

    image [B, C, D, H, W] (raw integers or floats) -> tokens [B, Dt*Ht*Wt, dim] in (d, h, w) order with
    d outermost; position = ``pos`` Linear(3, dim) on [-1, 1] coordinates of the same (d, h, w) grid
    (**fixed**: the original flattened tokens as (h, w, d) against a (d, h, w) position grid). Like the
    2-D stem, everything runs in fp32 (fp64 for fp64 parameters) whatever autocast says, and the
    output is cast to the autocast dtype (or ``out_dtype``). This stem has no fused op: eager only.
    """

    def __init__(self, in_ch: int, dim: int, patch: int | tuple[int, int, int]) -> None:
        super().__init__()
        self.patch = (patch,) * 3 if isinstance(patch, int) else cast(tuple[int, int, int], tuple(patch))
        self.proj = nn.Conv3d(in_ch, dim, self.patch, stride=self.patch, bias=False)
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Linear(3, dim)

    def grid(self, d: int, h: int, w: int) -> tuple[int, int, int]:
        """Token grid (Dt, Ht, Wt) for a D x H x W volume."""
        return (d // self.patch[0], h // self.patch[1], w // self.patch[2])

    def forward(
        self,
        image: torch.Tensor,
        intensity_scale: float = 1.0,
        intensity_offset: float = 0.0,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        if image.dim() != 5:
            raise ValueError(f"image: expected a 5-D tensor [B, C, D, H, W], got shape {tuple(image.shape)}")
        if any(s % p for s, p in zip(image.shape[2:], self.patch, strict=True)):
            raise ValueError(f"image: size {tuple(image.shape[2:])} is not divisible by patch {self.patch}")
        w = self.proj.weight
        cdt = torch.promote_types(w.dtype, torch.float32)
        dev = image.device.type
        odt = out_dtype or (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else w.dtype)
        # TF32 would round 16-bit pixel values: keep the convolution in ieee fp32 (conv_ieee)
        with torch.autocast(dev, enabled=False):
            x = image.to(cdt) * intensity_scale + intensity_offset
            feat = conv_ieee(x, w.to(cdt), None, self.patch)
            grid = tuple(feat.shape[2:])
            tokens = feat.flatten(2).transpose(1, 2)
            tokens = F.layer_norm(tokens, tokens.shape[-1:], self.norm.weight.to(cdt), self.norm.bias.to(cdt))
            coords = grid_positions(grid, image.device, cdt)
            tokens = tokens + F.linear(coords, self.pos.weight.to(cdt), self.pos.bias.to(cdt))
        return tokens.to(odt)
