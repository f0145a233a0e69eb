"""Addressing, products and dropout shared by the window-attention kernel families.

A program gathers its q, k, v tiles straight from the contiguous [B, T, C, H, W] tensors: token n of a group
sits at a token offset, element e of head h at an element offset, address = frame base + token offset +
element offset (:func:`tok_off` / :func:`el_off`), so no partition / permute copy exists anywhere.

Groups: MODE 0 local (tokens = the nPh x nPw patches of a window), MODE 1 global (tokens = one patch position
in each of the nWh x nWw windows). A token is a patch flattened in (ph, pw, C) order, C fastest; a head is a
contiguous chunk of that vector.
"""

from __future__ import annotations

import triton
import triton.language as tl
from fm_engine.kernels._attention_dropout import dropout_scale, keep4

MODE_LOCAL, MODE_GLOBAL = 0, 1
SCORE_DOT, SCORE_COSINE, SCORE_STANDARDIZE = 0, 1, 2


@triton.jit
def tok_off(n, g, MODE: tl.constexpr, C, Hx, Wx, nWw, nPh, nPw, phx, pwx):
    """Offset of token n's first element of group g inside its frame."""
    if MODE == 0:
        row = (g // nWw) * nPh + n // nPw  # patch row in the frame's patch grid
        col = (g % nWw) * nPw + n % nPw
    else:
        row = (n // nWw) * nPh + g // nPw
        col = (n % nWw) * nPw + g % nPw
    return row * phx * Wx + col * pwx


@triton.jit
def el_off(h, d, D, RUN, MODE: tl.constexpr, C, Hx, Wx, pwx):
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
def tile_off(base, tok, h, d, D, RUN, MODE: tl.constexpr, C, Hx, Wx, pwx, VEC: tl.constexpr):
    """Offsets [tokens, len(d)] of elements d of head h of the tokens at ``tok`` (frame offset ``base``).

    VEC > 1 (a power of two dividing both the pixels per head RUN and the patch width pwx): elements come in
    aligned runs of VEC neighbouring pixels (the pixel-fastest order of :func:`el_off`), and every offset of a
    run's first element is a multiple of VEC (the frame size, the row width, the token offsets and the run
    starts all are), which the hints pass on to the compiler so that a run loads as one vector."""
    if VEC > 1:
        e = (d // VEC) * VEC
        off = base + tok[:, None] + (el_off(h, e, D, RUN, MODE, C, Hx, Wx, pwx) + d % VEC)[None, :]
        return tl.max_contiguous(tl.multiple_of(off, [1, VEC]), [1, VEC])
    else:
        return base + tok[:, None] + el_off(h, d, D, RUN, MODE, C, Hx, Wx, pwx)[None, :]


@triton.jit
def mm(a, b, IEEE: tl.constexpr, DT: tl.constexpr):
    """a @ b (2-D, or 3-D batched over the first dim) with fp32 accumulation: exact IEEE fp32 products for fp32
    inputs (the fp32 parity rule), else tensor cores on operands rounded to the input dtype DT (as
    FlashAttention rounds P): wgmma on sm_90 for 2-D tiles of >= 64 rows, mma.sync otherwise."""
    if len(a.shape) == 3 and a.shape[0] == 1:  # one batch: a 2-D product (wgmma on sm_90 at 64 rows)
        a2 = tl.reshape(a, [a.shape[1], a.shape[2]])
        b2 = tl.reshape(b, [b.shape[1], b.shape[2]])
        return tl.reshape(mm(a2, b2, IEEE, DT), [1, a.shape[1], b.shape[2]])
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def trans3(x):
    """[batch, m, n] -> [batch, n, m]."""
    return tl.permute(x, (0, 2, 1))


@triton.jit
def dropout_tile(seed, rows, k0, N, p, inv_keep, BLOCK_N: tl.constexpr):
    """[rows, BLOCK_N] dropout multiplier (1/(1-p) kept, 0 dropped) for keys k0.. (k0 a multiple of 4) of
    attention rows ``rows`` (kernels/_attention_dropout.py's counter scheme)."""
    ctr = rows[:, None] * ((N + 3) // 4) + k0 // 4 + tl.arange(0, BLOCK_N // 4)[None, :]
    return dropout_scale(keep4(seed, ctr, p), inv_keep)


def run_of(d: int, c: int) -> int:
    """Pixels per head when a head is whole pixels (d a multiple of C), else 0."""
    return d // c if d % c == 0 else 0


def run_vector(d: int, c: int, pw: int, elem_bytes: int, block_d: int) -> int:
    """VEC of :func:`tile_off`: the largest power of two dividing both the pixels per head and the patch width,
    at most 16 bytes and one head-dim chunk (1 when heads are not whole pixels)."""
    run = run_of(d, c)
    vec = 1
    while run and run % (2 * vec) == 0 and pw % (2 * vec) == 0 and 2 * vec * elem_bytes <= 16 and 2 * vec <= block_d:
        vec *= 2
    return vec


def pow2_at_least(n: int, floor: int = 16) -> int:
    """The power of two >= n and >= floor (tl.dot needs every tile dim >= 16)."""
    return max(floor, triton.next_power_of_2(n))
