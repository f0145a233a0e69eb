"""Bias-gradient kernel: the relative-position bias gradient from per-program partial sums, reduced in a fixed
order (deterministic; no atomics).

The bias [n_head, N, N] is added after the softmax and shared by every frame and group, so its gradient is
dbias[h] = sum over (frame, group) of dA_d * mult, with dA_d = dO_g,h @ v_g,h^T (the gradient of the dropped
attention) and mult the forward's dropout multiplier: it needs dO and v only, not the scores. A program owns
one head, one [BLOCK_M, BLOCK_N] tile of the N x N matrix and one chunk of consecutive (frame, group) pairs,
walks its chunk in order accumulating in registers, and stores its partial sum into ``part`` [chunks, n_head,
N, N] (fp32); the launcher sums ``part`` over the chunks (a fixed-shape reduction: the same bits on every run).
Products: ``mm`` (tensor cores on fp16 / bf16 operands, exact IEEE fp32 for fp32).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import dropout_tile, mm, tile_off, tok_off


@triton.jit
def bias_grad_kernel(
    v_ptr, do_ptr, part_ptr,
    C, H, W, N, n_groups, nWw, nPh, nPw, ph, pw, n_head, D_V, RUN_V, n_items, per_chunk, n_tb, seed, p_drop,
    MODE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, VEC: tl.constexpr,
):  # fmt: skip
    """part[s, h, i, j] = sum over pairs r of chunk s (frame r // n_groups, group r % n_groups) of dA[h, i, j]."""
    DT: tl.constexpr = v_ptr.dtype.element_ty
    IEEE: tl.constexpr = DT == tl.float32
    pid = tl.program_id(0)
    jb = pid % n_tb
    r = pid // n_tb
    ib = r % n_tb
    r = r // n_tb
    h = r % n_head
    s = r // n_head
    offs_m = ib * BLOCK + tl.arange(0, BLOCK)
    offs_n = jb * BLOCK + tl.arange(0, BLOCK)
    mask_m = offs_m < N
    mask_n = offs_n < N
    offs_d = tl.arange(0, BLOCK_D)
    inv_keep = 1.0 / (1.0 - p_drop)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    r0 = s * per_chunk
    for it in range(r0, tl.minimum(r0 + per_chunk, n_items)):
        g = it % n_groups
        bt = (it // n_groups).to(tl.int64)
        base = bt * (C * H * W)
        tok_m = tok_off(offs_m, g, MODE, C, H, W, nWw, nPh, nPw, ph, pw)
        tok_n = tok_off(offs_n, g, MODE, C, H, W, nWw, nPh, nPw, ph, pw)
        da = tl.zeros([BLOCK, BLOCK], tl.float32)
        for d0 in range(0, D_V, BLOCK_D):
            md = d0 + offs_d < D_V
            off_m = tile_off(base, tok_m, h, d0 + offs_d, D_V, RUN_V, MODE, C, H, W, pw, VEC)
            off_n = tile_off(base, tok_n, h, d0 + offs_d, D_V, RUN_V, MODE, C, H, W, pw, VEC)
            do = tl.load(do_ptr + off_m, mask=mask_m[:, None] & md[None, :], other=0.0)
            v = tl.load(v_ptr + off_n, mask=mask_n[:, None] & md[None, :], other=0.0)
            da += mm(do, tl.trans(v), IEEE, DT)
        if DROPOUT:
            rows = ((bt * n_groups + g) * n_head + h) * N + offs_m
            da = da * dropout_tile(seed, rows, jb * BLOCK, N, p_drop, inv_keep, BLOCK)
        acc += da
    out = (s * n_head + h) * N * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(part_ptr + out, acc, mask=mask_m[:, None] & mask_n[None, :])
