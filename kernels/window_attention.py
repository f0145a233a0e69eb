"""Triton kernels of ST-CNNT local and global attention on [B, T, C, H, W] (fm_engine/ops/window_attention.py
holds the semantics and dispatch; temporal attention has its own kernels in kernels/temporal_attention.py).

Three kernel families. Groups of more than 64 tokens run the long kernels (section "long groups": blocked,
online softmax, head dims up to 256). Otherwise the channel-plane kernels (``plane_fwd_kernel`` /
``plane_bwd_kernel``, section "tiny heads") run whenever every head is a group of whole channels at one pixel
of the patch (hc divides C; the MRI production config has hc = 4) and q, k are not strided: they read channel
planes as [rows, pixels along W] tiles and score every head of a block of groups at once. The general kernels
run everything else (strided q / k, heads that straddle pixels, heads of whole pixels such as the parser
default's hc = 256), one forward and one backward kernel for both layouts, chosen by the constexpr MODE:

  MODE 0 local     program = (frame, window, head block),         tokens = the nPh x nPw patches of the window
  MODE 1 global    program = (frame, patch position, head block), tokens = that patch in each of the nWh x nWw windows

A program gathers its q, k, v tiles straight from the contiguous [B, T, C, H, W] tensors: token n of
the group sits at a token offset, element e of head h at an element offset, address = base + token
offset + element offset (``_tok_off`` / ``_el_off``), so no partition / permute copy exists anywhere. The
whole N x N score matrix of a group lives in registers (N <= 64); head dims are looped over in chunks of
BLOCK_D. A head made of whole pixels is walked pixel-fastest (``_el_off``), so its loads are runs of
contiguous pixels, not channel elements H*W apart; such heads are split over programs when the groups alone
leave SMs idle.

Forward:  S = scale * score(q, k) (plain, cosine, or standardised q/k), P = softmax(S),
          A = P + bias (post-softmax bias), o = dropout(A) @ v.
Backward: recomputes S and P from q, k (nothing N x N is stored), then
          dA = dO @ v^T, dv = A^T @ dO, dbias += dA (fp32 atomics over the groups sharing a head),
          dS = P * (dA - rowsum(P * dA)), and dq, dk from dS through the score form.

The general kernels' products use ``tl.dot`` on fp32 tiles with ieee precision: tiles are padded to 16
(masked lanes read nothing), and the op is memory-bound (N/2 FLOP per byte at most), so exact fp32
arithmetic costs no time that matters while meeting the fp32 parity rule. Softmax statistics and all
accumulation are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot, _autotune
from fm_engine.kernels._attention_dropout import dropout_scale, keep4, keep_at

from fm_engine import _alloc

MODE_LOCAL, MODE_GLOBAL = 0, 1
SCORE_DOT, SCORE_COSINE, SCORE_STANDARDIZE = 0, 1, 2
MAX_BLOCK_D = 64  # head-dim chunk: a 64 x 64 fp32 tile is 16 KiB of registers across the program
AOT_HELPERS = {"_scores", "_plane_scores"}  # jit helpers that take pointers (compiled inside the kernels)


@triton.jit
def _tok_off(n, g, MODE: tl.constexpr, C, Hx, Wx, nWw, nPh, nPw, phx, pwx):
    """Offset of token n's first element inside its frame."""
    if MODE == 0:
        row = (g // nWw) * nPh + n // nPw  # patch row in the frame's patch grid
        col = (g % nWw) * nPw + n % nPw
    else:
        row = (n // nWw) * nPh + g // nPw
        col = (n % nWw) * nPw + g % nPw
    return row * phx * Wx + col * pwx


@triton.jit
def _el_off(h, d, D, RUN, MODE: tl.constexpr, C, Hx, Wx, pwx):
    """Offset of element d of head h (head dim D) inside its token, a vector in (ph, pw, C) order, C fastest.

    Windows with heads of whole pixels (RUN = D / C > 0 pixels per head) enumerate a head's elements pixel
    fastest: element d is channel d // RUN of pixel h * RUN + d % RUN, so neighbouring elements are
    neighbouring pixels along W (contiguous bytes) instead of channel planes H*W apart. A score or an output
    element does not depend on the order its head's elements are summed or visited in."""
    run = tl.maximum(RUN, 1)
    f = h * D + d
    c = tl.where(RUN > 0, d // run, f % C)
    r = tl.where(RUN > 0, h * run + d % run, f // C)
    return c * (Hx * Wx) + (r // pwx) * Wx + r % pwx


@triton.jit
def _scores(
    q_ptr,
    k_ptr,
    base,
    g,
    h,
    offs_n,
    mask_n,
    C,
    Hq,
    Wq,
    nWw,
    nPh,
    nPw,
    phq,
    pwq,
    D,
    RUN,
    scale,
    eps,
    MODE: tl.constexpr,
    SCORE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Recompute one group's probabilities P [BLOCK_N, BLOCK_N] and what backward needs of the score form:
    the unscaled normalised scores Sn and the per-token reciprocal norms / means of q and k."""
    tok = _tok_off(offs_n, g, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq)
    offs_d = tl.arange(0, BLOCK_D)
    mean_q = tl.zeros([BLOCK_N], dtype=tl.float32)
    mean_k = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SCORE == 2:
        # two passes over the head dim: centring first keeps the variance free of cancellation
        for d0 in range(0, D, BLOCK_D):
            md = d0 + offs_d < D
            off = base + tok[:, None] + _el_off(h, d0 + offs_d, D, RUN, MODE, C, Hq, Wq, pwq)[None, :]
            m2 = mask_n[:, None] & md[None, :]
            mean_q += tl.sum(tl.load(q_ptr + off, mask=m2, other=0.0).to(tl.float32), 1)
            mean_k += tl.sum(tl.load(k_ptr + off, mask=m2, other=0.0).to(tl.float32), 1)
        mean_q = mean_q / D
        mean_k = mean_k / D
    s = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
    ss_q = tl.zeros([BLOCK_N], dtype=tl.float32)
    ss_k = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        md = d0 + offs_d < D
        off = base + tok[:, None] + _el_off(h, d0 + offs_d, D, RUN, MODE, C, Hq, Wq, pwq)[None, :]
        m2 = mask_n[:, None] & md[None, :]
        qt = tl.load(q_ptr + off, mask=m2, other=0.0).to(tl.float32)
        kt = tl.load(k_ptr + off, mask=m2, other=0.0).to(tl.float32)
        if SCORE == 2:
            qt = tl.where(m2, qt - mean_q[:, None], 0.0)
            kt = tl.where(m2, kt - mean_k[:, None], 0.0)
        if SCORE != 0:
            ss_q += tl.sum(qt * qt, 1)
            ss_k += tl.sum(kt * kt, 1)
        s += tl.dot(qt, tl.trans(kt), input_precision="ieee")
    if SCORE == 1:
        rq = 1.0 / tl.maximum(tl.sqrt(ss_q), 1e-12)  # F.normalize: x / max(|x|, 1e-12)
        rk = 1.0 / tl.maximum(tl.sqrt(ss_k), 1e-12)
    elif SCORE == 2:
        rq = 1.0 / tl.sqrt(ss_q / (D - 1) + eps)  # unbiased variance, eps of the input dtype
        rk = 1.0 / tl.sqrt(ss_k / (D - 1) + eps)
    else:
        rq = tl.full([BLOCK_N], 1.0, tl.float32)
        rk = tl.full([BLOCK_N], 1.0, tl.float32)
    sn = s * rq[:, None] * rk[None, :]
    valid = mask_n[None, :] & (offs_n[:, None] >= 0)
    logits = tl.where(valid, sn * scale, float("-inf"))
    mx = tl.max(logits, 1)
    p = tl.exp(logits - mx[:, None])
    p = p / tl.sum(p, 1)[:, None]
    return p, sn, rq, rk, mean_q, mean_k, ss_q, ss_k


@triton.jit
def _program(pid, n_head_blocks, n_groups):
    """(group, head block, frame b*T + t) of this program; head blocks are fastest. Attention rows are numbered
    ((frame * n_groups + group) * n_head + head) * N + query for the dropout counters."""
    h = pid % n_head_blocks
    r = pid // n_head_blocks
    return r % n_groups, h, (r // n_groups).to(tl.int64)


@triton.jit
def _dropout_mult(seed, item, g, h, offs_n, n_groups, n_head, N, p, inv_keep, BLOCK_N: tl.constexpr):
    """[BLOCK_N, BLOCK_N] dropout multiplier (1/(1-p) kept, 0 dropped) of one group and head."""
    rows = ((item * n_groups + g) * n_head + h) * N + offs_n
    ctr = rows[:, None] * ((N + 3) // 4) + tl.arange(0, BLOCK_N // 4)[None, :]
    return dropout_scale(keep4(seed, ctr, p), inv_keep)


@triton.jit
def stcnnt_attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    bias_ptr,
    C,
    Hq,
    Wq,
    H,
    W,
    N,
    n_groups,
    nWw,
    nPh,
    nPw,
    phq,
    pwq,
    ph,
    pw,
    n_head,
    heads_per_prog,
    D_QK,
    D_V,
    RUN_QK,
    RUN_V,
    scale,
    eps,
    seed,
    p_drop,
    MODE: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g, hb, bt = _program(tl.program_id(0), n_head // heads_per_prog, n_groups)
    item = bt
    inv_keep = 1.0 / (1.0 - p_drop)
    # the heads of one group run in one program: their elements share cache lines (a head of the
    # production shape is 4 channels of one pixel), so the group's tiles are fetched from DRAM once
    for hh in range(0, heads_per_prog):
        h = hb * heads_per_prog + hh
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        p, _, _, _, _, _, _, _ = _scores(
            q_ptr,
            k_ptr,
            bt * (C * Hq * Wq),
            g,
            h,
            offs_n,
            mask_n,
            C,
            Hq,
            Wq,
            nWw,
            nPh,
            nPw,
            phq,
            pwq,
            D_QK,
            RUN_QK,
            scale,
            eps,
            MODE,
            SCORE,
            BLOCK_N,
            BLOCK_D,
        )
        mask_nn = mask_n[:, None] & mask_n[None, :]
        if HAS_BIAS:
            b_off = h * N * N + offs_n[:, None] * N + offs_n[None, :]
            p += tl.load(bias_ptr + b_off, mask=mask_nn, other=0.0).to(tl.float32)
        if DROPOUT:  # on softmax + bias, as the reference orders them
            p = p * _dropout_mult(seed, item, g, h, offs_n, n_groups, n_head, N, p_drop, inv_keep, BLOCK_N)
        base = bt * (C * H * W)
        tok = _tok_off(offs_n, g, MODE, C, H, W, nWw, nPh, nPw, ph, pw)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D_V, BLOCK_D):
            md = d0 + offs_d < D_V
            off = base + tok[:, None] + _el_off(h, d0 + offs_d, D_V, RUN_V, MODE, C, H, W, pw)[None, :]
            m2 = mask_n[:, None] & md[None, :]
            vt = tl.load(v_ptr + off, mask=m2, other=0.0).to(tl.float32)
            o = tl.dot(p, vt, input_precision="ieee")
            tl.store(o_ptr + off, o.to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def stcnnt_attn_bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    bias_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dbias_ptr,
    C,
    Hq,
    Wq,
    H,
    W,
    N,
    n_groups,
    nWw,
    nPh,
    nPw,
    phq,
    pwq,
    ph,
    pw,
    n_head,
    heads_per_prog,
    D_QK,
    D_V,
    RUN_QK,
    RUN_V,
    scale,
    eps,
    seed,
    p_drop,
    MODE: tl.constexpr,
    SCORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    g, hb, bt = _program(tl.program_id(0), n_head // heads_per_prog, n_groups)
    item = bt
    inv_keep = 1.0 / (1.0 - p_drop)
    # the heads of one group run in one program: their elements share cache lines (a head of the
    # production shape is 4 channels of one pixel), so the group's tiles are fetched from DRAM once
    for hh in range(0, heads_per_prog):
        h = hb * heads_per_prog + hh
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        base_qk = bt * (C * Hq * Wq)
        p, sn, rq, rk, mean_q, mean_k, ss_q, ss_k = _scores(
            q_ptr,
            k_ptr,
            base_qk,
            g,
            h,
            offs_n,
            mask_n,
            C,
            Hq,
            Wq,
            nWw,
            nPh,
            nPw,
            phq,
            pwq,
            D_QK,
            RUN_QK,
            scale,
            eps,
            MODE,
            SCORE,
            BLOCK_N,
            BLOCK_D,
        )
        mask_nn = mask_n[:, None] & mask_n[None, :]
        a = p
        b_off = h * N * N + offs_n[:, None] * N + offs_n[None, :]
        if HAS_BIAS:
            a = p + tl.load(bias_ptr + b_off, mask=mask_nn, other=0.0).to(tl.float32)
        if DROPOUT:  # the forward's mask, regenerated: A_d = A * mult, dA = dA_d * mult
            mult = _dropout_mult(seed, item, g, h, offs_n, n_groups, n_head, N, p_drop, inv_keep, BLOCK_N)
            a = a * mult
        # dA = dO v^T and dv = A^T dO, one pass over v's head dim
        base_v = bt * (C * H * W)
        tok_v = _tok_off(offs_n, g, MODE, C, H, W, nWw, nPh, nPw, ph, pw)
        offs_d = tl.arange(0, BLOCK_D)
        da = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D_V, BLOCK_D):
            md = d0 + offs_d < D_V
            off = base_v + tok_v[:, None] + _el_off(h, d0 + offs_d, D_V, RUN_V, MODE, C, H, W, pw)[None, :]
            m2 = mask_n[:, None] & md[None, :]
            vt = tl.load(v_ptr + off, mask=m2, other=0.0).to(tl.float32)
            dot = tl.load(do_ptr + off, mask=m2, other=0.0).to(tl.float32)
            da += tl.dot(dot, tl.trans(vt), input_precision="ieee")
            dv = tl.dot(tl.trans(a), dot, input_precision="ieee")
            tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=m2)
        if DROPOUT:
            da = da * mult
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + b_off, da, mask=mask_nn)
        # softmax backward on the full rows; scale folded in
        ds = p * (da - tl.sum(p * da, 1)[:, None]) * scale
        # through the score form: with qh = q-hat and g = dS @ kh, dq = rq * (g - qh * r) where r = sum_m dS*Sn
        # (cosine) or r / (D - 1) (standardised); the mean(g) term of the standardisation vanishes because every
        # centred kh sums to 0.
        r_q = tl.zeros([BLOCK_N], dtype=tl.float32)
        r_k = tl.zeros([BLOCK_N], dtype=tl.float32)
        if SCORE == 1:
            r_q = tl.where(tl.sqrt(ss_q) > 1e-12, tl.sum(ds * sn, 1), 0.0)
            r_k = tl.where(tl.sqrt(ss_k) > 1e-12, tl.sum(ds * sn, 0), 0.0)
        elif SCORE == 2:
            r_q = tl.sum(ds * sn, 1) / (D_QK - 1)
            r_k = tl.sum(ds * sn, 0) / (D_QK - 1)
        tok = _tok_off(offs_n, g, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq)
        for d0 in range(0, D_QK, BLOCK_D):
            md = d0 + offs_d < D_QK
            off = base_qk + tok[:, None] + _el_off(h, d0 + offs_d, D_QK, RUN_QK, MODE, C, Hq, Wq, pwq)[None, :]
            m2 = mask_n[:, None] & md[None, :]
            qt = tl.load(q_ptr + off, mask=m2, other=0.0).to(tl.float32)
            kt = tl.load(k_ptr + off, mask=m2, other=0.0).to(tl.float32)
            if SCORE == 2:
                qt = tl.where(m2, qt - mean_q[:, None], 0.0)
                kt = tl.where(m2, kt - mean_k[:, None], 0.0)
            qh = qt * rq[:, None]
            kh = kt * rk[:, None]
            gq = tl.dot(ds, kh, input_precision="ieee")
            gk = tl.dot(tl.trans(ds), qh, input_precision="ieee")
            if SCORE != 0:
                gq = (gq - qh * r_q[:, None]) * rq[:, None]
                gk = (gk - kh * r_k[:, None]) * rk[:, None]
            tl.store(dq_ptr + off, gq.to(dq_ptr.dtype.element_ty), mask=m2)
            tl.store(dk_ptr + off, gk.to(dk_ptr.dtype.element_ty), mask=m2)


# --- long groups: more than 64 tokens ---------------------------------------------------------------------
#
# A group of N > 64 tokens (global attention on large frames, local windows of many patches) does not fit one
# program's registers as an N x N matrix. The long kernels tile it FlashAttention-style, with whole head rows
# (hc <= 256) as tiles: the forward owns BLOCK_M queries of one (frame, group, head) and walks the keys in
# blocks with an online softmax, keeping the post-softmax bias part of the output (sum_j b_ij v_j, which needs
# no rescaling) in a second accumulator; it saves the rows' log-sum-exp. The backward runs a dq kernel per query
# block (over all key blocks; it also forms delta_i = sum_j P_ij dA_ij = dO_i . (o_i - bias part_i)) and a
# dk / dv kernel per key block (over all query blocks), each recomputing the scores of its tile pairs.


@triton.jit
def _head_tile(g, h, offs_n, mask_n, D, RUN, MODE: tl.constexpr, C, Hx, Wx, nWw, nPh, nPw, phx, pwx,
               DP: tl.constexpr):  # fmt: skip
    """Offsets (inside the frame) and mask of the [tokens, DP] tile of head h's whole rows."""
    tok = _tok_off(offs_n, g, MODE, C, Hx, Wx, nWw, nPh, nPw, phx, pwx)
    offs_d = tl.arange(0, DP)
    return tok[:, None] + _el_off(h, offs_d, D, RUN, MODE, C, Hx, Wx, pwx)[None, :], mask_n[:, None] & (
        offs_d[None, :] < D
    )


@triton.jit
def _normalized(x, m, D, eps, SCORE: tl.constexpr):
    """Rows x [tokens, DP] (fp32, 0 where masked) -> (the rows as scored: x, x / |x| or standardised; the
    reciprocal norm, 1 for plain scores)."""
    if SCORE == 2:
        xc = tl.where(m, x - (tl.sum(x, 1) / D)[:, None], 0.0)
        r = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / (D - 1) + eps)  # unbiased variance, eps of the input dtype
        return xc * r[:, None], r
    elif SCORE == 1:
        r = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)  # F.normalize
        return x * r[:, None], r
    else:
        return x, tl.full([x.shape[0]], 1.0, tl.float32)


@triton.jit
def _long_program(pid, n_blocks, n_head, n_groups):
    """(block, head, group, frame) of a long-kernel program, blocks fastest."""
    blk = pid % n_blocks
    r = pid // n_blocks
    h = r % n_head
    r = r // n_head
    return blk, h, r % n_groups, (r // n_groups).to(tl.int64)


@triton.jit
def _long_mult(seed, rows, k0, N, p, inv_keep, BLOCK_N: tl.constexpr):
    """[rows, BLOCK_N] dropout multiplier for keys k0.. (k0 a multiple of 4) of attention rows ``rows``."""
    ctr = rows[:, None] * ((N + 3) // 4) + k0 // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
    return dropout_scale(keep4(seed, ctr, p), inv_keep)


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """a @ b with fp32 accumulation: ieee for fp32 inputs (the fp32 parity rule), else tensor cores on operands
    rounded to the input dtype (as FlashAttention rounds P). fp32 FMA dots on whole head rows replicate their
    operands across threads: in bf16 they spilled kilobytes per thread (gate cubins), tensor-core dots do not."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def long_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr, lse_ptr,
    C, Hq, Wq, H, W, N, n_groups, nWw, nPh, nPw, phq, pwq, ph, pw, n_head, D_QK, D_V, RUN_QK, RUN_V, n_blocks,
    scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQP: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = q_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    qb, h, g, bt = _long_program(tl.program_id(0), n_blocks, n_head, n_groups)
    base_qk = bt * (C * Hq * Wq)
    base_v = bt * (C * H * W)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    rows = ((bt * n_groups + g) * n_head + h) * N + offs_m
    off_q, m_q = _head_tile(g, h, offs_m, mask_m, D_QK, RUN_QK, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, DQP)
    qh, _ = _normalized(tl.load(q_ptr + base_qk + off_q, mask=m_q, other=0.0).to(tl.float32), m_q, D_QK, eps, SCORE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DVP], tl.float32)
    acc_b = tl.zeros([BLOCK_M, DVP], tl.float32)  # post-softmax bias part: sum_j b_ij v_j, never rescaled
    inv_keep = 1.0 / (1.0 - p_drop)
    for k0 in range(0, N, BLOCK_N):
        offs_n = k0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        off_k, m_k = _head_tile(g, h, offs_n, mask_n, D_QK, RUN_QK, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, DQP)
        kh, _ = _normalized(tl.load(k_ptr + base_qk + off_k, mask=m_k, other=0.0).to(tl.float32), m_k, D_QK, eps, SCORE)
        s = tl.where(mask_n[None, :], _mm(qh, tl.trans(kh), IEEE, DT) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # every row has a valid key in the first block: never -inf
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        off_v, m_v = _head_tile(g, h, offs_n, mask_n, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
        v = tl.load(v_ptr + base_v + off_v, mask=m_v, other=0.0)
        if DROPOUT:
            mult = _long_mult(seed, rows, k0, N, p_drop, inv_keep, BLOCK_N)
            p = p * mult
        acc = acc * alpha[:, None] + _mm(p, v, IEEE, DT)
        if HAS_BIAS:
            b_off = h * N * N + offs_m[:, None] * N + offs_n[None, :]
            b = tl.load(bias_ptr + b_off, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            if DROPOUT:
                b = b * mult
            acc_b += _mm(b, v, IEEE, DT)
        m_i = m_new
    off_o, m_o = _head_tile(g, h, offs_m, mask_m, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
    tl.store(o_ptr + base_v + off_o, (acc / l_i[:, None] + acc_b).to(o_ptr.dtype.element_ty), mask=m_o)
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def long_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, bias_ptr, lse_ptr, delta_ptr, dq_ptr,
    C, Hq, Wq, H, W, N, n_groups, nWw, nPh, nPw, phq, pwq, ph, pw, n_head, D_QK, D_V, RUN_QK, RUN_V, n_blocks,
    scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQP: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = q_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    qb, h, g, bt = _long_program(tl.program_id(0), n_blocks, n_head, n_groups)
    base_qk = bt * (C * Hq * Wq)
    base_v = bt * (C * H * W)
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < N
    rows = ((bt * n_groups + g) * n_head + h) * N + offs_m
    off_q, m_q = _head_tile(g, h, offs_m, mask_m, D_QK, RUN_QK, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, DQP)
    qh, rq = _normalized(tl.load(q_ptr + base_qk + off_q, mask=m_q, other=0.0).to(tl.float32), m_q, D_QK, eps, SCORE)
    off_o, m_o = _head_tile(g, h, offs_m, mask_m, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
    do = tl.load(do_ptr + base_v + off_o, mask=m_o, other=0.0)
    # delta_i = sum_j P_ij dA_ij = dO_i . o_i minus dO_i . (the bias part of o_i)
    delta = tl.sum(do.to(tl.float32) * tl.load(o_ptr + base_v + off_o, mask=m_o, other=0.0).to(tl.float32), 1)
    lse = tl.load(lse_ptr + rows, mask=mask_m, other=0.0)
    inv_keep = 1.0 / (1.0 - p_drop)
    if HAS_BIAS:
        part = tl.zeros([BLOCK_M, DVP], tl.float32)
        for k0 in range(0, N, BLOCK_N):
            offs_n = k0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            off_v, m_v = _head_tile(g, h, offs_n, mask_n, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
            v = tl.load(v_ptr + base_v + off_v, mask=m_v, other=0.0)
            b_off = h * N * N + offs_m[:, None] * N + offs_n[None, :]
            b = tl.load(bias_ptr + b_off, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            if DROPOUT:
                b = b * _long_mult(seed, rows, k0, N, p_drop, inv_keep, BLOCK_N)
            part += _mm(b, v, IEEE, DT)
        delta -= tl.sum(do.to(tl.float32) * part, 1)
    tl.store(delta_ptr + rows, delta, mask=mask_m)
    gq = tl.zeros([BLOCK_M, DQP], tl.float32)
    r_q = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, N, BLOCK_N):
        offs_n = k0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        off_k, m_k = _head_tile(g, h, offs_n, mask_n, D_QK, RUN_QK, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, DQP)
        kh, _ = _normalized(tl.load(k_ptr + base_qk + off_k, mask=m_k, other=0.0).to(tl.float32), m_k, D_QK, eps, SCORE)
        sn = _mm(qh, tl.trans(kh), IEEE, DT)
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp(sn * scale - lse[:, None]), 0.0)
        off_v, m_v = _head_tile(g, h, offs_n, mask_n, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
        da = _mm(do, tl.trans(tl.load(v_ptr + base_v + off_v, mask=m_v, other=0.0)), IEEE, DT)
        if DROPOUT:
            da = da * _long_mult(seed, rows, k0, N, p_drop, inv_keep, BLOCK_N)
        ds = p * (da - delta[:, None]) * scale
        if SCORE != 0:
            r_q += tl.sum(ds * sn, 1)
        gq += _mm(ds, kh, IEEE, DT)
    # through the score form, as in stcnnt_attn_bwd_kernel
    if SCORE == 1:
        gq = (gq - qh * tl.where(rq < 1e12, r_q, 0.0)[:, None]) * rq[:, None]
    elif SCORE == 2:
        gq = (gq - qh * (r_q / (D_QK - 1))[:, None]) * rq[:, None]
    tl.store(dq_ptr + base_qk + off_q, gq.to(dq_ptr.dtype.element_ty), mask=m_q)


@triton.jit
def long_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, bias_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dbias_ptr,
    C, Hq, Wq, H, W, N, n_groups, nWw, nPh, nPw, phq, pwq, ph, pw, n_head, D_QK, D_V, RUN_QK, RUN_V, n_blocks,
    scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DQP: tl.constexpr, DVP: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = q_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    kb, h, g, bt = _long_program(tl.program_id(0), n_blocks, n_head, n_groups)
    base_qk = bt * (C * Hq * Wq)
    base_v = bt * (C * H * W)
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    row0 = ((bt * n_groups + g) * n_head + h) * N
    off_k, m_k = _head_tile(g, h, offs_n, mask_n, D_QK, RUN_QK, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, DQP)
    kh, rk = _normalized(tl.load(k_ptr + base_qk + off_k, mask=m_k, other=0.0).to(tl.float32), m_k, D_QK, eps, SCORE)
    off_v, m_v = _head_tile(g, h, offs_n, mask_n, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
    v = tl.load(v_ptr + base_v + off_v, mask=m_v, other=0.0)
    gk = tl.zeros([BLOCK_N, DQP], tl.float32)
    dv = tl.zeros([BLOCK_N, DVP], tl.float32)
    r_k = tl.zeros([BLOCK_N], tl.float32)
    inv_keep = 1.0 / (1.0 - p_drop)
    for q0 in range(0, N, BLOCK_M):
        offs_m = q0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        off_q, m_q = _head_tile(g, h, offs_m, mask_m, D_QK, RUN_QK, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, DQP)
        qh, _ = _normalized(tl.load(q_ptr + base_qk + off_q, mask=m_q, other=0.0).to(tl.float32), m_q, D_QK, eps, SCORE)
        off_o, m_o = _head_tile(g, h, offs_m, mask_m, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
        do = tl.load(do_ptr + base_v + off_o, mask=m_o, other=0.0)
        lse = tl.load(lse_ptr + row0 + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptr + row0 + offs_m, mask=mask_m, other=0.0)
        valid = mask_n[:, None] & mask_m[None, :]
        snt = _mm(kh, tl.trans(qh), IEEE, DT)  # [keys, queries]
        pt = tl.where(valid, tl.exp(snt * scale - lse[None, :]), 0.0)
        dat = _mm(v, tl.trans(do), IEEE, DT)
        at = pt
        b_off = h * N * N + offs_m[None, :] * N + offs_n[:, None]
        if HAS_BIAS:
            at = pt + tl.load(bias_ptr + b_off, mask=valid, other=0.0).to(tl.float32)
        if DROPOUT:
            mult = tl.trans(_long_mult(seed, row0 + offs_m, kb * BLOCK_N, N, p_drop, inv_keep, BLOCK_N))
            at = at * mult
            dat = dat * mult
        dv += _mm(at, do, IEEE, DT)
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + b_off, dat, mask=valid)
        dst = pt * (dat - delta[None, :]) * scale
        if SCORE != 0:
            r_k += tl.sum(dst * snt, 1)
        gk += _mm(dst, qh, IEEE, DT)
    if SCORE == 1:
        gk = (gk - kh * tl.where(rk < 1e12, r_k, 0.0)[:, None]) * rk[:, None]
    elif SCORE == 2:
        gk = (gk - kh * (r_k / (D_QK - 1))[:, None]) * rk[:, None]
    tl.store(dk_ptr + base_qk + off_k, gk.to(dk_ptr.dtype.element_ty), mask=m_k)
    tl.store(dv_ptr + base_v + off_v, dv.to(dv_ptr.dtype.element_ty), mask=m_v)


# --- tiny heads: the channel-plane kernels ------------------------------------------------------------
#
# When every head is a group of hc whole channels at one pixel of the patch (hc divides C: head
# h = (pixel r of the patch) * C/hc + channel group) and q, k have v's patch size, a head's elements are hc
# channel planes, and the tokens of a group sit in the same rows of every plane. A program owns one channel
# group cg of one row band of a frame (local: a window row; global: a patch row) and walks that band's
# attention groups in sub-blocks: GB neighbouring groups x RYB pixel rows x RXB pixel columns of the patch.
# For each sub-block it reads every channel plane of the group as a [rows, pixels along W] tile (adjacent lanes
# read adjacent pixels; what one sub-block leaves of a 32-byte sector, the next one finds in L1), rearranges
# it in registers into [heads, tokens] (heads = (group, pixel row, pixel column) of the sub-block), and scores
# all those heads at once with FMAs, S[a, i, j] += q_c[a, i] * k_c[a, j] over the hc channels of the group:
# tensor-core tiles need head dims of 16, these heads have 1..8 elements. Tiles are padded to powers of two
# per factor and masked, so any window / patch geometry runs; [heads, tokens, tokens] must fit a register
# budget, which bounds the token count (see plane_tile).


@triton.jit
def _plane_tile(wgrp, g0, ry0, rx0, nPh, nPw, nWh, nWw, ph, pw, W,
                MODE: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr, U1P: tl.constexpr,
                U2P: tl.constexpr, RXP: tl.constexpr):  # fmt: skip
    """Offsets (within a channel plane) and validity of a [T1P*RYP rows, U1P*U2P*RXP pixels] tile.

    Rows are (t1, ry): the token row (local: patch row of the window; global: window row) and the pixel row
    ry0 + ry of the patch. Pixels are (u1, u2, rx) along W: local (window g0 + u1, patch column u2, pixel
    column rx0 + rx); global (window column u1, patch column g0 + u2, pixel column rx0 + rx).
    """
    rows = tl.arange(0, T1P * RYP)
    t1 = rows // RYP
    ry = ry0 + rows % RYP
    xs = tl.arange(0, U1P * U2P * RXP)
    u1 = xs // (U2P * RXP)
    u2 = (xs // RXP) % U2P
    rx = rx0 + xs % RXP
    if MODE == 0:
        y = (wgrp * nPh + t1) * ph + ry
        x = ((g0 + u1) * nPw + u2) * pw + rx
        ok_r = (t1 < nPh) & (ry < ph)
        ok_x = (g0 + u1 < nWw) & (u2 < nPw) & (rx < pw)
    else:
        y = (t1 * nPh + wgrp) * ph + ry
        x = (u1 * nPw + g0 + u2) * pw + rx
        ok_r = (t1 < nWh) & (ry < ph)
        ok_x = (u1 < nWw) & (g0 + u2 < nPw) & (rx < pw)
    return y[:, None] * W + x[None, :], ok_r[:, None] & ok_x[None, :]


@triton.jit
def _to_heads(x, MODE: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr, U1P: tl.constexpr,
              U2P: tl.constexpr, RXP: tl.constexpr):  # fmt: skip
    """[rows, pixels] plane tile -> [heads of the sub-block (group, ry, rx), tokens (t1, tx)]."""
    x = tl.reshape(x, [T1P, RYP, U1P, U2P, RXP])
    if MODE == 0:  # group u1, token column u2
        return tl.reshape(tl.permute(x, (2, 1, 4, 0, 3)), [U1P * RYP * RXP, T1P * U2P])
    else:  # group u2, token column u1
        return tl.reshape(tl.permute(x, (3, 1, 4, 0, 2)), [U2P * RYP * RXP, T1P * U1P])


@triton.jit
def _from_heads(x, MODE: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr, U1P: tl.constexpr,
                U2P: tl.constexpr, RXP: tl.constexpr):  # fmt: skip
    """Inverse of :func:`_to_heads`."""
    if MODE == 0:
        x = tl.reshape(x, [U1P, RYP, RXP, T1P, U2P])
        return tl.reshape(tl.permute(x, (3, 1, 0, 4, 2)), [T1P * RYP, U1P * U2P * RXP])
    else:
        x = tl.reshape(x, [U2P, RYP, RXP, T1P, U1P])
        return tl.reshape(tl.permute(x, (3, 1, 4, 0, 2)), [T1P * RYP, U1P * U2P * RXP])


@triton.jit
def _plane_load(ptr, base, off, ok, MODE: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr, U1P: tl.constexpr,
                U2P: tl.constexpr, RXP: tl.constexpr):  # fmt: skip
    x = tl.load(ptr + base + off, mask=ok, other=0.0).to(tl.float32)
    return _to_heads(x, MODE, T1P, RYP, U1P, U2P, RXP)


@triton.jit
def _plane_store(ptr, base, off, ok, x, MODE: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr,
                 U1P: tl.constexpr, U2P: tl.constexpr, RXP: tl.constexpr):  # fmt: skip
    y = _from_heads(x, MODE, T1P, RYP, U1P, U2P, RXP)
    tl.store(ptr + base + off, y.to(ptr.dtype.element_ty), mask=ok)


@triton.jit
def _plane_band(pid, C, HC, nPh, nWh, n_gouter, GBI, n_gblocks, n_rych, n_rxch, MODE: tl.constexpr):
    """This program's frame (item = b * T + t), row band, channel group, first group block and sub-block count."""
    go = pid % n_gouter
    r = pid // n_gouter
    CG = C // HC
    cg = r % CG
    r = r // CG
    if MODE == 0:
        n_band = nWh
    else:
        n_band = nPh
    band = r % n_band
    item = (r // n_band).to(tl.int64)
    gb_first = go * GBI
    n_sub = tl.minimum(GBI, n_gblocks - gb_first) * n_rych * n_rxch
    return item, band, cg, gb_first, n_sub


@triton.jit
def _plane_sub(sub, gb_first, band, cg, C, HC, nPh, nPw, nWh, nWw, ph, pw, n_rych, n_rxch,
               MODE: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr, U1P: tl.constexpr,
               U2P: tl.constexpr, RXP: tl.constexpr):  # fmt: skip
    """Sub-block ``sub`` of a band: its first group, pixel row and column, and per row a of its [heads, tokens]
    tiles the head, the attention group and validity; per token its index and validity."""
    rxch = sub % n_rxch
    r = sub // n_rxch
    rych = r % n_rych
    gblk = gb_first + r // n_rych
    if MODE == 0:
        GB: tl.constexpr = U1P
        TXP: tl.constexpr = U2P
        n_gx = nWw  # groups along W
        nt1 = nPh
        ntx = nPw
    else:
        GB: tl.constexpr = U2P  # type: ignore[no-redef]  # one constexpr per branch (Triton)
        TXP: tl.constexpr = U1P  # type: ignore[no-redef]  # one constexpr per branch (Triton)
        n_gx = nPw
        nt1 = nWh
        ntx = nWw
    g0 = gblk * GB
    ry0 = rych * RYP
    rx0 = rxch * RXP
    a = tl.arange(0, GB * RYP * RXP)
    ga = a // (RYP * RXP)
    ry = ry0 + (a // RXP) % RYP
    rx = rx0 + a % RXP
    head = (ry * pw + rx) * (C // HC) + cg
    grp = band * n_gx + g0 + ga
    a_ok = (ry < ph) & (rx < pw) & (g0 + ga < n_gx)
    n = tl.arange(0, T1P * TXP)
    t1 = n // TXP
    tx = n % TXP
    tok = t1 * ntx + tx
    n_ok = (t1 < nt1) & (tx < ntx)
    return g0, ry0, rx0, head, grp, a_ok, tok, n_ok


@triton.jit
def _plane_dropout(seed, item, grp, head, tok, n_groups, n_head, N, p, inv_keep, NP: tl.constexpr,
                   TX_EXACT: tl.constexpr):  # fmt: skip
    """[heads, NP, NP] dropout multiplier; rows ((item * n_groups + group) * n_head + head) * N + token."""
    rows = ((item * n_groups + grp[:, None]) * n_head + head[:, None]) * N + tok[None, :]
    nk4 = (N + 3) // 4
    if TX_EXACT:  # the padded token index is the token index of every valid key: one Philox draw per 4 keys
        keep = keep4(seed, rows[:, :, None] * nk4 + tl.arange(0, NP // 4)[None, None, :], p)
    else:
        keep = keep_at(seed, rows[:, :, None], tok[None, None, :].to(tl.int64), nk4, p)
    return dropout_scale(keep, inv_keep)


@triton.jit
def _plane_scores(q_ptr, k_ptr, base, off, ok, cg, HC, HW, scale, eps, n_ok,
                  SCORE: tl.constexpr, MODE: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr,
                  U1P: tl.constexpr, U2P: tl.constexpr, RXP: tl.constexpr):  # fmt: skip
    """P [heads, NP, NP] of a sub-block, the normalised unscaled scores Sn, and per (head, token) the
    reciprocal norms rq, rk, means mq, mk (standardised) and sums of squares (cosine)."""
    if MODE == 0:
        A: tl.constexpr = U1P * RYP * RXP
        NP: tl.constexpr = T1P * U2P
    else:
        A: tl.constexpr = U2P * RYP * RXP  # type: ignore[no-redef]  # one constexpr per branch (Triton)
        NP: tl.constexpr = T1P * U1P  # type: ignore[no-redef]  # one constexpr per branch (Triton)
    mq = tl.zeros([A, NP], tl.float32)
    mk = tl.zeros([A, NP], tl.float32)
    if SCORE == 2:  # centring first keeps the variance free of cancellation (two passes over the planes)
        for e in range(0, HC):
            c_off = (cg * HC + e) * HW
            mq += _plane_load(q_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP)
            mk += _plane_load(k_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP)
        mq = mq / HC
        mk = mk / HC
    s = tl.zeros([A, NP, NP], tl.float32)
    ssq = tl.zeros([A, NP], tl.float32)
    ssk = tl.zeros([A, NP], tl.float32)
    for e in range(0, HC):
        c_off = (cg * HC + e) * HW
        qc = _plane_load(q_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP) - mq
        kc = _plane_load(k_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP) - mk
        if SCORE != 0:
            ssq += qc * qc
            ssk += kc * kc
        s += qc[:, :, None] * kc[:, None, :]
    if SCORE == 1:
        rq = 1.0 / tl.maximum(tl.sqrt(ssq), 1e-12)  # F.normalize: x / max(|x|, 1e-12)
        rk = 1.0 / tl.maximum(tl.sqrt(ssk), 1e-12)
    elif SCORE == 2:
        rq = 1.0 / tl.sqrt(ssq / (HC - 1) + eps)  # unbiased variance, eps of the input dtype
        rk = 1.0 / tl.sqrt(ssk / (HC - 1) + eps)
    else:
        rq = tl.full([A, NP], 1.0, tl.float32)
        rk = tl.full([A, NP], 1.0, tl.float32)
    sn = s * rq[:, :, None] * rk[:, None, :]
    logits = tl.where(n_ok[None, None, :], sn * scale, float("-inf"))
    mx = tl.max(logits, 2)
    p = tl.exp(logits - mx[:, :, None])
    p = p / tl.sum(p, 2)[:, :, None]
    return p, sn, rq, rk, mq, mk, ssq, ssk


@triton.jit
def plane_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr,
    C, H, W, nPh, nPw, nWh, nWw, ph, pw, n_head, HC, n_groups, N, n_gouter, GBI, n_gblocks, n_rych, n_rxch,
    scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    TX_EXACT: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr, U1P: tl.constexpr, U2P: tl.constexpr,
    RXP: tl.constexpr,
):  # fmt: skip
    item, band, cg, gb_first, n_sub = _plane_band(
        tl.program_id(0), C, HC, nPh, nWh, n_gouter, GBI, n_gblocks, n_rych, n_rxch, MODE
    )
    if MODE == 0:
        NP: tl.constexpr = T1P * U2P
    else:
        NP: tl.constexpr = T1P * U1P  # type: ignore[no-redef]  # one constexpr per branch (Triton)
    HW = H * W
    base = item * C * HW
    inv_keep = 1.0 / (1.0 - p_drop)
    for sub in range(0, n_sub):
        g0, ry0, rx0, head, grp, a_ok, tok, n_ok = _plane_sub(
            sub, gb_first, band, cg, C, HC, nPh, nPw, nWh, nWw, ph, pw, n_rych, n_rxch, MODE, T1P, RYP, U1P, U2P, RXP
        )
        off, ok = _plane_tile(band, g0, ry0, rx0, nPh, nPw, nWh, nWw, ph, pw, W, MODE, T1P, RYP, U1P, U2P, RXP)
        p, _, _, _, _, _, _, _ = _plane_scores(
            q_ptr, k_ptr, base, off, ok, cg, HC, HW, scale, eps, n_ok, SCORE, MODE, T1P, RYP, U1P, U2P, RXP
        )
        if HAS_BIAS:  # added after the softmax, as the reference does
            b_off = head[:, None, None] * N * N + tok[None, :, None] * N + tok[None, None, :]
            b_ok = a_ok[:, None, None] & n_ok[None, :, None] & n_ok[None, None, :]
            p += tl.load(bias_ptr + b_off, mask=b_ok, other=0.0).to(tl.float32)
        if DROPOUT:
            p = p * _plane_dropout(seed, item, grp, head, tok, n_groups, n_head, N, p_drop, inv_keep, NP, TX_EXACT)
        for e in range(0, HC):
            c_off = (cg * HC + e) * HW
            vc = _plane_load(v_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP)
            _plane_store(o_ptr, base + c_off, off, ok, tl.sum(p * vc[:, None, :], 2), MODE, T1P, RYP, U1P, U2P, RXP)


@triton.jit
def plane_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, bias_ptr, dq_ptr, dk_ptr, dv_ptr, dbias_ptr,
    C, H, W, nPh, nPw, nWh, nWw, ph, pw, n_head, HC, n_groups, N, n_gouter, GBI, n_gblocks, n_rych, n_rxch,
    scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    TX_EXACT: tl.constexpr, T1P: tl.constexpr, RYP: tl.constexpr, U1P: tl.constexpr, U2P: tl.constexpr,
    RXP: tl.constexpr,
):  # fmt: skip
    item, band, cg, gb_first, n_sub = _plane_band(
        tl.program_id(0), C, HC, nPh, nWh, n_gouter, GBI, n_gblocks, n_rych, n_rxch, MODE
    )
    if MODE == 0:
        NP: tl.constexpr = T1P * U2P
    else:
        NP: tl.constexpr = T1P * U1P  # type: ignore[no-redef]  # one constexpr per branch (Triton)
    HW = H * W
    base = item * C * HW
    inv_keep = 1.0 / (1.0 - p_drop)
    for sub in range(0, n_sub):
        g0, ry0, rx0, head, grp, a_ok, tok, n_ok = _plane_sub(
            sub, gb_first, band, cg, C, HC, nPh, nPw, nWh, nWw, ph, pw, n_rych, n_rxch, MODE, T1P, RYP, U1P, U2P, RXP
        )
        off, ok = _plane_tile(band, g0, ry0, rx0, nPh, nPw, nWh, nWw, ph, pw, W, MODE, T1P, RYP, U1P, U2P, RXP)
        p, sn, rq, rk, mq, mk, ssq, ssk = _plane_scores(
            q_ptr, k_ptr, base, off, ok, cg, HC, HW, scale, eps, n_ok, SCORE, MODE, T1P, RYP, U1P, U2P, RXP
        )
        b_off = head[:, None, None] * N * N + tok[None, :, None] * N + tok[None, None, :]
        b_ok = a_ok[:, None, None] & n_ok[None, :, None] & n_ok[None, None, :]
        ad = p
        if HAS_BIAS:
            ad = p + tl.load(bias_ptr + b_off, mask=b_ok, other=0.0).to(tl.float32)
        if DROPOUT:  # the forward's mask, regenerated: A_d = A * mult, dA = dA_d * mult
            mult = _plane_dropout(seed, item, grp, head, tok, n_groups, n_head, N, p_drop, inv_keep, NP, TX_EXACT)
            ad = ad * mult
        # dA = dO v^T and dv = A_d^T dO, one pass over the channel group's v / dO planes
        da = tl.zeros_like(p)
        for e in range(0, HC):
            c_off = (cg * HC + e) * HW
            vc = _plane_load(v_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP)
            doc = _plane_load(do_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP)
            da += doc[:, :, None] * vc[:, None, :]
            dvc = tl.sum(ad * doc[:, :, None], 1)
            _plane_store(dv_ptr, base + c_off, off, ok, dvc, MODE, T1P, RYP, U1P, U2P, RXP)
        if DROPOUT:
            da = da * mult
        if HAS_BIAS:
            tl.atomic_add(dbias_ptr + b_off, da, mask=b_ok)
        # softmax backward on the full rows, scale folded in; then through the score form as in
        # stcnnt_attn_bwd_kernel
        ds = p * (da - tl.sum(p * da, 2)[:, :, None]) * scale
        if SCORE == 1:
            r_q = tl.where(tl.sqrt(ssq) > 1e-12, tl.sum(ds * sn, 2), 0.0)
            r_k = tl.where(tl.sqrt(ssk) > 1e-12, tl.sum(ds * sn, 1), 0.0)
        elif SCORE == 2:
            r_q = tl.sum(ds * sn, 2) / (HC - 1)
            r_k = tl.sum(ds * sn, 1) / (HC - 1)
        for e in range(0, HC):
            c_off = (cg * HC + e) * HW
            qh = (_plane_load(q_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP) - mq) * rq
            kh = (_plane_load(k_ptr, base + c_off, off, ok, MODE, T1P, RYP, U1P, U2P, RXP) - mk) * rk
            gq = tl.sum(ds * kh[:, None, :], 2)
            gk = tl.sum(ds * qh[:, :, None], 1)
            if SCORE != 0:
                gq = (gq - qh * r_q) * rq
                gk = (gk - kh * r_k) * rk
            _plane_store(dq_ptr, base + c_off, off, ok, gq, MODE, T1P, RYP, U1P, U2P, RXP)
            _plane_store(dk_ptr, base + c_off, off, ok, gk, MODE, T1P, RYP, U1P, U2P, RXP)


# --- launchers -----------------------------------------------------------------------------------


def _interpreting() -> bool:
    from fm_engine.ops._dispatch import interpreting

    return interpreting()


def _sms(device: torch.device | None) -> int:
    if device is None or device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def blocks(n_tokens: int, d_max: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the general kernels: tl.dot needs every tile dim >= 16."""
    block_n = max(16, triton.next_power_of_2(n_tokens))
    block_d = max(16, min(MAX_BLOCK_D, triton.next_power_of_2(d_max)))
    return block_n, block_d


def _warps(block_n: int) -> int:
    return 4 if block_n <= 32 else 8


def heads_per_program(geo: dict, mode: int, device: torch.device | None = None) -> int:
    """Heads one program of the general kernels walks: all of a group's heads when they interleave in memory (a
    head's elements are channels of shared pixels); heads of whole pixels are contiguous runs of their own, so
    they are split over programs until the grid holds about 8 programs per SM."""
    hpp = geo["n_head"]
    if _run(geo["D_QK"], geo["C"]) and _run(geo["D_V"], geo["C"]):
        groups = geo["programs"] // geo["n_head"]
        while hpp % 2 == 0 and groups * (geo["n_head"] // hpp) < 8 * _sms(device):
            hpp //= 2
    return hpp


def _run(d: int, c: int) -> int:
    """Pixels per head when a head is whole pixels (d a multiple of C), else 0."""
    return d // c if d % c == 0 else 0


_INTS = ("C", "Hq", "Wq", "H", "W", "N", "n_groups", "nWw", "nPh", "nPw", "phq", "pwq", "ph", "pw", "n_head")


def _launch_args(geo: dict, mode: int, hpp: int) -> list:
    """The general kernels' integer arguments, in order."""
    return [
        *(geo[k] for k in _INTS),
        hpp,
        geo["D_QK"],
        geo["D_V"],
        _run(geo["D_QK"], geo["C"]),
        _run(geo["D_V"], geo["C"]),
    ]


# Channel-plane kernels: one function per kernel with the candidate configs (the first is the default; the
# same on sm_80 and sm_90: nothing is pipelined through shared memory) and the interpreter's. GB groups, RYB
# pixel rows and RXB pixel columns of the patch form a sub-block, shrunk (GB first, then RYB, RXB) until its
# [heads, N, N] score tile holds at most ``budget`` elements; GBI group blocks per program; warps = tile
# elements / (32 * ept), 4..16. Register counts from the compile gate's cubins (sm_90, cosine scores), not
# timings: a [16 heads, 16, 16] forward tile at 8 warps takes 80 registers, a [1, 64, 64] one (global, 64
# windows) 205 at 4 warps but 91 at 16; backward keeps P, the scores, A and dA live, and needs about 4
# elements per thread to stay under 128 registers (216 at 8 per thread).
PLANE_INTERPRETER_CONFIG = {"GB": 2, "RYB": 1, "RXB": 2, "GBI": 2, "budget": 4096, "ept": 16}


def plane_configs(kind: str, arch: int) -> list[dict[str, int]]:
    if kind == "fwd":
        return [
            {"GB": 4, "RYB": 2, "RXB": 8, "GBI": 2, "budget": 8192, "ept": 16},
            {"GB": 2, "RYB": 1, "RXB": 8, "GBI": 4, "budget": 4096, "ept": 8},
            {"GB": 8, "RYB": 2, "RXB": 8, "GBI": 1, "budget": 16384, "ept": 16},
        ]
    return [
        {"GB": 2, "RYB": 2, "RXB": 8, "GBI": 2, "budget": 4096, "ept": 4},
        {"GB": 1, "RYB": 1, "RXB": 8, "GBI": 4, "budget": 2048, "ept": 4},
        {"GB": 4, "RYB": 2, "RXB": 8, "GBI": 1, "budget": 8192, "ept": 8},
    ]


def plane_tile(geo: dict, mode: int, cfg: dict[str, int]) -> dict[str, int] | None:
    """The plane kernels' tile constexprs and grid sizes for this geometry and config, or None when the
    kernels do not apply (heads not whole channel groups, strided q/k, or a score tile over budget)."""
    if geo["phq"] != geo["ph"] or geo["pwq"] != geo["pw"]:
        return None
    hc, C = geo["D_V"], geo["C"]
    if geo["D_QK"] != hc or C % hc:
        return None
    np2 = triton.next_power_of_2
    nWh = geo["H"] // (geo["nPh"] * geo["ph"])
    if mode == MODE_LOCAL:
        t1p, txp, n_gx, n_band, exact = np2(geo["nPh"]), np2(geo["nPw"]), geo["nWw"], nWh, np2(geo["nPw"]) == geo["nPw"]
    else:
        t1p, txp, n_gx, n_band, exact = np2(nWh), np2(geo["nWw"]), geo["nPw"], geo["nPh"], np2(geo["nWw"]) == geo["nWw"]
    gb, ryb, rxb = min(cfg["GB"], np2(n_gx)), min(cfg["RYB"], np2(geo["ph"])), min(cfg["RXB"], np2(geo["pw"]))
    npad = t1p * txp
    while gb * ryb * rxb * npad * npad > cfg["budget"] and gb * ryb * rxb > 1:
        if gb > 1:
            gb //= 2
        elif ryb > 1:
            ryb //= 2
        else:
            rxb //= 2
    if gb * ryb * rxb * npad * npad > cfg["budget"]:
        return None
    n_gblocks = triton.cdiv(n_gx, gb)
    gbi = min(cfg["GBI"], n_gblocks)
    n_gouter = triton.cdiv(n_gblocks, gbi)
    b_t = geo["programs"] // (geo["n_groups"] * geo["n_head"])
    return {
        "T1P": t1p,
        "RYP": ryb,
        "U1P": gb if mode == MODE_LOCAL else txp,
        "U2P": txp if mode == MODE_LOCAL else gb,
        "RXP": rxb,
        "TX_EXACT": exact,
        "nWh": nWh,
        "n_gouter": n_gouter,
        "GBI": gbi,
        "n_gblocks": n_gblocks,
        "n_rych": triton.cdiv(geo["ph"], ryb),
        "n_rxch": triton.cdiv(geo["pw"], rxb),
        "programs": n_gouter * (C // hc) * n_band * b_t,
        "num_warps": max(4, min(16, triton.next_power_of_2(gb * ryb * rxb * npad * npad // (32 * cfg["ept"])))),
    }


# Long-group kernels (N > MAX_TOKENS): whole head rows as tiles, so blocks shrink as heads grow; the interpreter
# runs 16-token blocks so that partial blocks and several of them are cheap to reach in tests.
MAX_TOKENS = 64  # the general kernels' N x N register tile
MAX_LONG_HEAD = 256


def long_configs(d_max: int, arch: int) -> list[dict[str, int]]:
    """Candidates (BLOCK_M queries = BLOCK_N keys, warps) for head rows padded to d_max; the first is the
    default. Tiles of whole head rows of q, k, v, dO and two [BLOCK, d_max] fp32 accumulators stay in registers:
    in the gate's sm_90 cubins (bf16, standardised scores, bias, dropout) 4 warps spilled 80..800 bytes per
    thread at every size, 8 warps at most a few dozen (none at d_max 16 or in the forward and dq kernels at 256)."""
    if d_max <= 64:
        return [{"BLOCK": 64, "num_warps": 8}, {"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 4}]
    if d_max <= 128:
        return [{"BLOCK": 32, "num_warps": 8}, {"BLOCK": 16, "num_warps": 4}, {"BLOCK": 32, "num_warps": 4}]
    return [{"BLOCK": 16, "num_warps": 8}, {"BLOCK": 16, "num_warps": 4}]


def long_tile(geo: dict, cfg: dict[str, int]) -> dict[str, int]:
    dqp = max(16, triton.next_power_of_2(geo["D_QK"]))
    dvp = max(16, triton.next_power_of_2(geo["D_V"]))
    n_blocks = triton.cdiv(geo["N"], cfg["BLOCK"])
    return {
        "BLOCK_M": cfg["BLOCK"], "BLOCK_N": cfg["BLOCK"], "DQP": dqp, "DVP": dvp, "n_blocks": n_blocks,
        "programs": geo["programs"] * n_blocks, "num_warps": cfg["num_warps"],
    }  # fmt: skip


LONG_INTERPRETER_CONFIG = {"BLOCK": 16, "num_warps": 4}


def candidates(geo: dict, mode: int, kind: str, device: torch.device | None) -> list[dict[str, int]]:
    """The configs a ``kind`` ("fwd" / "bwd") launch chooses from, the first the default: the long kernels'
    (groups over MAX_TOKENS), else the plane kernels' that take this geometry (none when the default does not:
    then the general kernels run, with the one config their tile sizes decide)."""
    if geo["N"] > MAX_TOKENS:
        if _interpreting():
            return [dict(LONG_INTERPRETER_CONFIG)]
        d_max = max(16, triton.next_power_of_2(max(geo["D_QK"], geo["D_V"])))
        return long_configs(d_max, _autotune.arch_class(device))
    cands = [dict(PLANE_INTERPRETER_CONFIG)] if _interpreting() else plane_configs(kind, _autotune.arch_class(device))
    if plane_tile(geo, mode, cands[0]) is None:
        return []
    return [c for c in cands if plane_tile(geo, mode, c) is not None]


_GEO_BUCKET = ("N", "C", "D_QK", "D_V", "ph", "pw", "phq", "pwq", "nPh", "nPw", "nWw", "n_head")


def _bucket(q: torch.Tensor, geo: dict, mode: int, flags: dict) -> tuple:
    """Launches in one bucket share one tuning: dtype, mode and flags, the window geometry, and the power of two
    of the program count (batch x frames x groups x heads)."""
    return (_autotune.dtype(q), mode, *(flags[f] for f in ("SCORE", "HAS_BIAS", "DROPOUT")),
            *(geo[g] for g in _GEO_BUCKET), _autotune.pow2(geo["programs"]))  # fmt: skip


def _long_constexprs(t: dict) -> dict:
    return {k: t[k] for k in ("BLOCK_M", "BLOCK_N", "DQP", "DVP")}


def _long_args(geo: dict, t: dict) -> list:
    """The long kernels' integer arguments, in order."""
    return [*(geo[k] for k in _INTS), geo["D_QK"], geo["D_V"], _run(geo["D_QK"], geo["C"]),
            _run(geo["D_V"], geo["C"]), t["n_blocks"]]  # fmt: skip


def _plane_args(geo: dict, t: dict) -> list:
    return [
        geo["C"], geo["H"], geo["W"], geo["nPh"], geo["nPw"], t["nWh"], geo["nWw"], geo["ph"], geo["pw"],
        geo["n_head"], geo["D_V"], geo["n_groups"], geo["N"], t["n_gouter"], t["GBI"], t["n_gblocks"], t["n_rych"],
        t["n_rxch"],
    ]  # fmt: skip


def _plane_constexprs(t: dict) -> dict:
    return {k: t[k] for k in ("TX_EXACT", "T1P", "RYP", "U1P", "U2P", "RXP")}


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    geo: dict,
    *,
    mode: int,
    score: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, C, Hq, Wq]; v: [B, T, C, H, W] (contiguous); geo: sizes (fm_engine.ops.window_attention.GEO_KEYS).
    ``dropout_p`` > 0 drops attention weights with the keep mask of ``seed`` (kernels/_attention_dropout.py).
    Returns o and, for groups of more than MAX_TOKENS tokens, the rows' log-sum-exp [B*T*groups*n_head*N] fp32
    that the backward needs (else an empty tensor). ``config``: one of :func:`candidates` (default: the bucket's
    tuned one; ``{}`` where there are none)."""
    o = _alloc.empty_like(v)
    lse = q.new_empty(0, dtype=torch.float32)
    if geo["programs"] == 0 or v.numel() == 0:
        return o, lse
    eps = float(torch.finfo(q.dtype).eps)
    flags = {"MODE": mode, "SCORE": score, "HAS_BIAS": bias is not None, "DROPOUT": dropout_p > 0}
    if config is None:
        cands = candidates(geo, mode, "fwd", q.device)
        config = {}
        if cands:
            config = FWD_TUNER.choose(
                q.device,
                _bucket(q, geo, mode, flags),
                cands,
                lambda c: forward(
                    q, k, v, bias, geo, mode=mode, score=score, scale=scale, dropout_p=dropout_p, seed=seed, config=c
                ),
            )
    if geo["N"] > MAX_TOKENS:  # the long kernels in both directions (the backward needs the lse)
        t = long_tile(geo, config)
        lse = _alloc.empty(geo["programs"] * geo["N"], dtype=torch.float32, device=q.device)
        long_fwd_kernel[(t["programs"],)](
            q, k, v, o, bias if bias is not None else q, lse, *_long_args(geo, t), float(scale), eps, seed,
            float(dropout_p), **flags, **_long_constexprs(t), num_warps=t["num_warps"],
        )  # fmt: skip
        return o, lse
    plane = plane_tile(geo, mode, config) if config else None
    if plane is not None:
        t = plane
        plane_fwd_kernel[(t["programs"],)](
            q, k, v, o, bias if bias is not None else q, *_plane_args(geo, t), float(scale), eps, seed,
            float(dropout_p), **flags, **_plane_constexprs(t), num_warps=t["num_warps"],
        )  # fmt: skip
        return o, lse
    hpp = heads_per_program(geo, mode, q.device)
    block_n, block_d = blocks(geo["N"], max(geo["D_QK"], geo["D_V"]))
    stcnnt_attn_fwd_kernel[(geo["programs"] // hpp,)](
        q, k, v, o, bias if bias is not None else q, *_launch_args(geo, mode, hpp), float(scale), eps, seed,
        float(dropout_p), **flags, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=_warps(block_n),
    )  # fmt: skip
    return o, lse


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    geo: dict,
    *,
    mode: int,
    score: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    o: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dbias or None) for the upstream gradient do: [B, T, C, H, W] (contiguous). Groups of
    more than MAX_TOKENS tokens also need the forward's output o and log-sum-exp. ``config`` as for
    :func:`forward` (tuned on its own)."""
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    dbias32 = torch.zeros(bias.shape, dtype=torch.float32, device=q.device) if bias is not None else None
    if geo["programs"] and v.numel():
        eps = float(torch.finfo(q.dtype).eps)
        flags = {"MODE": mode, "SCORE": score, "HAS_BIAS": bias is not None, "DROPOUT": dropout_p > 0}
        if config is None:
            cands = candidates(geo, mode, "bwd", q.device)
            config = {}
            if cands:
                config = BWD_TUNER.choose(
                    q.device,
                    _bucket(q, geo, mode, flags),
                    cands,
                    lambda c: backward(
                        do, q, k, v, bias, geo, mode=mode, score=score, scale=scale, dropout_p=dropout_p, seed=seed,
                        o=o, lse=lse, config=c,
                    ),
                )  # fmt: skip
        ptrs = (q, k, v, do, bias if bias is not None else q, dq, dk, dv, dbias32 if dbias32 is not None else dq)
        t = None if geo["N"] > MAX_TOKENS or not config else plane_tile(geo, mode, config)
        if geo["N"] > MAX_TOKENS:
            assert o is not None and lse is not None and lse.numel(), "long groups need the forward's o and lse"
            t = long_tile(geo, config)
            delta = _alloc.empty(lse.numel(), dtype=torch.float32, device=q.device)
            args = (*_long_args(geo, t), float(scale), eps, seed, float(dropout_p))
            long_bwd_dq_kernel[(t["programs"],)](
                q, k, v, o, do, ptrs[4], lse, delta, dq, *args, **flags, **_long_constexprs(t),
                num_warps=t["num_warps"],
            )  # fmt: skip
            long_bwd_dkdv_kernel[(t["programs"],)](
                q, k, v, do, ptrs[4], lse, delta, dk, dv, ptrs[8], *args, **flags, **_long_constexprs(t),
                num_warps=t["num_warps"],
            )  # fmt: skip
        elif t is not None:
            plane_bwd_kernel[(t["programs"],)](
                *ptrs, *_plane_args(geo, t), float(scale), eps, seed, float(dropout_p), **flags,
                **_plane_constexprs(t), num_warps=t["num_warps"],
            )  # fmt: skip
        else:
            hpp = heads_per_program(geo, mode, q.device)
            block_n, block_d = blocks(geo["N"], max(geo["D_QK"], geo["D_V"]))
            stcnnt_attn_bwd_kernel[(geo["programs"] // hpp,)](
                *ptrs, *_launch_args(geo, mode, hpp), float(scale), eps, seed, float(dropout_p), **flags,
                BLOCK_N=block_n, BLOCK_D=block_d, num_warps=_warps(block_n),
            )  # fmt: skip
    dbias = dbias32.to(bias.dtype) if dbias32 is not None and bias is not None else None
    return dq, dk, dv, dbias


_KERNELS = {
    "fwd": [stcnnt_attn_fwd_kernel, long_fwd_kernel, plane_fwd_kernel],
    "bwd": [stcnnt_attn_bwd_kernel, long_bwd_dq_kernel, long_bwd_dkdv_kernel, plane_bwd_kernel],
}
FWD_TUNER = _autotune.LaunchTuner("window_attention_fwd", _KERNELS["fwd"])
BWD_TUNER = _autotune.LaunchTuner("window_attention_bwd", _KERNELS["bwd"])

# --- compile gate ----------------------------------------------------------------------------------

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _signature(kernel: str, dt: str) -> dict[str, str]:
    ptrs = (
        ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr")
        if kernel == "fwd"
        else ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "bias_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    )
    sig = {p: _DT[dt] for p in ptrs}
    if kernel == "bwd":
        sig["dbias_ptr"] = "*fp32"
    ints = dict.fromkeys((*_INTS, "heads_per_prog", "D_QK", "D_V", "RUN_QK", "RUN_V", "seed"), "i32")
    return {**sig, **ints, "scale": "fp32", "eps": "fp32", "p_drop": "fp32"}


def register_gate(mode: int, cases: list[tuple[str, dict]]) -> None:
    """Register (dtype, constexpr config) launch cases of both kernels for ``mode``."""
    for dt, cfg in cases:
        full = {"MODE": mode, "SCORE": 0, "HAS_BIAS": False, "DROPOUT": False, **cfg}
        full["num_warps"] = _warps(full["BLOCK_N"])
        for kernel, fn in (("fwd", stcnnt_attn_fwd_kernel), ("bwd", stcnnt_attn_bwd_kernel)):
            _aot.register(
                fn, signatures=[_signature(kernel, dt)], configs=[full], name=f"stcnnt_attn_{kernel}[mode{mode}]"
            )


# Production local shape (4x4 patches, hc 4 -> BLOCK 16 x 16) in the half types, the parser-default shape
# (hc 256 -> BLOCK_D 64) with standardised scores and bias in fp32, and the largest token tile (64).
# A 128-token tile compiled too (98 KiB shared memory in backward) but took 30 s per compile, so groups
# are limited to 64 tokens (the reference runs larger ones; explain() says so).
register_gate(
    MODE_LOCAL,
    [
        ("bf16", {"BLOCK_N": 16, "BLOCK_D": 16, "SCORE": SCORE_COSINE}),
        ("fp16", {"BLOCK_N": 16, "BLOCK_D": 16, "HAS_BIAS": True}),
        ("fp32", {"BLOCK_N": 16, "BLOCK_D": 64, "SCORE": SCORE_STANDARDIZE, "HAS_BIAS": True}),
    ],
)
register_gate(MODE_GLOBAL, [("bf16", {"BLOCK_N": 64, "BLOCK_D": 16, "HAS_BIAS": True})])
# Every dtype x head-dim chunk at the largest token tile (64), with the flags that add the most code
# (standardised scores, bias): shared memory and registers grow with BLOCK_N x BLOCK_D, so these bound
# every smaller launch of the same dtype and chunk. Smaller token tiles are compiled above only in the
# configurations the production and parser-default shapes use.
register_gate(
    MODE_LOCAL,
    [
        (dt, {"BLOCK_N": 64, "BLOCK_D": bd, "SCORE": SCORE_STANDARDIZE, "HAS_BIAS": True, "DROPOUT": True})
        for dt in ("fp32", "fp16", "bf16")
        for bd in (16, 32, 64)
    ],
)


# --- compile gate: channel-plane kernels ------------------------------------------------------------------


def _production_geo(mode: int) -> dict:
    """Geometry of the MRI production shape (C 32, 64 x 64, patch 2, 32 heads of 4 channels): 8 x 8 windows of
    4 x 4 patches; local attention within a window, global across the windows."""
    nP, nW = 4, 8
    n_tokens, n_groups = (nP * nP, nW * nW) if mode == MODE_LOCAL else (nW * nW, nP * nP)
    return {"T": 12, "C": 32, "Hq": 64, "Wq": 64, "H": 64, "W": 64, "N": n_tokens, "n_groups": n_groups, "nWw": nW,
            "nPh": nP, "nPw": nP, "phq": 2, "pwq": 2, "ph": 2, "pw": 2, "n_head": 32, "D_QK": 4, "D_V": 4,
            "programs": 16 * 12 * n_groups * 32}  # fmt: skip


# An odd geometry: local windows of 3 x 3 patches of 3 x 3 pixels, 2 channels, 9 heads of 2 (token columns not a
# power of two: the per-element dropout draw; pixel rows and columns split over sub-blocks).
_ODD_GEO = {"T": 1, "C": 2, "Hq": 9, "Wq": 27, "H": 9, "W": 27, "N": 9, "n_groups": 3, "nWw": 3, "nPh": 3, "nPw": 3,
            "phq": 3, "pwq": 3, "ph": 3, "pw": 3, "n_head": 9, "D_QK": 2, "D_V": 2, "programs": 27}  # fmt: skip
_PLANE_INTS = ("C", "H", "W", "nPh", "nPw", "nWh", "nWw", "ph", "pw", "n_head", "HC", "n_groups", "N", "n_gouter",
               "GBI", "n_gblocks", "n_rych", "n_rxch", "seed")  # fmt: skip


def _register_plane(kind: str, dt: str, geo: dict, mode: int, cfg: dict, flags: dict) -> None:
    t = plane_tile(geo, mode, cfg)
    if t is None:  # this candidate's budget does not take this geometry: the general kernels run it
        return
    fn = plane_fwd_kernel if kind == "fwd" else plane_bwd_kernel
    ptrs: tuple[str, ...] = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr")
    if kind == "bwd":
        ptrs = ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "bias_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    sig = {**dict.fromkeys(ptrs, _DT[dt]), **dict.fromkeys(_PLANE_INTS, "i32")}
    sig.update({"scale": "fp32", "eps": "fp32", "p_drop": "fp32"} | ({"dbias_ptr": "*fp32"} if kind == "bwd" else {}))
    _aot.register(
        fn,
        signatures=[sig],
        configs=[{"MODE": mode, **flags, **_plane_constexprs(t), "num_warps": t["num_warps"]}],
        name=f"stcnnt_plane_{kind}[mode{mode}]",
    )


_HEAVIEST = {"SCORE": SCORE_STANDARDIZE, "HAS_BIAS": True, "DROPOUT": True}
for _kind in ("fwd", "bwd"):
    for _mode in (MODE_LOCAL, MODE_GLOBAL):
        # every candidate at the production shape with the flags that add the most code (bf16)
        for _cfg in plane_configs(_kind, 90):
            _register_plane(_kind, "bf16", _production_geo(_mode), _mode, _cfg, _HEAVIEST)
        # the default with the production flags (cosine, no bias; with and without dropout) in every dtype
        for _dt in ("bf16", "fp16", "fp32"):
            for _drop in (False, True):
                _flags = {"SCORE": SCORE_COSINE, "HAS_BIAS": False, "DROPOUT": _drop}
                _register_plane(_kind, _dt, _production_geo(_mode), _mode, plane_configs(_kind, 90)[0], _flags)
    _register_plane(_kind, "bf16", _ODD_GEO, MODE_LOCAL, plane_configs(_kind, 90)[0], _HEAVIEST)


# --- compile gate: long-group kernels -----------------------------------------------------------------------

_LONG_INTS = (*_INTS, "D_QK", "D_V", "RUN_QK", "RUN_V", "n_blocks", "seed")
_LONG_PTRS = {
    "fwd": (long_fwd_kernel, ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr"), ("lse_ptr",)),
    "dq": (long_bwd_dq_kernel, ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "bias_ptr", "dq_ptr"),
           ("lse_ptr", "delta_ptr")),
    "dkdv": (long_bwd_dkdv_kernel, ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "bias_ptr", "dk_ptr", "dv_ptr"),
             ("lse_ptr", "delta_ptr", "dbias_ptr")),
}  # fmt: skip


def _register_long(dt: str, mode: int, d_qk: int, d_v: int, cfg: dict, flags: dict) -> None:
    t = long_tile({"D_QK": d_qk, "D_V": d_v, "N": 256, "programs": 1}, cfg)
    for kind, (fn, ptrs, f32_ptrs) in _LONG_PTRS.items():
        sig = {**dict.fromkeys(ptrs, _DT[dt]), **dict.fromkeys(f32_ptrs, "*fp32"), **dict.fromkeys(_LONG_INTS, "i32")}
        sig.update({"scale": "fp32", "eps": "fp32", "p_drop": "fp32"})
        _aot.register(
            fn,
            signatures=[sig],
            configs=[{"MODE": mode, **flags, **_long_constexprs(t), "num_warps": t["num_warps"]}],
            name=f"stcnnt_long_{kind}[mode{mode}]",
        )


# Every candidate of each head-dim class (rows padded to 16 .. 256) with the heaviest flags in bf16; the
# defaults of the head dims 4 (production) and 256 (parser default) with the production flags in every dtype.
for _d in (16, 128, 256):
    for _cfg in long_configs(_d, 90):
        _register_long("bf16", MODE_GLOBAL, _d, _d, _cfg, _HEAVIEST)
for _cfg in long_configs(64, 90):
    _register_long("bf16", MODE_GLOBAL, 8, 32, _cfg, _HEAVIEST)  # strided q / k: hc_qk 8, hc_v 32
for _dt in ("bf16", "fp16", "fp32"):
    for _d in (4, 256):
        _flags = {"SCORE": SCORE_COSINE if _d == 4 else SCORE_DOT, "HAS_BIAS": _d == 256, "DROPOUT": False}
        for _mode in (MODE_LOCAL, MODE_GLOBAL):
            _register_long(_dt, _mode, _d, _d, long_configs(max(16, _d), 90)[0], _flags)
