"""Triton kernels of the ReLU² family (fm_engine/ops/relu2.py holds the semantics and dispatch).

Every kernel here is autotuned by :mod:`fm_engine.kernels._autotune` (bucketed keys, winners kept on disk)
and registers its configs with the compile gate (:mod:`fm_engine.kernels._aot`).

Element-wise
------------
``relu2_fwd_kernel`` (y = relu(x)^2) and ``relu2_bwd_kernel`` (dx = 2 relu(x) dy): fp32 math, one rounding
to the storage dtype, NaN kept (relu(NaN) = NaN as in torch). Memory-bound: forward 2 s bytes per element,
backward 3 s (s = bytes per element). Each program streams one block with unmasked loads and stores
when the block is whole, so with 16-byte aligned pointers they compile to 16-byte vectors
(``ld.global.v4`` / ``st.global.v4``: tests/test_compile_gate.py checks the PTX); only the last block is
masked. Block sizes of 1K-8K elements with 4-16 warps are tuned per (size bucket, dtype): a whole block of
8K bf16 elements is 16 KiB per tensor in flight per program, several programs per SM.

The ReLU² MLP ``y = dropout(relu(x W1^T)^2) W2^T`` (x [M, D], W1 [H, D], W2 [Dout, H])
----------------------------------------------------------------------------------------
Two designs, registered as two backends of the op so that measured evidence picks per size.

**Fused GEMMs** (backend "triton"): one GEMM kernel ``_mm_kernel`` with operand prologues and output
epilogues chosen by constexpr flags, launched five ways::

  forward   r   = relu(x @ W1^T)                        EPI_RELU: relu in the epilogue, r is stored
            y   = (r^2 * keep / (1-p)) @ W2^T           PRO_RELU2: square + dropout in the A prologue
  backward  da  = (dy @ W2) * 2 r * keep / (1-p)        EPI_DRELU2: reads r in the epilogue
            dW2^T = (r^2 * keep / (1-p))^T @ dy         PRO_RELU2_T: the prologue on A = r^T, stored transposed
            dW1 = da^T @ x,  dx = da @ W1               plain

The only hidden-sized tensor written in the forward, and kept for backward, is r; eager keeps relu(a),
its square and the dropout mask. dW2 is computed transposed so that its prologue (square, dropout) is
on the A operand: Hopper's wgmma takes A from registers, while a B operand changed in registers must go
back through shared memory, and Triton 3.6 then serialises the MMAs (``wgmma.wait_group 0`` every step,
seen in the sm_90 PTX of the former B-prologue variant; with the prologue on A, 1-3 groups stay in flight:
tests/test_compile_gate.py checks the PTX).
The weight gradients (long K = M, few output tiles: 64 tiles of 128x128 at 2048x512) may split K into
``SPLIT`` fp32 slices summed afterwards in a fixed order (deterministic); SPLIT 1, 2 or 4 is part of the
tuned config, so at large M the tuner can drop split-K when it does not pay.

**Vendor GEMMs + fused element-wise passes** (backend "hybrid"): the four products per step run in
cuBLAS through ``torch.mm``; everything element-wise runs in two memory-bound Triton passes::

  forward   a  = x @ W1^T                     (cuBLAS; a is the one hidden tensor kept for backward)
            h  = relu(a)^2 * keep / (1-p)     mlp_act_fwd_kernel: read a, write h
            y  = h @ W2^T                     (cuBLAS; h is freed)
  backward  dh = dy @ W2                      (cuBLAS)
            da = dh * 2 relu(a) * keep / (1-p), h = relu(a)^2 * keep / (1-p)
                                              mlp_act_bwd_kernel: read a, dh; write da (over dh), h
            dW2 = dy^T @ h, dW1 = da^T @ x, dx = da @ W1   (cuBLAS)

``torch._addmm_activation(bias, x, W1^T, use_gelu=False)`` exists (aten schema ``_addmm_activation(self,
mat1, mat2, *, beta=1, alpha=1, use_gelu=False)``) and puts relu into cuBLASLt's epilogue when it gets a
1-D bias of size H in the operands' dtype with beta = 1 on a CUDA device; it is not used: the square must
read and write the hidden tensor anyway, so moving relu into the epilogue saves no byte, it would need a
zero bias, and cuBLASLt's relu epilogue is max(x, 0), which on a GPU need not keep NaN as torch.relu does
(not checked here). The relu is done in the Triton passes, NaN-preserving.

Dropout in both designs: keep(row, col) = Philox ``tl.rand(seed, row * H + col) >= p`` on the flat index
of the [M, H] hidden tensor, regenerated wherever needed, never stored; both designs draw the same mask
for one seed (``dropout_keep_mask``).

Byte and FLOP model (bf16, s = 2 B; H200 ceilings measured 2026-11-30: 800 TFLOP/s bf16, 4247 GB/s copy).
Both designs do the six products, 12·M·D·H FLOP; they differ in hidden-tensor traffic (in units of
s·M·H bytes) and in whose GEMMs run:

  ==================  =======  =======  ====================================================
  traffic (s·M·H)     fwd      bwd      passes outside GEMMs
  ==================  =======  =======  ====================================================
  eager               6        >= 9     relu, square (fwd); square', relu' (bwd)
  hybrid              4        8        one pass per direction (2 and 4 s·M·H)
  fused               2        5        none
  ==================  =======  =======  ====================================================

* M 49152, 512 -> 2048 -> 512: each product 103 GFLOP = 0.129 ms at the ceiling (0.77 ms for six); s·M·H =
  201 MB = 0.047 ms at copy speed. Hybrid: cuBLAS products (what eager and torch.compile also use) plus
  6·201 MB of element-wise passes (0.28 ms at copy speed) against eager's ~ 10 (0.47 ms): it should land
  near torch.compile, which fuses the same element-wise work, above eager by the ~0.2 ms of passes saved;
  not faster than compile. Fused: 5 fewer s·M·H of traffic than hybrid (~1 GB, ~0.24 ms) but only wins
  if its Triton GEMMs reach cuBLAS speed (the 2026-11-30 run: forward at 400 TFLOP/s, half of it).
* M 3072, 768 -> 3072 -> 768: each product 14.5 GFLOP = 18 µs at the ceiling; s·M·H = 19 MB = 4.4 µs.
  The whole step is ~0.15-0.2 ms of GPU work, so the host cost of launching matters as much as the
  kernels: the 2026-11-30 fused forward took 0.36 ms for two launches at 81 TFLOP/s, about 5x its GPU time,
  which points at host overhead rather than tiles. Per fwd+bwd the fused design issues 6 Triton launches,
  the hybrid 2 Triton launches and 6 cuBLAS calls; both pay the op dispatch, two custom ops and autograd,
  ~0.1 ms of host time with stub kernels on the 2-core CPU test machine (not the GPU host). The hybrid
  should track eager (0.23 ms) less the element-wise passes it saves if its host path stays under the
  GPU time.
Whether either design meets its target is for a GPU run to show (benchmarks/relu2.py); no GPU time here is
measured.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from fm_engine.kernels import _aot, _autotune
from fm_engine.kernels._autotune import dtype, pow2

from fm_engine import _alloc


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (Triton launches on the current device), whatever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --- element-wise ----------------------------------------------------------------------------------

# 16-byte vectors are 8 bf16/fp16 or 4 fp32 elements per thread and access; a block of BLOCK elements over
# 32·warps threads gives each thread BLOCK / (32·warps) elements, i.e. 1-8 vectors per tensor in flight.
EW_CONFIGS = [
    triton.Config({"BLOCK": 4096}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK": 2048}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK": 4096}, num_warps=4, num_stages=1),
    triton.Config({"BLOCK": 8192}, num_warps=8, num_stages=1),
    triton.Config({"BLOCK": 8192}, num_warps=16, num_stages=1),
    triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1),
]
EW_INTERPRETER = triton.Config({"BLOCK": 256}, num_warps=4, num_stages=1)
EW_BLOCK_INTERPRETER = 256  # tests size their inputs around it


def _ew_key(a: dict) -> tuple:
    return (pow2(a["n"]), dtype(a["x_ptr"]))


def _ew_grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


@triton.jit
def _relu_nan(x):
    """relu in fp32 that keeps NaN, as torch.relu does."""
    return tl.where((x > 0) | (x != x), x, 0.0)


@_autotune.autotune(name="relu2_fwd", configs=EW_CONFIGS, interpreter_config=EW_INTERPRETER, key=_ew_key)
@triton.jit
def relu2_fwd_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # whole block: no mask, so aligned pointers give 16-byte vectors
        r = _relu_nan(tl.load(x_ptr + offs).to(tl.float32))
        tl.store(y_ptr + offs, (r * r).to(y_ptr.dtype.element_ty))
    else:
        m = offs < n
        r = _relu_nan(tl.load(x_ptr + offs, mask=m).to(tl.float32))
        tl.store(y_ptr + offs, (r * r).to(y_ptr.dtype.element_ty), mask=m)


@_autotune.autotune(name="relu2_bwd", configs=EW_CONFIGS, interpreter_config=EW_INTERPRETER, key=_ew_key)
@triton.jit
def relu2_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        x = tl.load(x_ptr + offs).to(tl.float32)
        dy = tl.load(dy_ptr + offs).to(tl.float32)
        tl.store(dx_ptr + offs, (2.0 * _relu_nan(x) * dy).to(dx_ptr.dtype.element_ty))
    else:
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m).to(tl.float32)
        tl.store(dx_ptr + offs, (2.0 * _relu_nan(x) * dy).to(dx_ptr.dtype.element_ty), mask=m)


def relu2_forward(x: torch.Tensor) -> torch.Tensor:
    """x: contiguous, any shape -> relu(x)^2."""
    y = _alloc.empty_like(x)
    n = x.numel()
    if n:
        with on_device(x):
            relu2_fwd_kernel[_ew_grid(n)](x, y, n)
    return y


def relu2_backward(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """x, dy: contiguous, same shape -> 2 relu(x) dy."""
    dx = _alloc.empty_like(x)
    n = x.numel()
    if n:
        with on_device(x):
            relu2_bwd_kernel[_ew_grid(n)](x, dy, dx, n)
    return dx


# --- dropout mask --------------------------------------------------------------------------------


@triton.jit
def _keep_flat(seed, offs, p):
    """Dropout keep mask of hidden elements at flat offsets row * H + col: Philox draw >= p (p = 0 keeps all)."""
    return tl.rand(seed, offs.to(tl.int32)) >= p


@triton.jit
def _keep(seed, row, col, hidden, p):
    return _keep_flat(seed, row * hidden + col, p)


@_autotune.autotune(
    name="relu2_keep_mask",
    configs=[triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)],
    interpreter_config=triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1),
    key=lambda a: (),
)
@triton.jit
def _keep_mask_kernel(out_ptr, n, seed, p, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, _keep_flat(seed, offs, p).to(tl.int8), mask=ok)


def dropout_keep_mask(seed: int, M: int, H: int, p: float, device: torch.device) -> torch.Tensor:
    """The [M, H] keep mask (bool) that both MLP designs use for ``seed`` (for tests and debugging)."""
    out = torch.empty(M * H, dtype=torch.int8, device=device)
    if M * H:
        with on_device(out):
            _keep_mask_kernel[_ew_grid(M * H)](out, M * H, seed, p)
    return out.view(M, H).bool()


# --- hybrid MLP: the element-wise passes between cuBLAS products ------------------------------------


def _act_key(a: dict) -> tuple:
    return (pow2(a["n"]), dtype(a["a_ptr"]), bool(a["DROPOUT"]))


@_autotune.autotune(name="relu2_mlp_act_fwd", configs=EW_CONFIGS, interpreter_config=EW_INTERPRETER, key=_act_key)
@triton.jit
def mlp_act_fwd_kernel(a_ptr, h_ptr, n, seed, p, scale, DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    """h = relu(a)^2 * keep / (1 - p) over the flat [M, H] hidden tensor (offset = row * H + col)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    whole = start + BLOCK <= n
    m = offs < n
    if whole:
        a = tl.load(a_ptr + offs).to(tl.float32)
    else:
        a = tl.load(a_ptr + offs, mask=m).to(tl.float32)
    r = _relu_nan(a)
    h = r * r
    if DROPOUT:
        # dropped elements are h * 0 (not 0) so a NaN stays NaN, as in F.dropout
        h = tl.where(_keep_flat(seed, offs, p), h * scale, h * 0.0)
    if whole:
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty))
    else:
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=m)


