"""Long-group kernels: groups of more than 64 tokens (global attention on large frames, local windows of many
patches), FlashAttention-style, with whole head rows (hc <= 256) as tiles.

A group of N > 64 tokens does not fit one program's registers as an N x N matrix. The forward owns BLOCK_M
queries of one (frame, group, head) and walks the keys in blocks with an online softmax, keeping the
post-softmax bias part of the output (sum_j b_ij v_j, which needs no rescaling) in a second accumulator; it
saves the rows' log-sum-exp. The backward runs a dq kernel per query block (over all key blocks; it also forms
delta_i = sum_j P_ij dA_ij = dO_i . (o_i - bias part_i)) and a dk / dv kernel per key block (over all query
blocks), each recomputing the scores of its tile pairs. The bias gradient has kernels of its own
(bias_grad.py). Products: ``mm`` (tensor cores for fp16 / bf16: wgmma at 64-row tiles on sm_90; IEEE fp32
otherwise).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import dropout_tile, el_off, mm, tok_off


@triton.jit
def _head_tile(g, h, offs_n, mask_n, D, RUN, MODE: tl.constexpr, C, Hx, Wx, nWw, nPh, nPw, phx, pwx,
               DP: tl.constexpr):  # fmt: skip
    """Offsets (inside the frame) and mask of the [tokens, DP] tile of head h's whole rows."""
    tok = tok_off(offs_n, g, MODE, C, Hx, Wx, nWw, nPh, nPw, phx, pwx)
    offs_d = tl.arange(0, DP)
    return tok[:, None] + el_off(h, offs_d, D, RUN, MODE, C, Hx, Wx, pwx)[None, :], mask_n[:, None] & (
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
        s = tl.where(mask_n[None, :], mm(qh, tl.trans(kh), IEEE, DT) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # every row has a valid key in the first block: never -inf
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        off_v, m_v = _head_tile(g, h, offs_n, mask_n, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
        v = tl.load(v_ptr + base_v + off_v, mask=m_v, other=0.0)
        if DROPOUT:
            mult = dropout_tile(seed, rows, k0, N, p_drop, inv_keep, BLOCK_N)
            p = p * mult
        acc = acc * alpha[:, None] + mm(p, v, IEEE, DT)
        if HAS_BIAS:
            b_off = h * N * N + offs_m[:, None] * N + offs_n[None, :]
            b = tl.load(bias_ptr + b_off, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            if DROPOUT:
                b = b * mult
            acc_b += mm(b, v, IEEE, DT)
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
                b = b * dropout_tile(seed, rows, k0, N, p_drop, inv_keep, BLOCK_N)
            part += mm(b, v, IEEE, DT)
        delta -= tl.sum(do.to(tl.float32) * part, 1)
    tl.store(delta_ptr + rows, delta, mask=mask_m)
    gq = tl.zeros([BLOCK_M, DQP], tl.float32)
    r_q = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, N, BLOCK_N):
        offs_n = k0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        off_k, m_k = _head_tile(g, h, offs_n, mask_n, D_QK, RUN_QK, MODE, C, Hq, Wq, nWw, nPh, nPw, phq, pwq, DQP)
        kh, _ = _normalized(tl.load(k_ptr + base_qk + off_k, mask=m_k, other=0.0).to(tl.float32), m_k, D_QK, eps, SCORE)
        sn = mm(qh, tl.trans(kh), IEEE, DT)
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp(sn * scale - lse[:, None]), 0.0)
        off_v, m_v = _head_tile(g, h, offs_n, mask_n, D_V, RUN_V, MODE, C, H, W, nWw, nPh, nPw, ph, pw, DVP)
        da = mm(do, tl.trans(tl.load(v_ptr + base_v + off_v, mask=m_v, other=0.0)), IEEE, DT)
        if DROPOUT:
            da = da * dropout_tile(seed, rows, k0, N, p_drop, inv_keep, BLOCK_N)
        ds = p * (da - delta[:, None]) * scale
        if SCORE != 0:
            r_q += tl.sum(ds * sn, 1)
        gq += mm(ds, kh, IEEE, DT)
    # through the score form, as in stcnnt_attn_bwd_kernel
    if SCORE == 1:
        gq = (gq - qh * tl.where(rq < 1e12, r_q, 0.0)[:, None]) * rq[:, None]
    elif SCORE == 2:
        gq = (gq - qh * (r_q / (D_QK - 1))[:, None]) * rq[:, None]
    tl.store(dq_ptr + base_qk + off_q, gq.to(dq_ptr.dtype.element_ty), mask=m_q)


@triton.jit
def long_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, bias_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
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
        snt = mm(kh, tl.trans(qh), IEEE, DT)  # [keys, queries]
        pt = tl.where(valid, tl.exp(snt * scale - lse[None, :]), 0.0)
        dat = mm(v, tl.trans(do), IEEE, DT)
        at = pt
        if HAS_BIAS:
            b_off = h * N * N + offs_m[None, :] * N + offs_n[:, None]
            at = pt + tl.load(bias_ptr + b_off, mask=valid, other=0.0).to(tl.float32)
        if DROPOUT:
            mult = tl.trans(dropout_tile(seed, row0 + offs_m, kb * BLOCK_N, N, p_drop, inv_keep, BLOCK_N))
            at = at * mult
            dat = dat * mult
        dv += mm(at, do, IEEE, DT)
        dst = pt * (dat - delta[None, :]) * scale
        if SCORE != 0:
            r_k += tl.sum(dst * snt, 1)
        gk += mm(dst, qh, IEEE, DT)
    if SCORE == 1:
        gk = (gk - kh * tl.where(rk < 1e12, r_k, 0.0)[:, None]) * rk[:, None]
    elif SCORE == 2:
        gk = (gk - kh * (r_k / (D_QK - 1))[:, None]) * rk[:, None]
    tl.store(dk_ptr + base_qk + off_k, gk.to(dk_ptr.dtype.element_ty), mask=m_k)
    tl.store(dv_ptr + base_v + off_v, dv.to(dv_ptr.dtype.element_ty), mask=m_v)
