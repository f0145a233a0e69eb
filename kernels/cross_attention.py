"""Triton kernels for grouped-query cross-attention (KERNELS.md K4), not causal, Nq != Nk.

q: [B, Hq, Nq, D]; k, v: [B, Hkv, Nk, D]; query head h reads KV head h // (Hq // Hkv). D is a power
of two in 16..128. fp16 / bf16 use tensor-core dots with fp32 accumulation; fp32 uses ieee dots
(slower, but within fp32 rounding of an fp64 reference).

Forward: grid (query tiles, B * Hq, key splits). At the AViT shape (B 1, Nq 768, 8 heads) one program
per query tile gives 6 x 8 = 48 programs for 132 SMs, each walking 27,648 keys; splitting the keys
into S ranges gives 48 * S programs, each writing its normalised partial output and base-2
log-sum-exp in fp32, which ``_combine_kernel`` merges exactly (online rescaling over the splits).

Backward: ``_delta_kernel`` computes delta = rowsum(dO * o); then one fused kernel, ``_bwd_kernel``, with
grid (key splits S, B * Hkv). A program owns a contiguous range of key tiles of one KV head; for each key tile
it keeps K, V and the dK, dV accumulators on chip and streams every query tile of the head group's Hq / Hkv
query heads past them, computing S = QK^T, P, dP = dO V^T and dS once per (query tile, key tile) and from
them all three gradients: dV += P^T dO, dK += dS^T Q, and dQ_tile = dS K, which it adds into its split's
fp32 dQ partial [S, B*Hq, Nq, D]. Only that program writes that partial (it zeroes it, then reduces into it
in program order), so the sums are the same in every run; ``_dq_merge_kernel`` adds
the S partials in split order, scales and rounds once (deterministic, no atomics across programs).

FLOP / byte model of the backward (per batch, bf16, s = 2 bytes; the AViT shape in brackets: Hq 8, Hkv 4,
Nq 768, Nk 27,648, D 64; BLOCK_N = 128 keys resident):
  matmul FLOP   = 10 * Hq * Nq * Nk * D  (S recomputed, dP, dV, dK, dQ)            [108.7 GFLOP]
                  the previous two-kernel design (dK/dV pass, then a key-split dQ pass) recomputed S and dP
                  in both passes: 14 * Hq * Nq * Nk * D                             [152.2 GFLOP, +40 %]
  DRAM bytes    = s * Hkv * Nk * D * 4 (read K, V; write dK, dV)                   [57 MB]
                + s * Hq * Nq * D * 3 (Q, dO read; dQ written), each key-split program re-reads Q and dO
                  of its head group, which stay in L2 (2 * 2 * Nq * D * s = 393 KB per KV head)
                + 4 * S * Hq * Nq * D * 2 (dQ partials written and read once)      [~52 MB at S*B*Hkv = 132]
  L2 reductions = 4 * Hq * Nq * D * Nk / BLOCK_N (one fp32 [Nq, D] per key tile per query head) [340 MB]
With Nk / Nq = 36 the kernel is compute-bound: at the bf16 tensor-core rate the 108.7 GFLOP need ~0.14 ms
on an H100/H200 (790 TFLOP/s measured), while the ~110 MB of DRAM traffic need ~0.03 ms and the reductions
arrive at ~1.3 TB/s even at 400 TFLOP/s, within L2's reduction bandwidth. Against the old design the new one
removes 40 % of the matmul work, the second pass over K and V, and the separate dQ kernel's launch; what it
adds (the partial buffer, ~52 MB written and read) costs about 0.03 ms at DRAM speed. Why this should beat
SDPA's cuDNN backward (0.30 ms measured at B 1 on the H200, about 360 TFLOP/s on the 10x count) is that
estimate only: it has not been measured, and the KV-head grouping (both query heads of a KV head in one
program, so K and V are read once for both) is the one structural advantage over an SDPA call on expanded
heads.

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

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
AOT_HELPERS = {"_key_ok", "_live_tiles"}  # a jit helper that takes a pointer (compiled inside the kernels)


def _interpreting() -> bool:
    from fm_engine.ops._dispatch import interpreting

    return interpreting()


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
def _bwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    do_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    dqp_ptr,
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
    sd_b,
    sd_h,
    sd_m,
    skpm_b,
    HKV,
    NQ,
    NK,
    GROUP,
    BLOCKS_PER_SPLIT,
    scale,
    scale_log2,
    seed,
    p_drop,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dK, dV (final) and this split's dQ partial (unscaled fp32, [S, B*Hq, NQ, D]) of one KV head."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    n_hq = HKV * GROUP
    offs_d = tl.arange(0, D)
    inv_keep = 1.0 / (1.0 - p_drop)
    # This program alone writes its split's partial: it zeroes it, then adds each key tile's dQ into it with
    # reductions issued in program order (separated by barriers), so the fp32 sums are the same in every run.
    # Zeroing here rather than with a memset keeps the lines in L2 for the reductions that follow.
    dqp_split = dqp_ptr + pid_s.to(tl.int64) * tl.num_programs(1) * GROUP * NQ * D
    for g in range(0, GROUP):
        for start_m in range(0, NQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            dq_ptrs = dqp_split + ((b * n_hq + hk * GROUP + g) * NQ + offs_m[:, None]) * D + offs_d[None, :]
            tl.store(dq_ptrs, tl.zeros([BLOCK_M, D], tl.float32), mask=(offs_m < NQ)[:, None])
    tl.debug_barrier()  # the zeros land before any reduction (a reduction may come from another thread)
    kb_start = pid_s * BLOCKS_PER_SPLIT
    kb_end = tl.minimum(kb_start + BLOCKS_PER_SPLIT, tl.cdiv(NK, BLOCK_N))
    for kb in range(kb_start, kb_end):
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        in_seq = offs_n < NK
        col_ok = _key_ok(kpm_ptr, b * skpm_b, offs_n, NK, HAS_MASK)
        # a tile of padding keys only gets dK = dV = 0 and adds nothing to dQ: its query loop is skipped
        nq_walk = tl.where(tl.max(col_ok.to(tl.int32), 0) > 0, NQ, 0)
        k = tl.load(
            k_ptr + b * sk_b + hk * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        v = tl.load(
            v_ptr + b * sv_b + hk * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=col_ok[:, None], other=0.0
        )
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for g in range(0, GROUP):
            h = hk * GROUP + g
            q_base = q_ptr + b * sq_b + h * sq_h
            do_base = do_ptr + b * sd_b + h * sd_h
            row_base = (b * n_hq + h) * NQ
            for start_m in range(0, nq_walk, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                row_ok = offs_m < NQ
                q = tl.load(q_base + offs_m[:, None] * sq_m + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                do = tl.load(do_base + offs_m[:, None] * sd_m + offs_d[None, :], mask=row_ok[:, None], other=0.0)
                lse = _lse_for_backward(tl.load(lse_ptr + row_base + offs_m, mask=row_ok, other=0.0))
                delta = tl.load(delta_ptr + row_base + offs_m, mask=row_ok, other=0.0)
                st = _dot(k, tl.trans(q), IEEE) * scale_log2  # S^T [BLOCK_N, BLOCK_M]
                pt = tl.where(row_ok[None, :] & col_ok[:, None], tl.exp2(st - lse[None, :]), 0.0)
                dpt = _dot(v, tl.trans(do), IEEE)
                if DROPOUT:  # dV = P_d^T dO, dP = (dO V^T) * mult; delta = rowsum(dO * O) already sees the mask
                    mult = tl.trans(_dropout_mult(seed, row_base + offs_m, kb * BLOCK_N, NK, p_drop, inv_keep, BLOCK_N))
                    dv += _dot((pt * mult).to(do.dtype), do, IEEE)
                    dpt = dpt * mult
                else:
                    dv += _dot(pt.to(do.dtype), do, IEEE)
                dst = (pt * (dpt - delta[None, :])).to(q.dtype)
                dk += _dot(dst, q, IEEE)
                dq = _dot(tl.trans(dst), k, IEEE)  # [BLOCK_M, D]
                dq_ptrs = dqp_split + ((b * n_hq + h) * NQ + offs_m[:, None]) * D + offs_d[None, :]
                # a plain store on the first tile instead of the zeroing would need a branch here, which
                # Triton 3.6's software pipeliner rejects for sm_90
                tl.atomic_add(dq_ptrs, dq, mask=row_ok[:, None], sem="relaxed")
        tl.store(
            dk_ptr + (pid_bh * NK + offs_n[:, None]) * D + offs_d[None, :],
            (dk * scale).to(dk_ptr.dtype.element_ty),
            mask=in_seq[:, None],
        )
        tl.store(
            dv_ptr + (pid_bh * NK + offs_n[:, None]) * D + offs_d[None, :],
            dv.to(dv_ptr.dtype.element_ty),
            mask=in_seq[:, None],
        )


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
_BWD_TILES: dict[tuple[str, int, int, bool, bool], tuple[tuple[int, int, int, int], ...]] = {
    ("half", 16, 80, False, False): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 16, 80, False, True): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 16, 80, True, False): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 16, 80, True, True): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 16, 90, False, False): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 16, 90, False, True): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 16, 90, True, False): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 16, 90, True, True): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 32, 80, False, False): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 8, 1)),
    ("half", 32, 80, False, True): ((32, 128, 8, 1), (32, 128, 8, 2), (32, 64, 4, 1)),
    ("half", 32, 80, True, False): ((32, 128, 8, 1), (32, 128, 8, 2), (64, 64, 8, 1)),
    ("half", 32, 80, True, True): ((32, 128, 8, 1), (32, 128, 8, 2), (32, 64, 4, 1)),
    ("half", 32, 90, False, False): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 32, 90, False, True): ((32, 128, 8, 1), (32, 128, 8, 2), (64, 64, 8, 1)),
    ("half", 32, 90, True, False): ((64, 128, 8, 1), (64, 128, 8, 2), (32, 128, 4, 1)),
    ("half", 32, 90, True, True): ((32, 128, 8, 1), (32, 128, 8, 2), (64, 64, 8, 1)),
    ("half", 64, 80, False, False): ((32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 1)),
    ("half", 64, 80, False, True): ((32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 1)),
    ("half", 64, 80, True, False): ((32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 1)),
    ("half", 64, 80, True, True): ((16, 64, 8, 1), (16, 64, 8, 2), (32, 32, 8, 1)),
    ("half", 64, 90, False, False): ((64, 128, 8, 1), (32, 128, 8, 1), (32, 128, 8, 2)),
    ("half", 64, 90, False, True): ((32, 128, 8, 1), (32, 64, 8, 1), (32, 64, 8, 2)),
    ("half", 64, 90, True, False): ((32, 128, 8, 1), (32, 128, 8, 2), (64, 64, 8, 2)),
    ("half", 64, 90, True, True): ((32, 128, 8, 1), (32, 64, 8, 1), (32, 64, 8, 2)),
    ("half", 128, 80, False, False): ((32, 32, 8, 1), (32, 32, 8, 2), (16, 32, 4, 1)),
    ("half", 128, 80, False, True): ((32, 32, 8, 1), (32, 32, 8, 2), (16, 32, 8, 1)),
    ("half", 128, 80, True, False): ((32, 32, 8, 1), (16, 32, 8, 1), (16, 32, 8, 2)),
    ("half", 128, 80, True, True): ((32, 16, 8, 1), (16, 16, 8, 1), (16, 16, 4, 1)),
    ("half", 128, 90, False, False): ((32, 32, 8, 1), (32, 32, 8, 2), (16, 32, 4, 1)),
    ("half", 128, 90, False, True): ((32, 32, 8, 1), (32, 32, 8, 2), (16, 32, 4, 1)),
    ("half", 128, 90, True, False): ((32, 32, 8, 1), (32, 32, 8, 2), (16, 32, 4, 1)),
    ("half", 128, 90, True, True): ((32, 32, 8, 1), (32, 32, 8, 2), (16, 32, 8, 1)),
    ("fp32", 16, 80, False, False): ((32, 32, 4, 2), (16, 64, 4, 2), (16, 64, 8, 2)),
    ("fp32", 16, 80, False, True): ((32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)),
    ("fp32", 16, 80, True, False): ((32, 32, 4, 2), (16, 64, 4, 2), (16, 64, 8, 2)),
    ("fp32", 16, 80, True, True): ((32, 32, 8, 2), (16, 64, 4, 2), (16, 64, 8, 2)),
    ("fp32", 16, 90, False, False): ((32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)),
    ("fp32", 16, 90, False, True): ((32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)),
    ("fp32", 16, 90, True, False): ((32, 32, 4, 2), (16, 64, 4, 2), (16, 64, 8, 2)),
    ("fp32", 16, 90, True, True): ((32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)),
    ("fp32", 32, 80, False, False): ((32, 32, 8, 2), (16, 64, 4, 2), (32, 16, 4, 2)),
    ("fp32", 32, 80, False, True): ((16, 64, 4, 2), (32, 16, 4, 2), (32, 16, 8, 2)),
    ("fp32", 32, 80, True, False): ((32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)),
    ("fp32", 32, 80, True, True): ((16, 32, 4, 2), (16, 16, 4, 2), (32, 64, 8, 2)),
    ("fp32", 32, 90, False, False): ((32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 8, 2)),
    ("fp32", 32, 90, False, True): ((32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)),
    ("fp32", 32, 90, True, False): ((32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)),
    ("fp32", 32, 90, True, True): ((32, 32, 4, 2), (32, 32, 8, 2), (16, 64, 4, 2)),
    ("fp32", 64, 80, False, False): ((32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2)),
    ("fp32", 64, 80, False, True): ((32, 32, 8, 2), (16, 64, 8, 2), (32, 16, 8, 2)),
    ("fp32", 64, 80, True, False): ((32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2)),
    ("fp32", 64, 80, True, True): ((16, 64, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)),
    ("fp32", 64, 90, False, False): ((32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2)),
    ("fp32", 64, 90, False, True): ((32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2)),
    ("fp32", 64, 90, True, False): ((32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)),
    ("fp32", 64, 90, True, True): ((32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)),
    ("fp32", 128, 80, False, False): ((16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)),
    ("fp32", 128, 80, False, True): ((16, 32, 8, 2), (16, 16, 4, 2), (16, 16, 8, 2)),
    ("fp32", 128, 80, True, False): ((16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)),
    ("fp32", 128, 80, True, True): ((16, 32, 8, 2), (16, 16, 4, 2), (16, 16, 8, 2)),
    ("fp32", 128, 90, False, False): ((16, 64, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)),
    ("fp32", 128, 90, False, True): ((16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)),
    ("fp32", 128, 90, True, False): ((16, 64, 8, 2), (16, 32, 8, 2), (32, 16, 8, 2)),
    ("fp32", 128, 90, True, True): ((16, 32, 8, 2), (32, 16, 8, 2), (16, 16, 4, 2)),
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
    """Fused backward candidates (BLOCK_N keys resident, BLOCK_M queries streamed); the first is the default."""
    return _tiles(_BWD_TILES, dtype, d, arch, has_mask, dropout)


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
        return [dict(INTERPRETER_CONFIG)]
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


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def num_splits(programs: int, n_kblocks: int, device: torch.device) -> int:
    """Forward key splits so that ``programs * splits`` fills the GPU about four times over, each split
    keeping at least 4 key tiles (below that the partial write + merge costs more than it spreads)."""
    if n_kblocks <= 1:
        return 1
    if device.type != "cuda":
        return min(3, n_kblocks)  # interpreter: exercise the merge on every multi-tile test
    sms = _sms(device)
    if programs >= 2 * sms:
        return 1
    return max(1, min(triton.cdiv(4 * sms, programs), n_kblocks // 4, 64))


def bwd_splits(kv_programs: int, n_kblocks: int, device: torch.device) -> int:
    """Backward key splits: one program per (split, batch, KV head), as many as keep every SM busy with the
    fewest key tiles per program (the makespan), and the fewest splits among equals (each split costs a dQ
    partial of B*Hq*Nq*D fp32, written and merged once)."""
    if n_kblocks <= 1:
        return 1
    if device.type != "cuda":
        return min(3, n_kblocks)  # interpreter: exercise the partial merge on every multi-tile test
    sms = _sms(device)
    best, best_cost = 1, None
    for s in range(1, min(n_kblocks, 128) + 1):
        waves = triton.cdiv(s * kv_programs, sms)
        cost = waves * triton.cdiv(n_kblocks, s)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


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
    cfg = config
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    delta = _alloc.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    dbm = INTERPRETER_CONFIG["BLOCK_M"] if _interpreting() else 64
    _delta_kernel[(triton.cdiv(nq, dbm), b * hq)](
        o,
        do,
        delta,
        o.stride(0),
        o.stride(1),
        o.stride(2),
        do.stride(0),
        do.stride(1),
        do.stride(2),
        hq,
        nq,
        D=d,
        BLOCK_M=dbm,
        num_warps=4,
        num_stages=1,
    )
    n_kb = triton.cdiv(nk, bn)
    if splits is None:
        splits = bwd_splits(b * kv_heads, n_kb, q.device)
    splits, per = _split_plan(n_kb, splits)
    dk = _alloc.empty(b, kv_heads, nk, d, dtype=q.dtype, device=q.device)
    dv = _alloc.empty(b, kv_heads, nk, d, dtype=q.dtype, device=q.device)
    dqp = _alloc.empty(splits, b * hq, nq, d, dtype=torch.float32, device=q.device)  # every element written
    _bwd_kernel[(splits, b * kv_heads)](
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        dqp,
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
        do.stride(0),
        do.stride(1),
        do.stride(2),
        skpm_b,
        kv_heads,
        nq,
        nk,
        group,
        per,
        scale,
        scale * LOG2E,
        seed,
        float(dropout_p),
        D=d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        IEEE=q.dtype == torch.float32,
        HAS_MASK=has_mask,
        DROPOUT=dropout_p > 0,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    dq = _alloc.empty(b, hq, nq, d, dtype=q.dtype, device=q.device)
    n = dq.numel()
    _dq_merge_kernel[(triton.cdiv(n, MERGE_BLOCK),)](dqp, dq, n, splits, scale, BLOCK=MERGE_BLOCK, num_warps=4)
    return dq, dk, dv


FWD_TUNER = _autotune.LaunchTuner("cross_attention_fwd", [_fwd_kernel, _combine_kernel])
BWD_TUNER = _autotune.LaunchTuner("cross_attention_bwd", [_delta_kernel, _bwd_kernel, _dq_merge_kernel])

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
        bsig = {n: t for n in ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "dk_ptr", "dv_ptr")}
        bsig.update({"lse_ptr": "*fp32", "delta_ptr": "*fp32", "dqp_ptr": "*fp32", "kpm_ptr": "*u8"})
        bsig.update({n: i32 for n in (*_STRIDES, "sd_b", "sd_h", "sd_m", "skpm_b", "HKV", "NQ", "NK", "GROUP")})
        bsig.update({"BLOCKS_PER_SPLIT": i32, "scale": "fp32", "scale_log2": "fp32", "seed": i32, "p_drop": "fp32"})
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
                        _aot.register(
                            _bwd_kernel,
                            signatures=[bsig],
                            configs=[{**c, **flags} for c in bwd_configs(dtype, d, arch, mask, drop)],
                            name="cross_attention_bwd",
                            archs=(arch,),
                            strict=True,
                            representative=rep,
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
                configs=[{"D": d, "BLOCK_M": 64, "num_warps": 4, "num_stages": 1}],
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
