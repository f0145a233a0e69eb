"""Pooled grouped-query cross-attention benchmarks (docs/KERNELS.md K4), at the AViT shape.

q [B, Hq, Nq, D], k / v [B, Hkv, Nk, D]; AViT: Nq 768, Nk 27,648, Hq 8, Hkv 4, D 64, bf16, B 1 / 4 / 8.
  FLOP  fwd = 4·B·Hq·Nq·Nk·D            (QKᵀ and PV)
        bwd = 10·B·Hq·Nq·Nk·D           (QKᵀ recomputed, dV, dP, dQ, dK: 2.5x the forward)
  bytes fwd = s·(2·B·Hq·Nq·D + 2·B·Hkv·Nk·D)   (read q, k, v; write o)
        bwd = s·(4·B·Hq·Nq·D + 4·B·Hkv·Nk·D)   (read q, o, dO, k, v; write dq, dk, dv)
s = bytes per element; the log-sum-exp and split partials are not counted.
Peers: SDPA's cuDNN and flash backends with ``enable_gqa=True`` (no repeated KV heads); SDPA's memory-efficient
backend refuses GQA inputs ("No available kernel"), so that peer repeats K and V to the query heads inside the
timed call (what a caller has to do; its backward sums the repeats); FlexAttention (compiled,
``enable_gqa=True``), xFormers and NATTEN when importable.

Masked case (``padded``): ragged key sequences, batch element i of B has its last ``i / (B - 1) · padded``
of the keys marked as padding by a key-padding mask (the M-JEPA predictor's kind of input). FLOP count the
attended keys only, Σ_b valid_b in place of B·Nk (the work the attention needs; kernels that skip padding
tiles do about that much); bytes count the whole tensors (every backend reads and writes them). Peers there:
the SDPA backends that take a boolean ``attn_mask`` (efficient with repeated K / V); flash, FlexAttention,
xFormers and NATTEN are not run.

Dropout case (``dropout``): attention dropout 0.1, MiT-UB's default, on the fast kernels (keep mask regenerated
from a seed, never stored) and on SDPA's backends that draw their own; FlexAttention has no dropout.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fm_engine import ops
from fm_engine.ops.cross_attention import cross_attention_reference

from .harness import Case, standard_labels


def _sdpa(
    backend_name: str, key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0
) -> Callable[..., Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    attend = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    expand = backend_name == "EFFICIENT_ATTENTION"  # no GQA support: repeat K / V to the query heads

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if expand:
            g = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=dropout_p, enable_gqa=not expand)

    return run


def _ragged_mask(b: int, nk: int, padded: float, device: torch.device) -> torch.Tensor:
    """[B, Nk] bool, True = padding: batch element i pads its last round(i / (B - 1) · padded · Nk) keys."""
    lengths = torch.tensor([nk - round(i / max(b - 1, 1) * padded * nk) for i in range(b)], device=device)
    return torch.arange(nk, device=device)[None] >= lengths[:, None]


def _flex() -> tuple[Callable[..., Any] | None, str]:
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as e:
        return None, f"FlexAttention not importable ({e.__class__.__name__})"
    compiled = torch.compile(flex_attention)
    return (lambda q, k, v: compiled(q, k, v, enable_gqa=True)), ""


def _xformers() -> tuple[Callable[..., Any] | None, str]:
    try:
        xops = importlib.import_module("xformers.ops")
    except Exception as e:
        return None, f"xformers not importable ({e.__class__.__name__})"

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # xFormers' grouped layout [B, N, G(kv heads), H/G, D]: KV heads broadcast without a copy
        b, hq, nq, d = q.shape
        hkv, nk = k.shape[1], k.shape[2]
        g = hq // hkv
        q5 = q.transpose(1, 2).reshape(b, nq, hkv, g, d)
        k5 = k.transpose(1, 2)[:, :, :, None].expand(b, nk, hkv, g, d)
        v5 = v.transpose(1, 2)[:, :, :, None].expand(b, nk, hkv, g, d)
        return xops.memory_efficient_attention(q5, k5, v5).reshape(b, nq, hq, d).transpose(1, 2)

    return run, ""


def _natten() -> tuple[Callable[..., Any] | None, str]:
    try:
        natten = importlib.import_module("natten")
    except Exception as e:
        return None, f"natten not importable ({e.__class__.__name__})"
    attention = getattr(natten, "attention", None)
    if attention is None:
        return None, "this NATTEN version has no plain (non-neighborhood) attention entry point"

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # NATTEN takes heads-last [B, N, H, D]; repeat KV heads when it has no GQA support
        g = q.shape[1] // k.shape[1]
        kk, vv = (t.repeat_interleave(g, dim=1).transpose(1, 2) for t in (k, v))
        return attention(q.transpose(1, 2), kk, vv).transpose(1, 2)

    return run, ""


def _case(
    b: int,
    hq: int,
    hkv: int,
    nq: int,
    nk: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
    padded: float = 0.0,
    dropout: float = 0.0,
) -> Case:
    s = torch.finfo(dtype).bits // 8
    mask = _ragged_mask(b, nk, padded, device) if padded > 0 else None

    def setup() -> list[torch.Tensor]:
        q = torch.randn(b, hq, nq, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, nk, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, nk, d, device=device, dtype=dtype, requires_grad=True)
        return [q, k, v]

    fns = standard_labels(
        lambda q, k, v: cross_attention_reference(q, k, v, kv_heads=hkv, key_padding_mask=mask, dropout_p=dropout),
        quick,
    )
    notes: dict[str, str] = {}
    why = ops.get_op("cross_attention").backends["triton"].available()
    if why is None:
        fns["triton"] = lambda q, k, v: ops.cross_attention(
            q, k, v, kv_heads=hkv, key_padding_mask=mask, dropout_p=dropout, backend="triton"
        )
    else:
        notes["triton"] = why
    sdpa = [("sdpa-cudnn", "CUDNN_ATTENTION"), ("sdpa-efficient", "EFFICIENT_ATTENTION")]
    if mask is None:
        sdpa.insert(1, ("sdpa-flash", "FLASH_ATTENTION"))
    else:
        notes["sdpa-flash"] = "the flash SDPA backend takes no attention mask"
    if device.type == "cuda":
        for label, name in sdpa:
            fns[label] = _sdpa(name, mask, dropout)
    else:
        notes["sdpa-*"] = "the cuDNN / flash / efficient SDPA backends are CUDA kernels"
    peers: dict[str, tuple[Callable[..., Any] | None, str]] = {}
    if mask is not None or dropout > 0:
        for label in ("xformers", "natten", "flex"):
            notes[label] = "not run on the masked case" if mask is not None else "not run with attention dropout"
    else:
        peers = {"xformers": _xformers(), "natten": _natten()}
        if quick:
            notes["flex"] = "quick run: compiling FlexAttention takes longer than the smoke test"
        else:
            peers["flex"] = _flex()
    for label, (fn, why) in peers.items():
        if fn is not None and device.type == "cuda":
            fns[label] = fn
        else:
            notes[label] = why or "CUDA only"
    keys = float(b * nk) if mask is None else float((~mask).sum())  # attended keys over the batch
    attn = keys * hq * nq * d
    return Case(
        op="cross_attention",
        name=f"B{b} Nq{nq} Nk{nk} H{hq}/{hkv} D{d} {str(dtype).replace('torch.', '')}"
        + (f" padded<={padded:.0%}" if mask is not None else "")
        + (f" dropout{dropout:g}" if dropout > 0 else ""),
        setup=setup,
        fns=fns,
        flops={"fwd": 4.0 * attn, "bwd": 10.0 * attn},
        bytes={
            "fwd": s * (2.0 * b * hq * nq * d + 2.0 * b * hkv * nk * d),
            "bwd": s * (4.0 * b * hq * nq * d + 4.0 * b * hkv * nk * d),
        },
        flop_formula=(
            "fwd 4·B·Hq·Nq·Nk·D, bwd 10·B·Hq·Nq·Nk·D"
            if mask is None
            else "fwd 4·Hq·Nq·D·Σ_b valid_b, bwd 10·Hq·Nq·D·Σ_b valid_b (attended keys only)"
        ),
        byte_formula="fwd s(2·B·Hq·Nq·D + 2·B·Hkv·Nk·D), bwd s(4·B·Hq·Nq·D + 4·B·Hkv·Nk·D)",
        notes=notes,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_case(1, 2, 1, 32, 80, 16, torch.float32, device, True)]
    bf16 = torch.bfloat16
    return [_case(b, 8, 4, 768, 27648, 64, bf16, device, False) for b in (1, 4, 8)] + [
        _case(1, 8, 4, 768, 27648, 64, torch.float32, device, False),
        _case(4, 8, 4, 768, 27648, 64, bf16, device, False, padded=0.5),
        _case(1, 8, 4, 768, 27648, 64, bf16, device, False, dropout=0.1),
    ]
