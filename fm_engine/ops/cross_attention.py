"""Grouped-query attention with Nq != Nk, not causal: the AViT pooled cross-attention (KERNELS.md K4).

``cross_attention(q, k, v, *, kv_heads, scale=None, dropout_p=0.0, key_padding_mask=None)``
q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hkv == kv_heads and Hq a multiple of Hkv (query head h
uses KV head h // (Hq // Hkv)); key_padding_mask: [B, Nk] bool, True = padding (ignored key).
Returns [B, Hq, Nq, D]. Self-attention is the case k, v computed from the same tokens as q.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, public


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    group = q.shape[1] // kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]  # SDPA: True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> None:
    for n, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(n, t)
        _checks.floating(n, t)
        _checks.ndim(n, t, 4, "[B, heads, tokens, head_dim]")
    _checks.same_device(q=q, k=k, v=v)
    _checks.same_dtype(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} must equal k's shape {tuple(k.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"k: batch {k.shape[0]} differs from q's batch {q.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"k: head_dim {k.shape[-1]} differs from q's head_dim {q.shape[-1]}")
    if not isinstance(kv_heads, int) or kv_heads < 1 or k.shape[1] != kv_heads:
        raise ValueError(f"kv_heads: {kv_heads} does not match k's head count {k.shape[1]}")
    if q.shape[1] % kv_heads:
        raise ValueError(f"kv_heads: query heads {q.shape[1]} must be a multiple of kv_heads {kv_heads}")
    _checks.probability("dropout_p", dropout_p)
    if key_padding_mask is not None:
        _checks.tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask: expected a bool tensor of shape {(k.shape[0], k.shape[2])}, "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


CROSS_ATTENTION = Op("cross_attention", cross_attention_reference, _validate, preference=("triton",))


def cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Grouped-query attention. q: [B, Hq, Nq, D]; k, v: [B, kv_heads, Nk, D] -> [B, Hq, Nq, D]."""
    return CROSS_ATTENTION(
        q, k, v, kv_heads=kv_heads, scale=scale, dropout_p=dropout_p, key_padding_mask=key_padding_mask, backend=backend
    )


public(CROSS_ATTENTION, cross_attention)
