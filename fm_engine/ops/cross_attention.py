"""Grouped-query attention with Nq != Nk, not causal: the AViT pooled cross-attention (docs/KERNELS.md K4).

``cross_attention(q, k, v, *, kv_heads, scale=None, dropout_p=0.0, key_padding_mask=None)``
q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D] with Hkv == kv_heads and Hq a multiple of Hkv (query head h
uses KV head h // (Hq // Hkv)); key_padding_mask: [B, Nk] bool, True = padding (ignored key).
Returns [B, Hq, Nq, D]. Self-attention is the case k, v computed from the same tokens as q.

Backends: reference (SDPA on repeated KV heads) and triton (kernels/cross_attention.py: key-split
forward with an exact log-sum-exp merge; a backward in two passes, dK / dV over key blocks and dQ over
query blocks with key-split fp32 partials merged in a fixed order, so gradients are deterministic).
The Triton backend takes fp16 / bf16 (tensor-core dots, fp32 accumulation) and fp32 (ieee dots),
head dims 16, 32, 64, 128, and key_padding_mask (padding keys get score -inf before the softmax and
dK = dV = 0; a query whose keys are all padding gets output 0 and zero gradients, as the reference's
SDPA gives). Attention dropout runs inside the kernels: the keep mask is regenerated from a seed drawn
from torch's CPU generator (kernels/_attention_dropout.py), never stored, so it differs from SDPA's draw;
the mask of a seed is ``dropout_keep_mask(seed, [B, Hq, Nq, Nk], p)`` and the reference replays a given
mask through ``dropout_mask``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, OpCall, public, triton_available, triton_device_ok

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_HEAD_DIMS = (16, 32, 64, 128)


def cross_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager reference (SDPA). ``dropout_mask``: [B, Hq, Nq, Nk] bool keep mask to apply instead of SDPA's
    own draw (tests replay the Triton backend's mask; the public op never passes it)."""
    group = q.shape[1] // kv_heads
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]  # SDPA: True = attend
    if dropout_mask is None or dropout_p == 0.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    s = q.shape[-1] ** -0.5 if scale is None else scale
    att = (q @ k.transpose(-2, -1)) * s
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if mask is not None:
        att = att.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # all keys padding: 0, as SDPA gives
    return (att * dropout_mask / (1.0 - dropout_p)) @ v


@dataclasses.dataclass(frozen=True)
class CrossAttentionCall(OpCall):
    """A validated :func:`cross_attention` call."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_heads: int
    scale: float | None
    dropout_p: float
    key_padding_mask: torch.Tensor | None


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_heads: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> CrossAttentionCall:
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
    return CrossAttentionCall(q, k, v, kv_heads, scale, dropout_p, key_padding_mask)


def _bucket(call: CrossAttentionCall) -> tuple[dict, dict]:
    q, k = call.q, call.k
    flags = {
        "dtype": q.dtype,
        "head_dim": q.shape[-1],
        "group": q.shape[1] // call.kv_heads,
        "mask": call.key_padding_mask is not None,
        "dropout": call.dropout_p > 0,
    }
    return flags, {"B": q.shape[0], "Hq": q.shape[1], "Nq": q.shape[2], "Nk": k.shape[2]}


CROSS_ATTENTION = Op("cross_attention", cross_attention_reference, _validate, bucket=_bucket)


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


# --- Triton backend ------------------------------------------------------------------------------


@torch.library.custom_op("fm_engine::cross_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    kv_heads: int,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the dropout seed comes from torch's CPU generator (torch.manual_seed makes it reproducible; no device
    # sync) and is returned as a CPU tensor, which backward reads to regenerate the same mask
    from fm_engine.kernels import cross_attention as K
    from fm_engine.kernels._attention_dropout import draw_seed

    seed = draw_seed() if dropout_p > 0 else 0
    o, lse = K.forward(q, k, v, kv_heads, scale, key_padding_mask, dropout_p=dropout_p, seed=seed)
    return o, lse, torch.tensor([seed], dtype=torch.int64)


@_fwd.register_fake
def _(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    kv_heads: int,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("fm_engine::cross_attention_bwd", mutates_args=())
def _bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    kv_heads: int,
    scale: float,
    seed: torch.Tensor,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import cross_attention as K

    return K.backward(
        do, q, k, v, o, lse, kv_heads, scale, key_padding_mask, dropout_p=dropout_p, seed=int(seed.item())
    )


@_bwd.register_fake
def _(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    kv_heads: int,
    scale: float,
    seed: torch.Tensor,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, key_padding_mask, kv_heads, scale, dropout_p = inputs
    o, lse, seed = output
    ctx.save_for_backward(q, k, v, o, lse, key_padding_mask, seed)
    ctx.kv_heads, ctx.scale, ctx.dropout_p = kv_heads, scale, dropout_p


def _backward(ctx: Any, do: torch.Tensor, _dlse: torch.Tensor, _dseed: torch.Tensor) -> tuple:
    q, k, v, o, lse, key_padding_mask, seed = ctx.saved_tensors
    dq, dk, dv = _bwd(do, q, k, v, o, lse, key_padding_mask, ctx.kv_heads, ctx.scale, seed, ctx.dropout_p)
    return dq, dk, dv, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton_supports(call: CrossAttentionCall) -> str | None:
    q, k, v, key_padding_mask, dropout_p = call.q, call.k, call.v, call.key_padding_mask, call.dropout_p
    reason = triton_device_ok(q, k, v)
    if reason:
        return reason
    if q.dtype not in _TRITON_DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float16, bfloat16, float32)"
    if q.shape[-1] not in _TRITON_HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the Triton kernels take {_TRITON_HEAD_DIMS})"
    if (reason := _checks.dropout_capture(dropout_p, q)) is not None:
        return reason
    if key_padding_mask is not None and key_padding_mask.device != q.device:
        return f"key_padding_mask on {key_padding_mask.device}, q on {q.device} (the kernels read it on q's device)"
    if k.shape[2] == 0 or q.shape[2] == 0 or q.shape[0] == 0:
        return "an empty batch, query or key sequence"
    return None


def _triton_cross_attention(call: CrossAttentionCall) -> torch.Tensor:
    q = call.q
    s = float(q.shape[-1] ** -0.5 if call.scale is None else call.scale)
    return _fwd(q, call.k, call.v, call.key_padding_mask, call.kv_heads, s, float(call.dropout_p))[0]


CROSS_ATTENTION.register(
    "triton",
    _triton_cross_attention,
    available=triton_available,
    supports=_triton_supports,
    sources=(
        "fm_engine.kernels.cross_attention",
        "fm_engine.kernels._aot",
        "fm_engine.kernels._attention_dropout",
        "fm_engine.kernels._autotune",
    ),
)
