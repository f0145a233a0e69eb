"""Triton kernels of ST-CNNT temporal attention (fm_engine/ops/temporal_attention.py holds the semantics).

Per (batch b, head h) the attention is T x T (T <= 64) over head vectors that are long contiguous slices of
a frame: row t of Q_h is q[b, t].flatten()[h * D_qk : (h + 1) * D_qk] (D_qk = C*Hq*Wq / n_head, thousands),
likewise K_h, and V_h with D_v. One program per (b, h) would walk megabytes alone while B * n_head programs
leave SMs idle (B 4 x 32 heads = 128 programs for 132 SMs at T 64), so every pass splits the head dim over
programs and reduces the small T x T partials in a fixed order, without atomics:

  forward   ``_scores_kernel``   grid (D_qk splits, B*H): partial QK^T [T, T] and per-row partial sums of q, k
                                 and their squares over its D_qk range -> fp32 partial buffers
            ``_pv_kernel``       grid (D_v splits, B*H): sums the partials in split order, forms the normalised
                                 scores Sn, P = softmax(scale * Sn) (causal mask), dropout, o[:, range] = P V[:, range];
                                 split 0 also saves Sn and the per-row stats (means, reciprocal norms) for backward
  backward  ``_bwd_v_kernel``    grid (D_v splits, B*H): P from the saved Sn; dV[:, range] = P_d^T dO[:, range] and
                                 a partial dA = dO[:, range] V[:, range]^T
            ``_bwd_qk_kernel``   grid (D_qk splits, B*H): sums the dA partials, dS = P (dA - rowsum(P dA)) scale, and
                                 dq, dk over its D_qk range through the score form

Each of q, k, v, o, dO, dq, dk, dv is read or written once (q, k are never re-read in backward: the T x T scores
and the row stats saved by the forward are B*H*(T^2 + 4T) floats). Standardised scores need the row means
before the centred products; the partial sums are taken about a shift (the mean of the row's first chunk, which
every split computes alike) so that the one-pass variance Σ(x-a)² - D·m² keeps its precision when the mean is
large against the spread. fp16 / bf16 multiply on tensor cores with fp32 accumulation (P, dS and the normalised
rows are rounded to the input dtype for the products, as FlashAttention does); fp32 uses ieee dots.

Dropout: the keep mask of kernels/_attention_dropout.py for attention rows (b * n_head + h) * T + query.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot, _autotune
from fm_engine.kernels._attention_dropout import dropout_keep_mask, dropout_scale, keep4

from fm_engine import _alloc
from fm_engine._env import interpreting as _interpreting  # a module global: the kernel report patches it

SCORE_DOT, SCORE_COSINE, SCORE_STANDARDIZE = 0, 1, 2
MAX_T = 64
N_STATS = 4  # per-row stats saved for backward: mean_q, mean_k, rq, rk (partials: sum q, sum k, sum q², sum k²)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _rows(ptr, base, frame, h, D, d0, offs_t, T, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_T, BLOCK_D] tile of head h's rows (frames) at head elements d0.., as fp32, with its mask."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    m = (offs_t[:, None] < T) & (offs_d[None, :] < D)
    x = tl.load(ptr + base + offs_t[:, None] * frame + h * D + offs_d[None, :], mask=m, other=0.0)
    return x, m


@triton.jit
def _shift(ptr, base, frame, h, D, offs_t, T, SCORE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per-row shift of the standardised form: the mean of the row's first chunk (0 for the other forms)."""
    if SCORE == 2:
        x, _ = _rows(ptr, base, frame, h, D, 0, offs_t, T, BLOCK_T, BLOCK_D)
        return tl.sum(x.to(tl.float32), 1) / tl.minimum(D, BLOCK_D)
    else:
        return tl.zeros([BLOCK_T], tl.float32)


