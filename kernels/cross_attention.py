"""Triton kernels for grouped-query cross-attention (docs/KERNELS.md K4), not causal, Nq != Nk.

q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; query head h reads KV head h // (Hq // Hkv). D is a power
of two in 16..128. fp16 / bf16 use tensor-core dots with fp32 accumulation; fp32 uses ieee dots
(slower, but within fp32 rounding of an fp64 reference).

Forward: grid (query tiles, B * Hq, key splits). At the AViT shape (B 1, Nq 768, 8 heads) one program
per query tile gives 6 x 8 = 48 programs for 132 SMs, each walking 27,648 keys; splitting the keys
into S ranges gives 48 * S programs, each writing its normalised partial output and base-2
log-sum-exp in fp32, which ``_combine_kernel`` merges exactly (online rescaling over the splits).

Backward, in the FlashAttention-2 shape: ``_delta_kernel`` computes delta = rowsum(dO * o); then two kernels,
each writing its own outputs only (no read-modify-write, no atomics, the same sums in every run):

* ``_bwd_dkdv_kernel``, grid (key tiles, B * Hkv): one pass over the key blocks. A program keeps one key tile's
  K, V and dK, dV accumulators on chip and streams every query tile of the head group's Hq / Hkv query heads
  past them (one flat loop, software-pipelined): S^T = K Q^T, P^T, dP^T = V dO^T, dV += P^T dO,
  dK += dS^T Q. At the AViT shape (Nk 27,648, 128-key tiles, Hkv 4) that is 864 programs at B 1.
* ``_bwd_dq_kernel``, grid (query tiles, B * Hq, key splits): one pass over the query blocks. A program keeps a
  query tile's Q, dO and dQ accumulator on chip and streams its split's key tiles: S = Q K^T, P, dP = dO V^T,
  dQ += dS K. The keys are split (:func:`bwd_splits`, as the forward) so that B 1 (6 x 8 query tiles of 128)
  still fills the GPU; each split writes an fp32 partial that ``_dq_merge_kernel`` adds in split order.

FLOP of the backward: 14 * Hq * Nq * Nk * D per batch (S and dP are computed in both kernels; a fused kernel
needs 10, but adds dQ into memory from every key tile inside its innermost loop, which serialises it).
Nothing here was timed on a GPU yet.

Skipped work with a key-padding mask: the forward trims each split's key range to its first and last
non-padding key (ragged sequences are padded at the end), and the fused backward skips the query loop of
a key tile that is all padding.

Key-padding mask (optional, [B, Nk] bool read in place as uint8, True = padding; ``HAS_MASK``
constexpr): padding keys score -inf before the softmax in every kernel, so they get no weight and
dK = dV = 0. A split whose keys are all padding writes o = 0 and log-sum-exp -inf, which the merge weights
by 0 (the running maximum is shifted by 0 while it is still -inf, so nothing computes -inf - -inf). A query
whose keys are all padding gets o = 0, log-sum-exp -inf and zero gradients, as the reference's SDPA does.

Dropout (``DROPOUT`` constexpr): the keep mask of kernels/_attention_dropout.py for attention rows
(b * Hq + h) * Nq + query, applied to P after the softmax (the normaliser sums the undropped P) and
regenerated in the backward: dV = P_d^T dO, dP = (dO V^T) * mask / (1 - p); delta = rowsum(dO * o) already
sees the mask through o.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot, _autotune
from fm_engine.kernels._attention_dropout import dropout_keep_mask, dropout_scale, keep4

from fm_engine import _alloc
from fm_engine._env import interpreting as _interpreting  # a module global: the kernel report patches it

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
AOT_HELPERS = {"_key_ok", "_live_tiles"}  # a jit helper that takes a pointer (compiled inside the kernels)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _key_ok(kpm_ptr, kpm_off, offs_n, NK, HAS_MASK: tl.constexpr):
    """Keys that take part: inside the sequence and, with a key-padding mask (uint8, 1 = padding), not padding."""
    ok = offs_n < NK
    if HAS_MASK:
        pad = tl.load(kpm_ptr + kpm_off + offs_n, mask=ok, other=1)
        ok = ok & (pad == 0)
    return ok


@triton.jit
def _dropout_mult(seed, rows, kb_start, NK, p, inv_keep, BLOCK_N: tl.constexpr):
    """[rows, BLOCK_N] dropout multiplier (1/(1-p) kept, 0 dropped) for keys kb_start.. of attention rows
    ``rows`` = (b * Hq + h) * Nq + query (kernels/_attention_dropout.py); kb_start is a multiple of 4."""
    ctr = rows[:, None].to(tl.int64) * ((NK + 3) // 4) + kb_start // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
    return dropout_scale(keep4(seed, ctr, p), inv_keep)


@triton.jit
def _live_tiles(kpm_ptr, kpm_off, kb_start, kb_end, NK, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Key tiles [lo, hi) of [kb_start, kb_end) between the first and the last non-padding key: padding at the
    ends of a split (ragged sequences are padded at the end) is skipped, interior padding is masked."""
    if HAS_MASK:
        lo = kb_end * BLOCK_N
        hi = kb_start * BLOCK_N
        for n0 in range(kb_start * BLOCK_N, kb_end * BLOCK_N, 4 * BLOCK_N):
            offs = n0 + tl.arange(0, 4 * BLOCK_N)
            ok = _key_ok(kpm_ptr, kpm_off, offs, NK, True) & (offs < kb_end * BLOCK_N)  # this split's keys only
            lo = tl.minimum(lo, tl.min(tl.where(ok, offs, kb_end * BLOCK_N), 0))
            hi = tl.maximum(hi, tl.max(tl.where(ok, offs + 1, kb_start * BLOCK_N), 0))
        return lo // BLOCK_N, tl.maximum(tl.cdiv(hi, BLOCK_N), lo // BLOCK_N)
    else:
        return kb_start, kb_end


