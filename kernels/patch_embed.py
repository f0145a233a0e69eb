"""Triton kernels for the full-precision stem (docs/KERNELS.md K5, docs/MODELS.md 1.2 / 1.4).

fp32 products on tensor cores: the 3xTF32 split
-----------------------------------------------
The conv and its weight gradient are GEMMs whose result must match fp64 to fp32 rounding (10- to 16-bit
pixels and fp32 weights; TF32 alone keeps 11 significant bits). Each fp32 operand x is split into two
TF32 values, x_hi = tf32(x) and x_lo = tf32(x - x_hi), where tf32() rounds to 1 + 10 mantissa bits by
integer arithmetic on the bit pattern (add half an ulp, clear the low 13 bits: ties away from zero). The
products x·w are then summed as x_lo·w_hi + x_hi·w_lo + x_hi·w_hi: three TF32 tensor-core products with
fp32 accumulation (``_dot3``). Because the split is explicit, every operand a dot sees is exactly
representable in TF32, so each product of two of them (at most 22 significant bits) is exact in fp32 on
the GPU, and Triton's interpreter, which multiplies in fp32 and ignores ``input_precision``, computes the
same products: CPU tests check the GPU's arithmetic, only the fp32 summation order differs.

Error analysis. For |x| in [2^e, 2^(e+1)): |x - x_hi| <= 2^(e-11) (round to nearest, 11 significant bits),
x - x_hi is exact in fp32, and |x_lo - (x - x_hi)| <= 2^-11 |x - x_hi| <= 2^(e-22), so x = x_hi + x_lo + dx
with |dx| <= 2^-22 |x|, and |x_lo| <= 2^-11 |x|. The same holds for w. Then

    x·w - (x_lo·w_hi + x_hi·w_lo + x_hi·w_hi) = x_lo·w_lo + x_hi·dw + dx·w (+ x_lo·dw, below 2^-33)

is at most (2^-22 + 2^-22(1 + 2^-11) + 2^-22) |x||w| ~ 3·2^-22 |x||w| = 7.2e-7 |x||w| per product, next to
fp32's own rounding of one product (2^-24 = 6e-8) and its summation error (up to K·2^-24 relative for K
terms: 1.5e-5 for K = 256 in the worst case). The three dropped terms are not systematically signed, so
over a sum of K products they grow like sqrt(K), as rounding errors do, and the stem's error stays of
the order of an fp32 computation's: tests/test_patch_embed.py checks the normwise relative error
against fp64 stays below 1e-5 with full-range uint16 pixels (0..65535 and a DICOM-style rescale, so |x|
up to 5e4 next to offsets of -1024) and large weights, where an error of 2^-11 per TF32 product would
fail by two orders of magnitude. Values beyond 2^127 (overflow of the rounding) are out of scope.

Forward, two kernels:

1. ``_conv_kernel``, one program per ``BLOCK_T`` output tokens x ``BLOCK_D`` channels of one image: gather
   each token's patch straight from the raw image (uint8 / uint16 / int16 / fp32 / bf16), apply the
   intensity affine in fp32, split it, and multiply by the pre-split conv weight [dim, C*p*p] (split once
   per call on the host: 2 x 512 KiB at dim 512, K 256), plus the conv bias. The image-side operand is A,
   computed in registers (Hopper's wgmma takes A from registers); the weights are B, loaded from memory,
   K-contiguous as TF32 wgmma requires. With pooling it does this for every conv token of the token's
   AdaptiveMaxPool2d bin (start = floor(i*In/Out), end = ceil((i+1)*In/Out)) and keeps the first maximum
   in PyTorch's scan order (rows, then columns) and its conv-token index. Writes the (pooled) features in
   fp32, which backward needs anyway; the image is read once per path when the bins do not overlap.
2. ``_norm_kernel``: LayerNorm of each feature row in fp32, plus the position
   pos_weight[:, 0]*u_i + pos_weight[:, 1]*v_j + pos_bias with u_i = 2i/(Ht-1) - 1 computed from the
   token index (0 on an axis of length 1), cast to the output dtype; also writes mean and 1/std.

Backward, three kernels:

1. ``_norm_bwd_kernel``: the LayerNorm backward per row (dfeat = rstd (g nw - mean(g nw) - xhat mean(g nw
   xhat))) and, in one pass, per-program column sums of g, g·xhat, g·u, g·v and dfeat: the gradients of
   pos_bias / norm_bias, norm_weight, pos_weight and the conv bias, summed afterwards in program order
   (deterministic).
2. ``_unpool_split_kernel``: the conv-feature gradient, split into TF32 hi / lo and stored token-contiguous
   ([dim, tokens], the K-major B operand of the GEMM below). With pooling it routes each pooled gradient to
   the conv token its maximum came from, as a gather: a conv token lies in at most 2 x 2 bins (adjacent
   adaptive bins overlap by at most one row or column), whose gradients it sums in a fixed order.
3. ``_dweight_kernel``: dW^T[k, d] = sum over conv tokens t of x[t, k] dconv[t, d], a 3xTF32 GEMM (A = the
   patches gathered from the raw image again and split in registers, B = the split gradient), with the
   token range split in SPLIT slices summed afterwards. With pooling this dense GEMM over all conv tokens
   does 36x the work of a gather at 192x144 -> 32x24, on tensor cores instead of a serial per-token loop.

Byte / FLOP model (AViT stem, B 1, 3072 x 2304 uint16, patch 16: 27,648 conv tokens, K 256): the conv is
2·27648·256·D FLOP (3.6 GFLOP at D 256, 7.2 at D 512), 3x that in TF32 products; at half the bf16 rate
(TF32 on H100/H200) the fp32-exact ceiling is bf16 peak / 6, ~130 TFLOP/s of conv math at 800, i.e.
28 µs (D 256) and 55 µs (D 512) per direction. The traffic is small: 14 MB of image per pass, features
and gradients 28 MB (D 256, full grid) or 1.5 MB (pooled), the split conv gradient 2 x 28 MB (D 256) or
2 x 57 MB (D 512, the dense unpooled gradient). The eager fp32 stem took 1.42 ms fwd+bwd in the
2026-11-30 run; its conv runs on FP32 units (TF32 off). Nothing here is measured.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot, _autotune
from fm_engine.kernels._autotune import dtype, pow2

from fm_engine import _alloc

IMAGE_PTR = {
    torch.uint8: "*u8",
    torch.uint16: "*u16",
    torch.int16: "*i16",
    torch.float32: "*fp32",
    torch.bfloat16: "*bf16",
}
# @triton.jit helpers that take pointers (the compile gate compiles them inside the kernels)
AOT_HELPERS = {"_conv_tile"}

OUT_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
DWEIGHT_SPLIT_MAX = 32  # most token slices a weight-gradient config may use


# --- 3xTF32 ---------------------------------------------------------------------------------------


@triton.jit
def _tf32(x):
    """x rounded to the nearest TF32 value (ties away from zero), exactly representable in fp32."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _dot3(a_hi, a_lo, b_hi, b_lo, acc):
    """acc + a @ b to fp32 accuracy from split operands: the small products first."""
    acc = tl.dot(a_lo, b_hi, acc, input_precision="tf32")
    acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
    return tl.dot(a_hi, b_hi, acc, input_precision="tf32")


