"""Attention dropout shared by the attention kernels (window, temporal, cross): a keep mask regenerated from
(seed, position) with Triton's Philox generator wherever it is needed, never stored.

Counter scheme. An attention op's probabilities form rows (every leading index and the query, flattened
row-major: e.g. (batch, head, query) for cross-attention) of ``n_keys`` keys. Key j of row r uses word
``j % 4`` of Philox(seed, counter = r * ceil(n_keys / 4) + j // 4): one Philox evaluation serves four
neighbouring keys (``tl.rand4x``), a quarter of the integer work of one evaluation per element, and the mask
does not depend on any kernel's tile sizes. Element (r, j) is kept when that word, as a uniform float in
[0, 1), is >= p; kept values are scaled by 1 / (1 - p), as ``F.dropout`` does.

The seed is drawn on the host from torch's CPU generator (``torch.manual_seed`` makes it reproducible, and
no device sync happens), returned by the forward as a tensor and read again by the backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot

from fm_engine import _alloc

SEED_MAX = 2**31 - 1  # seeds are int32 kernel arguments


def draw_seed() -> int:
    """A fresh dropout seed from torch's (CPU) default generator."""
    return int(torch.randint(0, SEED_MAX, (1,)).item())


@triton.jit
def keep4(seed, ctr, p):
    """Keep mask for 4 * ctr.shape[-1] keys: ``ctr`` holds the Philox counters of the key quads (int64, any
    rank); key 4q + w of the last dim takes word w of the draw for ctr[..., q]."""
    u0, u1, u2, u3 = tl.rand4x(seed, ctr)
    u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
    return u >= p


@triton.jit
def keep_at(seed, rows, keys, nk4, p):
    """Keep mask of elements (rows, keys) (int64 tensors of one shape) of the same counter scheme, one Philox
    draw per element: for tiles whose key positions are not four consecutive keys per quad (padded tiles)."""
    u0, u1, u2, u3 = tl.rand4x(seed, rows * nk4 + keys // 4)
    w = keys % 4
    u = tl.where(w == 0, u0, tl.where(w == 1, u1, tl.where(w == 2, u2, u3)))
    return u >= p


@triton.jit
def dropout_scale(keep, inv_keep):
    """1 / (1 - p) where kept, 0 where dropped (a multiplier, so a NaN stays NaN as in F.dropout)."""
    return tl.where(keep, inv_keep, 0.0)


@triton.jit
def _keep_mask_kernel(out_ptr, ROWS, NK, seed, p, BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    """out [ROWS, NK] int8 = the keep mask of the counter scheme above."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    q0 = tl.program_id(1) * BLOCK_Q
    nk4 = (NK + 3) // 4
    ctr = rows[:, None] * nk4 + (q0 + tl.arange(0, BLOCK_Q))[None, :]
    keep = keep4(seed, ctr, p)
    cols = 4 * q0 + tl.arange(0, 4 * BLOCK_Q)
    ok = (rows[:, None] < ROWS) & (cols[None, :] < NK)
    tl.store(out_ptr + rows[:, None] * NK + cols[None, :], keep.to(tl.int8), mask=ok)


_MASK_TILE = {"BLOCK_R": 16, "BLOCK_Q": 16}


def dropout_keep_mask(seed: int, shape: tuple[int, ...], p: float, device: torch.device | str) -> torch.Tensor:
    """The keep mask (bool, ``shape``) that the attention kernels apply for ``seed``: ``shape[-1]`` is the key
    dim and the leading dims, flattened row-major, are the rows of the counter scheme (for tests and debugging).
    """
    nk = int(shape[-1])
    rows = 1
    for s in shape[:-1]:
        rows *= int(s)
    out = _alloc.empty(rows * nk, dtype=torch.int8, device=device)
    if out.numel():
        br, bq = _MASK_TILE["BLOCK_R"], _MASK_TILE["BLOCK_Q"]
        grid = (triton.cdiv(rows, br), triton.cdiv(triton.cdiv(nk, 4), bq))
        _keep_mask_kernel[grid](out, rows, nk, seed, float(p), BLOCK_R=br, BLOCK_Q=bq)
    return out.view(shape).bool()


_aot.register(
    _keep_mask_kernel,
    signatures=[{"out_ptr": "*i8", "ROWS": "i32", "NK": "i32", "seed": "i32", "p": "fp32"}],
    configs=[{**_MASK_TILE, "num_warps": 4}],
    name="attention_keep_mask",
    strict=True,
)
