"""Temporal attention on [B, T, C, H, W]: ST-CNNT "T" attention (docs/KERNELS.md K2, docs/MODELS.md 2.6).

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
place, splits the long head dims over programs and reduces the T x T partials in a fixed order, T <= 64; the
backward reuses the forward's T x T scores and row stats, so q and k are read once per pass). Dropout on the Triton
backend regenerates its keep mask from a seed drawn from torch's CPU generator (kernels/_attention_dropout.py);
the mask of a seed is ``dropout_keep_mask(seed, [B, n_head, T, T], p)`` and the reference replays a given
mask through ``dropout_mask``.
"""

from __future__ import annotations

import dataclasses

import torch

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, OpCall, public, triton_available, triton_device_ok
from fm_engine.ops.window_attention import FAST_DTYPES, attend, check_flags, check_qkv, default_scale, score_form


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


@dataclasses.dataclass(frozen=True)
class TemporalAttentionCall(OpCall):
    """A validated :func:`temporal_attention` call and what it resolves to: the head dims, the softmax scale
    (``scale`` or its default) and the score form (one of fm_engine.ops.window_attention.SCORES)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    n_head: int
    scale: float | None
    cosine: bool
    normalize_qk: bool
    causal: bool
    dropout_p: float
    d_qk: int
    d_v: int
    softmax_scale: float
    score: str


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
) -> TemporalAttentionCall:
    check_qkv(q, k, v)
    d_qk, d_v = head_dims(q, v, n_head)
    check_flags(scale, cosine, normalize_qk, dropout_p, d_qk)
    s = default_scale(d_qk, cosine) if scale is None else scale
    return TemporalAttentionCall(
        q, k, v, n_head, scale, cosine, normalize_qk, causal, dropout_p, d_qk, d_v, s, score_form(cosine, normalize_qk)
    )


def _bucket(call: TemporalAttentionCall) -> tuple[dict, dict]:
    cosine = call.cosine
    flags = {
        "dtype": call.q.dtype,
        "causal": bool(call.causal),
        "cosine": cosine,
        "normalize_qk": bool(call.normalize_qk) and not cosine,
        "dropout": float(call.dropout_p) > 0,
    }
    v = call.v
    return flags, {"B": v.shape[0], "T": v.shape[1], "heads": call.n_head, "D_qk": call.d_qk, "D_v": call.d_v}


TEMPORAL_ATTENTION = Op("temporal_attention", temporal_attention_reference, _validate, bucket=_bucket)


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
#
# kernels/temporal_attention.py: the head dims split over programs in every pass, partial T x T results reduced
# in a fixed order. The forward returns, beside o, the normalised scores Sn [B*H, BT, BT] and per-frame stats
# [B*H, 4, BT] (fp32, a few KB per head), so backward never re-reads q and k to rebuild the attention; and the
# dropout seed (torch's CPU generator, no device sync) as a CPU tensor.


def _score_code(score: str) -> int:
    """The kernels' code of a score form (lazy: the kernels import triton)."""
    from fm_engine.kernels.temporal_attention import SCORE_COSINE, SCORE_DOT, SCORE_STANDARDIZE

    return {"dot": SCORE_DOT, "cosine": SCORE_COSINE, "standardize": SCORE_STANDARDIZE}[score]


@torch.library.custom_op("fm_engine::temporal_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_head: int,
    score: str,
    causal: bool,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import temporal_attention as K  # lazy: kernels import triton
    from fm_engine.kernels._attention_dropout import draw_seed

    seed = draw_seed() if dropout_p > 0 else 0
    code = _score_code(score)
    o, sn, st = K.forward(q, k, v, n_head, score=code, causal=causal, scale=scale, dropout_p=dropout_p, seed=seed)
    return o, sn, st, torch.tensor([seed], dtype=torch.int64)


@_fwd.register_fake
def _(q, k, v, n_head, score, causal, scale, dropout_p):
    bt = max(16, 1 << max(0, (v.shape[1] - 1).bit_length()))
    bh = v.shape[0] * n_head
    f32 = torch.float32
    return (
        torch.empty_like(v, memory_format=torch.contiguous_format),
        v.new_empty(bh, bt, bt, dtype=f32),
        v.new_empty(bh, 4, bt, dtype=f32),
        torch.empty(1, dtype=torch.int64),
    )


@torch.library.custom_op("fm_engine::temporal_attention_bwd", mutates_args=())
def _bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sn: torch.Tensor,
    st: torch.Tensor,
    seed: torch.Tensor,
    n_head: int,
    score: str,
    causal: bool,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import temporal_attention as K

    return K.backward(
        do, q, k, v, sn, st, n_head, score=_score_code(score), causal=causal, scale=scale, dropout_p=dropout_p,
        seed=int(seed.item()),
    )  # fmt: skip


@_bwd.register_fake
def _(do, q, k, v, sn, st, seed, n_head, score, causal, scale, dropout_p):
    c = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=c),
        torch.empty_like(k, memory_format=c),
        torch.empty_like(v, memory_format=c),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, n_head, score, causal, scale, dropout_p = inputs
    _, sn, st, seed = output
    ctx.save_for_backward(q, k, v, sn, st, seed)
    ctx.args = (n_head, score, causal, scale, dropout_p)


def _backward(ctx, do, _dsn, _dst, _dseed):
    q, k, v, sn, st, seed = ctx.saved_tensors
    dq, dk, dv = _bwd(do.contiguous(), q, k, v, sn, st, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton_temporal(call: TemporalAttentionCall) -> torch.Tensor:
    return _fwd(
        call.q.contiguous(), call.k.contiguous(), call.v.contiguous(), call.n_head, call.score, bool(call.causal),
        float(call.softmax_scale), float(call.dropout_p),
    )[0]  # fmt: skip


MAX_TRITON_FRAMES = 64  # the T x T scores of a head live in registers (kernels/temporal_attention.py)


def _triton_temporal_supports(call: TemporalAttentionCall) -> str | None:
    q, k, v, dropout_p = call.q, call.k, call.v, call.dropout_p
    reason = triton_device_ok(q, k, v)
    if reason is not None:
        return reason
    if q.dtype not in FAST_DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float32, float16, bfloat16)"
    if v.shape[1] > MAX_TRITON_FRAMES:
        return f"{v.shape[1]} frames > {MAX_TRITON_FRAMES} (a head's T x T scores must fit registers)"
    if (reason := _checks.dropout_capture(dropout_p, q)) is not None:
        return reason
    if v[0].numel() >= 2**31 or q[0].numel() >= 2**31:
        return "more than 2**31 elements per batch item (32-bit in-item offsets)"
    return None


TEMPORAL_ATTENTION.register(
    "triton",
    _triton_temporal,
    available=triton_available,
    supports=_triton_temporal_supports,
    sources=(
        "fm_engine.kernels.temporal_attention",
        "fm_engine.kernels._aot",
        "fm_engine.kernels._attention_dropout",
        "fm_engine.kernels._autotune",
    ),
)