@triton.jit
def _lse_for_backward(lse):
    """Rows whose keys are all ignored have log-sum-exp -inf; +inf makes every exp2(s - lse) exactly 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def _fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    op_ptr,
    lsep_ptr,
    kpm_ptr,
    sq_b,
    sq_h,
    sq_m,
    sk_b,
    sk_h,
    sk_n,
    sv_b,
    sv_h,
    sv_n,
    so_b,
    so_h,
    so_m,
    skpm_b,
    H,
    NQ,
    NK,
    GROUP,
    BLOCKS_PER_SPLIT,
    scale_log2,
    seed,
    p_drop,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < NQ
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    inv_keep = 1.0 / (1.0 - p_drop)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    kb_start = pid_s * BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + BLOCKS_PER_SPLIT, tl.cdiv(NK, BLOCK_N))
    kb_lo, kb_hi = _live_tiles(kpm_ptr, b * skpm_b, kb_start, kb_end, NK, BLOCK_N, HAS_MASK)
    for kb in range(kb_lo, kb_hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = _key_ok(kpm_ptr, b * skpm_b, offs_n, NK, HAS_MASK)
        kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = _dot(q, kt, IEEE) * scale_log2
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen only ignored keys so far keep m = -inf: shift them by 0, so p = 0, not NaN
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:  # the normaliser l sums the undropped probabilities: dropout acts after the softmax
            p = p * _dropout_mult(seed, pid_bh * NQ + offs_m, kb * BLOCK_N, NK, p_drop, inv_keep, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    # a row with no valid key in this range: output 0 and log-sum-exp -inf (weight 0 in the merge)
    seen = l_i > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    if SPLIT:
        # partials: op_ptr [S, B*H, NQ, D] fp32, lsep_ptr [S, B*H, NQ] fp32, contiguous
        base = pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh
        tl.store(op_ptr + (base * NQ + offs_m[:, None]) * D + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(lsep_ptr + base * NQ + offs_m, lse, mask=row_ok)
    else:
        tl.store(
            o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=row_ok[:, None],
        )
        tl.store(lse_ptr + pid_bh * NQ + offs_m, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    op_ptr, lsep_ptr, o_ptr, lse_ptr, so_b, so_h, so_m, H, NQ, NSPLIT, D: tl.constexpr, BLOCK_M: tl.constexpr
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < NQ
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    bh = tl.num_programs(1)
    for s in range(0, NSPLIT):
        base = s * bh + pid_bh
        ls = tl.load(lsep_ptr + base * NQ + offs_m, mask=row_ok, other=0.0)
        o = tl.load(op_ptr + (base * NQ + offs_m[:, None]) * D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m, ls)
        # a split whose keys are all ignored has ls = -inf: it gets weight 0, and rows with no valid
        # key in any split so far are shifted by 0 rather than by -inf (no NaN from -inf - -inf)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        w = tl.exp2(ls - m_use)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m = m_new
    # rows whose keys are all ignored: output 0 (as the reference's SDPA), log-sum-exp -inf
    seen = l_i > 0.0
    out = tl.where(seen[:, None], acc / tl.where(seen, l_i, 1.0)[:, None], 0.0)
    tl.store(
        o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    lse = tl.where(seen, m + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + pid_bh * NQ + offs_m, lse, mask=row_ok)


@triton.jit
def _delta_kernel(
    o_ptr, do_ptr, delta_ptr, so_b, so_h, so_m, sd_b, sd_h, sd_m, H, NQ, D: tl.constexpr, BLOCK_M: tl.constexpr
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < NQ
    o = tl.load(o_ptr + b * so_b + h * so_h + offs_m[:, None] * so_m + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(
        do_ptr + b * sd_b + h * sd_h + offs_m[:, None] * sd_m + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    tl.store(delta_ptr + pid_bh * NQ + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, kpm_ptr,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_m, skpm_b,
    HKV, NQ, NK, GROUP, scale, scale_log2, seed, p_drop,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):  # fmt: skip
    """dK, dV of one key tile of one KV head: grid (key tiles, B * Hkv).

    K and V of the tile and the dK, dV accumulators stay on chip while every query tile of the head group's
    GROUP query heads streams past (one flat loop, so Triton pipelines its loads); per step S^T = K Q^T,
    P^T, dP^T = V dO^T, dV += P^T dO, dS^T = P^T (dP^T - delta), dK += dS^T Q. Only this program writes its
    rows of dK and dV: no atomics, the same sums in every run."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    n_hq = HKV * GROUP
    offs_d = tl.arange(0, D)
    inv_keep = 1.0 / (1.0 - p_drop)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    in_seq = offs_n < NK
    col_ok = _key_ok(kpm_ptr, b * skpm_b, offs_n, NK, HAS_MASK)
    k = tl.load(
        k_ptr + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=col_ok[:, None], other=0.0
    )
    v = tl.load(
        v_ptr + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=col_ok[:, None], other=0.0
    )
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    n_m = tl.cdiv(NQ, BLOCK_M)
    # a tile of padding keys only gets dK = dV = 0: its query loop is skipped
    steps = tl.where(tl.max(col_ok.to(tl.int32), 0) > 0, GROUP * n_m, 0)
    for it in range(0, steps):
        h = hk * GROUP + it // n_m
        offs_m = (it % n_m) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = offs_m < NQ
        row_base = (b * n_hq + h) * NQ
        q = tl.load(
            q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        do = tl.load(
            do_ptr + b * sd_b + h * sd_h + offs_m[:, None] * sd_m + offs_d[None, :], mask=row_ok[:, None], other=0.0
        )
        lse = _lse_for_backward(tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=0.0))
        delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
        st = _dot(k, tl.trans(q), IEEE) * scale_log2  # S^T [BLOCK_N, BLOCK_M]
        pt = tl.where(row_ok[None, :] & col_ok[:, None], tl.exp2(st - lse[None, :]), 0.0)
        dpt = _dot(v, tl.trans(do), IEEE)
        if DROPOUT:  # dV = P_d^T dO, dP = (dO V^T) * mult; delta = rowsum(dO * O) already sees the mask
            mult = tl.trans(_dropout_mult(seed, row_base + offs_m, pid_n * BLOCK_N, NK, p_drop, inv_keep, BLOCK_N))
            dv += _dot((pt * mult).to(do.dtype), do, IEEE)
            dpt = dpt * mult
        else:
            dv += _dot(pt.to(do.dtype), do, IEEE)
        dk += _dot((pt * (dpt - delta[None, :])).to(q.dtype), q, IEEE)
    out = (pid_bh * NK + offs_n[:, None]) * D + offs_d[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=in_seq[:, None])
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=in_seq[:, None])


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, dqp_ptr, kpm_ptr,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sd_b, sd_h, sd_m, skpm_b,
    H, NQ, NK, GROUP, BLOCKS_PER_SPLIT, scale, scale_log2, seed, p_drop,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """dQ of one query tile of one query head over one key split: grid (query tiles, B * Hq, key splits).

    Q, dO and the dQ accumulator stay on chip while the split's key tiles stream past; per step S = Q K^T,
    P, dP = dO V^T, dS = P (dP - delta), dQ += dS K. With SPLIT the unscaled fp32 sum goes to the split's
    partial [S, B*Hq, NQ, D] (``_dq_merge_kernel`` adds the partials in split order), else dQ is stored."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    row_ok = offs_m < NQ
    inv_keep = 1.0 / (1.0 - p_drop)
    rows = pid_bh * NQ + offs_m
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None] * sq_m + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(
        do_ptr + b * sd_b + h * sd_h + offs_m[:, None] * sd_m + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    lse = _lse_for_backward(tl.load(lse_ptr + rows, mask=row_ok, other=0.0))
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    kb_start = pid_s * BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + BLOCKS_PER_SPLIT, tl.cdiv(NK, BLOCK_N))
    kb_lo, kb_hi = _live_tiles(kpm_ptr, b * skpm_b, kb_start, kb_end, NK, BLOCK_N, HAS_MASK)
    for kb in range(kb_lo, kb_hi):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = _key_ok(kpm_ptr, b * skpm_b, offs_n, NK, HAS_MASK)
        kt = tl.load(k_base + offs_n[None, :] * sk_n + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * sv_n + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        s = _dot(q, kt, IEEE) * scale_log2
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, vt, IEEE)
        if DROPOUT:
            dp = dp * _dropout_mult(seed, rows, kb * BLOCK_N, NK, p_drop, inv_keep, BLOCK_N)
        ds = (p * (dp - delta[:, None])).to(q.dtype)
        dq += _dot(ds, tl.trans(kt), IEEE)
    if SPLIT:
        part = (pid_s.to(tl.int64) * tl.num_programs(1) + pid_bh) * NQ
        tl.store(dqp_ptr + (part + offs_m[:, None]) * D + offs_d[None, :], dq, mask=row_ok[:, None])
    else:
        tl.store(dq_ptr + (rows[:, None] * D + offs_d[None, :]), (dq * scale).to(dq_ptr.dtype.element_ty),
                 mask=row_ok[:, None])  # fmt: skip


@triton.jit
def _dq_merge_kernel(dqp_ptr, dq_ptr, N, NSPLIT, scale, BLOCK: tl.constexpr):
    """dq = scale * sum of the split partials, in split order (deterministic), rounded once to dq's dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    for s in range(0, NSPLIT):
        acc += tl.load(dqp_ptr + s * N + offs, mask=ok, other=0.0)
    tl.store(dq_ptr + offs, (acc * scale).to(dq_ptr.dtype.element_ty), mask=ok)


