"""Triton kernels of the ReLU² family (fm_engine/ops/relu2.py holds the semantics and dispatch).

Element-wise: ``relu2_fwd`` (y = relu(x)^2) and ``relu2_bwd`` (dx = 2 relu(x) dy), fp32 math,
one rounding to the storage dtype.

MLP ``y = dropout(relu(x W1^T)^2) W2^T``: one GEMM kernel, ``_mm``, with operand prologues and
output epilogues selected by constexpr flags, launched four ways:

  forward   r  = relu(x @ W1^T)                      EPI_RELU: relu in the epilogue, r is stored
            y  = (r^2 * keep / (1-p)) @ W2^T         A_RELU2: square + dropout in the A prologue
  backward  da = (dy @ W2) * 2 r * keep / (1-p)      EPI_DRELU2: reads r in the epilogue
            dW2 = dy^T @ (r^2 * keep / (1-p))        B_RELU2: square + dropout in the B prologue
            dW1 = da^T @ x,  dx = da @ W1            plain

So the only hidden-sized tensor written in the forward, and kept for backward, is r; eager keeps
relu(a), its square and the dropout mask. The dropout mask is regenerated wherever it is needed
from (seed, row * hidden + col) with Triton's Philox ``tl.rand``, never stored.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot

from fm_engine import _alloc

# --- element-wise ------------------------------------------------------------------------------

EW_BLOCK = 2048  # 2048 elements x 2 B = 4 KiB per program: 16-byte vectors per thread with 4 warps


@triton.jit
def relu2_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    r = tl.where(x > 0, x, 0.0)
    r = tl.where(x != x, x, r)  # NaN propagates as in torch.relu
    tl.store(y_ptr + offs, (r * r).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def relu2_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=m).to(tl.float32)
    r = tl.where(x > 0, x, 0.0)
    r = tl.where(x != x, x, r)
    tl.store(dx_ptr + offs, (2.0 * r * dy).to(dx_ptr.dtype.element_ty), mask=m)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (Triton launches on the current device), whatever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _ew_block() -> int:
    # the interpreter runs each program in numpy: smaller blocks make partial blocks cheap to test
    return 256 if _aot.interpreting() else EW_BLOCK


def relu2_forward(x: torch.Tensor) -> torch.Tensor:
    """x: contiguous, any shape -> relu(x)^2."""
    y = _alloc.empty_like(x)
    n = x.numel()
    if n:
        blk = _ew_block()
        with on_device(x):
            relu2_fwd_kernel[(triton.cdiv(n, blk),)](x, y, n, BLOCK=blk, num_warps=4)
    return y


def relu2_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    dx = _alloc.empty_like(x)
    n = x.numel()
    if n:
        blk = _ew_block()
        with on_device(x):
            relu2_bwd_kernel[(triton.cdiv(n, blk),)](x, dy, dx, n, BLOCK=blk, num_warps=4)
    return dx


# --- GEMM with ReLU² prologues / epilogues -------------------------------------------------------

EPI_NONE, EPI_RELU, EPI_DRELU2 = 0, 1, 2

# BK = 32 everywhere so every config also fits fp32 operands in shared memory on sm_80 (the gate
# checks: 128x128x32 fp32 with 4 stages is 128 KiB < 163 KiB). Three configs keep the compile gate
# (every mode x dtype x config, twice) near 160 kernels.
GPU_CONFIGS = [
    triton.Config({"BM": 128, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BM": 128, "BN": 64, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BM": 64, "BN": 128, "BK": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
INTERPRETER_CONFIG = triton.Config({"BM": 16, "BN": 16, "BK": 16, "GROUP_M": 2}, num_warps=4, num_stages=2)
MM_TILE = 16  # tile edge in the interpreter: tests size their shapes around it
K_SPLIT_ALIGN = 256  # split-K slices start at multiples of every config's BK


@triton.jit
def _keep(seed, row, col, hidden, p):
    """Dropout keep mask for hidden element (row, col): Philox draw >= p (p = 0: keep all)."""
    return tl.rand(seed, (row * hidden + col).to(tl.int32)) >= p


@triton.autotune(
    configs=_aot.runtime_configs(GPU_CONFIGS, INTERPRETER_CONFIG),
    key=["M", "N", "K", "A_RELU2", "B_RELU2", "EPI", "DROPOUT", "IEEE"],
)
@triton.jit
def _mm(
    a_ptr,
    b_ptr,
    c_ptr,
    r_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    stride_rm,
    stride_rn,
    stride_cs,
    k_split,
    seed,
    p,
    scale,
    hidden,
    A_RELU2: tl.constexpr,
    B_RELU2: tl.constexpr,
    EPI: tl.constexpr,
    DROPOUT: tl.constexpr,
    IEEE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped tile order: GROUP_M row-tiles share each column of B while it is in L2
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    a_row = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_col = b_ptr + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    # split-K: program (tile, s) sums K range [s*k_split, (s+1)*k_split) into its own slice of c
    pid_k = tl.program_id(1)
    k_lo = pid_k * k_split
    k_hi = tl.minimum(K, k_lo + k_split)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        k_ok = kk < k_hi
        a = tl.load(a_row + kk[None, :].to(tl.int64) * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_col + kk[:, None].to(tl.int64) * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if A_RELU2:  # a = r[m, k] (hidden index k): square, drop, rescale
            af = a.to(tl.float32)
            af = af * af
            if DROPOUT:
                # dropped elements are x * 0 (not 0) so a NaN stays NaN, as in F.dropout
                af = tl.where(_keep(seed, rm[:, None], kk[None, :], hidden, p), af * scale, af * 0.0)
            a = af.to(b.dtype)
        if B_RELU2:  # b = r[k, n] (token k, hidden n)
            bf = b.to(tl.float32)
            bf = bf * bf
            if DROPOUT:
                bf = tl.where(_keep(seed, kk[:, None], rn[None, :], hidden, p), bf * scale, bf * 0.0)
            b = bf.to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    c_mask = m_ok[:, None] & n_ok[None, :]
    if EPI == 1:  # relu that keeps NaN, as torch.relu does
        acc = tl.where((acc > 0) | (acc != acc), acc, 0.0)
    if EPI == 2:  # da = dh * 2 r * keep * scale, r[m, n] with hidden index n
        r = tl.load(
            r_ptr + rm[:, None].to(tl.int64) * stride_rm + rn[None, :].to(tl.int64) * stride_rn, mask=c_mask, other=0.0
        ).to(tl.float32)
        acc = acc * 2.0 * r
        if DROPOUT:
            acc = tl.where(_keep(seed, rm[:, None], rn[None, :], hidden, p), acc * scale, acc * 0.0)
    c = (
        c_ptr
        + pid_k.to(tl.int64) * stride_cs
        + rm[:, None].to(tl.int64) * stride_cm
        + rn[None, :].to(tl.int64) * stride_cn
    )
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _keep_mask_kernel(out_ptr, M, H, seed, p, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * H
    keep = _keep(seed, offs // H, offs % H, H, p)
    tl.store(out_ptr + offs, keep.to(tl.int8), mask=ok)


def _mm_launch(
    a: torch.Tensor,
    a_strides: tuple[int, ...],
    b: torch.Tensor,
    b_strides: tuple[int, ...],
    M: int,
    N: int,
    K: int,
    out_dtype: torch.dtype,
    *,
    r: torch.Tensor | None = None,
    a_relu2: bool = False,
    b_relu2: bool = False,
    epi: int = EPI_NONE,
    seed: int = 0,
    p: float = 0.0,
    hidden: int = 1,
    split_k: int = 1,
) -> torch.Tensor:
    """C [M, N] = A [M, K] @ B [K, N] (operands given by pointer + strides) with the selected
    prologue / epilogue. ``split_k`` > 1 (plain epilogue only) sums K in that many fp32 slices."""
    if split_k > 1 and epi != EPI_NONE:
        raise ValueError("split_k: a split-K product cannot apply an epilogue")
    if M == 0 or N == 0 or K == 0:
        return torch.zeros(M, N, dtype=out_dtype, device=a.device)
    k_split = K
    if split_k > 1:
        k_split = triton.cdiv(triton.cdiv(K, split_k), K_SPLIT_ALIGN) * K_SPLIT_ALIGN
        split_k = triton.cdiv(K, k_split)
    c_out = _alloc.empty(split_k, M, N, dtype=torch.float32 if split_k > 1 else out_dtype, device=a.device)
    c = c_out[0] if split_k == 1 else c_out
    r_arg = r if r is not None else a  # not read without EPI_DRELU2; keeps one pointer type per dtype
    r_strides = (r.stride(0), r.stride(1)) if r is not None else (0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), split_k)
    with on_device(a):
        _mm[grid](
            a,
            b,
            c_out,
            r_arg,
            M,
            N,
            K,
            a_strides[0],
            a_strides[1],
            b_strides[0],
            b_strides[1],
            c_out.stride(1),
            c_out.stride(2),
            r_strides[0],
            r_strides[1],
            c_out.stride(0),
            k_split,
            seed,
            p,
            1.0 / (1.0 - p),
            hidden,
            A_RELU2=a_relu2,
            B_RELU2=b_relu2,
            EPI=epi,
            DROPOUT=p > 0.0,
            IEEE=a.dtype == torch.float32,
        )
    return c if split_k == 1 else c.sum(0).to(out_dtype)


def weight_grad_split(M: int, N: int, K: int, device: torch.device) -> int:
    """How many K slices a weight-gradient product (few output tiles, long K) should use.

    dW1 / dW2 of the MiT-UB MLP at 64 images x 768 tokens have 2048 x 512 outputs (64 tiles of
    128 x 128) and K = 49152: one program per tile would leave half of an H100's 132 SMs idle, so
    K is split until there are about two programs per SM.
    """
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    if tiles >= sms or K < 8 * K_SPLIT_ALIGN:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), K // (4 * K_SPLIT_ALIGN)))


def mlp_forward(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, D], w1: [H, D], w2: [Dout, H] -> (y [M, Dout], r = relu(x W1^T) [M, H])."""
    M, D = x.shape
    H = w1.shape[0]
    Dout = w2.shape[0]
    r = _mm_launch(x, x.stride(), w1, (w1.stride(1), w1.stride(0)), M, H, D, x.dtype, epi=EPI_RELU)
    y = _mm_launch(
        r, r.stride(), w2, (w2.stride(1), w2.stride(0)), M, Dout, H, x.dtype, a_relu2=True, seed=seed, p=p, hidden=H
    )
    return y, r


