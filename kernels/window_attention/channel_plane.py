"""Channel-plane kernels: tiny heads of whole channels at one pixel, many heads per program, batched tensor-core
products.

When every head is a group of hc whole channels at one pixel of the patch (hc divides C: head
h = (pixel r of the patch) * C/hc + channel group) and q, k have v's patch size, a head's elements are hc
channel planes, and the tokens of a group sit in the same rows of every plane. A program owns one channel
group cg of one row band of a frame (local: a window row; global: a patch row) and walks that band's
attention groups in sub-blocks: GBP neighbouring groups x RYP pixel rows x RXP pixel columns of the patch.
Those A = GBP * RYP * RXP heads are scored at once as a batch of A matrix products:

  q, k, v, dO   [A heads, NP tokens, DP head elements]  gathered straight from the planes: the address of
                (head a, token n, element e) is frame base + channel (cg * hc + e) * H * W + hoff[a] + toff[n]
                (a head offset plus a token offset: no register tile is reshaped or permuted)
  S = Q K^T     [A, NP, NP]   tl.dot on 3-D tiles (batched mma.sync on tensor cores for fp16 / bf16; exact
                IEEE fp32 products for fp32), head elements padded to DP = 16 with masked lanes reading zeros
  o = P V, dA = dO V^T, dV = A^T dO, dQ = dS K, dK = dS^T Q   the same way.

Token tiles are padded to NP >= 16 (tl.dot's smallest tile; padded tokens are masked keys and unstored
queries). Tiles are padded to powers of two per factor and masked, so any window / patch geometry runs;
[heads, tokens, tokens] must fit a register budget, which bounds the token count (see plane_tile).
"""

from __future__ import annotations

import triton
import triton.language as tl
from fm_engine.kernels._attention_dropout import dropout_scale, keep4, keep_at