@_autotune.autotune(
    name="relu2_mlp_act_bwd",
    configs=EW_CONFIGS,
    interpreter_config=EW_INTERPRETER,
    key=_act_key,
    restore=("dh_ptr",),  # da is written over dh: tuning reruns start from the saved dh
)
@triton.jit
def mlp_act_bwd_kernel(a_ptr, dh_ptr, da_ptr, h_ptr, n, seed, p, scale, DROPOUT: tl.constexpr, BLOCK: tl.constexpr):
    """da = dh * 2 relu(a) * keep / (1-p) (may overwrite dh) and h = relu(a)^2 * keep / (1-p) (for dW2)."""
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    whole = start + BLOCK <= n
    m = offs < n
    if whole:
        a = tl.load(a_ptr + offs).to(tl.float32)
        dh = tl.load(dh_ptr + offs).to(tl.float32)
    else:
        a = tl.load(a_ptr + offs, mask=m).to(tl.float32)
        dh = tl.load(dh_ptr + offs, mask=m).to(tl.float32)
    r = _relu_nan(a)
    da = dh * 2.0 * r
    h = r * r
    if DROPOUT:
        keep = _keep_flat(seed, offs, p)
        da = tl.where(keep, da * scale, da * 0.0)
        h = tl.where(keep, h * scale, h * 0.0)
    if whole:
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty))
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty))
    else:
        tl.store(da_ptr + offs, da.to(da_ptr.dtype.element_ty), mask=m)
        tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=m)


