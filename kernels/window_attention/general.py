"""General kernels: one (frame, group, block of heads) per program, groups of at most 64 tokens, any head.

They run every geometry the channel-plane kernels do not (strided q / k, heads that straddle pixels, heads of
whole pixels such as the parser default's hc = 256), one forward and one backward kernel for both layouts:

  MODE 0 local     program = (frame, window, head block),         tokens = the nPh x nPw patches of the window
  MODE 1 global    program = (frame, patch position, head block), tokens = that patch in each of the nWh x nWw windows

The whole N x N score matrix of a group lives in registers (N <= 64, padded to >= 16); head dims are looped
over in chunks of BLOCK_D (>= 16, masked lanes read nothing). A head made of whole pixels is walked
pixel-fastest (``el_off``), so its loads are runs of contiguous pixels; such heads are split over programs
when the groups alone leave SMs idle.

Forward:  S = scale * score(q, k) (plain, cosine, or standardised q/k), P = softmax(S),
          A = P + bias (post-softmax bias), o = dropout(A) @ v.
Backward: recomputes S and P from q, k (nothing N x N is stored), then
          dA = dO @ v^T, dv = A^T @ dO, dS = P * (dA - rowsum(P * dA)), and dq, dk from dS through the score
          form. The bias gradient is computed by kernels of its own (bias_grad.py).

Products: ``mm`` -- tensor cores (mma.sync: the token tiles have 16..64 rows) on operands in the input dtype
for fp16 / bf16, exact IEEE fp32 dots for fp32. Softmax statistics and all accumulation are fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import dropout_tile, mm, tile_off, tok_off


@triton.jit
def _scores(
    q_ptr, k_ptr, base, g, h, offs_n, mask_n, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, D, RUN, scale, eps,
    MODE: tl.constexpr, SCORE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    """Recompute one group's probabilities P [BLOCK_N, BLOCK_N] and what backward needs of the score form:
    the unscaled normalised scores Sn and the per-token reciprocal norms / means of q and k."""
    DT: tl.constexpr = q_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    tok = tok_off(offs_n, g, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq)
    offs_d = tl.arange(0, BLOCK_D)
    mean_q = tl.zeros([BLOCK_N], dtype=tl.float32)
    mean_k = tl.zeros([BLOCK_N], dtype=tl.float32)
    if SCORE == 2:
        # two passes over the head dim: centring first keeps the variance free of cancellation
        for d0 in range(0, D, BLOCK_D):
            md = d0 + offs_d < D
            off = tile_off(base, tok, h, d0 + offs_d, D, RUN, MODE, C, Hq, Wq, pwq, VEC)
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
        off = tile_off(base, tok, h, d0 + offs_d, D, RUN, MODE, C, Hq, Wq, pwq, VEC)
        m2 = mask_n[:, None] & md[None, :]
        qt = tl.load(q_ptr + off, mask=m2, other=0.0)
        kt = tl.load(k_ptr + off, mask=m2, other=0.0)
        if SCORE == 2:
            qt = tl.where(m2, qt.to(tl.float32) - mean_q[:, None], 0.0)
            kt = tl.where(m2, kt.to(tl.float32) - mean_k[:, None], 0.0)
        if SCORE != 0:
            ss_q += tl.sum(qt.to(tl.float32) * qt.to(tl.float32), 1)
            ss_k += tl.sum(kt.to(tl.float32) * kt.to(tl.float32), 1)
        s += mm(qt, tl.trans(kt), IEEE, DT)
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
def stcnnt_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr,
    C, Hq, Wq, H, W, N, n_groups, nWw, nPh, nPw, phq, pwq, ph, pw, n_head, heads_per_prog, D_QK, D_V, RUN_QK,
    RUN_V, scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VEC_QK: tl.constexpr, VEC_V: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = v_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    g, hb, bt = _program(tl.program_id(0), n_head // heads_per_prog, n_groups)
    inv_keep = 1.0 / (1.0 - p_drop)
    # the heads of one group run in one program: their elements share cache lines (a head of the
    # production shape is 4 channels of one pixel), so the group's tiles are fetched from DRAM once
    for hh in range(0, heads_per_prog):
        h = hb * heads_per_prog + hh
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        p, _, _, _, _, _, _, _ = _scores(
            q_ptr, k_ptr, bt * (C * Hq * Wq), g, h, offs_n, mask_n, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, D_QK,
            RUN_QK, scale, eps, MODE, SCORE, BLOCK_N, BLOCK_D, VEC_QK,
        )  # fmt: skip
        mask_nn = mask_n[:, None] & mask_n[None, :]
        if HAS_BIAS:
            b_off = h * N * N + offs_n[:, None] * N + offs_n[None, :]
            p += tl.load(bias_ptr + b_off, mask=mask_nn, other=0.0).to(tl.float32)
        if DROPOUT:  # on softmax + bias, as the reference orders them
            rows = ((bt * n_groups + g) * n_head + h) * N + offs_n
            p = p * dropout_tile(seed, rows, 0, N, p_drop, inv_keep, BLOCK_N)
        base = bt * (C * H * W)
        tok = tok_off(offs_n, g, MODE, C, H, W, nWw, nPh, nPw, ph, pw)
        offs_d = tl.arange(0, BLOCK_D)
        for d0 in range(0, D_V, BLOCK_D):
            md = d0 + offs_d < D_V
            off = tile_off(base, tok, h, d0 + offs_d, D_V, RUN_V, MODE, C, H, W, pw, VEC_V)
            m2 = mask_n[:, None] & md[None, :]
            vt = tl.load(v_ptr + off, mask=m2, other=0.0)
            o = mm(p, vt, IEEE, DT)
            tl.store(o_ptr + off, o.to(o_ptr.dtype.element_ty), mask=m2)


@triton.jit
def stcnnt_attn_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, bias_ptr, dq_ptr, dk_ptr, dv_ptr,
    C, Hq, Wq, H, W, N, n_groups, nWw, nPh, nPw, phq, pwq, ph, pw, n_head, heads_per_prog, D_QK, D_V, RUN_QK,
    RUN_V, scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, VEC_QK: tl.constexpr, VEC_V: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = v_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    g, hb, bt = _program(tl.program_id(0), n_head // heads_per_prog, n_groups)
    inv_keep = 1.0 / (1.0 - p_drop)
    for hh in range(0, heads_per_prog):
        h = hb * heads_per_prog + hh
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        base_qk = bt * (C * Hq * Wq)
        p, sn, rq, rk, mean_q, mean_k, ss_q, ss_k = _scores(
            q_ptr, k_ptr, base_qk, g, h, offs_n, mask_n, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, D_QK, RUN_QK, scale,
            eps, MODE, SCORE, BLOCK_N, BLOCK_D, VEC_QK,
        )  # fmt: skip
        mask_nn = mask_n[:, None] & mask_n[None, :]
        a = p
        if HAS_BIAS:
            b_off = h * N * N + offs_n[:, None] * N + offs_n[None, :]
            a = p + tl.load(bias_ptr + b_off, mask=mask_nn, other=0.0).to(tl.float32)
        if DROPOUT:  # the forward's mask, regenerated: A_d = A * mult, dA = dA_d * mult
            rows = ((bt * n_groups + g) * n_head + h) * N + offs_n
            mult = dropout_tile(seed, rows, 0, N, p_drop, inv_keep, BLOCK_N)
            a = a * mult
        # dA = dO v^T and dv = A^T dO, one pass over v's head dim
        base_v = bt * (C * H * W)
        tok_v = tok_off(offs_n, g, MODE, C, H, W, nWw, nPh, nPw, ph, pw)
        offs_d = tl.arange(0, BLOCK_D)
        da = tl.zeros([BLOCK_N, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D_V, BLOCK_D):
            md = d0 + offs_d < D_V
            off = tile_off(base_v, tok_v, h, d0 + offs_d, D_V, RUN_V, MODE, C, H, W, pw, VEC_V)
            m2 = mask_n[:, None] & md[None, :]
            vt = tl.load(v_ptr + off, mask=m2, other=0.0)
            dot = tl.load(do_ptr + off, mask=m2, other=0.0)
            da += mm(dot, tl.trans(vt), IEEE, DT)
            dv = mm(tl.trans(a), dot, IEEE, DT)
            tl.store(dv_ptr + off, dv.to(dv_ptr.dtype.element_ty), mask=m2)
        if DROPOUT:
            da = da * mult
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
        tok = tok_off(offs_n, g, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq)
        for d0 in range(0, D_QK, BLOCK_D):
            md = d0 + offs_d < D_QK
            off = tile_off(base_qk, tok, h, d0 + offs_d, D_QK, RUN_QK, MODE, C, Hq, Wq, pwq, VEC_QK)
            m2 = mask_n[:, None] & md[None, :]
            qt = tl.load(q_ptr + off, mask=m2, other=0.0).to(tl.float32)
            kt = tl.load(k_ptr + off, mask=m2, other=0.0).to(tl.float32)
            if SCORE == 2:
                qt = tl.where(m2, qt - mean_q[:, None], 0.0)
                kt = tl.where(m2, kt - mean_k[:, None], 0.0)
            qh = qt * rq[:, None]
            kh = kt * rk[:, None]
            gq = mm(ds, kh, IEEE, DT)
            gk = mm(tl.trans(ds), qh, IEEE, DT)
            if SCORE != 0:
                gq = (gq - qh * r_q[:, None]) * rq[:, None]
                gk = (gk - kh * r_k[:, None]) * rk[:, None]
            tl.store(dq_ptr + off, gq.to(dq_ptr.dtype.element_ty), mask=m2)
            tl.store(dk_ptr + off, gk.to(dk_ptr.dtype.element_ty), mask=m2)