@triton.jit
def _scores_kernel(
    q_ptr,
    k_ptr,
    sp_ptr,
    stp_ptr,
    T,
    frame_qk,
    n_head,
    D,
    CHUNKS_PER_SPLIT,
    SCORE: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """sp [S, B*H, BLOCK_T, BLOCK_T] = Σ over this split's d of (q - a)(k - b)^T; stp [S, B*H, 4, BLOCK_T] =
    Σ (q - a), Σ (k - b), Σ (q - a)², Σ (k - b)² (a, b: :func:`_shift`)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_head
    h = pid_bh % n_head
    base = b * T * frame_qk
    offs_t = tl.arange(0, BLOCK_T)
    sa = _shift(q_ptr, base, frame_qk, h, D, offs_t, T, SCORE, BLOCK_T, BLOCK_D)
    sb = _shift(k_ptr, base, frame_qk, h, D, offs_t, T, SCORE, BLOCK_T, BLOCK_D)
    s = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    sq = tl.zeros([BLOCK_T], tl.float32)
    sk = tl.zeros([BLOCK_T], tl.float32)
    ssq = tl.zeros([BLOCK_T], tl.float32)
    ssk = tl.zeros([BLOCK_T], tl.float32)
    d_lo = pid_s * CHUNKS_PER_SPLIT * BLOCK_D
    d_hi = tl.minimum(d_lo + CHUNKS_PER_SPLIT * BLOCK_D, D)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        q, m = _rows(q_ptr, base, frame_qk, h, D, d0, offs_t, T, BLOCK_T, BLOCK_D)
        k, _ = _rows(k_ptr, base, frame_qk, h, D, d0, offs_t, T, BLOCK_T, BLOCK_D)
        if SCORE == 2:
            qc = tl.where(m, q.to(tl.float32) - sa[:, None], 0.0)
            kc = tl.where(m, k.to(tl.float32) - sb[:, None], 0.0)
            sq += tl.sum(qc, 1)
            sk += tl.sum(kc, 1)
            s += _dot(qc, tl.trans(kc), True)  # centred fp32 values: ieee (the shift is not a bf16 number)
        else:
            qc = q.to(tl.float32)
            kc = k.to(tl.float32)
            s += _dot(q, tl.trans(k), IEEE)
        if SCORE != 0:
            ssq += tl.sum(qc * qc, 1)
            ssk += tl.sum(kc * kc, 1)
    part = pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh
    tl.store(sp_ptr + (part * BLOCK_T + offs_t[:, None]) * BLOCK_T + offs_t[None, :], s)
    st = stp_ptr + part * 4 * BLOCK_T + offs_t
    tl.store(st, sq)
    tl.store(st + BLOCK_T, sk)
    tl.store(st + 2 * BLOCK_T, ssq)
    tl.store(st + 3 * BLOCK_T, ssk)


@triton.jit
def _probs(sn, T, scale, offs_t, CAUSAL: tl.constexpr):
    """P = softmax(scale * Sn) over the valid (and, causal, earlier) frames."""
    valid = (offs_t[None, :] < T) & (offs_t[:, None] >= 0)
    if CAUSAL:
        valid = valid & (offs_t[None, :] <= offs_t[:, None])
    logits = tl.where(valid, sn * scale, float("-inf"))
    p = tl.exp(logits - tl.max(logits, 1)[:, None])
    return p / tl.sum(p, 1)[:, None]


@triton.jit
def _dropout_mult(seed, pid_bh, T, offs_t, p, BLOCK_T: tl.constexpr):
    rows = pid_bh * T + offs_t
    ctr = rows[:, None] * ((T + 3) // 4) + tl.arange(0, BLOCK_T // 4)[None, :]
    return dropout_scale(keep4(seed, ctr, p), 1.0 / (1.0 - p))


@triton.jit
def _pv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    sp_ptr,
    stp_ptr,
    sn_ptr,
    st_ptr,
    T,
    frame_qk,
    frame_v,
    n_head,
    D_QK,
    D_V,
    N_QK_SPLITS,
    CHUNKS_PER_SPLIT,
    scale,
    eps,
    seed,
    p_drop,
    SCORE: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """o[:, this split's D_v range] = dropout(softmax(scale * Sn)) V; split 0 saves Sn [B*H, BLOCK_T, BLOCK_T]
    and the row stats st [B*H, 4, BLOCK_T] = mean_q, mean_k, rq, rk."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_head
    h = pid_bh % n_head
    offs_t = tl.arange(0, BLOCK_T)
    bh = tl.num_programs(1)
    s = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    sq = tl.zeros([BLOCK_T], tl.float32)
    sk = tl.zeros([BLOCK_T], tl.float32)
    ssq = tl.zeros([BLOCK_T], tl.float32)
    ssk = tl.zeros([BLOCK_T], tl.float32)
    for i in range(0, N_QK_SPLITS):  # in split order: the same sums in every program and every run
        part = i * bh + pid_bh
        s += tl.load(sp_ptr + (part * BLOCK_T + offs_t[:, None]) * BLOCK_T + offs_t[None, :])
        stp = stp_ptr + part * 4 * BLOCK_T + offs_t
        sq += tl.load(stp)
        sk += tl.load(stp + BLOCK_T)
        ssq += tl.load(stp + 2 * BLOCK_T)
        ssk += tl.load(stp + 3 * BLOCK_T)
    base_qk = b * T * frame_qk
    mean_q = tl.zeros([BLOCK_T], tl.float32)
    mean_k = tl.zeros([BLOCK_T], tl.float32)
    if SCORE == 1:
        rq = 1.0 / tl.maximum(tl.sqrt(ssq), 1e-12)  # F.normalize: x / max(|x|, 1e-12)
        rk = 1.0 / tl.maximum(tl.sqrt(ssk), 1e-12)
        sn = s * rq[:, None] * rk[None, :]
    elif SCORE == 2:
        # shifted sums: x - a summed to sq; the centred product and the unbiased variance follow exactly
        mq = sq / D_QK
        mk = sk / D_QK
        rq = 1.0 / tl.sqrt(tl.maximum(ssq - D_QK * mq * mq, 0.0) / (D_QK - 1) + eps)
        rk = 1.0 / tl.sqrt(tl.maximum(ssk - D_QK * mk * mk, 0.0) / (D_QK - 1) + eps)
        sn = (s - D_QK * mq[:, None] * mk[None, :]) * rq[:, None] * rk[None, :]
        mean_q = _shift(q_ptr, base_qk, frame_qk, h, D_QK, offs_t, T, SCORE, BLOCK_T, BLOCK_D) + mq
        mean_k = _shift(k_ptr, base_qk, frame_qk, h, D_QK, offs_t, T, SCORE, BLOCK_T, BLOCK_D) + mk
    else:
        rq = tl.full([BLOCK_T], 1.0, tl.float32)
        rk = tl.full([BLOCK_T], 1.0, tl.float32)
        sn = s
    if pid_s == 0:
        tl.store(sn_ptr + (pid_bh * BLOCK_T + offs_t[:, None]) * BLOCK_T + offs_t[None, :], sn)
        st = st_ptr + pid_bh * 4 * BLOCK_T + offs_t
        tl.store(st, mean_q)
        tl.store(st + BLOCK_T, mean_k)
        tl.store(st + 2 * BLOCK_T, rq)
        tl.store(st + 3 * BLOCK_T, rk)
    p = _probs(sn, T, scale, offs_t, CAUSAL)
    if DROPOUT:
        p = p * _dropout_mult(seed, pid_bh, T, offs_t, p_drop, BLOCK_T)
    base_v = b * T * frame_v
    d_lo = pid_s * CHUNKS_PER_SPLIT * BLOCK_D
    d_hi = tl.minimum(d_lo + CHUNKS_PER_SPLIT * BLOCK_D, D_V)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        v, m = _rows(v_ptr, base_v, frame_v, h, D_V, d0, offs_t, T, BLOCK_T, BLOCK_D)
        o = _dot(p.to(v.dtype), v, IEEE)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(
            o_ptr + base_v + offs_t[:, None] * frame_v + h * D_V + offs_d[None, :], o.to(o_ptr.dtype.element_ty), mask=m
        )


@triton.jit
def _bwd_v_kernel(
    v_ptr,
    do_ptr,
    dv_ptr,
    sn_ptr,
    dap_ptr,
    T,
    frame_v,
    n_head,
    D_V,
    CHUNKS_PER_SPLIT,
    scale,
    seed,
    p_drop,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dv[:, range] = P_d^T dO[:, range]; dap [S, B*H, BLOCK_T, BLOCK_T] = dO[:, range] V[:, range]^T."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_head
    h = pid_bh % n_head
    offs_t = tl.arange(0, BLOCK_T)
    sn = tl.load(sn_ptr + (pid_bh * BLOCK_T + offs_t[:, None]) * BLOCK_T + offs_t[None, :])
    p = _probs(sn, T, scale, offs_t, CAUSAL)
    if DROPOUT:
        p = p * _dropout_mult(seed, pid_bh, T, offs_t, p_drop, BLOCK_T)
    base = b * T * frame_v
    da = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    d_lo = pid_s * CHUNKS_PER_SPLIT * BLOCK_D
    d_hi = tl.minimum(d_lo + CHUNKS_PER_SPLIT * BLOCK_D, D_V)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        v, m = _rows(v_ptr, base, frame_v, h, D_V, d0, offs_t, T, BLOCK_T, BLOCK_D)
        do, _ = _rows(do_ptr, base, frame_v, h, D_V, d0, offs_t, T, BLOCK_T, BLOCK_D)
        da += _dot(do, tl.trans(v), IEEE)
        dv = _dot(tl.trans(p.to(do.dtype)), do, IEEE)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(
            dv_ptr + base + offs_t[:, None] * frame_v + h * D_V + offs_d[None, :],
            dv.to(dv_ptr.dtype.element_ty),
            mask=m,
        )
    part = pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh
    tl.store(dap_ptr + (part * BLOCK_T + offs_t[:, None]) * BLOCK_T + offs_t[None, :], da)


@triton.jit
def _bwd_qk_kernel(
    q_ptr,
    k_ptr,
    dq_ptr,
    dk_ptr,
    sn_ptr,
    st_ptr,
    dap_ptr,
    T,
    frame_qk,
    n_head,
    D_QK,
    N_V_SPLITS,
    CHUNKS_PER_SPLIT,
    scale,
    seed,
    p_drop,
    SCORE: tl.constexpr,
    CAUSAL: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """dq, dk over this split's D_qk range, from dA (the dap partials summed in split order)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // n_head
    h = pid_bh % n_head
    offs_t = tl.arange(0, BLOCK_T)
    bh = tl.num_programs(1)
    sn = tl.load(sn_ptr + (pid_bh * BLOCK_T + offs_t[:, None]) * BLOCK_T + offs_t[None, :])
    st = st_ptr + pid_bh * 4 * BLOCK_T + offs_t
    mean_q = tl.load(st)
    mean_k = tl.load(st + BLOCK_T)
    rq = tl.load(st + 2 * BLOCK_T)
    rk = tl.load(st + 3 * BLOCK_T)
    p = _probs(sn, T, scale, offs_t, CAUSAL)
    da = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    for i in range(0, N_V_SPLITS):
        da += tl.load(dap_ptr + ((i * bh + pid_bh) * BLOCK_T + offs_t[:, None]) * BLOCK_T + offs_t[None, :])
    if DROPOUT:
        da = da * _dropout_mult(seed, pid_bh, T, offs_t, p_drop, BLOCK_T)
    # softmax backward on the full rows, scale folded in; then through the score form: with qh the normalised
    # q rows and g = dS kh, dq = rq (g - qh r) where r = Σ_j dS Sn (cosine; 0 for a zero row) or that / (D - 1)
    # (standardised; the mean(g) term vanishes because every centred kh sums to 0)
    ds = p * (da - tl.sum(p * da, 1)[:, None]) * scale
    if SCORE == 1:
        r_q = tl.where(rq < 1e12, tl.sum(ds * sn, 1), 0.0)
        r_k = tl.where(rk < 1e12, tl.sum(ds * sn, 0), 0.0)
    elif SCORE == 2:
        r_q = tl.sum(ds * sn, 1) / (D_QK - 1)
        r_k = tl.sum(ds * sn, 0) / (D_QK - 1)
    base = b * T * frame_qk
    d_lo = pid_s * CHUNKS_PER_SPLIT * BLOCK_D
    d_hi = tl.minimum(d_lo + CHUNKS_PER_SPLIT * BLOCK_D, D_QK)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        q, m = _rows(q_ptr, base, frame_qk, h, D_QK, d0, offs_t, T, BLOCK_T, BLOCK_D)
        k, _ = _rows(k_ptr, base, frame_qk, h, D_QK, d0, offs_t, T, BLOCK_T, BLOCK_D)
        if SCORE == 0:
            gq = _dot(ds.to(k.dtype), k, IEEE)
            gk = _dot(tl.trans(ds).to(q.dtype), q, IEEE)
        else:
            qh = tl.where(m, (q.to(tl.float32) - mean_q[:, None]) * rq[:, None], 0.0)
            kh = tl.where(m, (k.to(tl.float32) - mean_k[:, None]) * rk[:, None], 0.0)
            gq = _dot(ds.to(q.dtype), kh.to(q.dtype), IEEE)
            gk = _dot(tl.trans(ds).to(q.dtype), qh.to(q.dtype), IEEE)
            gq = (gq - qh * r_q[:, None]) * rq[:, None]
            gk = (gk - kh * r_k[:, None]) * rk[:, None]
        off = base + offs_t[:, None] * frame_qk + h * D_QK + (d0 + tl.arange(0, BLOCK_D))[None, :]
        tl.store(dq_ptr + off, gq.to(dq_ptr.dtype.element_ty), mask=m)
        tl.store(dk_ptr + off, gk.to(dk_ptr.dtype.element_ty), mask=m)


# --- launch configurations ----------------------------------------------------------------------------------
#
# Candidate configs per direction (forward: the scores and P·V kernels; backward: the dV and dq / dk kernels), the
# first the default, for sm_90 / sm_80, and the interpreter's. A launch takes its bucket's winner from FWD_TUNER /
# BWD_TUNER (kernels/_autotune.py: LaunchTuner, timing each candidate once per bucket on the user's GPU). Every
# candidate compiles without spilling registers in both kernels of its direction for every score form, causal
# and dropout setting (the compile gate checks each, strictly): the table lists, per (direction, operand class,
# T tile, architecture), the first three (BLOCK_D, warps, stages) of a preference order that do, read from the
# gate's cubins (cuobjdump -res-usage), not from timings. Preference: 64-wide D chunks with 4 warps at short T
# tiles, narrower chunks over more warps at T tile 64 (the dq / dk kernel holds four [T, T] fp32 tiles: Sn, P,
# dA, dS), fp32 (ieee dots on CUDA cores) narrow chunks.
_TILES: dict[tuple[str, str, int, int], tuple[tuple[int, int, int], ...]] = {
    ("fwd", "half", 16, 80): ((64, 4, 2), (128, 8, 2), (32, 4, 2)),
    ("fwd", "half", 16, 90): ((64, 4, 3), (128, 8, 3), (32, 4, 3)),
    ("fwd", "half", 32, 80): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("fwd", "half", 32, 90): ((32, 4, 3), (64, 8, 3), (32, 8, 3)),
    ("fwd", "half", 64, 80): ((32, 16, 2), (32, 8, 2), (16, 16, 2)),
    ("fwd", "half", 64, 90): ((32, 16, 3), (32, 8, 3), (16, 16, 3)),
    ("fwd", "fp32", 16, 80): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("fwd", "fp32", 16, 90): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("fwd", "fp32", 32, 80): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("fwd", "fp32", 32, 90): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("fwd", "fp32", 64, 80): ((32, 8, 2), (16, 8, 2)),
    ("fwd", "fp32", 64, 90): ((16, 8, 2),),
    ("bwd", "half", 16, 80): ((64, 4, 2), (128, 8, 2), (32, 4, 2)),
    ("bwd", "half", 16, 90): ((64, 4, 3), (128, 8, 3), (32, 4, 3)),
    ("bwd", "half", 32, 80): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("bwd", "half", 32, 90): ((32, 4, 3), (64, 8, 3), (32, 8, 3)),
    ("bwd", "half", 64, 80): ((32, 8, 2), (16, 16, 2), (16, 8, 2)),
    ("bwd", "half", 64, 90): ((32, 16, 3), (32, 8, 3), (16, 16, 3)),
    ("bwd", "fp32", 16, 80): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("bwd", "fp32", 16, 90): ((32, 4, 2), (64, 8, 2), (32, 8, 2)),
    ("bwd", "fp32", 32, 80): ((64, 8, 2), (32, 8, 2), (16, 4, 2)),
    ("bwd", "fp32", 32, 90): ((32, 8, 2), (16, 4, 2), (16, 8, 2)),
    ("bwd", "fp32", 64, 80): ((16, 8, 2),),
    ("bwd", "fp32", 64, 90): ((16, 8, 2),),
}

INTERPRETER_CONFIG = {"BLOCK_D": 16, "num_warps": 4, "num_stages": 1}


def configs(kind: str, dtype: torch.dtype, block_t: int, arch: int) -> list[dict[str, int]]:
    """Candidates of a ``kind`` ("fwd" / "bwd") launch: each streams [T, BLOCK_D] chunks past [T, T] fp32 tiles."""
    key = (kind, "fp32" if dtype == torch.float32 else "half", block_t, 90 if arch >= 90 else 80)
    return [{"BLOCK_D": bd, "num_warps": w, "num_stages": st} for bd, w, st in _TILES[key]]


def candidates(kind: str, dtype: torch.dtype, block_t: int, device: torch.device | None) -> list[dict[str, int]]:
    """The configs a ``kind`` launch on ``device`` chooses from: the interpreter's one, or the architecture's list."""
    return (
        [dict(INTERPRETER_CONFIG)] if _interpreting() else configs(kind, dtype, block_t, _autotune.arch_class(device))
    )


def _bucket(q: torch.Tensor, v: torch.Tensor, n_head: int, score: int, causal: bool, dropout_p: float) -> tuple:
    """Launches in one bucket share one tuning: dtype, T tile, powers of two of B*heads and the head dims, flags."""
    B, T = v.shape[:2]
    d_qk, d_v = q[0, 0].numel() // n_head, v[0, 0].numel() // n_head
    return (_autotune.dtype(q), block_t(T), _autotune.pow2(B * n_head), _autotune.pow2(d_qk), _autotune.pow2(d_v),
            score, bool(causal), dropout_p > 0)  # fmt: skip


def block_t(T: int) -> int:
    return max(16, triton.next_power_of_2(T))  # tl.dot needs every tile dim >= 16


def splits(programs: int, d: int, block_d: int, device: torch.device) -> tuple[int, int]:
    """(splits, chunks per split) of a head dim of d: enough programs for about 4 per SM."""
    chunks = triton.cdiv(d, block_d)
    sms = _aot.sm_count(device)
    if sms is None:
        want = 3  # interpreter: exercise the reductions on every multi-chunk test
    else:
        want = triton.cdiv(4 * sms, programs)
    per = triton.cdiv(chunks, max(1, min(want, chunks)))
    return triton.cdiv(chunks, per), per


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n_head: int,
    *,
    score: int,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k: [B, T, C, Hq, Wq]; v: [B, T, C, H, W], contiguous -> (o like v, Sn [B*H, BT, BT] fp32, row stats
    [B*H, 4, BT] fp32) with BT = :func:`block_t` (T). ``config``: the launch config (default: the bucket's
    tuned one among :func:`candidates`)."""
    B, T = v.shape[:2]
    frame_qk, frame_v = q[0, 0].numel(), v[0, 0].numel()
    d_qk, d_v = frame_qk // n_head, frame_v // n_head
    bt = block_t(T)
    bh = B * n_head
    if config is None:
        config = FWD_TUNER.choose(
            q.device,
            _bucket(q, v, n_head, score, causal, dropout_p),
            candidates("fwd", q.dtype, bt, q.device),
            lambda c: forward(q, k, v, n_head, score=score, causal=causal, scale=scale, dropout_p=dropout_p,
                              seed=seed, config=c),
        )  # fmt: skip
    cfg = config
    bd = cfg["BLOCK_D"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    ieee = q.dtype == torch.float32
    o = _alloc.empty_like(v)
    sn = _alloc.empty(bh, bt, bt, dtype=torch.float32, device=q.device)
    st = _alloc.empty(bh, 4, bt, dtype=torch.float32, device=q.device)
    if bh == 0 or T == 0:
        return o, sn, st
    s_qk, per_qk = splits(bh, d_qk, bd, q.device)
    sp = _alloc.empty(s_qk, bh, bt, bt, dtype=torch.float32, device=q.device)
    stp = _alloc.empty(s_qk, bh, 4, bt, dtype=torch.float32, device=q.device)
    _scores_kernel[(s_qk, bh)](
        q, k, sp, stp, T, frame_qk, n_head, d_qk, per_qk, SCORE=score, IEEE=ieee, BLOCK_T=bt, BLOCK_D=bd, **launch
    )
    s_v, per_v = splits(bh, d_v, bd, q.device)
    _pv_kernel[(s_v, bh)](
        q, k, v, o, sp, stp, sn, st, T, frame_qk, frame_v, n_head, d_qk, d_v, s_qk, per_v, float(scale),
        float(torch.finfo(q.dtype).eps), seed, float(dropout_p),
        SCORE=score, CAUSAL=causal, DROPOUT=dropout_p > 0, IEEE=ieee, BLOCK_T=bt, BLOCK_D=bd, **launch,
    )  # fmt: skip
    return o, sn, st


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sn: torch.Tensor,
    st: torch.Tensor,
    n_head: int,
    *,
    score: int,
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for the upstream gradient do (contiguous, like v), from the forward's saved Sn and stats.
    ``config`` as for :func:`forward` (tuned on its own: the backward's best tile need not be the forward's)."""
    B, T = v.shape[:2]
    frame_qk, frame_v = q[0, 0].numel(), v[0, 0].numel()
    d_qk, d_v = frame_qk // n_head, frame_v // n_head
    bt = block_t(T)
    bh = B * n_head
    if config is None:
        config = BWD_TUNER.choose(
            q.device,
            _bucket(q, v, n_head, score, causal, dropout_p),
            candidates("bwd", q.dtype, bt, q.device),
            lambda c: backward(do, q, k, v, sn, st, n_head, score=score, causal=causal, scale=scale,
                               dropout_p=dropout_p, seed=seed, config=c),
        )  # fmt: skip
    cfg = config
    bd = cfg["BLOCK_D"]
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    ieee = q.dtype == torch.float32
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    if bh == 0 or T == 0:
        return dq, dk, dv
    flags = {"CAUSAL": causal, "DROPOUT": dropout_p > 0, "IEEE": ieee, "BLOCK_T": bt, "BLOCK_D": bd}
    s_v, per_v = splits(bh, d_v, bd, q.device)
    dap = _alloc.empty(s_v, bh, bt, bt, dtype=torch.float32, device=q.device)
    _bwd_v_kernel[(s_v, bh)](
        v, do, dv, sn, dap, T, frame_v, n_head, d_v, per_v, float(scale), seed, float(dropout_p), **flags, **launch
    )
    s_qk, per_qk = splits(bh, d_qk, bd, q.device)
    _bwd_qk_kernel[(s_qk, bh)](
        q, k, dq, dk, sn, st, dap, T, frame_qk, n_head, d_qk, s_v, per_qk, float(scale), seed, float(dropout_p),
        SCORE=score, **flags, **launch,
    )  # fmt: skip
    return dq, dk, dv


FWD_TUNER = _autotune.LaunchTuner("temporal_attention_fwd", [_scores_kernel, _pv_kernel])
BWD_TUNER = _autotune.LaunchTuner("temporal_attention_bwd", [_bwd_v_kernel, _bwd_qk_kernel])

# --- compile gate -------------------------------------------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


def _register() -> None:
    i32, f32 = "i32", "fp32"
    # Every candidate of every (dtype, T tile, architecture) with every score form, causal and dropout setting its
    # kernel has, strictly; the quick gate compiles the first of each kernel for bf16 at T tiles 16 and 64 and
    # fp32 at 64.
    scores = (SCORE_DOT, SCORE_COSINE, SCORE_STANDARDIZE)
    flags: dict[str, list[dict[str, int | bool]]] = {
        "scores": [{"SCORE": sc} for sc in scores],
        "pv": [{"SCORE": sc, "CAUSAL": ca, "DROPOUT": dr} for sc in scores for ca in (False, True) for dr in (False, True)],
        "bwd_v": [{"CAUSAL": ca, "DROPOUT": dr} for ca in (False, True) for dr in (False, True)],
        "bwd_qk": [{"SCORE": sc, "CAUSAL": ca, "DROPOUT": dr} for sc in scores for ca in (False, True) for dr in (False, True)],
    }  # fmt: skip
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = _PTR[dtype]
        sigs = {
            "scores": {"q_ptr": t, "k_ptr": t, "sp_ptr": "*fp32", "stp_ptr": "*fp32",
                       **dict.fromkeys(("T", "frame_qk", "n_head", "D", "CHUNKS_PER_SPLIT"), i32)},
            "pv": {**dict.fromkeys(("q_ptr", "k_ptr", "v_ptr", "o_ptr"), t),
                   **dict.fromkeys(("sp_ptr", "stp_ptr", "sn_ptr", "st_ptr"), "*fp32"),
                   **dict.fromkeys(("T", "frame_qk", "frame_v", "n_head", "D_QK", "D_V", "N_QK_SPLITS",
                                    "CHUNKS_PER_SPLIT", "seed"), i32),
                   "scale": f32, "eps": f32, "p_drop": f32},
            "bwd_v": {"v_ptr": t, "do_ptr": t, "dv_ptr": t, "sn_ptr": "*fp32", "dap_ptr": "*fp32",
                      **dict.fromkeys(("T", "frame_v", "n_head", "D_V", "CHUNKS_PER_SPLIT", "seed"), i32),
                      "scale": f32, "p_drop": f32},
            "bwd_qk": {**dict.fromkeys(("q_ptr", "k_ptr", "dq_ptr", "dk_ptr"), t),
                       **dict.fromkeys(("sn_ptr", "st_ptr", "dap_ptr"), "*fp32"),
                       **dict.fromkeys(("T", "frame_qk", "n_head", "D_QK", "N_V_SPLITS", "CHUNKS_PER_SPLIT", "seed"), i32),
                       "scale": f32, "p_drop": f32},
        }  # fmt: skip
        kernels = {"scores": _scores_kernel, "pv": _pv_kernel, "bwd_v": _bwd_v_kernel, "bwd_qk": _bwd_qk_kernel}
        for bt in (16, 32, 64):
            rep = (dtype == torch.bfloat16 and bt in (16, 64)) or (dtype == torch.float32 and bt == 64)
            for arch in (80, 90):
                for name, fn in kernels.items():
                    kind = "fwd" if name in ("scores", "pv") else "bwd"
                    common: dict[str, int | bool] = {"IEEE": dtype == torch.float32, "BLOCK_T": bt}
                    _aot.register(
                        fn,
                        signatures=[sigs[name]],
                        configs=[{**common, **c, **f} for c in configs(kind, dtype, bt, arch) for f in flags[name]],
                        name=f"temporal_{name}",
                        archs=(arch,),
                        strict=True,
                        representative=rep,
                    )


_register()

__all__ = ["MAX_T", "backward", "dropout_keep_mask", "forward"]