def _seed_p(p: float) -> tuple[float, float]:
    return float(p), 1.0 / (1.0 - p)


def hybrid_forward(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, D] (any strides), w1: [H, D], w2: [Dout, H] -> (y [M, Dout], a = x W1^T [M, H], kept)."""
    a = torch.mm(x, w1.t())
    h = _alloc.empty_like(a)
    n = a.numel()
    if n:
        with on_device(a):
            mlp_act_fwd_kernel[_ew_grid(n)](a, h, n, seed, *_seed_p(p), DROPOUT=p > 0.0)
    y = torch.mm(h, w2.t())
    return y, a


def hybrid_backward(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, a: torch.Tensor, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx [M, D], dw1 [H, D], dw2 [Dout, H]) of y = hybrid_forward(...)[0]."""
    dh = torch.mm(dy, w2)  # fresh and private: da is written over it
    h = _alloc.empty_like(a)
    n = a.numel()
    if n:
        with on_device(a):
            mlp_act_bwd_kernel[_ew_grid(n)](a, dh, dh, h, n, seed, *_seed_p(p), DROPOUT=p > 0.0)
    da = dh
    dw2 = torch.mm(dy.t(), h)
    del h
    dw1 = torch.mm(da.t(), x)
    dx = torch.mm(da, w1)
    return dx, dw1, dw2