# --- launch configurations ----------------------------------------------------------------------
#
# One function per direction: the candidate configs for sm_90 and sm_80 (the first is the default) and the
# interpreter's. A launch takes its bucket's winner from FWD_TUNER / BWD_TUNER (kernels/_autotune.py:
# LaunchTuner, which times every candidate once per bucket on the user's GPU and keeps the winner on disk).
# Every candidate is compiled by the gate below (strictly: no register spill), so the tuner picks among them
# without new compile risks. Which tiles are worth trying comes from the FLOP / byte model in the module
# docstring and the register counts below; only the forward's 128 x 64 tile was timed (H200, no mask or dropout).

_INTERP_TILE = 16  # tl.dot's minimum; small tiles make partial tiles and many splits cheap to reach in tests
INTERPRETER_CONFIG = {"BLOCK_M": _INTERP_TILE, "BLOCK_N": _INTERP_TILE, "num_warps": 4, "num_stages": 1}
BWD_INTERPRETER_CONFIG = {
    **INTERPRETER_CONFIG,
    "DQ_M": _INTERP_TILE,
    "DQ_N": _INTERP_TILE,
    "dq_warps": 4,
    "dq_stages": 1,
}
DELTA_ROWS = 32  # query rows per program of the delta kernel: 24 x 8 programs at the AViT shape, B 1
MERGE_BLOCK = 1024