from ._common import mm, trans3


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
def _plane_sub(sub, gb_first, band, cg, C, HC, W, nPh, nPw, nWh, nWw, ph, pw, n_rych, n_rxch,
               MODE: tl.constexpr, T1P: tl.constexpr, TXP: tl.constexpr, GBP: tl.constexpr, RYP: tl.constexpr,
               RXP: tl.constexpr):  # fmt: skip
    """Sub-block ``sub`` of a band: per head a of the sub-block (group, pixel row, pixel column) its head index,
    attention group, plane offset and validity; per token n (token row t1, token column tx) its index, plane
    offset and validity.

    local: pixel row (band * nPh + t1) * ph + ry, column ((g + ga) * nPw + tx) * pw + rx;
    global: pixel row (t1 * nPh + band) * ph + ry, column (tx * nPw + g + ga) * pw + rx."""
    rxch = sub % n_rxch
    r = sub // n_rxch
    rych = r % n_rych
    g0 = (gb_first + r // n_rych) * GBP
    a = tl.arange(0, GBP * RYP * RXP)
    ga = a // (RYP * RXP)
    ry = rych * RYP + (a // RXP) % RYP
    rx = rxch * RXP + a % RXP
    n = tl.arange(0, T1P * TXP)
    t1 = n // TXP
    tx = n % TXP
    if MODE == 0:
        n_gx = nWw  # groups along W
        nt1 = nPh
        ntx = nPw
        hoff = (band * nPh * ph + ry) * W + (g0 + ga) * nPw * pw + rx
        toff = t1 * ph * W + tx * pw
    else:
        n_gx = nPw
        nt1 = nWh
        ntx = nWw
        hoff = (band * ph + ry) * W + (g0 + ga) * pw + rx
        toff = t1 * nPh * ph * W + tx * nPw * pw
    head = (ry * pw + rx) * (C // HC) + cg
    grp = band * n_gx + g0 + ga
    a_ok = (ry < ph) & (rx < pw) & (g0 + ga < n_gx)
    tok = t1 * ntx + tx
    n_ok = (t1 < nt1) & (tx < ntx)
    return head, grp, a_ok, hoff, tok, n_ok, toff


@triton.jit
def _plane_tile(base, cg, HC, HW, hoff, a_ok, toff, n_ok, DP: tl.constexpr):
    """Offsets and mask of the [heads, tokens, DP] tile of a sub-block: element e is channel cg * HC + e."""
    e = tl.arange(0, DP)
    off = base + ((cg * HC + e) * HW)[None, None, :] + hoff[:, None, None] + toff[None, :, None]
    ok = (a_ok[:, None] & n_ok[None, :])[:, :, None] & (e < HC)[None, None, :]
    return off, ok


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
def _plane_scores(q_ptr, k_ptr, off, ok, HC, scale, eps, n_ok, SCORE: tl.constexpr):
    """P [heads, NP, NP] of a sub-block, per (head, token) the reciprocal norms rq, rk and sums of squares
    (cosine), and the q, k tiles as scored before normalisation (fp32; centred for standardised scores)."""
    DT: tl.constexpr = q_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    qx = tl.load(q_ptr + off, mask=ok, other=0.0)
    kx = tl.load(k_ptr + off, mask=ok, other=0.0)
    qf = qx.to(tl.float32)
    kf = kx.to(tl.float32)
    if SCORE == 2:  # centre first: keeps the variance free of cancellation
        qf = tl.where(ok, qf - (tl.sum(qf, 2) / HC)[:, :, None], 0.0)
        kf = tl.where(ok, kf - (tl.sum(kf, 2) / HC)[:, :, None], 0.0)
        s = mm(qf, trans3(kf), IEEE, DT)
    else:
        s = mm(qx, trans3(kx), IEEE, DT)
    ssq = tl.sum(qf * qf, 2)
    ssk = tl.sum(kf * kf, 2)
    if SCORE == 1:
        rq = 1.0 / tl.maximum(tl.sqrt(ssq), 1e-12)  # F.normalize: x / max(|x|, 1e-12)
        rk = 1.0 / tl.maximum(tl.sqrt(ssk), 1e-12)
    elif SCORE == 2:
        rq = 1.0 / tl.sqrt(ssq / (HC - 1) + eps)  # unbiased variance, eps of the input dtype
        rk = 1.0 / tl.sqrt(ssk / (HC - 1) + eps)
    else:
        rq = tl.full(ssq.shape, 1.0, tl.float32)
        rk = tl.full(ssk.shape, 1.0, tl.float32)
    sn = s * rq[:, :, None] * rk[:, None, :]
    logits = tl.where(n_ok[None, None, :], sn * scale, float("-inf"))
    mx = tl.max(logits, 2)
    p = tl.exp(logits - mx[:, :, None])
    p = p / tl.sum(p, 2)[:, :, None]
    return p, rq, rk, ssq, ssk, qf, kf


@triton.jit
def plane_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, bias_ptr,
    C, H, W, nPh, nPw, nWh, nWw, ph, pw, n_head, HC, n_groups, N, n_gouter, GBI, n_gblocks, n_rych, n_rxch,
    scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    TX_EXACT: tl.constexpr, T1P: tl.constexpr, TXP: tl.constexpr, GBP: tl.constexpr, RYP: tl.constexpr,
    RXP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = v_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    NP: tl.constexpr = T1P * TXP
    item, band, cg, gb_first, n_sub = _plane_band(
        tl.program_id(0), C, HC, nPh, nWh, n_gouter, GBI, n_gblocks, n_rych, n_rxch, MODE
    )
    HW = H * W
    base = item * C * HW
    inv_keep = 1.0 / (1.0 - p_drop)
    for sub in range(0, n_sub):
        head, grp, a_ok, hoff, tok, n_ok, toff = _plane_sub(
            sub, gb_first, band, cg, C, HC, W, nPh, nPw, nWh, nWw, ph, pw, n_rych, n_rxch, MODE, T1P, TXP, GBP, RYP,
            RXP,
        )  # fmt: skip
        off, ok = _plane_tile(base, cg, HC, HW, hoff, a_ok, toff, n_ok, DP)
        p, _, _, _, _, _, _ = _plane_scores(q_ptr, k_ptr, off, ok, HC, scale, eps, n_ok, SCORE)
        if HAS_BIAS:  # added after the softmax, as the reference does
            b_off = head[:, None, None] * N * N + tok[None, :, None] * N + tok[None, None, :]
            b_ok = a_ok[:, None, None] & n_ok[None, :, None] & n_ok[None, None, :]
            p += tl.load(bias_ptr + b_off, mask=b_ok, other=0.0).to(tl.float32)
        if DROPOUT:
            p = p * _plane_dropout(seed, item, grp, head, tok, n_groups, n_head, N, p_drop, inv_keep, NP, TX_EXACT)
        v = tl.load(v_ptr + off, mask=ok, other=0.0)
        tl.store(o_ptr + off, mm(p, v, IEEE, DT).to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def plane_bwd_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, bias_ptr, dq_ptr, dk_ptr, dv_ptr,
    C, H, W, nPh, nPw, nWh, nWw, ph, pw, n_head, HC, n_groups, N, n_gouter, GBI, n_gblocks, n_rych, n_rxch,
    scale, eps, seed, p_drop,
    MODE: tl.constexpr, SCORE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    TX_EXACT: tl.constexpr, T1P: tl.constexpr, TXP: tl.constexpr, GBP: tl.constexpr, RYP: tl.constexpr,
    RXP: tl.constexpr, DP: tl.constexpr,
):  # fmt: skip
    DT: tl.constexpr = v_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    NP: tl.constexpr = T1P * TXP
    item, band, cg, gb_first, n_sub = _plane_band(
        tl.program_id(0), C, HC, nPh, nWh, n_gouter, GBI, n_gblocks, n_rych, n_rxch, MODE
    )
    HW = H * W
    base = item * C * HW
    inv_keep = 1.0 / (1.0 - p_drop)
    for sub in range(0, n_sub):
        head, grp, a_ok, hoff, tok, n_ok, toff = _plane_sub(
            sub, gb_first, band, cg, C, HC, W, nPh, nPw, nWh, nWw, ph, pw, n_rych, n_rxch, MODE, T1P, TXP, GBP, RYP,
            RXP,
        )  # fmt: skip
        off, ok = _plane_tile(base, cg, HC, HW, hoff, a_ok, toff, n_ok, DP)
        p, rq, rk, ssq, ssk, qf, kf = _plane_scores(q_ptr, k_ptr, off, ok, HC, scale, eps, n_ok, SCORE)
        v = tl.load(v_ptr + off, mask=ok, other=0.0)
        do = tl.load(do_ptr + off, mask=ok, other=0.0)
        da = mm(do, trans3(v), IEEE, DT)
        ad = p
        if HAS_BIAS:
            b_off = head[:, None, None] * N * N + tok[None, :, None] * N + tok[None, None, :]
            b_ok = a_ok[:, None, None] & n_ok[None, :, None] & n_ok[None, None, :]
            ad = p + tl.load(bias_ptr + b_off, mask=b_ok, other=0.0).to(tl.float32)
        if DROPOUT:  # the forward's mask, regenerated: A_d = A * mult, dA = dA_d * mult
            mult = _plane_dropout(seed, item, grp, head, tok, n_groups, n_head, N, p_drop, inv_keep, NP, TX_EXACT)
            ad = ad * mult
            da = da * mult
        tl.store(dv_ptr + off, mm(trans3(ad), do, IEEE, DT).to(dv_ptr.dtype.element_ty), mask=ok)
        # softmax backward on the full rows, scale folded in; then through the score form as in general.py,
        # with r_q = rowsum(dS * Sn) = sum_e qh * (dS kh) (Sn = qh kh^T), so no Sn tile stays live
        ds = p * (da - tl.sum(p * da, 2)[:, :, None]) * scale
        qh = qf * rq[:, :, None]
        kh = kf * rk[:, :, None]
        gq = mm(ds, kh, IEEE, DT)
        gk = mm(trans3(ds), qh, IEEE, DT)
        if SCORE == 1:
            r_q = tl.where(tl.sqrt(ssq) > 1e-12, tl.sum(qh * gq, 2), 0.0)
            r_k = tl.where(tl.sqrt(ssk) > 1e-12, tl.sum(kh * gk, 2), 0.0)
            gq = (gq - qh * r_q[:, :, None]) * rq[:, :, None]
            gk = (gk - kh * r_k[:, :, None]) * rk[:, :, None]
        elif SCORE == 2:
            r_q = tl.sum(qh * gq, 2) / (HC - 1)
            r_k = tl.sum(kh * gk, 2) / (HC - 1)
            gq = (gq - qh * r_q[:, :, None]) * rq[:, :, None]
            gk = (gk - kh * r_k[:, :, None]) * rk[:, :, None]
        tl.store(dq_ptr + off, gq.to(dq_ptr.dtype.element_ty), mask=ok)
        tl.store(dk_ptr + off, gk.to(dk_ptr.dtype.element_ty), mask=ok)