# --- fused MLP: one GEMM kernel with ReLU² prologues / epilogues ----------------------------------------

PRO_NONE, PRO_RELU2, PRO_RELU2_T = 0, 1, 2
EPI_NONE, EPI_RELU, EPI_DRELU2 = 0, 1, 2
MM_TILE = 16  # tile edge in the interpreter: tests size their shapes around it
SPLIT_MAX = 4  # most K slices a weight-gradient config may use


def _tile(bm: int, bn: int, bk: int, warps: int, stages: int, split: int = 1) -> triton.Config:
    return triton.Config(
        {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8, "SPLIT": split}, num_warps=warps, num_stages=stages
    )


def _with_split(configs: list[triton.Config], splits: tuple[int, ...]) -> list[triton.Config]:
    return [
        triton.Config({**c.kwargs, "SPLIT": s}, num_warps=c.num_warps, num_stages=c.num_stages)
        for s in splits
        for c in configs
    ]


# Config lists per architecture, launch family and alignment, chosen from the compile gate's register
# counts (kernels/_aot.py: every config below compiles for its architecture without a spill or a stack
# frame; the gate checks it on every CI run). Tiles: BM x BN x BK, warps, stages.
# * sm_90, bf16/fp16, 16-aligned operands: wgmma keeps the accumulator in registers, so 128x256 and 256x128
#   tiles fit with 8 warps (167-254 registers); BK 64 halves the loop trips of BK 32.
# * sm_80: mma.sync also holds operand fragments in registers: 128x256 / 256x128 / 128x128-on-4-warps spill
#   at BK 64 (24-32 B of stack), so the large tiles there use BK 32.
# * dropout: the Philox draw of a whole tile in the prologue / epilogue costs registers; with it, da's
#   epilogue (dh * 2r * keep) spills at 128x256 on sm_90 (3.3 KB of stack) and at everything above 64x64
#   on sm_80, hence shorter lists.
# * unaligned: a row stride that is not a multiple of 16 elements rules out 16-byte vectors, and every
#   element then needs its own address registers: 128x128 tiles spill by 0.3-1.5 KB; only small tiles fit.
# * fp32 runs the ieee dot on the FMA units (the reference's F.linear is fp32 without TF32); 128-row tiles
#   and 64x64 on 4 warps spill somewhere (8-192 B), so its tiles are 64 rows on 8 warps or BK 16.
_A, _B, _C = _tile(128, 128, 64, 8, 3), _tile(128, 256, 64, 8, 3), _tile(256, 128, 64, 8, 3)
_D, _E, _F, _G = _tile(128, 128, 64, 4, 4), _tile(64, 128, 64, 4, 4), _tile(128, 64, 64, 4, 4), _tile(64, 64, 64, 4, 5)
_a, _b, _c = _tile(128, 128, 32, 4, 4), _tile(128, 256, 32, 8, 3), _tile(256, 128, 32, 8, 3)
_d, _f, _g = _tile(64, 128, 32, 4, 4), _tile(64, 64, 32, 4, 4), _tile(128, 128, 32, 8, 4)
MM_CONFIGS = {80: [_A, _b, _c, _a, _E, _F, _G], 90: [_A, _B, _C, _D, _E, _F, _G]}
MM_CONFIGS_DROPOUT = {80: [_G, _f], 90: [_A, _g, _E, _F, _G, _d]}
MM_CONFIGS_UNALIGNED = [_tile(32, 64, 32, 4, 3), _tile(64, 32, 32, 4, 3), _tile(32, 32, 32, 4, 2)]
MM_CONFIGS_FP32 = [_tile(64, 128, 32, 8, 3), _tile(64, 64, 32, 8, 3), _tile(64, 64, 16, 4, 3)]
MM_CONFIGS_FP32_UNALIGNED = [_tile(64, 64, 32, 8, 3), _tile(32, 64, 32, 4, 3), _tile(32, 32, 32, 4, 2)]
# weight gradients: the tiles that suit a long K, each with 4, 2 or 1 K slices; 4 first, so that the first config
# (what runs untuned: FM_ENGINE_AUTOTUNE=0, CUDA-graph capture) fills 132 SMs at the headline shape
# (dW1 [2048, 512]: 64 tiles of 128x128, 256 programs split 4)
_SPLITS = (4, 2, 1)
WGRAD_CONFIGS = {80: _with_split([_A, _b, _a, _E], _SPLITS), 90: _with_split([_A, _B, _D, _E], _SPLITS)}
WGRAD_CONFIGS_DROPOUT = {80: _with_split([_G, _f], _SPLITS), 90: _with_split([_A, _g, _E], _SPLITS)}
WGRAD_CONFIGS_UNALIGNED = _with_split(MM_CONFIGS_UNALIGNED[:2], _SPLITS)
WGRAD_CONFIGS_FP32 = _with_split(MM_CONFIGS_FP32[:2], _SPLITS)
WGRAD_CONFIGS_FP32_UNALIGNED = _with_split(MM_CONFIGS_FP32_UNALIGNED[:2], _SPLITS)
MM_INTERPRETER = _tile(16, 16, 16, 4, 2)
# the interpreter's weight gradients run split in 2, so every CPU test crosses a slice boundary
WGRAD_INTERPRETER = _tile(16, 16, 16, 4, 2, split=2)


