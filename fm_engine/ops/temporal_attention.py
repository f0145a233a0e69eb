"""Temporal attention on [B, T, C, H, W]: ST-CNNT "T" attention (KERNELS.md K2, MODELS.md 2.6).

``temporal_attention(q, k, v, *, n_head, scale=None, cosine=False, normalize_qk=False, causal=False,
dropout_p=0.0)`` -> o: [B, T, C, H, W].

q, k: [B, T, C, Hq, Wq] (smaller than v when the Q/K conv is strided, stride_t 2 by default);
v: [B, T, C, H, W]. Each frame is flattened in (C, H, W) order, C outermost, and split into n_head
contiguous chunks, so a head is a group of C / n_head whole channel maps when n_head divides C
(otherwise a chunk may start inside a channel map; it only has to divide C*H*W). Per head:
D_qk = C*Hq*Wq / n_head, D_v = C*H*W / n_head, and the attention is T x T per (b, head):

    scores = scale * q . k  (plain, scale defaults to 1/sqrt(D_qk)), or the cosine / normalize_qk forms of
             fm_engine.ops.window_attention (same definitions over the D_qk-long head vectors);
    causal: frame i attends to frames j <= i only;
    o = dropout(softmax(scores)) @ v.

Backends: reference (eager), triton (kernels/temporal_attention.py: reads the [B, T, C, H, W] tensors in
place, loops over the long head dims in chunks, backward recomputes the T x T matrix). Dropout on the Triton
backend regenerates its keep mask from a seed drawn from torch's CPU generator (kernels/_attention_dropout.py);
the mask of a seed is ``dropout_keep_mask(seed, [B, n_head, T, T], p)`` and the reference replays a given
mask through ``dropout_mask``.
"""

from __future__ import annotations

import torch

from fm_engine.ops._dispatch import Op, public, triton_available
from fm_engine.ops.window_attention import (
    attend,
    check_flags,
    check_qkv,
    default_scale,
    triton_attention,
    triton_common_supports,
)


def head_dims(q: torch.Tensor, v: torch.Tensor, n_head: int) -> tuple[int, int]:
    """(D_qk, D_v) per head; ValueError when n_head does not split the frames into whole chunks."""
    if not isinstance(n_head, int) or isinstance(n_head, bool) or n_head < 1:
        raise ValueError(f"n_head: expected a positive int, got {n_head!r}")
    C, Hq, Wq = q.shape[2:]
    H, W = v.shape[3:]
    if (C * Hq * Wq) % n_head or (C * H * W) % n_head:
        raise ValueError(
            f"n_head: {n_head} heads do not divide the frame sizes C*Hq*Wq = {C}*{Hq}*{Wq} = {C * Hq * Wq} (q, k) "
            f"and C*H*W = {C}*{H}*{W} = {C * H * W} (v) into whole head dims"
        )
    return C * Hq * Wq // n_head, C * H * W // n_head


def temporal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_head: int,
    scale: float | None = None,
    cosine: bool = False,
    normalize_qk: bool = False,
    causal: bool = False,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager reference. ``dropout_mask``: [B, n_head, T, T] bool keep mask to apply instead of a fresh draw
    (tests replay the Triton backend's mask; the public op never passes it)."""
    B, T = v.shape[:2]
    d_qk, _ = head_dims(q, v, n_head)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(B, T, n_head, -1).transpose(1, 2)  # B heads T D

    s = default_scale(d_qk, cosine) if scale is None else scale
    o = attend(
        heads(q),
        heads(k),
        heads(v),
        scale=s,
        cosine=cosine,
        normalize_qk=normalize_qk,
        causal=causal,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
    )
    return o.transpose(1, 2).reshape(v.shape)


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_head: int,
    scale: float | None = None,
    cosine: bool = False,
    normalize_qk: bool = False,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> None:
    check_qkv(q, k, v)
    d_qk, _ = head_dims(q, v, n_head)
    check_flags(scale, cosine, normalize_qk, dropout_p, d_qk)


TEMPORAL_ATTENTION = Op("temporal_attention", temporal_attention_reference, _validate, preference=("triton",))


def temporal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_head: int,
    scale: float | None = None,
    cosine: bool = False,
    normalize_qk: bool = False,
    causal: bool = False,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """T x T attention per (batch, head). q, k: [B, T, C, Hq, Wq]; v: [B, T, C, H, W] -> [B, T, C, H, W].

    See the module docstring for the head split and the score forms. ``dropout_p`` is applied as given.
    """
    return TEMPORAL_ATTENTION(
        q,
        k,
        v,
        n_head=n_head,
        scale=scale,
        cosine=cosine,
        normalize_qk=normalize_qk,
        causal=causal,
        dropout_p=dropout_p,
        backend=backend,
    )


public(TEMPORAL_ATTENTION, temporal_attention)


# --- Triton backend ---------------------------------------------------------------------------------


def _triton_temporal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    n_head: int,
    scale: float | None = None,
    cosine: bool = False,
    normalize_qk: bool = False,
    causal: bool = False,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    B, T, C, H, W = v.shape
    d_qk, d_v = head_dims(q, v, n_head)
    s = default_scale(d_qk, cosine) if scale is None else scale
    # temporal layout for the shared kernels: one group per batch item, the frames are the tokens
    geo = [T, C, q.shape[3], q.shape[4], H, W, T, 1, 1, 1, 1, 1, 1, 1, 1, n_head, d_qk, d_v, B * n_head]
    return triton_attention(
        q, k, v, None, geo, mode="temporal", cosine=cosine, normalize_qk=normalize_qk, causal=causal, scale=s,
        dropout_p=dropout_p,
    )  # fmt: skip


def _triton_temporal_supports(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0, **_: object
) -> str | None:
    return triton_common_supports([q, k, v], dropout_p, v.shape[1], v[0].numel())


TEMPORAL_ATTENTION.register("triton", _triton_temporal, available=triton_available, supports=_triton_temporal_supports)