# Candidate tiles (BLOCK_M, BLOCK_N, warps, stages), the first the default, for each (operand class, head dim,
# architecture, HAS_MASK, DROPOUT): the kernels hold their tiles in registers at the edge of the 255-register
# budget, and the mask and dropout code moves that edge, so each flag combination has its own list. Each list is
# the first (at most three) of a preference order that compile for that key without spilling registers or
# exceeding shared memory, read from the sm_80 / sm_90 cubins of the compile gate (which checks every entry
# with every split flag, strictly). Preference: forward 128x64 / 4 warps (339 TFLOP/s on an H200), then wider
# warps, then smaller tiles; backward 128 resident keys first (half the dQ reduction traffic of 64). "half" is
# fp16 and bf16 (tensor-core dots); fp32 runs ieee dots on CUDA cores with small tiles.
_FWD_TILES: dict[tuple[str, int, int, bool, bool], tuple[tuple[int, int, int, int], ...]] = {
    ("half", 16, 80, False, False): ((128, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)),
    ("half", 16, 80, False, True): ((128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)),
    ("half", 16, 80, True, False): ((128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 2)),
    ("half", 16, 80, True, True): ((128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)),
    ("half", 16, 90, False, False): ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
    ("half", 16, 90, False, True): ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
    ("half", 16, 90, True, False): ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
    ("half", 16, 90, True, True): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)),
    ("half", 32, 80, False, False): ((128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2)),
    ("half", 32, 80, False, True): ((128, 64, 4, 2), (128, 64, 8, 2), (64, 64, 4, 2)),
    ("half", 32, 80, True, False): ((128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2)),
    ("half", 32, 80, True, True): ((128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2)),
    ("half", 32, 90, False, False): ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
    ("half", 32, 90, False, True): ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
    ("half", 32, 90, True, False): ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
    ("half", 32, 90, True, True): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)),
    ("half", 64, 80, False, False): ((128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)),
    ("half", 64, 80, False, True): ((128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2)),
    ("half", 64, 80, True, False): ((128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2)),
    ("half", 64, 80, True, True): ((64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)),
    ("half", 64, 90, False, False): ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3)),
    ("half", 64, 90, False, True): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)),
    ("half", 64, 90, True, False): ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 8, 3)),
    ("half", 64, 90, True, True): ((128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 4, 2)),
    ("half", 128, 80, False, False): ((128, 64, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)),
    ("half", 128, 80, False, True): ((64, 64, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2)),
    ("half", 128, 80, True, False): ((32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("half", 128, 80, True, True): ((64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)),
    ("half", 128, 90, False, False): ((128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 8, 3)),
    ("half", 128, 90, False, True): ((64, 32, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("half", 128, 90, True, False): ((64, 64, 8, 3), (64, 32, 4, 2), (32, 32, 4, 2)),
    ("half", 128, 90, True, True): ((32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 16, 80, False, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 16, 80, False, True): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 16, 80, True, False): ((64, 32, 8, 2), (32, 32, 4, 2), (32, 64, 4, 2)),
    ("fp32", 16, 80, True, True): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 16, 90, False, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 16, 90, False, True): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 16, 90, True, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 16, 90, True, True): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 32, 80, False, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 32, 80, False, True): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 32, 80, True, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 32, 80, True, True): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 32, 90, False, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 32, 90, False, True): ((32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2)),
    ("fp32", 32, 90, True, False): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 32, 90, True, True): ((64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2)),
    ("fp32", 64, 80, False, False): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2)),
    ("fp32", 64, 80, False, True): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 64, 80, True, False): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 64, 80, True, True): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 64, 90, False, False): ((64, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2)),
    ("fp32", 64, 90, False, True): ((32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2)),
    ("fp32", 64, 90, True, False): ((32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2)),
    ("fp32", 64, 90, True, True): ((32, 32, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2)),
    ("fp32", 128, 80, False, False): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 128, 80, False, True): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 128, 80, True, False): ((64, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)),
    ("fp32", 128, 80, True, True): ((64, 32, 8, 2), (32, 16, 4, 2)),
    ("fp32", 128, 90, False, False): ((64, 32, 8, 2),),
    ("fp32", 128, 90, False, True): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 128, 90, True, False): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
    ("fp32", 128, 90, True, True): ((64, 32, 8, 2), (32, 32, 4, 2), (16, 32, 4, 2)),
}
# Backward tiles (BLOCK_M queries, BLOCK_N keys, warps, stages) per (operand class, head dim, architecture,
# HAS_MASK, DROPOUT), the first the default. dK / dV kernel: 64-128 keys resident (the tile's rows: wgmma on
# sm_90), queries streamed; dQ kernel: 64-128 queries resident, 32-64 keys streamed. 8 warps and 2 stages
# keep the dots pipelined within the register budget; the compile gate checks every entry for spills. sm_80
# (mma.sync, accumulators in registers) has one candidate: 64x128 dK / dV tiles spill 8-456 B there and a
# 64x64 dQ tile 8-152 B (the kernel report at the AViT shape). fp32 (ieee dots) has one candidate, 8 warps, or 4 where 8
# keep an 8-byte stack frame (dK / dV masked on sm_80, dQ with dropout on sm_90 or at head dim 128; 4 warps spill
# elsewhere). With both mask and dropout on sm_80 the 16-bit tiles shrink or drop a stage (D 16 dK / dV one stage,
# D 128 dK / dV 32 keys, D 128 dQ two stages: the others keep an 8-32 B frame).
_DKDV_TILES: dict[tuple[str, int, int, bool, bool], tuple[tuple[int, int, int, int], ...]] = {
    ("half", 16, 80, False, False): ((32, 128, 8, 2),),
    ("half", 16, 80, False, True): ((32, 128, 8, 2),),
    ("half", 16, 80, True, False): ((32, 128, 8, 2),),
    ("half", 16, 80, True, True): ((32, 128, 8, 1),),
    ("half", 16, 90, False, False): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 16, 90, False, True): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 16, 90, True, False): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 16, 90, True, True): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 32, 80, False, False): ((32, 128, 8, 2),),
    ("half", 32, 80, False, True): ((32, 128, 8, 2),),
    ("half", 32, 80, True, False): ((32, 128, 8, 2),),
    ("half", 32, 80, True, True): ((32, 128, 8, 2),),
    ("half", 32, 90, False, False): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 32, 90, False, True): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 32, 90, True, False): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 32, 90, True, True): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 64, 80, False, False): ((32, 128, 8, 2),),
    ("half", 64, 80, False, True): ((32, 128, 8, 2),),
    ("half", 64, 80, True, False): ((32, 128, 8, 2),),
    ("half", 64, 80, True, True): ((32, 128, 8, 2),),
    ("half", 64, 90, False, False): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 64, 90, False, True): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 64, 90, True, False): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 64, 90, True, True): ((64, 128, 8, 2), (32, 128, 8, 2)),
    ("half", 128, 80, False, False): ((32, 64, 8, 1),),
    ("half", 128, 80, False, True): ((32, 64, 8, 1),),
    ("half", 128, 80, True, False): ((32, 64, 8, 1),),
    ("half", 128, 80, True, True): ((32, 32, 8, 1),),
    ("half", 128, 90, False, False): ((32, 64, 8, 2), (16, 64, 8, 2)),
    ("half", 128, 90, False, True): ((32, 64, 8, 2), (16, 64, 8, 2)),
    ("half", 128, 90, True, False): ((32, 64, 8, 2), (16, 64, 8, 2)),
    ("half", 128, 90, True, True): ((32, 64, 8, 2), (16, 64, 8, 2)),
    ("fp32", 16, 80, False, False): ((32, 32, 8, 2),),
    ("fp32", 16, 80, False, True): ((32, 32, 8, 2),),
    ("fp32", 16, 80, True, False): ((32, 32, 4, 2),),
    ("fp32", 16, 80, True, True): ((32, 32, 8, 2),),
    ("fp32", 16, 90, False, False): ((32, 32, 8, 2),),
    ("fp32", 16, 90, False, True): ((32, 32, 8, 2),),
    ("fp32", 16, 90, True, False): ((32, 32, 8, 2),),
    ("fp32", 16, 90, True, True): ((32, 32, 8, 2),),
    ("fp32", 32, 80, False, False): ((32, 32, 8, 2),),
    ("fp32", 32, 80, False, True): ((32, 32, 8, 2),),
    ("fp32", 32, 80, True, False): ((32, 32, 4, 2),),
    ("fp32", 32, 80, True, True): ((32, 32, 8, 2),),
    ("fp32", 32, 90, False, False): ((32, 32, 8, 2),),
    ("fp32", 32, 90, False, True): ((32, 32, 8, 2),),
    ("fp32", 32, 90, True, False): ((32, 32, 8, 2),),
    ("fp32", 32, 90, True, True): ((32, 32, 8, 2),),
    ("fp32", 64, 80, False, False): ((32, 32, 8, 2),),
    ("fp32", 64, 80, False, True): ((32, 32, 8, 2),),
    ("fp32", 64, 80, True, False): ((32, 32, 4, 2),),
    ("fp32", 64, 80, True, True): ((32, 32, 8, 2),),
    ("fp32", 64, 90, False, False): ((32, 32, 8, 2),),
    ("fp32", 64, 90, False, True): ((32, 32, 8, 2),),
    ("fp32", 64, 90, True, False): ((32, 32, 8, 2),),
    ("fp32", 64, 90, True, True): ((32, 32, 8, 2),),
    ("fp32", 128, 80, False, False): ((16, 32, 8, 2),),
    ("fp32", 128, 80, False, True): ((16, 32, 8, 2),),
    ("fp32", 128, 80, True, False): ((16, 32, 8, 2),),
    ("fp32", 128, 80, True, True): ((16, 32, 8, 2),),
    ("fp32", 128, 90, False, False): ((16, 32, 8, 2),),
    ("fp32", 128, 90, False, True): ((16, 32, 8, 2),),
    ("fp32", 128, 90, True, False): ((16, 32, 8, 2),),
    ("fp32", 128, 90, True, True): ((16, 32, 8, 2),),
}
_DQ_TILES: dict[tuple[str, int, int, bool, bool], tuple[tuple[int, int, int, int], ...]] = {
    ("half", 16, 80, False, False): ((128, 32, 8, 2),),
    ("half", 16, 80, False, True): ((128, 32, 8, 2),),
    ("half", 16, 80, True, False): ((128, 32, 8, 2),),
    ("half", 16, 80, True, True): ((128, 32, 8, 2),),
    ("half", 16, 90, False, False): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 16, 90, False, True): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 16, 90, True, False): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 16, 90, True, True): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 32, 80, False, False): ((128, 32, 8, 2),),
    ("half", 32, 80, False, True): ((128, 32, 8, 2),),
    ("half", 32, 80, True, False): ((128, 32, 8, 2),),
    ("half", 32, 80, True, True): ((128, 32, 8, 2),),
    ("half", 32, 90, False, False): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 32, 90, False, True): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 32, 90, True, False): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 32, 90, True, True): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 64, 80, False, False): ((128, 32, 8, 2),),
    ("half", 64, 80, False, True): ((128, 32, 8, 2),),
    ("half", 64, 80, True, False): ((128, 32, 8, 2),),
    ("half", 64, 80, True, True): ((128, 32, 8, 2),),
    ("half", 64, 90, False, False): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 64, 90, False, True): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 64, 90, True, False): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 64, 90, True, True): ((128, 32, 8, 2), (64, 64, 8, 2)),
    ("half", 128, 80, False, False): ((64, 32, 8, 1),),
    ("half", 128, 80, False, True): ((64, 32, 8, 1),),
    ("half", 128, 80, True, False): ((64, 32, 8, 1),),
    ("half", 128, 80, True, True): ((64, 32, 8, 2),),
    ("half", 128, 90, False, False): ((64, 32, 8, 2), (32, 32, 8, 2)),
    ("half", 128, 90, False, True): ((64, 32, 8, 2), (32, 32, 8, 2)),
    ("half", 128, 90, True, False): ((64, 32, 8, 2), (32, 32, 8, 2)),
    ("half", 128, 90, True, True): ((64, 32, 8, 2), (32, 32, 8, 2)),
    ("fp32", 16, 80, False, False): ((32, 32, 8, 2),),
    ("fp32", 16, 80, False, True): ((32, 32, 4, 2),),
    ("fp32", 16, 80, True, False): ((32, 32, 8, 2),),
    ("fp32", 16, 80, True, True): ((32, 32, 8, 2),),
    ("fp32", 16, 90, False, False): ((32, 32, 8, 2),),
    ("fp32", 16, 90, False, True): ((32, 32, 4, 2),),
    ("fp32", 16, 90, True, False): ((32, 32, 8, 2),),
    ("fp32", 16, 90, True, True): ((32, 32, 8, 2),),
    ("fp32", 32, 80, False, False): ((32, 32, 8, 2),),
    ("fp32", 32, 80, False, True): ((32, 32, 8, 1),),
    ("fp32", 32, 80, True, False): ((32, 32, 8, 2),),
    ("fp32", 32, 80, True, True): ((32, 32, 8, 2),),
    ("fp32", 32, 90, False, False): ((32, 32, 8, 2),),
    ("fp32", 32, 90, False, True): ((32, 32, 4, 2),),
    ("fp32", 32, 90, True, False): ((32, 32, 8, 2),),
    ("fp32", 32, 90, True, True): ((32, 32, 8, 2),),
    ("fp32", 64, 80, False, False): ((32, 32, 8, 2),),
    ("fp32", 64, 80, False, True): ((32, 32, 8, 2),),
    ("fp32", 64, 80, True, False): ((32, 32, 8, 2),),
    ("fp32", 64, 80, True, True): ((32, 32, 8, 2),),
    ("fp32", 64, 90, False, False): ((32, 32, 8, 2),),
    ("fp32", 64, 90, False, True): ((32, 32, 4, 2),),
    ("fp32", 64, 90, True, False): ((32, 32, 8, 2),),
    ("fp32", 64, 90, True, True): ((32, 32, 8, 2),),
    ("fp32", 128, 80, False, False): ((16, 32, 4, 2),),
    ("fp32", 128, 80, False, True): ((16, 32, 8, 2),),
    ("fp32", 128, 80, True, False): ((16, 32, 8, 2),),
    ("fp32", 128, 80, True, True): ((16, 32, 8, 2),),
    ("fp32", 128, 90, False, False): ((16, 32, 4, 2),),
    ("fp32", 128, 90, False, True): ((16, 32, 4, 2),),
    ("fp32", 128, 90, True, False): ((16, 32, 8, 2),),
    ("fp32", 128, 90, True, True): ((16, 32, 8, 2),),
}