def mlp_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    r: torch.Tensor,
    p: float,
    seed: int,
    split_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx [M, D], dw1 [H, D], dw2 [Dout, H]) of y = mlp_forward(...)[0].

    ``split_k``: K slices of the two weight-gradient products (None: :func:`weight_grad_split`)."""
    M, D = x.shape
    H = w1.shape[0]
    Dout = w2.shape[0]
    da = _mm_launch(
        dy, dy.stride(), w2, w2.stride(), M, H, Dout, x.dtype, r=r, epi=EPI_DRELU2, seed=seed, p=p, hidden=H
    )
    split = split_k if split_k is not None else weight_grad_split(Dout, H, M, x.device)
    dw2 = _mm_launch(
        dy,
        (dy.stride(1), dy.stride(0)),
        r,
        r.stride(),
        Dout,
        H,
        M,
        w2.dtype,
        b_relu2=True,
        seed=seed,
        p=p,
        hidden=H,
        split_k=split,
    )
    dw1 = _mm_launch(da, (da.stride(1), da.stride(0)), x, x.stride(), H, D, M, w1.dtype, split_k=split)
    dx = _mm_launch(da, da.stride(), w1, w1.stride(), M, D, H, x.dtype)
    return dx, dw1, dw2


def dropout_keep_mask(seed: int, M: int, H: int, p: float, device: torch.device) -> torch.Tensor:
    """The [M, H] keep mask (bool) that the MLP kernels use for ``seed`` (for tests and debugging)."""
    out = torch.empty(M * H, dtype=torch.int8, device=device)
    blk = 1024
    _keep_mask_kernel[(triton.cdiv(M * H, blk),)](out, M, H, seed, p, BLOCK=blk)
    return out.view(M, H).bool()


# --- compile gate ------------------------------------------------------------------------------

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
for _kern in (relu2_fwd_kernel,):
    _aot.register(
        _kern,
        signatures=[{"x_ptr": t, "y_ptr": t, "n": "i64"} for t in _DT.values()],
        configs=[{"BLOCK": EW_BLOCK, "num_warps": 4}, {"BLOCK": 256, "num_warps": 4}],
    )
_aot.register(
    relu2_bwd_kernel,
    signatures=[{"x_ptr": t, "dy_ptr": t, "dx_ptr": t, "n": "i64"} for t in _DT.values()],
    configs=[{"BLOCK": EW_BLOCK, "num_warps": 4}, {"BLOCK": 256, "num_warps": 4}],
)
_aot.register(
    _keep_mask_kernel,
    signatures=[{"out_ptr": "*i8", "M": "i32", "H": "i32", "seed": "i32", "p": "fp32"}],
    configs=[{"BLOCK": 1024, "num_warps": 4}],
)

_MM_SCALARS = {
    "M": "i32",
    "N": "i32",
    "K": "i32",
    **{
        s: "i32"
        for s in (
            "stride_am",
            "stride_ak",
            "stride_bk",
            "stride_bn",
            "stride_cm",
            "stride_cn",
            "stride_rm",
            "stride_rn",
            "stride_cs",
            "k_split",
        )
    },
    "seed": "i32",
    "p": "fp32",
    "scale": "fp32",
    "hidden": "i32",
}
# Every launch mode (with and without dropout) x dtype x GPU config; fp32 uses the ieee dot.
# INTERPRETER_CONFIG only ever runs in the interpreter, so it is not compiled here.
_MODES = [
    {"A_RELU2": 0, "B_RELU2": 0, "EPI": EPI_NONE, "DROPOUT": 0},
    {"A_RELU2": 0, "B_RELU2": 0, "EPI": EPI_RELU, "DROPOUT": 0},
    *({"A_RELU2": 1, "B_RELU2": 0, "EPI": EPI_NONE, "DROPOUT": d} for d in (0, 1)),
    *({"A_RELU2": 0, "B_RELU2": 0, "EPI": EPI_DRELU2, "DROPOUT": d} for d in (0, 1)),
    *({"A_RELU2": 0, "B_RELU2": 1, "EPI": EPI_NONE, "DROPOUT": d} for d in (0, 1)),
]
# Unit strides of the six launches with contiguous tensors (fm_engine/ops/relu2.py calls these):
# r = x W1ᵀ and y = h W2ᵀ read A row-major and B = Wᵀ column-major; da = dy W2 and dx = da W1 read
# both row-major; dW2 = dyᵀ h and dW1 = daᵀ x read A transposed.
_UNIT = {
    "fwd": {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1},
    "rowmajor": {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1},
    "wgrad": {"stride_am": 1, "stride_bn": 1, "stride_cn": 1},
}
_MODE_UNIT = {  # (A_RELU2, B_RELU2, EPI) -> launch patterns
    (0, 0, EPI_NONE): [_UNIT["rowmajor"], _UNIT["wgrad"]],
    (0, 0, EPI_RELU): [_UNIT["fwd"]],
    (1, 0, EPI_NONE): [_UNIT["fwd"]],
    (0, 0, EPI_DRELU2): [{**_UNIT["rowmajor"], "stride_rn": 1}],
    (0, 1, EPI_NONE): [_UNIT["wgrad"]],
}
for _name, _t in _DT.items():
    for _mode in _MODES:
        # plain-epilogue products may be split-K, writing fp32 slices
        outs = {_t, "*fp32"} if _mode["EPI"] == EPI_NONE and not _mode["A_RELU2"] else {_t}
        _aot.register(
            _mm,
            signatures=[{"a_ptr": _t, "b_ptr": _t, "c_ptr": o, "r_ptr": _t, **_MM_SCALARS} for o in sorted(outs)],
            configs=[{**c, **_mode, "IEEE": int(_name == "fp32")} for c in _aot.config_dicts(GPU_CONFIGS)],
            name=f"relu2_mlp_mm[A{_mode['A_RELU2']}B{_mode['B_RELU2']}E{_mode['EPI']}D{_mode['DROPOUT']}]",
            specializations=_MODE_UNIT[(_mode["A_RELU2"], _mode["B_RELU2"], _mode["EPI"])],
        )
