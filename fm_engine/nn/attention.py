"""Grouped-query attention module (self- and cross-attention) over ``fm_engine.ops.cross_attention``."""

from __future__ import annotations

import torch
from torch import nn

from fm_engine import ops


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, not causal.

    x: [B, N, dim]; kv: [B, Nk, kv_dim] (defaults to x: self-attention) -> [B, N, dim].
    Parameters: ``q_proj`` Linear(dim, heads*head_dim), ``k_proj`` / ``v_proj`` Linear(kv_dim,
    kv_heads*head_dim), ``out_proj`` Linear(heads*head_dim, dim); bias-free unless ``bias=True``.
    ``key_padding_mask``: [B, Nk] bool, True = padding. Attention dropout acts in training only
    (**fixed**: the original applied it in eval too, including the EMA target pass).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kv_heads: int | None = None,
        kv_dim: int | None = None,
        head_dim: int = 64,
        dropout: float = 0.0,
        bias: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if heads % kv_heads:
            raise ValueError(f"heads: {heads} must be a multiple of kv_heads {kv_heads}")
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_dim, kv_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(heads * head_dim, dim, bias=bias)
        self.dropout = float(dropout)
        self.backend = backend

    def forward(
        self, x: torch.Tensor, kv: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        kv = x if kv is None else kv
        b, n, _ = x.shape
        nk = kv.shape[1]
        q = self.q_proj(x).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(kv).view(b, nk, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(kv).view(b, nk, self.kv_heads, self.head_dim).transpose(1, 2)
        o = ops.cross_attention(
            q,
            k,
            v,
            kv_heads=self.kv_heads,
            dropout_p=self.dropout if self.training else 0.0,
            key_padding_mask=key_padding_mask,
            backend=self.backend,
        )
        return self.out_proj(o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))