def _tiles(table: dict, dtype: torch.dtype, d: int, arch: int, has_mask: bool, dropout: bool) -> list[dict[str, int]]:
    key = ("fp32" if dtype == torch.float32 else "half", d, 90 if arch >= 90 else 80, bool(has_mask), bool(dropout))
    if key not in table:
        raise ValueError(f"cross-attention kernels: no configs for head dim {d} (expected one of {HEAD_DIMS})")
    return [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st} for m, n, w, st in table[key]]


def fwd_configs(
    dtype: torch.dtype, d: int, arch: int, has_mask: bool = False, dropout: bool = False
) -> list[dict[str, int]]:
    """Forward candidates (BLOCK_M queries x BLOCK_N keys); the first is the default."""
    return _tiles(_FWD_TILES, dtype, d, arch, has_mask, dropout)


def bwd_configs(
    dtype: torch.dtype, d: int, arch: int, has_mask: bool = False, dropout: bool = False
) -> list[dict[str, int]]:
    """Backward candidates, the first the default: the dK / dV kernel's tile (BLOCK_N keys resident, BLOCK_M
    queries streamed; ``num_warps``, ``num_stages``) with the dQ kernel's (DQ_M queries resident, DQ_N keys
    streamed; ``dq_warps``, ``dq_stages``), paired in preference order."""
    key = ("fp32" if dtype == torch.float32 else "half", d, 90 if arch >= 90 else 80, bool(has_mask), bool(dropout))
    if key not in _DKDV_TILES:
        raise ValueError(f"cross-attention kernels: no configs for head dim {d} (expected one of {HEAD_DIMS})")
    kv, dq = _DKDV_TILES[key], _DQ_TILES[key]
    return [
        {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st,
         "DQ_M": qm, "DQ_N": qn, "dq_warps": qw, "dq_stages": qs}
        for (m, n, w, st), (qm, qn, qw, qs) in zip(kv, dq[: len(kv)] + dq[-1:] * (len(kv) - len(dq)))
    ]  # fmt: skip


