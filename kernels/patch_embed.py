"""Triton kernels for the full-precision stem (KERNELS.md K5, MODELS.md 1.2 / 1.4).

Forward, two kernels:

1. ``_conv_kernel``, one program per ``BLOCK_T`` output tokens x ``BLOCK_D`` channels of one image:
   gather each token's patch straight from the raw image (uint8 / uint16 / int16 / fp32 / bf16),
   apply the intensity affine in fp32 and multiply by the conv weight [dim, C*p*p] with ieee fp32
   dots (10- to 16-bit pixel values are exact in fp32, not in TF32 or bf16), plus the conv bias.
   With pooling it does this for every conv token of the token's AdaptiveMaxPool2d bin
   (start = floor(i*In/Out), end = ceil((i+1)*In/Out)) and keeps the first maximum in PyTorch's
   scan order (rows, then columns) and its conv-token index. Writes the (pooled) features in fp32,
   which backward needs anyway; the image is read once per path when the bins do not overlap.
2. ``_norm_kernel``: LayerNorm of each feature row in fp32, plus the position
   pos_weight[:, 0]*u_i + pos_weight[:, 1]*v_j + pos_bias with u_i = 2i/(Ht-1) - 1 computed from the
   token index (0 on an axis of length 1), cast to the output dtype; also writes mean and 1/std.
Splitting the channels across programs (instead of one program holding a whole row for LayerNorm)
gives the pooled AViT query path (768 tokens x 512 channels) 192 programs per image instead of 48.

Backward: ``_dweight_kernel`` computes the conv weight gradient dW[d, k] = sum_t dconv[t, d] * x[t, k]
as an ieee fp32 GEMM over tokens that gathers the patches from the raw image again (no unfolded copy);
with pooling, ``_dweight_pooled_kernel`` gathers, per pooled token and channel, the patch of the conv
token the max came from. Both split the token range across programs and sum the fp32 partials after.
The rest of the backward (LayerNorm, position, bias) is element-wise work and reductions done in
plain torch in fp32 by ``fm_engine.ops.patch_embed``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot

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


def _interpreting() -> bool:
    from fm_engine.ops._dispatch import interpreting

    return interpreting()


@triton.jit
def _conv_tile(
    img_ptr,
    w_ptr,
    bias_ptr,
    gh,
    gw,
    t_ok,
    offs_d,
    s_ic,
    s_ih,
    s_iw,
    D,
    K,
    scale,
    offset,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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
        w = tl.load(w_ptr + offs_d[None, :] * K + offs_k[:, None], mask=d_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(x, w, input_precision="ieee")
    bias = tl.load(bias_ptr + offs_d, mask=d_ok, other=0.0)
    return acc + bias[None, :]


@triton.jit
def _conv_kernel(
    img_ptr,
    w_ptr,
    bias_ptr,
    feat_ptr,
    arg_ptr,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    GH,
    GW,
    TH,
    TW,
    KH_MAX,
    KW_MAX,
    D,
    K,
    scale,
    offset,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    POOL: tl.constexpr,
):
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
                    img_b,
                    w_ptr,
                    bias_ptr,
                    gh,
                    gw,
                    ok,
                    offs_d,
                    s_ic,
                    s_ih,
                    s_iw,
                    D,
                    K,
                    scale,
                    offset,
                    P,
                    BLOCK_T,
                    BLOCK_D,
                    BLOCK_K,
                )
                # strict '>' keeps the first maximum in scan order, as PyTorch's adaptive max pool does
                take = ok[:, None] & (f > feat)
                feat = tl.where(take, f, feat)
                arg = tl.where(take, (gh * GW + gw)[:, None], arg)
    else:
        feat = _conv_tile(
            img_b,
            w_ptr,
            bias_ptr,
            ti,
            tj,
            t_ok,
            offs_d,
            s_ic,
            s_ih,
            s_iw,
            D,
            K,
            scale,
            offset,
            P,
            BLOCK_T,
            BLOCK_D,
            BLOCK_K,
        )
    mask = t_ok[:, None] & d_ok[None, :]
    idx = (b * nt + offs_t)[:, None].to(tl.int64) * D + offs_d[None, :]
    tl.store(feat_ptr + idx, feat, mask=mask)
    if POOL:
        tl.store(arg_ptr + idx, arg, mask=mask)


@triton.jit
def _norm_kernel(
    feat_ptr,
    nw_ptr,
    nb_ptr,
    pw_ptr,
    pb_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    NROWS,
    TW,
    NT,
    D,
    eps,
    u_step,
    u_off,
    v_step,
    v_off,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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


@triton.jit
def _dweight_kernel(
    img_ptr,
    dconv_ptr,
    dwp_ptr,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    B,
    GW,
    NT,
    D,
    K,
    TOKENS_PER_SPLIT,
    scale,
    offset,
    P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dwp_ptr[s, d, k] = sum over this split's tokens t of dconv_ptr[t, d] * x[t, k] (fp32, ieee)."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = offs_d < D
    k_ok = offs_k < K
    c = offs_k // (P * P)
    py = (offs_k // P) % P
    px = offs_k % P
    col = c.to(tl.int64) * s_ic + py * s_ih + px * s_iw
    acc = tl.zeros([BLOCK_D, BLOCK_K], tl.float32)
    total = B * NT
    t_start = pid_s * TOKENS_PER_SPLIT
    t_end = tl.minimum(t_start + TOKENS_PER_SPLIT, total)
    for t0 in range(t_start, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_ok = offs_t < t_end
        bt = (offs_t // NT).to(tl.int64)
        tt = offs_t % NT
        gh = tt // GW
        gw = tt % GW
        row = bt * s_ib + (gh * P).to(tl.int64) * s_ih + (gw * P).to(tl.int64) * s_iw
        pix = tl.load(img_ptr + row[:, None] + col[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0)
        x = tl.where(t_ok[:, None], pix.to(tl.float32) * scale + offset, 0.0)
        g = tl.load(
            dconv_ptr + offs_t.to(tl.int64)[None, :] * D + offs_d[:, None],
            mask=t_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        acc += tl.dot(g, x, input_precision="ieee")
    tl.store(
        dwp_ptr + (pid_s.to(tl.int64) * D + offs_d[:, None]) * K + offs_k[None, :],
        acc,
        mask=d_ok[:, None] & k_ok[None, :],
    )


@triton.jit
def _dweight_pooled_kernel(
    img_ptr,
    g_ptr,
    arg_ptr,
    dwp_ptr,
    s_ib,
    s_ic,
    s_ih,
    s_iw,
    GW,
    NT,
    TOTAL,
    D,
    K,
    TOKENS_PER_SPLIT,
    scale,
    offset,
    P: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """DWP[s, d, k] = sum over this split's pooled tokens t of G[t, d] * x[b(t), ARG[t, d], k].

    Each pooled output routes its gradient to one conv token per channel (its argmax), so the weight
    gradient is a gather, not a GEMM over all conv tokens: 36x less work at 192x144 -> 32x24."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    d_ok = offs_d < D
    k_ok = offs_k < K
    c = offs_k // (P * P)
    py = (offs_k // P) % P
    px = offs_k % P
    col = c.to(tl.int64) * s_ic + py * s_ih + px * s_iw
    acc = tl.zeros([BLOCK_D, BLOCK_K], tl.float32)
    t_start = pid_s * TOKENS_PER_SPLIT
    t_end = tl.minimum(t_start + TOKENS_PER_SPLIT, TOTAL)
    for t in range(t_start, t_end):
        t64 = tl.cast(t, tl.int64)
        g = tl.load(g_ptr + t64 * D + offs_d, mask=d_ok, other=0.0)
        idx = tl.load(arg_ptr + t64 * D + offs_d, mask=d_ok, other=0)
        row = (t64 // NT) * s_ib + ((idx // GW) * P).to(tl.int64) * s_ih + ((idx % GW) * P).to(tl.int64) * s_iw
        pix = tl.load(img_ptr + row[:, None] + col[None, :], mask=d_ok[:, None] & k_ok[None, :], other=0)
        acc += g[:, None] * (pix.to(tl.float32) * scale + offset)
    tl.store(
        dwp_ptr + (pid_s.to(tl.int64) * D + offs_d[:, None]) * K + offs_k[None, :],
        acc,
        mask=d_ok[:, None] & k_ok[None, :],
    )


# --- launch configurations ----------------------------------------------------------------------


def conv_tiles(pool: bool, interpret: bool | None = None) -> dict[str, int]:
    """Tile of the conv (+ pool) kernel: BLOCK_T tokens x BLOCK_D channels, BLOCK_K patch elements per step."""
    if _interpreting() if interpret is None else interpret:
        return {"BLOCK_T": 16, "BLOCK_D": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    # pooled: 768 query tokens per image, so 32-token tiles (x 8 channel tiles of 64 at dim 512) give
    # 192 programs per image where 64-token tiles would leave most of 132 SMs idle at batch 1
    return {"BLOCK_T": 32 if pool else 64, "BLOCK_D": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}


def norm_tiles(dim: int) -> dict[str, int]:
    """Rows per program of the LayerNorm + position kernel (a whole feature row per program row)."""
    block_d = max(16, triton.next_power_of_2(dim))
    rows = max(1, min(16, 4096 // block_d))
    return {"BLOCK_R": rows, "BLOCK_D": block_d, "num_warps": 4 if block_d <= 1024 else 8, "num_stages": 1}


def dweight_tiles(interpret: bool | None = None) -> dict[str, int]:
    if _interpreting() if interpret is None else interpret:
        return {"BLOCK_T": 16, "BLOCK_D": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
    return {"BLOCK_T": 32, "BLOCK_D": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2}


def max_bin(n_in: int, n_out: int) -> int:
    """Largest AdaptiveMaxPool bin length for n_in -> n_out."""
    return max(-(-((i + 1) * n_in) // n_out) - (i * n_in) // n_out for i in range(n_out))


def _axis(n: int) -> tuple[float, float]:
    """(step, offset) of linspace(-1, 1, n) as i * step + offset; a single token sits at 0."""
    return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)


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
    b, c, h, w = image.shape
    d = weight.shape[0]
    k = c * patch * patch
    gh, gw = h // patch, w // patch
    pool = pool_h > 0
    th, tw = (pool_h, pool_w) if pool else (gh, gw)
    nt = th * tw
    wmat = weight.reshape(d, k).contiguous()
    params = [t.contiguous() for t in (norm_weight, norm_bias, pos_weight, pos_bias)]
    dev = image.device
    y = _alloc.empty(b, nt, d, dtype=out_dtype, device=dev)
    feat = _alloc.empty(b, nt, d, dtype=torch.float32, device=dev)
    mean = _alloc.empty(b, nt, dtype=torch.float32, device=dev)
    rstd = _alloc.empty(b, nt, dtype=torch.float32, device=dev)
    arg = (
        _alloc.empty(b, nt, d, dtype=torch.int32, device=dev) if pool else torch.empty(0, dtype=torch.int32, device=dev)
    )
    cfg = conv_tiles(pool)
    kh = max_bin(gh, th) if pool else 1
    kw = max_bin(gw, tw) if pool else 1
    grid = (triton.cdiv(nt, cfg["BLOCK_T"]), triton.cdiv(d, cfg["BLOCK_D"]), b)
    _conv_kernel[grid](
        image, wmat, bias.contiguous(), feat, arg if pool else feat, *image.stride(),
        gh, gw, th, tw, kh, kw, d, k, float(intensity_scale), float(intensity_offset),
        P=patch, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], POOL=pool,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    ncfg = norm_tiles(d)
    _norm_kernel[(triton.cdiv(b * nt, ncfg["BLOCK_R"]),)](
        feat, *params, y, mean, rstd, b * nt, tw, nt, d, float(eps), *_axis(th), *_axis(tw),
        BLOCK_R=ncfg["BLOCK_R"], BLOCK_D=ncfg["BLOCK_D"], num_warps=ncfg["num_warps"], num_stages=1,
    )  # fmt: skip
    return y, feat, mean, rstd, arg


def weight_grad(
    image: torch.Tensor,
    grad: torch.Tensor,
    arg: torch.Tensor,
    patch: int,
    intensity_scale: float,
    intensity_offset: float,
    splits: int | None = None,
) -> torch.Tensor:
    """Conv weight gradient dW [D, C, p, p] (fp32).

    Without pooling (``arg`` empty): grad [B, GH*GW, D] is the gradient of the conv features and
    dW = sum over conv tokens of grad x patch pixels (after the affine), an ieee GEMM. With pooling:
    grad [B, T, D] is the gradient of the pooled features and arg [B, T, D] the conv-token index each
    one came from; dW gathers those patches."""
    b, c, h, w = image.shape
    gh, gw = h // patch, w // patch
    d = grad.shape[-1]
    k = c * patch * patch
    pool = arg.numel() > 0
    total = grad.shape[0] * grad.shape[1]
    cfg = dweight_tiles()
    step = 1 if pool else cfg["BLOCK_T"]
    grid_dk = (triton.cdiv(d, cfg["BLOCK_D"]), triton.cdiv(k, cfg["BLOCK_K"]))
    if splits is None:
        if image.device.type == "cuda":
            sms = torch.cuda.get_device_properties(image.device).multi_processor_count
            # at least 256 tokens per split for the GEMM, 32 for the serial per-token gather
            per_min = 32 if pool else 256
            splits = max(1, min(triton.cdiv(4 * sms, grid_dk[0] * grid_dk[1]), triton.cdiv(total, per_min)))
        else:
            splits = min(3, triton.cdiv(total, step))
    per = triton.cdiv(triton.cdiv(total, splits), step) * step
    splits = triton.cdiv(total, per)
    dwp = _alloc.empty(splits, d, k, dtype=torch.float32, device=image.device)
    grad = grad.contiguous()
    scale, offset = float(intensity_scale), float(intensity_offset)
    launch = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    if pool:
        _dweight_pooled_kernel[(*grid_dk, splits)](
            image, grad, arg.contiguous(), dwp, *image.stride(), gw, grad.shape[1], total, d, k, per, scale, offset,
            P=patch, BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], **launch,
        )  # fmt: skip
    else:
        _dweight_kernel[(*grid_dk, splits)](
            image, grad, dwp, *image.stride(), b, gw, gh * gw, d, k, per, scale, offset,
            P=patch, BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_K=cfg["BLOCK_K"], **launch,
        )  # fmt: skip
    return dwp.sum(0).reshape(d, c, patch, patch)


# --- compile gate -------------------------------------------------------------------------------


def _register() -> None:
    i32, f32 = "i32", "fp32"
    # the AViT stems: patch 16, dim 512 (query path, pooled) and kv_dim 256 (full path), uint16 images
    # and the float images of the ViT pipeline
    conv_cases = [(torch.uint16, True), (torch.uint16, False), (torch.float32, False), (torch.bfloat16, False)]
    for img_dt, pool in conv_cases:
        sig = {"img_ptr": IMAGE_PTR[img_dt], "arg_ptr": "*i32" if pool else "*fp32", "scale": f32, "offset": f32}
        sig.update({n: "*fp32" for n in ("w_ptr", "bias_ptr", "feat_ptr")})
        names = ("s_ib", "s_ic", "s_ih", "s_iw", "GH", "GW", "TH", "TW", "KH_MAX", "KW_MAX", "D", "K")
        sig.update({n: i32 for n in names})
        _aot.register(
            _conv_kernel, signatures=[sig], configs=[{**conv_tiles(pool, interpret=False), "P": 16, "POOL": pool}]
        )
    for out_dt, dim in ((torch.bfloat16, 512), (torch.bfloat16, 256), (torch.float32, 768)):
        sig = {n: "*fp32" for n in ("feat_ptr", "nw_ptr", "nb_ptr", "pw_ptr", "pb_ptr", "mean_ptr", "rstd_ptr")}
        sig["y_ptr"] = OUT_PTR[out_dt]
        sig.update({n: i32 for n in ("NROWS", "TW", "NT", "D")})
        sig.update({n: f32 for n in ("eps", "u_step", "u_off", "v_step", "v_off")})
        _aot.register(_norm_kernel, signatures=[sig], configs=[norm_tiles(dim)])
    for img_dt in (torch.uint16, torch.float32):
        sig = {"img_ptr": IMAGE_PTR[img_dt], "dconv_ptr": "*fp32", "dwp_ptr": "*fp32", "scale": f32, "offset": f32}
        sig.update({n: i32 for n in ("s_ib", "s_ic", "s_ih", "s_iw", "B", "GW", "NT", "D", "K", "TOKENS_PER_SPLIT")})
        _aot.register(_dweight_kernel, signatures=[sig], configs=[{**dweight_tiles(interpret=False), "P": 16}])
    sig = {"img_ptr": "*u16", "g_ptr": "*fp32", "arg_ptr": "*i32", "dwp_ptr": "*fp32", "scale": f32, "offset": f32}
    sig.update({n: i32 for n in ("s_ib", "s_ic", "s_ih", "s_iw", "GW", "NT", "TOTAL", "D", "K", "TOKENS_PER_SPLIT")})
    cfg = dweight_tiles(interpret=False)
    del cfg["BLOCK_T"]
    _aot.register(_dweight_pooled_kernel, signatures=[sig], configs=[{**cfg, "P": 16}])


_register()