def tf32_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) of a contiguous fp32 tensor, as the kernels' ``_tf32`` computes them."""

    def rnd(v: torch.Tensor) -> torch.Tensor:
        return ((v.contiguous().view(torch.int32) + 0x1000) & -8192).view(torch.float32)

    hi = rnd(t)
    return hi, rnd(t - hi)


# --- forward --------------------------------------------------------------------------------------------


@triton.jit
def _conv_tile(
    img_ptr, whi_ptr, wlo_ptr, bias_ptr,
    gh, gw, t_ok, offs_d,
    s_ic, s_ih, s_iw, D, K, scale, offset,
    P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """conv features [BLOCK_T, BLOCK_D] (fp32) of the conv tokens at grid cells (gh, gw), channels offs_d."""
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    row = (gh * P).to(tl.int64) * s_ih + (gw * P).to(tl.int64) * s_iw
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        c = offs_k // (P * P)
        py = (offs_k // P) % P
        px = offs_k % P
        col = c.to(tl.int64) * s_ic + py * s_ih + px * s_iw
        pix = tl.load(img_ptr + row[:, None] + col[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0)
        x = tl.where(k_ok[None, :], pix.to(tl.float32) * scale + offset, 0.0)
        x_hi = _tf32(x)
        w_off = offs_d[None, :] * K + offs_k[:, None]  # B[k, d] = W[d, k]: K-contiguous
        w_mask = d_ok[None, :] & k_ok[:, None]
        w_hi = tl.load(whi_ptr + w_off, mask=w_mask, other=0.0)
        w_lo = tl.load(wlo_ptr + w_off, mask=w_mask, other=0.0)
        acc = _dot3(x_hi, _tf32(x - x_hi), w_hi, w_lo, acc)
    bias = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0)
    return acc + bias[None, :]


# Tiles of the conv: tokens x channels x patch elements, warps, stages; every one compiles for sm_80 and sm_90
# without a spill or stack frame (the compile gate checks). The conv loop is short (K 256 = 8-16 steps),
# so 1-2 stages: deeper software pipelining keeps the gathered pixels of later steps in registers and
# spilled at every 64x64 tile with 2 stages on sm_80. With pooling the kernel also holds the running
# maximum and its index per output, so only the tiles marked pool-safe below run pooled (16-wide K
# steps; 128x64x32 and 64x64x32 on 8 warps spill 56-80 B pooled on sm_80).
# A row stride that is not a multiple of 16 pixels (only with small patches) loses the 16-byte loads
# and needs an address register per pixel: a second, smaller list serves those images.
def _cfg(t: int, d: int, k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_T": t, "BLOCK_D": d, "BLOCK_K": k}, num_warps=warps, num_stages=stages)


# The pooled launches have lists of their own (the pool-safe tiles), so their first config, the one that runs
# untuned (FM_ENGINE_AUTOTUNE=0, CUDA-graph capture), is pool-safe too; it is the small 64x32 tile, which
# fills 132 SMs at batch 1 (768 pooled tokens x 512 channels: 192 programs).
_POOL_SAFE = [_cfg(64, 32, 32, 4, 1), _cfg(128, 64, 16, 8, 1), _cfg(128, 64, 16, 8, 2), _cfg(64, 64, 16, 4, 1)]
CONV_CONFIGS = [_cfg(128, 128, 16, 8, 1), _cfg(64, 128, 32, 8, 1), _cfg(128, 64, 32, 8, 1), *_POOL_SAFE]
_POOL_SAFE_UNALIGNED = [_cfg(32, 64, 16, 4, 1), _cfg(64, 64, 16, 8, 1), _cfg(64, 32, 16, 8, 1), _cfg(32, 32, 16, 4, 1)]
CONV_CONFIGS_UNALIGNED = [
    _cfg(128, 64, 16, 8, 1),
    _cfg(64, 64, 32, 8, 1),
    _cfg(64, 32, 32, 4, 2),
    *_POOL_SAFE_UNALIGNED,
]
CONV_INTERPRETER = _cfg(16, 16, 16, 4, 1)


def _conv_key(a: dict) -> tuple:
    tokens = a["TH"] * a["TW"]
    return (pow2(tokens), pow2(a["D"]), a["K"], a["P"], bool(a["POOL"]), a["KH_MAX"] * a["KW_MAX"], dtype(a["img_ptr"]))


@triton.jit
def _conv_kernel(
    img_ptr, whi_ptr, wlo_ptr, bias_ptr, feat_ptr, arg_ptr,
    s_ib, s_ic, s_ih, s_iw, GH, GW, TH, TW, KH_MAX, KW_MAX, D, K, scale, offset,
    P: tl.constexpr, POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """FEAT[b, t, d] = conv (+ adaptive max pool) features in fp32; ARG = the pooled conv-token index."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nt = TH * TW
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < nt
    ti = offs_t // TW
    tj = offs_t % TW
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    img_b = img_ptr + b * s_ib
    if POOL:
        hs = (ti * GH) // TH
        he = ((ti + 1) * GH + TH - 1) // TH
        ws = (tj * GW) // TW
        we = ((tj + 1) * GW + TW - 1) // TW
        feat = tl.full([BLOCK_T, BLOCK_D], float("-inf"), tl.float32)
        arg = tl.zeros([BLOCK_T, BLOCK_D], tl.int32)
        for dh in range(0, KH_MAX):
            for dw in range(0, KW_MAX):
                gh = hs + dh
                gw = ws + dw
                ok = t_ok & (gh < he) & (gw < we)
                f = _conv_tile(
                    img_b, whi_ptr, wlo_ptr, bias_ptr, gh, gw, ok, offs_d, s_ic, s_ih, s_iw, D, K, scale, offset,
                    P, BLOCK_T, BLOCK_D, BLOCK_K,
                )  # fmt: skip
                # strict '>' keeps the first maximum in scan order, as PyTorch's adaptive max pool does
                take = ok[:, None] & (f > feat)
                feat = tl.where(take, f, feat)
                arg = tl.where(take, (gh * GW + gw)[:, None], arg)
    else:
        feat = _conv_tile(
            img_b, whi_ptr, wlo_ptr, bias_ptr, ti, tj, t_ok, offs_d, s_ic, s_ih, s_iw, D, K, scale, offset,
            P, BLOCK_T, BLOCK_D, BLOCK_K,
        )  # fmt: skip
    mask = t_ok[:, None] & d_ok[None, :]
    idx = (b * nt + offs_t)[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(feat_ptr + idx, feat, mask=mask)
    if POOL:
        tl.store(arg_ptr + idx, arg, mask=mask)


_CONV_LISTS = {
    (True, False): CONV_CONFIGS,
    (False, False): CONV_CONFIGS_UNALIGNED,
    (True, True): _POOL_SAFE,
    (False, True): _POOL_SAFE_UNALIGNED,
}
CONV = {  # (16-aligned image, pooled) -> the tuned conv
    (aligned, pool): _autotune.autotune(
        name="patch_embed_conv" + ("" if aligned else "_unaligned") + ("_pooled" if pool else ""),
        configs=configs,
        interpreter_config=CONV_INTERPRETER,
        key=_conv_key,
    )(_conv_kernel)
    for (aligned, pool), configs in _CONV_LISTS.items()
}


def _image_aligned(image: torch.Tensor, *ints: int) -> bool:
    """16-aligned image pointer and strides, and 16-divisible sizes: the loads the aligned list was checked for."""
    return image.data_ptr() % 16 == 0 and all(v % 16 == 0 for v in (*image.stride()[:3], *ints))


# Row blocks of the LayerNorm kernels: a whole feature row per program row, BLOCK_R rows per program.
ROW_CONFIGS = [
    triton.Config({"BLOCK_R": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_R": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_R": 2}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_R": 8}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_R": 8}, num_warps=8, num_stages=1),
    # not 16 rows on 8 warps: it spills 8 B at dim 256 on sm_90 with the runtime alignment (kernel report)
]
ROW_INTERPRETER = triton.Config({"BLOCK_R": 4}, num_warps=4, num_stages=1)
_ROW_ELEMS_MAX = 8192  # elements of a row block: 32-64 fp32 values per thread and tensor at 4-8 warps


def _rows_fit(c: triton.Config, a: dict) -> bool:
    return c.kwargs["BLOCK_R"] * a["BLOCK_D"] <= _ROW_ELEMS_MAX


# the backward holds g, xhat, dfeat and five column sums: 8 rows of 512 or 1024 spill (8-24 B), so at most
# 2048 elements per block
ROW_CONFIGS_BWD = [
    triton.Config({"BLOCK_R": 2}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_R": 1}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_R": 4}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_R": 2}, num_warps=8, num_stages=1),
]


def _rows_fit_bwd(c: triton.Config, a: dict) -> bool:
    return c.kwargs["BLOCK_R"] * a["BLOCK_D"] <= 2048


def _row_key(a: dict) -> tuple:
    return (pow2(a["NROWS"]), a["BLOCK_D"], _autotune.dtype(a.get("y_ptr", a.get("dy_ptr"))))


@_autotune.autotune(
    name="patch_embed_norm", configs=ROW_CONFIGS, interpreter_config=ROW_INTERPRETER, key=_row_key, prune=_rows_fit
)
@triton.jit
def _norm_kernel(
    feat_ptr, nw_ptr, nb_ptr, pw_ptr, pb_ptr, y_ptr, mean_ptr, rstd_ptr,
    NROWS, TW, NT, D, eps, u_step, u_off, v_step, v_off,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Y = LayerNorm(FEAT) * nw + nb + position(token), fp32, cast to Y's dtype; also mean and 1/std."""
    offs_r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = offs_r < NROWS
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    mask = r_ok[:, None] & d_ok[None, :]
    idx = offs_r[:, None] * D + offs_d[None, :]
    feat = tl.load(feat_ptr + idx, mask=mask, other=0.0)
    mean = tl.sum(feat, 1) / D
    xc = tl.where(d_ok[None, :], feat - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
    nw = tl.load(nw_ptr + offs_d, mask=d_ok, other=0.0)
    nb = tl.load(nb_ptr + offs_d, mask=d_ok, other=0.0)
    pw0 = tl.load(pw_ptr + offs_d * 2, mask=d_ok, other=0.0)
    pw1 = tl.load(pw_ptr + offs_d * 2 + 1, mask=d_ok, other=0.0)
    pb = tl.load(pb_ptr + offs_d, mask=d_ok, other=0.0)
    t = offs_r % NT
    u = (t // TW).to(tl.float32) * u_step + u_off
    v = (t % TW).to(tl.float32) * v_step + v_off
    pos = u[:, None] * pw0[None, :] + v[:, None] * pw1[None, :] + pb[None, :]
    y = xc * rstd[:, None] * nw[None, :] + nb[None, :] + pos
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + offs_r, mean, mask=r_ok)
    tl.store(rstd_ptr + offs_r, rstd, mask=r_ok)


# --- backward -------------------------------------------------------------------------------------------


@_autotune.autotune(
    name="patch_embed_norm_bwd",
    configs=ROW_CONFIGS_BWD,
    interpreter_config=ROW_INTERPRETER,
    key=_row_key,
    prune=_rows_fit_bwd,
)
@triton.jit
def _norm_bwd_kernel(
    dy_ptr, feat_ptr, mean_ptr, rstd_ptr, nw_ptr, dfeat_ptr, part_ptr,
    NROWS, TW, NT, D, u_step, u_off, v_step, v_off,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """DFEAT = LayerNorm backward of DY (fp32); PART[program] = this program's column sums of
    g, g*xhat, g*u, g*v and dfeat. Programs stride over the row blocks (tl.num_programs(0) of them)."""
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    nw = tl.load(nw_ptr + offs_d, mask=d_ok, other=0.0)
    s_g = tl.zeros([BLOCK_D], tl.float32)
    s_gx = tl.zeros([BLOCK_D], tl.float32)
    s_gu = tl.zeros([BLOCK_D], tl.float32)
    s_gv = tl.zeros([BLOCK_D], tl.float32)
    s_df = tl.zeros([BLOCK_D], tl.float32)
    for rb in range(pid, tl.cdiv(NROWS, BLOCK_R), tl.num_programs(0)):
        offs_r = tl.cast(rb, tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = offs_r < NROWS
        mask = r_ok[:, None] & d_ok[None, :]
        idx = offs_r[:, None] * D + offs_d[None, :]
        g = tl.load(dy_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        feat = tl.load(feat_ptr + idx, mask=mask, other=0.0)
        mean = tl.load(mean_ptr + offs_r, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + offs_r, mask=r_ok, other=0.0)
        xhat = tl.where(mask, (feat - mean[:, None]) * rstd[:, None], 0.0)
        gx = g * nw[None, :]
        c1 = tl.sum(gx, 1) / D
        c2 = tl.sum(gx * xhat, 1) / D
        dfeat = tl.where(mask, rstd[:, None] * (gx - c1[:, None] - xhat * c2[:, None]), 0.0)
        tl.store(dfeat_ptr + idx, dfeat, mask=mask)
        t = offs_r % NT
        u = (t // TW).to(tl.float32) * u_step + u_off
        v = (t % TW).to(tl.float32) * v_step + v_off
        s_g += tl.sum(g, 0)
        s_gx += tl.sum(g * xhat, 0)
        s_gu += tl.sum(g * u[:, None], 0)
        s_gv += tl.sum(g * v[:, None], 0)
        s_df += tl.sum(dfeat, 0)
    base = part_ptr + pid.to(tl.int64) * 5 * D + offs_d
    tl.store(base, s_g, mask=d_ok)
    tl.store(base + D, s_gx, mask=d_ok)
    tl.store(base + 2 * D, s_gu, mask=d_ok)
    tl.store(base + 3 * D, s_gv, mask=d_ok)
    tl.store(base + 4 * D, s_df, mask=d_ok)


# (with pooling, four candidate bins per tile: 64x64 on 4 warps spills; these fit)
SPLIT_CONFIGS = [
    triton.Config({"BLOCK_T": 64, "BLOCK_D": 64}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK_T": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK_T": 64, "BLOCK_D": 32}, num_warps=4, num_stages=1),
]
SPLIT_INTERPRETER = triton.Config({"BLOCK_T": 16, "BLOCK_D": 16}, num_warps=4, num_stages=1)


@_autotune.autotune(
    name="patch_embed_unpool_split",
    configs=SPLIT_CONFIGS,
    interpreter_config=SPLIT_INTERPRETER,
    key=lambda a: (pow2(a["GH"] * a["GW"]), pow2(a["D"]), bool(a["POOL"]), pow2(a["TOTAL"])),
)
@triton.jit
def _unpool_split_kernel(
    g_ptr, arg_ptr, hi_ptr, lo_ptr,
    GH, GW, TH, TW, D, TOTAL,
    POOL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """HI/LO[d, b*GH*GW + t] = tf32 split of the conv-feature gradient of conv token t of image b.

    Without pooling that is G[b, t, d]; with pooling it is the sum, over the (at most 2 x 2) bins (i, j)
    containing t, of G[b, i*TW + j, d] where ARG[b, i*TW + j, d] == t, in a fixed order."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    nt = GH * GW
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < nt
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    if POOL:
        gh = offs_t // GW
        gw = offs_t % GW
        i0 = (gh * TH) // GH  # the first bin holding row gh; the next one may hold it too
        j0 = (gw * TW) // GW
        g = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for di in range(0, 2):
            i = i0 + di
            i_ok = (i < TH) & ((i * GH) // TH <= gh)
            for dj in range(0, 2):
                j = j0 + dj
                ok = t_ok & i_ok & (j < TW) & ((j * GW) // TW <= gw)
                m = ok[:, None] & d_ok[None, :]
                pidx = (b * TH * TW + i * TW + j)[:, None].to(tl.int64) * D + offs_d[None, :]
                src = tl.load(arg_ptr + pidx, mask=m, other=-1)
                gv = tl.load(g_ptr + pidx, mask=m, other=0.0)
                g += tl.where(src == offs_t[:, None], gv, 0.0)
    else:
        m = t_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + (b * nt + offs_t)[:, None].to(tl.int64) * D + offs_d[None, :], mask=m, other=0.0)
    hi = _tf32(g)
    out = offs_d[None, :].to(tl.int64) * TOTAL + (b * nt + offs_t)[:, None]
    m = t_ok[:, None] & d_ok[None, :]
    tl.store(hi_ptr + out, hi, mask=m)
    tl.store(lo_ptr + out, _tf32(g - hi), mask=m)


def _with_split(configs: list[triton.Config], splits: tuple[int, ...]) -> list[triton.Config]:
    return [
        triton.Config({**c.kwargs, "SPLIT": s}, num_warps=c.num_warps, num_stages=c.num_stages)
        for s in splits
        for c in configs
    ]


# dW^T [K, D] is small (256 x 256 .. 256 x 512: 4-16 tiles) and its reduction long (27,648 tokens per image),
# so the token range is split in 8-32 slices to fill 132 SMs; the tuner picks tile and split together.
# Tiles: BLOCK_K x BLOCK_D x BLOCK_T, 1 stage (2 stages spill on sm_80 without 16-aligned rows).
def _dw(kk: int, d: int, t: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_K": kk, "BLOCK_D": d, "BLOCK_T": t}, num_warps=warps, num_stages=1)


DWEIGHT_CONFIGS = _with_split(
    [_dw(64, 128, 32, 8), _dw(128, 64, 32, 8), _dw(128, 128, 32, 8), _dw(64, 64, 32, 8)], (32, 16, 8)
)  # split 32 first: the untuned first config fills 132 SMs at dim 256 (4 x 2 tiles x 32 = 256 programs)
DWEIGHT_INTERPRETER = triton.Config(
    {"BLOCK_K": 16, "BLOCK_D": 16, "BLOCK_T": 16, "SPLIT": 3}, num_warps=4, num_stages=1
)


@_autotune.autotune(
    name="patch_embed_dweight",
    configs=DWEIGHT_CONFIGS,
    interpreter_config=DWEIGHT_INTERPRETER,
    key=lambda a: (pow2(a["TOTAL"]), pow2(a["D"]), a["K"], a["P"], _autotune.dtype(a["img_ptr"])),
)
@triton.jit
def _dweight_kernel(
    img_ptr, ghi_ptr, glo_ptr, dwp_ptr,
    s_ib, s_ic, s_ih, s_iw, GW, NT, TOTAL, D, K, scale, offset,
    P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, SPLIT: tl.constexpr,
):  # fmt: skip
    """DWP[s, d, k] = sum over slice s of the conv tokens t of dconv[t, d] x[t, k] (3xTF32).

    Computed as C[k, d] = x^T @ dconv: A = the patches x^T [BLOCK_K, BLOCK_T], gathered from the raw image and
    split in registers; B = GHI / GLO [D, TOTAL] (token-contiguous, K-major); stored transposed."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k_ok = offs_k < K
    d_ok = offs_d < D
    c = offs_k // (P * P)
    py = (offs_k // P) % P
    px = offs_k % P
    col = c.to(tl.int64) * s_ic + py * s_ih + px * s_iw
    per = tl.cdiv(tl.cdiv(TOTAL, SPLIT), BLOCK_T) * BLOCK_T
    t_lo = pid_s * per
    t_hi = tl.minimum(TOTAL, t_lo + per)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_hi
        bt = (offs_t // NT).to(tl.int64)
        tt = offs_t % NT
        row = bt * s_ib + ((tt // GW) * P).to(tl.int64) * s_ih + ((tt % GW) * P).to(tl.int64) * s_iw
        pix = tl.load(img_ptr + col[:, None] + row[None, :], mask=k_ok[:, None] & t_ok[None, :], other=0)
        x = tl.where(t_ok[None, :], pix.to(tl.float32) * scale + offset, 0.0)
        x_hi = _tf32(x)
        g_off = offs_d[None, :].to(tl.int64) * TOTAL + offs_t[:, None]
        g_mask = t_ok[:, None] & d_ok[None, :]
        g_hi = tl.load(ghi_ptr + g_off, mask=g_mask, other=0.0)
        g_lo = tl.load(glo_ptr + g_off, mask=g_mask, other=0.0)
        acc = _dot3(x_hi, _tf32(x - x_hi), g_hi, g_lo, acc)
    tl.store(
        dwp_ptr + (pid_s.to(tl.int64) * D + offs_d[None, :]) * K + offs_k[:, None],
        acc,
        mask=k_ok[:, None] & d_ok[None, :],
    )


# --- host side ------------------------------------------------------------------------------------------


def max_bin(n_in: int, n_out: int) -> int:
    """Largest AdaptiveMaxPool bin length for n_in -> n_out."""
    return max(-(-((i + 1) * n_in) // n_out) - (i * n_in) // n_out for i in range(n_out))


def _axis(n: int) -> tuple[float, float]:
    """(step, offset) of linspace(-1, 1, n) as i * step + offset; a single token sits at 0."""
    return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)


def _block_d(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def forward(
    image: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    patch: int,
    pool_h: int,
    pool_w: int,
    intensity_scale: float,
    intensity_offset: float,
    out_dtype: torch.dtype,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, T, D] out_dtype, features [B, T, D] fp32, mean [B, T], rstd [B, T], argmax [B, T, D]
    int32 conv-token index, or an empty tensor without pooling). pool_h = pool_w = 0: no pooling."""
    image = image.contiguous()  # (a no-op for whole images) the kernels read with a unit column stride
    b, c, h, w = image.shape
    d = weight.shape[0]
    k = c * patch * patch
    gh, gw = h // patch, w // patch
    pool = pool_h > 0
    th, tw = (pool_h, pool_w) if pool else (gh, gw)
    nt = th * tw
    w_hi, w_lo = tf32_split(weight.reshape(d, k).float())
    params = [t.contiguous() for t in (norm_weight, norm_bias, pos_weight, pos_bias)]
    dev = image.device
    y = _alloc.empty(b, nt, d, dtype=out_dtype, device=dev)
    feat = _alloc.empty(b, nt, d, dtype=torch.float32, device=dev)
    mean = _alloc.empty(b, nt, dtype=torch.float32, device=dev)
    rstd = _alloc.empty(b, nt, dtype=torch.float32, device=dev)
    arg = (
        _alloc.empty(b, nt, d, dtype=torch.int32, device=dev) if pool else torch.empty(0, dtype=torch.int32, device=dev)
    )
    kh = max_bin(gh, th) if pool else 1
    kw = max_bin(gw, tw) if pool else 1
    grid = lambda meta: (triton.cdiv(nt, meta["BLOCK_T"]), triton.cdiv(d, meta["BLOCK_D"]), b)
    CONV[_image_aligned(image, d, k), bool(pool)][grid](
        image, w_hi, w_lo, bias.contiguous(), feat, arg if pool else feat, *image.stride(),
        gh, gw, th, tw, kh, kw, d, k, float(intensity_scale), float(intensity_offset),
        P=patch, POOL=pool,
    )  # fmt: skip
    _norm_kernel[lambda meta: (triton.cdiv(b * nt, meta["BLOCK_R"]),)](
        feat, *params, y, mean, rstd, b * nt, tw, nt, d, float(eps), *_axis(th), *_axis(tw), BLOCK_D=_block_d(d),
    )  # fmt: skip
    return y, feat, mean, rstd, arg


def _programs(n_blocks: int, device: torch.device) -> int:
    """Programs for a grid-stride kernel: a few per SM on a GPU; 3 in the interpreter (crosses programs)."""
    sms = _aot.sm_count(device)
    if sms is not None:
        return max(1, min(n_blocks, 4 * sms))
    return max(1, min(n_blocks, 3))


def weight_grad(
    image: torch.Tensor,
    grad: torch.Tensor,
    arg: torch.Tensor,
    patch: int,
    pool: tuple[int, int] | None,
    intensity_scale: float,
    intensity_offset: float,
) -> torch.Tensor:
    """Conv weight gradient dW [D, C, p, p] (fp32).

    Without pooling (``pool`` None): grad [B, GH*GW, D] is the gradient of the conv features and
    dW = sum over conv tokens of grad x patch pixels (after the affine). With pooling to ``pool`` = (TH, TW):
    grad [B, TH*TW, D] is the gradient of the pooled features and arg [B, TH*TW, D] the conv-token index each
    one came from; the gradient is routed back to those conv tokens first (``_unpool_split_kernel``)."""
    image = image.contiguous()
    b, c, h, w = image.shape
    gh, gw = h // patch, w // patch
    d = grad.shape[-1]
    k = c * patch * patch
    th, tw = pool if pool is not None else (gh, gw)
    total = b * gh * gw
    dev = image.device
    g_hi = _alloc.empty(d, total, dtype=torch.float32, device=dev)
    g_lo = _alloc.empty(d, total, dtype=torch.float32, device=dev)
    grad = grad.contiguous()
    src = arg.contiguous() if pool is not None else grad  # arg is not read without pooling
    _unpool_split_kernel[lambda m: (triton.cdiv(gh * gw, m["BLOCK_T"]), triton.cdiv(d, m["BLOCK_D"]), b)](
        grad, src, g_hi, g_lo, gh, gw, th, tw, d, total, POOL=pool is not None
    )
    dwp = _alloc.empty(DWEIGHT_SPLIT_MAX, d, k, dtype=torch.float32, device=dev)
    grid = lambda m: (triton.cdiv(k, m["BLOCK_K"]), triton.cdiv(d, m["BLOCK_D"]), m["SPLIT"])
    cfg = _dweight_kernel[grid](
        image, g_hi, g_lo, dwp, *image.stride(), gw, gh * gw, total, d, k,
        float(intensity_scale), float(intensity_offset), P=patch,
    )  # fmt: skip
    split = int(cfg.kwargs["SPLIT"])
    dw = dwp[0] if split == 1 else dwp[:split].sum(0)
    return dw.reshape(d, c, patch, patch)


def backward(
    dy: torch.Tensor,
    image: torch.Tensor,
    norm_weight: torch.Tensor,
    feat: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    arg: torch.Tensor,
    patch: int,
    pool_h: int,
    pool_w: int,
    intensity_scale: float,
    intensity_offset: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (weight, bias, norm_weight, norm_bias, pos_weight, pos_bias), all fp32, from dy [B, T, D]."""
    b, _, h, w = image.shape
    gh, gw = h // patch, w // patch
    pool = (pool_h, pool_w) if pool_h > 0 else None
    th, tw = pool or (gh, gw)
    d = feat.shape[-1]
    nrows = b * th * tw
    dev = image.device
    dfeat = _alloc.empty(b, th * tw, d, dtype=torch.float32, device=dev)
    part = _alloc.empty(_programs(nrows, dev), 5, d, dtype=torch.float32, device=dev)
    grid = lambda m: (min(part.shape[0], triton.cdiv(nrows, m["BLOCK_R"])),)
    cfg = _norm_bwd_kernel[grid](
        dy.contiguous(), feat, mean, rstd, norm_weight.contiguous(), dfeat, part,
        nrows, tw, th * tw, d, *_axis(th), *_axis(tw), BLOCK_D=_block_d(d),
    )  # fmt: skip
    sums = part[: grid(cfg.kwargs)[0]].sum(0)  # the programs that ran, summed in program order
    d_weight = weight_grad(image, dfeat, arg, patch, pool, intensity_scale, intensity_offset)
    d_pos_weight = sums[2:4].t().contiguous()
    # separate tensors: a custom op's outputs must not alias, and norm_bias and pos_bias must not share a .grad
    return d_weight, sums[4].clone(), sums[1].clone(), sums[0].clone(), d_pos_weight, sums[0].clone()


# --- compile gate -------------------------------------------------------------------------------


# The launchers make the image contiguous (unit column stride); its row stride and sizes may or may not be
# multiples of 16 (the conv picks its config list by that; the weight gradient's list fits both).
_UNIT_IMAGE = [{"s_iw": 1}]


def _register() -> None:
    i32, f32 = "i32", "fp32"
    # the AViT stems: patch 16, dim 512 (query path, pooled) and kv_dim 256 (full path), uint16 images,
    # and the float images of the ViT pipeline
    conv_cases = [(torch.uint16, True), (torch.uint16, False), (torch.float32, False), (torch.bfloat16, False)]
    for img_dt, pool in conv_cases:
        sig = {"img_ptr": IMAGE_PTR[img_dt], "arg_ptr": "*i32" if pool else "*fp32", "scale": f32, "offset": f32}
        sig.update({n: "*fp32" for n in ("whi_ptr", "wlo_ptr", "bias_ptr", "feat_ptr")})
        names = ("s_ib", "s_ic", "s_ih", "s_iw", "GH", "GW", "TH", "TW", "KH_MAX", "KW_MAX", "D", "K")
        sig.update({n: i32 for n in names})
        cx = {"P": 16, "POOL": pool}
        for (aligned, pooled), kern in CONV.items():
            if pooled != pool:
                continue
            _aot.register(
                kern, signatures=[sig], constexprs=cx, name=f"{kern.name}[POOL{int(pool)}]",
                specializations=_UNIT_IMAGE, generic=False, alignments=(aligned,),
            )  # fmt: skip
    for out_dt, dim in ((torch.bfloat16, 512), (torch.bfloat16, 256), (torch.float32, 768)):
        sig = {n: "*fp32" for n in ("feat_ptr", "nw_ptr", "nb_ptr", "pw_ptr", "pb_ptr", "mean_ptr", "rstd_ptr")}
        sig["y_ptr"] = OUT_PTR[out_dt]
        sig.update({n: i32 for n in ("NROWS", "TW", "NT", "D")})
        sig.update({n: f32 for n in ("eps", "u_step", "u_off", "v_step", "v_off")})
        cx = {"BLOCK_D": _block_d(dim)}
        _aot.register(_norm_kernel, signatures=[sig], constexprs=cx, prune_args=cx, name=f"patch_embed_norm[D{dim}]")
        sig = {n: "*fp32" for n in ("feat_ptr", "mean_ptr", "rstd_ptr", "nw_ptr", "dfeat_ptr", "part_ptr")}
        sig["dy_ptr"] = OUT_PTR[out_dt]
        sig.update({n: i32 for n in ("NROWS", "TW", "NT", "D")})
        sig.update({n: f32 for n in ("u_step", "u_off", "v_step", "v_off")})
        _aot.register(
            _norm_bwd_kernel, signatures=[sig], constexprs=cx, prune_args=cx, name=f"patch_embed_norm_bwd[D{dim}]"
        )
    for pool in (True, False):
        sig = {"g_ptr": "*fp32", "arg_ptr": "*i32" if pool else "*fp32", "hi_ptr": "*fp32", "lo_ptr": "*fp32"}
        sig.update({n: i32 for n in ("GH", "GW", "TH", "TW", "D", "TOTAL")})
        _aot.register(_unpool_split_kernel, signatures=[sig], constexprs={"POOL": pool}, specializations=[{}])
    for img_dt in (torch.uint16, torch.float32):
        sig = {"img_ptr": IMAGE_PTR[img_dt], "ghi_ptr": "*fp32", "glo_ptr": "*fp32", "dwp_ptr": "*fp32"}
        sig.update({n: i32 for n in ("s_ib", "s_ic", "s_ih", "s_iw", "GW", "NT", "TOTAL", "D", "K")})
        sig.update({"scale": f32, "offset": f32})
        _aot.register(
            _dweight_kernel, signatures=[sig], constexprs={"P": 16},
            specializations=_UNIT_IMAGE, generic=False, alignments=(True, False),
        )  # fmt: skip

    # grid-stride over the row blocks with a few programs per SM (_programs): persistent
    _aot.note(_norm_bwd_kernel, persistent=True)


_register()