def _dkdv_config(c: dict[str, int]) -> dict[str, int]:
    return {k: c[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")}


def _dq_config(c: dict[str, int]) -> dict[str, int]:
    return {"BLOCK_M": c["DQ_M"], "BLOCK_N": c["DQ_N"], "num_warps": c["dq_warps"], "num_stages": c["dq_stages"]}


def _combine_rows(d: int) -> int:
    """Query rows per program of the split merge (4 warps; its own grid, independent of the forward's tile): a
    [rows, D] fp32 accumulator plus one partial in flight stays spill-free (at most 202 registers, sm_80 and
    sm_90, in the gate's cubins); 128 rows of D 64 spilled."""
    return 32 if d <= 64 else 16


def candidates(
    kind: str, dtype: torch.dtype, d: int, device: torch.device | None, has_mask: bool, dropout: bool
) -> list[dict[str, int]]:
    """The configs a ``kind`` ("fwd" / "bwd") launch on ``device`` chooses from (interpreter: its one)."""
    if _interpreting():
        return [dict(INTERPRETER_CONFIG if kind == "fwd" else BWD_INTERPRETER_CONFIG)]
    return (fwd_configs if kind == "fwd" else bwd_configs)(dtype, d, _autotune.arch_class(device), has_mask, dropout)


def _bucket(
    q: torch.Tensor, k: torch.Tensor, kv_heads: int, has_mask: bool, dropout_p: float, splits: int | None
) -> tuple:
    """Launches in one bucket share one tuning: dtype, head dim, powers of two of Nq, Nk and B*Hq, the GQA group,
    flags and an explicit split count."""
    b, hq, nq, d = q.shape
    pow2 = _autotune.pow2
    return (_autotune.dtype(q), d, pow2(nq), pow2(k.shape[2]), pow2(b * hq), hq // kv_heads, has_mask, dropout_p > 0,
            splits)  # fmt: skip


def num_splits(programs: int, n_kblocks: int, device: torch.device) -> int:
    """Key splits so that ``programs * splits`` fills the GPU about four times over, each split keeping at
    least 4 key tiles (below that the partial write + merge costs more than it spreads): the forward's, and
    the dQ kernel's through :func:`bwd_splits`."""
    if n_kblocks <= 1:
        return 1
    sms = _aot.sm_count(device)
    if sms is None:
        return min(3, n_kblocks)  # interpreter: exercise the merge on every multi-tile test
    if programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, programs), n_kblocks // 4, 64))


def bwd_splits(programs: int, n_kblocks: int, device: torch.device) -> int:
    """Key splits of the dQ kernel (``programs`` = query tiles x B x Hq): as for the forward. Each split costs a
    dQ partial of B*Hq*Nq*D fp32, written and merged once; the dK / dV kernel needs none (a program per key
    tile)."""
    return num_splits(programs, n_kblocks, device)


def _split_plan(n_kblocks: int, splits: int) -> tuple[int, int]:
    """(splits, key tiles per split) with no empty split."""
    splits = max(1, min(splits, n_kblocks))
    per = triton.cdiv(n_kblocks, splits)
    return triton.cdiv(n_kblocks, per), per


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _key_mask(key_padding_mask: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, int, bool]:
    """(uint8 mask [B, Nk] with unit key stride, its batch stride, HAS_MASK) for the kernels.

    The bool mask is reinterpreted as uint8 (same bytes, 1 = padding), not copied. Without a mask a
    one-byte placeholder keeps the launch signature the compile gate built (the kernels never read it).
    """
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=device), 0, False
    m = _last_dim_contiguous(key_padding_mask).view(torch.uint8)
    return m, m.stride(0), True


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_heads: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    splits: int | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, Hq, Nq, D] (q's dtype, contiguous) and base-2 log-sum-exp [B, Hq, Nq] fp32.

    ``key_padding_mask`` [B, Nk] bool, True = padding: those keys get no weight. A query whose keys are
    all padding gets o = 0 and log-sum-exp -inf (the reference's SDPA also returns 0 for such rows).
    ``config``: the launch config (default: the bucket's tuned one among :func:`candidates`).
    """
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    kpm, skpm_b, has_mask = _key_mask(key_padding_mask, q.device)
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    group = hq // kv_heads
    if config is None:
        config = FWD_TUNER.choose(
            q.device,
            _bucket(q, k, kv_heads, has_mask, dropout_p, splits),
            candidates("fwd", q.dtype, d, q.device, has_mask, dropout_p > 0),
            lambda c: forward(q, k, v, kv_heads, scale, key_padding_mask, splits, dropout_p, seed, config=c),
        )
    cfg = config
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    n_kb = triton.cdiv(nk, bn)
    grid_m = triton.cdiv(nq, bm)
    if splits is None:
        splits = num_splits(grid_m * b * hq, n_kb, q.device)
    splits, per = _split_plan(n_kb, splits)
    o = _alloc.empty(b, hq, nq, d, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    split = splits > 1
    if split:
        op = _alloc.empty(splits, b * hq, nq, d, dtype=torch.float32, device=q.device)
        lsep = _alloc.empty(splits, b * hq, nq, dtype=torch.float32, device=q.device)
    else:
        # unused when SPLIT is off; an fp32 tensor keeps the launch signature the compile gate built
        op, lsep = lse, lse
    _fwd_kernel[(grid_m, b * hq, splits)](
        q,
        k,
        v,
        o,
        lse,
        op,
        lsep,
        kpm,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        o.stride(0),
        o.stride(1),
        o.stride(2),
        skpm_b,
        hq,
        nq,
        nk,
        group,
        per,
        scale * LOG2E,
        seed,
        float(dropout_p),
        D=d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        SPLIT=split,
        IEEE=q.dtype == torch.float32,
        HAS_MASK=has_mask,
        DROPOUT=dropout_p > 0,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    if split:
        _combine_kernel[(triton.cdiv(nq, _combine_rows(d)), b * hq)](
            op,
            lsep,
            o,
            lse,
            o.stride(0),
            o.stride(1),
            o.stride(2),
            hq,
            nq,
            splits,
            D=d,
            BLOCK_M=_combine_rows(d),
            num_warps=4,
            num_stages=1,
        )
    return o, lse


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    kv_heads: int,
    scale: float,
    key_padding_mask: torch.Tensor | None = None,
    splits: int | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq [B, Hq, Nq, D], dk, dv [B, Hkv, Nk, D], all contiguous in q's dtype (padding keys get dk = dv = 0).
    ``splits``: key splits of the fused kernel (None: :func:`bwd_splits`). ``config`` as for :func:`forward`."""
    do, q, k, v, o = (_last_dim_contiguous(t) for t in (do, q, k, v, o))
    kpm, skpm_b, has_mask = _key_mask(key_padding_mask, q.device)
    b, hq, nq, d = q.shape
    nk = k.shape[2]
    group = hq // kv_heads
    if config is None:
        config = BWD_TUNER.choose(
            q.device,
            _bucket(q, k, kv_heads, has_mask, dropout_p, splits),
            candidates("bwd", q.dtype, d, q.device, has_mask, dropout_p > 0),
            lambda c: backward(
                do, q, k, v, o, lse, kv_heads, scale, key_padding_mask, splits, dropout_p, seed, config=c
            ),
        )
    delta = _alloc.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    dbm = INTERPRETER_CONFIG["BLOCK_M"] if _interpreting() else DELTA_ROWS
    _delta_kernel[(triton.cdiv(nq, dbm), b * hq)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], hq, nq, D=d, BLOCK_M=dbm, num_warps=4, num_stages=1,
    )  # fmt: skip
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], skpm_b)
    flags = {"D": d, "IEEE": q.dtype == torch.float32, "HAS_MASK": has_mask, "DROPOUT": dropout_p > 0}
    # dK, dV: a program per key tile of each (batch, KV head); no split, nothing to merge
    kv = _dkdv_config(config)
    dk = _alloc.empty(b, kv_heads, nk, d, dtype=q.dtype, device=q.device)
    dv = _alloc.empty(b, kv_heads, nk, d, dtype=q.dtype, device=q.device)
    _bwd_dkdv_kernel[(triton.cdiv(nk, kv["BLOCK_N"]), b * kv_heads)](
        q, k, v, do, lse, delta, dk, dv, kpm, *strides, kv_heads, nq, nk, group, scale, scale * LOG2E, seed,
        float(dropout_p), **flags, BLOCK_M=kv["BLOCK_M"], BLOCK_N=kv["BLOCK_N"], num_warps=kv["num_warps"],
        num_stages=kv["num_stages"],
    )  # fmt: skip
    # dQ: a program per query tile of each (batch, query head) and key split
    qc = _dq_config(config)
    grid_m = triton.cdiv(nq, qc["BLOCK_M"])
    n_kb = triton.cdiv(nk, qc["BLOCK_N"])
    if splits is None:
        splits = bwd_splits(grid_m * b * hq, n_kb, q.device)
    splits, per = _split_plan(n_kb, splits)
    dq = _alloc.empty(b, hq, nq, d, dtype=q.dtype, device=q.device)
    split = splits > 1
    # every element of the partials is written; without a split the launch signature keeps an fp32 tensor
    dqp = _alloc.empty(splits, b * hq, nq, d, dtype=torch.float32, device=q.device) if split else delta
    _bwd_dq_kernel[(grid_m, b * hq, splits)](
        q, k, v, do, lse, delta, dq, dqp, kpm, *strides, hq, nq, nk, group, per, scale, scale * LOG2E, seed,
        float(dropout_p), **flags, SPLIT=split, BLOCK_M=qc["BLOCK_M"], BLOCK_N=qc["BLOCK_N"],
        num_warps=qc["num_warps"], num_stages=qc["num_stages"],
    )  # fmt: skip
    if split:
        n = dq.numel()
        _dq_merge_kernel[(triton.cdiv(n, MERGE_BLOCK),)](dqp, dq, n, splits, scale, BLOCK=MERGE_BLOCK, num_warps=4)
    return dq, dk, dv