def _mm_key(a: dict) -> tuple:
    unit = tuple(int(a[s] == 1) for s in ("stride_am", "stride_ak", "stride_bk", "stride_bn"))
    return (pow2(a["M"]), pow2(a["N"]), pow2(a["K"]), dtype(a["a_ptr"]), a["PRO"], a["EPI"], a["DROPOUT"], unit)


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, r_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn, stride_rm, stride_rn, stride_cs,
    seed, p, scale, hidden,
    PRO: tl.constexpr, EPI: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C[s] = A @ B over K slice s (SPLIT slices; stride_cs apart), with the selected prologue / epilogue."""
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
    pid_k = tl.program_id(1)
    if SPLIT == 1:
        k_lo = 0
        k_hi = K
    else:  # slice s sums K range [s*per, (s+1)*per), per a multiple of BK
        per = tl.cdiv(tl.cdiv(K, SPLIT), BK) * BK
        k_lo = pid_k * per
        k_hi = tl.minimum(K, k_lo + per)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        k_ok = kk < k_hi
        a = tl.load(a_row + kk[None, :].to(tl.int64) * stride_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_col + kk[:, None].to(tl.int64) * stride_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if PRO != 0:  # a = r (PRO_RELU2: a[m, k] = r[token m, hidden k]; PRO_RELU2_T: a[m, k] = r[token k, hidden m])
            af = a.to(tl.float32)
            af = af * af
            if DROPOUT:
                # dropped elements are x * 0 (not 0) so a NaN stays NaN, as in F.dropout
                if PRO == 1:
                    keep = _keep(seed, rm[:, None], kk[None, :], hidden, p)
                else:
                    keep = _keep(seed, kk[None, :], rm[:, None], hidden, p)
                af = tl.where(keep, af * scale, af * 0.0)
            a = af.to(b.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)

    c_mask = m_ok[:, None] & n_ok[None, :]
    if EPI == 1:
        acc = _relu_nan(acc)
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


# One tuner per launch family: (weight gradient?, fp32?, "" / "dropout" / "unaligned") -> its config lists.
_LISTS: dict[tuple[bool, bool, str], list[triton.Config] | dict[int, list[triton.Config]]] = {
    (False, False, ""): MM_CONFIGS,
    (False, False, "dropout"): MM_CONFIGS_DROPOUT,
    (False, False, "unaligned"): MM_CONFIGS_UNALIGNED,
    (False, True, ""): MM_CONFIGS_FP32,
    (False, True, "dropout"): MM_CONFIGS_FP32,
    (False, True, "unaligned"): MM_CONFIGS_FP32_UNALIGNED,
    (True, False, ""): WGRAD_CONFIGS,
    (True, False, "dropout"): WGRAD_CONFIGS_DROPOUT,
    (True, False, "unaligned"): WGRAD_CONFIGS_UNALIGNED,
    (True, True, ""): WGRAD_CONFIGS_FP32,
    (True, True, "dropout"): WGRAD_CONFIGS_FP32,
    (True, True, "unaligned"): WGRAD_CONFIGS_FP32_UNALIGNED,
}
GEMMS = {
    k: _autotune.autotune(
        name=f"relu2_mlp_{'wgrad' if k[0] else 'mm'}{'_fp32' if k[1] else ''}{'_' + k[2] if k[2] else ''}",
        configs=lists,
        interpreter_config=WGRAD_INTERPRETER if k[0] else MM_INTERPRETER,
        key=_mm_key,
    )(_mm_kernel)
    for k, lists in _LISTS.items()
}


def _aligned(*args: object) -> bool:
    """True when Triton will mark every pointer 16-byte aligned and every non-unit stride a multiple of 16
    (what the aligned config lists were checked for)."""
    for v in args:
        if isinstance(v, torch.Tensor):
            if v.data_ptr() % 16:
                return False
        elif isinstance(v, int) and v != 1 and v % 16:
            return False
    return True


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
    pro: int = PRO_NONE,
    epi: int = EPI_NONE,
    seed: int = 0,
    p: float = 0.0,
    hidden: int = 1,
    wgrad: bool = False,
    transpose_out: bool = False,
) -> torch.Tensor:
    """C [M, N] = A [M, K] @ B [K, N] (operands given by pointer + strides) with the selected prologue /
    epilogue; ``transpose_out`` returns C^T [N, M]. ``wgrad``: a weight gradient (long K): the tuned config
    may split K into fp32 slices, summed here in slice order."""
    if M == 0 or N == 0 or K == 0:
        z = torch.zeros(M, N, dtype=out_dtype, device=a.device)
        return z.t().contiguous() if transpose_out else z
    if epi != EPI_NONE and (transpose_out or wgrad):
        raise ValueError("epi: only plain and prologue products are split or stored transposed")
    shape = (N, M) if transpose_out else (M, N)
    if wgrad:
        c_out = _alloc.empty(SPLIT_MAX, *shape, dtype=torch.float32, device=a.device)
    else:
        c_out = _alloc.empty(1, *shape, dtype=out_dtype, device=a.device)
    s_cm, s_cn = (c_out.stride(2), c_out.stride(1)) if transpose_out else (c_out.stride(1), c_out.stride(2))
    r_arg = r if r is not None else a  # not read without EPI_DRELU2; keeps one pointer type per dtype
    r_strides = (r.stride(0), r.stride(1)) if r is not None else (0, 0)
    aligned = _aligned(a, b, c_out, r_arg, *a_strides, *b_strides, s_cm, s_cn, *r_strides)
    family = "dropout" if aligned and p > 0.0 else ("" if aligned else "unaligned")
    kernel = GEMMS[(wgrad, a.dtype == torch.float32, family)]
    fp32 = a.dtype == torch.float32
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), meta["SPLIT"])
    with on_device(a):
        cfg = kernel[grid](
            a, b, c_out, r_arg,
            M, N, K,
            a_strides[0], a_strides[1], b_strides[0], b_strides[1], s_cm, s_cn, r_strides[0], r_strides[1],
            c_out.stride(0),
            seed, p, 1.0 / (1.0 - p), hidden,
            PRO=pro, EPI=epi, DROPOUT=p > 0.0, IEEE=fp32,
        )  # fmt: skip
    if not wgrad:
        return c_out[0]
    split = int(cfg.kwargs.get("SPLIT", 1))
    if split == 1:  # a copy, so the result does not hold on to the SPLIT_MAX-slice buffer
        return c_out[0].to(out_dtype, copy=True)
    return c_out[:split].sum(0).to(out_dtype)


def mlp_forward(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, D], w1: [H, D], w2: [Dout, H] -> (y [M, Dout], r = relu(x W1^T) [M, H])."""
    # contiguous operands: every product then reads with unit inner strides, the only layouts the compile
    # gate checks (arbitrary strides need an address register per element and spill at useful tiles)
    x, w1, w2 = x.contiguous(), w1.contiguous(), w2.contiguous()
    M, D = x.shape
    H = w1.shape[0]
    Dout = w2.shape[0]
    r = _mm_launch(x, x.stride(), w1, (w1.stride(1), w1.stride(0)), M, H, D, x.dtype, epi=EPI_RELU)
    y = _mm_launch(
        r, r.stride(), w2, (w2.stride(1), w2.stride(0)), M, Dout, H, x.dtype, pro=PRO_RELU2, seed=seed, p=p, hidden=H
    )
    return y, r


