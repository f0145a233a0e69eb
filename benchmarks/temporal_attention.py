"""ST-CNNT temporal attention benchmarks (docs/KERNELS.md K2) on [B, T, C, H, W].

Shapes: the production MRI shape (B 16, T 12, C 32, 64x64, 32 heads, stride_t 2: Q/K at 32x32, so
D_qk = 1024 and D_v = 4096 per head), cosine scores, causal and not, bf16 and fp32; T 64 (B 4) in bf16.
Per (b, head) the attention is T x T over P frame pairs, P = T² (causal: the T(T+1)/2 pairs j <= i, the work
the attention needs):
  FLOP  fwd = 2·B·P·C·(Hq·Wq + H·W)             (QKᵀ and AV)
        bwd = 2·B·P·C·(3·Hq·Wq + 2·H·W)         (S recomputed, dA, dV, dQ, dK)
  bytes fwd = s·B·T·C·(2·Hq·Wq + 2·H·W)          (read q, k, v; write o)
        bwd = s·B·T·C·(4·Hq·Wq + 3·H·W)          (read q, k, v, dO; write dq, dk, dv)
s = bytes per element. Peers: SDPA (default backend choice) on [B, heads, T, D] views of the same tensors
(no copy) for the plain-score cases; its flash kernels stop at head dim 256 and need D_qk == D_v, so
PyTorch picks the math or efficient kernel. FlexAttention is not run: its kernels take head dims of a few
hundred at most.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fm_engine.ops import get_op
from fm_engine.ops.temporal_attention import temporal_attention, temporal_attention_reference

from .harness import Case, standard_labels


def _case(
    B: int,
    T: int,
    C: int,
    H: int,
    W: int,
    stride: int,
    n_head: int,
    cosine: bool,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
) -> Case:
    s = torch.finfo(dtype).bits // 8
    Hq, Wq = H // stride, W // stride

    def setup() -> list[torch.Tensor]:
        q = torch.randn(B, T, C, Hq, Wq, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, C, Hq, Wq, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, C, H, W, device=device, dtype=dtype, requires_grad=True)
        return [q, k, v]

    kw: dict[str, Any] = {"n_head": n_head, "cosine": cosine, "causal": causal}
    fns = standard_labels(lambda q, k, v: temporal_attention_reference(q, k, v, **kw), quick)
    notes: dict[str, str] = {}
    why = get_op("temporal_attention").backends["triton"].available()
    if why is None:
        fns["triton"] = lambda q, k, v: temporal_attention(q, k, v, backend="triton", **kw)
    else:
        notes["triton"] = why
    if cosine:
        notes["sdpa"] = "cosine scores need normalised copies of q and k first (not a like-for-like peer)"
    else:

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            def heads(x: torch.Tensor) -> torch.Tensor:
                return x.reshape(B, T, n_head, -1).transpose(1, 2)

            o = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=causal)
            return o.transpose(1, 2).reshape(v.shape)

        fns["sdpa"] = sdpa
    if quick:
        notes["flex"] = "quick run: compiling FlexAttention takes longer than the smoke test"
    else:
        notes["flex"] = (
            f"FlexAttention's kernels take head dims of a few hundred at most; D_qk is {C * Hq * Wq // n_head}"
        )
    qk, vv = float(Hq * Wq), float(H * W)
    pairs = T * (T + 1) / 2 if causal else float(T * T)
    return Case(
        op="temporal_attention",
        name=(
            f"B{B} T{T} C{C} {H}x{W} stride{stride} heads{n_head} D{C * Hq * Wq // n_head}/{C * H * W // n_head}"
            f"{' cos' if cosine else ''}{' causal' if causal else ''} {str(dtype).replace('torch.', '')}"
        ),
        setup=setup,
        fns=fns,
        flops={"fwd": 2.0 * B * pairs * C * (qk + vv), "bwd": 2.0 * B * pairs * C * (3 * qk + 2 * vv)},
        bytes={"fwd": s * B * T * C * (2 * qk + 2 * vv), "bwd": s * B * T * C * (4 * qk + 3 * vv)},
        flop_formula=(
            f"fwd 2·B·P·C·(Hq·Wq + H·W), bwd 2·B·P·C·(3·Hq·Wq + 2·H·W), P = {'T(T+1)/2' if causal else 'T²'}"
        ),
        byte_formula="fwd s·B·T·C·(2·Hq·Wq + 2·H·W), bwd s·B·T·C·(4·Hq·Wq + 3·H·W)",
        notes=notes,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_case(1, 3, 4, 8, 8, 2, 2, False, True, torch.float32, device, True)]
    bf16, fp32 = torch.bfloat16, torch.float32
    out = []
    for causal in (False, True):
        for cosine in (True, False):
            out.append(_case(16, 12, 32, 64, 64, 2, 32, cosine, causal, bf16, device, False))
    out.append(_case(16, 12, 32, 64, 64, 2, 32, True, False, fp32, device, False))
    out.append(_case(4, 64, 32, 64, 64, 2, 32, False, True, bf16, device, False))
    return out