FWD_TUNER = _autotune.LaunchTuner("cross_attention_fwd", [_fwd_kernel, _combine_kernel])
BWD_TUNER = _autotune.LaunchTuner(
    "cross_attention_bwd", [_delta_kernel, _bwd_dkdv_kernel, _bwd_dq_kernel, _dq_merge_kernel]
)

# --- compile gate -------------------------------------------------------------------------------

_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
_STRIDES = ("sq_b", "sq_h", "sq_m", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n")


def _register() -> None:
    i32 = "i32"
    # Every candidate of every (dtype, head dim, architecture, mask, dropout) with the flags it is chosen for,
    # strictly (no spill); the forward also with and without key splits. The quick gate compiles the first
    # candidate of each flag combination at the AViT head dim 64 in bf16 and fp32.
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        t = _PTR[dtype]
        ieee = dtype == torch.float32
        fwd_sig = {n: t for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
        fwd_sig.update({"lse_ptr": "*fp32", "op_ptr": "*fp32", "lsep_ptr": "*fp32", "kpm_ptr": "*u8"})
        fwd_sig.update({n: i32 for n in (*_STRIDES, "so_b", "so_h", "so_m", "skpm_b", "H", "NQ", "NK", "GROUP")})
        fwd_sig.update({"BLOCKS_PER_SPLIT": i32, "scale_log2": "fp32", "seed": i32, "p_drop": "fp32"})
        common = {n: t for n in ("q_ptr", "k_ptr", "v_ptr", "do_ptr")}
        common.update({"lse_ptr": "*fp32", "delta_ptr": "*fp32", "kpm_ptr": "*u8"})
        common.update({n: i32 for n in (*_STRIDES, "sd_b", "sd_h", "sd_m", "skpm_b", "NQ", "NK", "GROUP")})
        common.update({"scale": "fp32", "scale_log2": "fp32", "seed": i32, "p_drop": "fp32"})
        kvsig = {**common, "dk_ptr": t, "dv_ptr": t, "HKV": i32}
        dqsig = {**common, "dq_ptr": t, "dqp_ptr": "*fp32", "H": i32, "BLOCKS_PER_SPLIT": i32}
        for d in HEAD_DIMS:
            rep = d == 64 and dtype != torch.float16
            for arch in (80, 90):
                for mask in (False, True):
                    for drop in (False, True):
                        flags = {"D": d, "IEEE": ieee, "HAS_MASK": mask, "DROPOUT": drop}
                        fwd = fwd_configs(dtype, d, arch, mask, drop)
                        _aot.register(
                            _fwd_kernel,
                            signatures=[fwd_sig],
                            configs=[{**c, **flags, "SPLIT": s} for c in fwd for s in (True, False)],
                            name="cross_attention_fwd",
                            archs=(arch,),
                            strict=True,
                            representative=rep,
                        )
                        bwd = bwd_configs(dtype, d, arch, mask, drop)
                        # the backward tiles sit at the edge of the register budget: strictly with the alignment a
                        # launch of contiguous tensors gets at run time (what the kernel report also checks), and
                        # without alignment hints (odd sizes or strides) with spills reported, not failing
                        for generic, strict in ((False, True), (True, False)):
                            spec = None if generic else [{}]
                            _aot.register(
                                _bwd_dkdv_kernel,
                                signatures=[kvsig],
                                configs=[{**_dkdv_config(c), **flags} for c in bwd],
                                name="cross_attention_bwd_dkdv",
                                archs=(arch,),
                                strict=strict,
                                representative=rep,
                                generic=generic,
                                specializations=spec,
                            )
                            _aot.register(
                                _bwd_dq_kernel,
                                signatures=[dqsig],
                                configs=[{**_dq_config(c), **flags, "SPLIT": sp} for c in bwd for sp in (True, False)],
                                name="cross_attention_bwd_dq",
                                archs=(arch,),
                                strict=strict,
                                representative=rep,
                                generic=generic,
                                specializations=spec,
                            )
            _aot.register(
                _combine_kernel,
                signatures=[
                    {
                        "op_ptr": "*fp32",
                        "lsep_ptr": "*fp32",
                        "o_ptr": t,
                        "lse_ptr": "*fp32",
                        **{n: i32 for n in ("so_b", "so_h", "so_m", "H", "NQ", "NSPLIT")},
                    }
                ],
                configs=[{"D": d, "BLOCK_M": _combine_rows(d), "num_warps": 4, "num_stages": 1}],
                name="cross_attention_combine",
                strict=True,
                representative=rep,
            )
            _aot.register(
                _delta_kernel,
                signatures=[
                    {
                        "o_ptr": t,
                        "do_ptr": t,
                        "delta_ptr": "*fp32",
                        **{n: i32 for n in ("so_b", "so_h", "so_m", "sd_b", "sd_h", "sd_m", "H", "NQ")},
                    }
                ],
                configs=[{"D": d, "BLOCK_M": DELTA_ROWS, "num_warps": 4, "num_stages": 1}],
                name="cross_attention_delta",
                strict=True,
                representative=rep,
            )
        _aot.register(
            _dq_merge_kernel,
            signatures=[{"dqp_ptr": "*fp32", "dq_ptr": t, "N": i32, "NSPLIT": i32, "scale": "fp32"}],
            configs=[{"BLOCK": MERGE_BLOCK, "num_warps": 4}],
            name="cross_attention_dq_merge",
            strict=True,
        )


_register()

__all__ = ["HEAD_DIMS", "backward", "bwd_configs", "dropout_keep_mask", "forward", "fwd_configs"]