def mlp_backward(
    dy: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, r: torch.Tensor, p: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dx [M, D], dw1 [H, D], dw2 [Dout, H]) of y = mlp_forward(...)[0]."""
    dy, x, w1, w2 = dy.contiguous(), x.contiguous(), w1.contiguous(), w2.contiguous()
    M, D = x.shape
    H = w1.shape[0]
    Dout = w2.shape[0]
    da = _mm_launch(
        dy, dy.stride(), w2, w2.stride(), M, H, Dout, x.dtype, r=r, epi=EPI_DRELU2, seed=seed, p=p, hidden=H
    )
    # dW2^T [H, Dout] = h^T @ dy with h = r^2 (dropped) made in the A prologue; stored as dW2 [Dout, H]
    dw2 = _mm_launch(
        r, (r.stride(1), r.stride(0)), dy, dy.stride(), H, Dout, M, w2.dtype,
        pro=PRO_RELU2_T, seed=seed, p=p, hidden=H, wgrad=True, transpose_out=True,
    )  # fmt: skip
    dw1 = _mm_launch(da, (da.stride(1), da.stride(0)), x, x.stride(), H, D, M, w1.dtype, wgrad=True)
    dx = _mm_launch(da, da.stride(), w1, w1.stride(), M, D, H, x.dtype)
    return dx, dw1, dw2


# --- compile gate ------------------------------------------------------------------------------

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
_ALIGNED: list[dict[str, int]] = [{}]  # the 16-aligned launch (pointers and n divisible by 16)
# n is i32 below 2^31 elements (every size benchmarked), i64 above
_aot.register(
    relu2_fwd_kernel,
    signatures=[{"x_ptr": t, "y_ptr": t, "n": i} for i in ("i32", "i64") for t in _DT.values()],
    specializations=_ALIGNED,
)
_aot.register(
    relu2_bwd_kernel,
    signatures=[{"x_ptr": t, "dy_ptr": t, "dx_ptr": t, "n": i} for i in ("i32", "i64") for t in _DT.values()],
    specializations=_ALIGNED,
)
_aot.register(_keep_mask_kernel, signatures=[{"out_ptr": "*i8", "n": "i32", "seed": "i32", "p": "fp32"}])
for _d in (0, 1):
    _aot.register(
        mlp_act_fwd_kernel,
        signatures=[
            {"a_ptr": t, "h_ptr": t, "n": "i32", "seed": "i32", "p": "fp32", "scale": "fp32"} for t in _DT.values()
        ],
        constexprs={"DROPOUT": _d},
        name=f"relu2_mlp_act_fwd[D{_d}]",
        specializations=_ALIGNED,
    )
    _aot.register(
        mlp_act_bwd_kernel,
        signatures=[
            {"a_ptr": t, "dh_ptr": t, "da_ptr": t, "h_ptr": t, "n": "i32", "seed": "i32", "p": "fp32", "scale": "fp32"}
            for t in _DT.values()
        ],
        constexprs={"DROPOUT": _d},
        name=f"relu2_mlp_act_bwd[D{_d}]",
        specializations=_ALIGNED,
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
        )
    },
    "seed": "i32",
    "p": "fp32",
    "scale": "fp32",
    "hidden": "i32",
}
# Unit strides of the launches with contiguous tensors (mlp_forward / mlp_backward): r = x W1ᵀ and
# y = h W2ᵀ read A row-major and B = Wᵀ column-major; da = dy W2 and dx = da W1 read both row-major;
# the weight gradients read A transposed, dW1 stores row-major and dW2ᵀ stores transposed.
_UNIT = {
    "fwd": {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1},
    "rowmajor": {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1},
    "dw1": {"stride_am": 1, "stride_bn": 1, "stride_cn": 1},
    "dw2t": {"stride_am": 1, "stride_bn": 1, "stride_cm": 1},
}
# (weight gradient?, mode, launch pattern): the products mlp_forward / mlp_backward launch
_MODES = [
    (False, {"PRO": PRO_NONE, "EPI": EPI_NONE, "DROPOUT": 0}, _UNIT["rowmajor"]),
    (False, {"PRO": PRO_NONE, "EPI": EPI_RELU, "DROPOUT": 0}, _UNIT["fwd"]),
    *((False, {"PRO": PRO_RELU2, "EPI": EPI_NONE, "DROPOUT": d}, _UNIT["fwd"]) for d in (0, 1)),
    *(
        (False, {"PRO": PRO_NONE, "EPI": EPI_DRELU2, "DROPOUT": d}, {**_UNIT["rowmajor"], "stride_rn": 1})
        for d in (0, 1)
    ),
    (True, {"PRO": PRO_NONE, "EPI": EPI_NONE, "DROPOUT": 0}, _UNIT["dw1"]),
    *((True, {"PRO": PRO_RELU2_T, "EPI": EPI_NONE, "DROPOUT": d}, _UNIT["dw2t"]) for d in (0, 1)),
]
for _name, _t in _DT.items():
    for _wg, _mode, _spec in _MODES:
        _out = "*fp32" if _wg else _t  # weight gradients write fp32 K slices
        _sig = [{"a_ptr": _t, "b_ptr": _t, "c_ptr": _out, "r_ptr": _t, **_MM_SCALARS}]
        _cx = {**_mode, "IEEE": int(_name == "fp32")}
        _tag = f"[P{_mode['PRO']}E{_mode['EPI']}D{_mode['DROPOUT']}]"
        # aligned launches: the dropout family when dropping; unaligned launches: one family for all modes
        _fam = GEMMS[(_wg, _name == "fp32", "dropout" if _mode["DROPOUT"] else "")]
        _aot.register(
            _fam, signatures=_sig, constexprs=_cx, name=_fam.name + _tag, specializations=[_spec], generic=False
        )
        _un = GEMMS[(_wg, _name == "fp32", "unaligned")]
        _aot.register(
            _un, signatures=_sig, constexprs=_cx, name=_un.name + _tag, specializations=[_spec], generic=False,
            alignments=(False,),
        )  # fmt: skip
