"""Pre-norm transformer encoder layer and LayerScale (docs/MODELS.md 1.3).

All matrix work goes through ``fm_engine.nn`` (``Attention`` -> op ``cross_attention``, ``ReLU2MLP`` -> op
``relu2_mlp``), so one layer runs on the reference or a fast backend with the same weights. The MiT-UB
backbones (``fm_engine.models.mitub``) and the M-JEPA predictor (``fm_engine.ssl.mjepa``) are built from
these layers; ``fm_engine.models.mitub.layers`` re-exports them under the same names.
"""

from __future__ import annotations

import torch
from torch import nn

from fm_engine.nn._backend_arg import refuse_backend_argument
from fm_engine.nn.attention import Attention
from fm_engine.nn.mlp import ReLU2MLP


class LayerScale(nn.Module):
    """Per-channel scale ``gamma * x``; x: [..., dim]. ``gamma`` starts at ``init`` (1e-5 in the AViT)."""

    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


@refuse_backend_argument
class EncoderLayer(nn.Module):
    """Pre-norm encoder layer: ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``.

    x: [B, N, dim] -> [B, N, dim]. Attention: ``heads`` query heads of ``head_dim``, ``kv_heads`` KV
    heads (GQA), no biases; MLP: ReLU² with hidden ``mlp_ratio * dim``, hidden dropout ``dropout``,
    no biases. Attention dropout ``attn_dropout`` acts in training only (**fixed**: the original also
    applied it in eval mode, including the EMA target pass). ``key_padding_mask``: [B, N] bool,
    True = padding (those tokens are never attended to).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        head_dim: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads, kv_heads, head_dim=head_dim, dropout=attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = ReLU2MLP(dim, mlp_ratio * dim, dropout=dropout)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), key_padding_mask=key_padding_mask))
        return x + self.ls2(self.mlp(self.norm2(x)))
