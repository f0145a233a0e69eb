"""ST-CNNT local / global attention benchmarks (docs/KERNELS.md K1) on [B, T, C, H, W].

Shapes: the production MRI shape (B 16, T 12, C 32, 64x64, window 8, patch 2, 32 heads: hc 4, cosine, no
bias), local and global, bf16 and fp32; the parser-default shape (window 64, patch 16, 32 heads: hc 256,
relative-position bias on) at 128x128, local and global, bf16; and the parser-default local shape without the
bias, which FlexAttention can express (a like-for-like peer for the hc 256 kernels).
N = tokens per attention group (local: patches per window; global: windows), Hq x Wq = the Q/K frame:
  FLOP  fwd = 2·B·T·N·C·(Hq·Wq + H·W)            (S = QKᵀ and AV over every group and head)
        bwd = 2·B·T·N·C·(3·Hq·Wq + 2·H·W)        (S recomputed, dA, dV, dQ, dK)
  bytes fwd = s·B·T·C·(2·Hq·Wq + 2·H·W)           (read q, k, v; write o)
        bwd = s·B·T·C·(4·Hq·Wq + 3·H·W)           (read q, k, v, dO; write dq, dk, dv)
s = bytes per element; the [n_head, N, N] bias and its gradient are not counted (< 0.1 %).
Peers, where the configuration is expressible: FlexAttention with a block mask over the permuted tokens
(the permutation is timed: it is what a caller of FlexAttention has to do), NATTEN ``na2d`` with
kernel = stride = the window (local) or kernel = window count, dilation = patches per window (global).
Neither can add a bias after the softmax, so the cases with the
relative-position bias list them under notes with that reason.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fm_engine.ops import get_op
from fm_engine.ops.window_attention import (
    Geometry,
    default_scale,
    from_tokens,
    geometry,
    to_tokens,
    window_attention,
    window_attention_reference,
)

from .harness import Case, standard_labels


def _heads(x: torch.Tensor, g: Geometry, ph: int, pw: int, n_head: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B*T, n_head, groups*N, hc], tokens of one group adjacent."""
    t = to_tokens(x, g, ph, pw)
    B, T, G, N, _ = t.shape
    return t.reshape(B * T, G * N, n_head, -1).transpose(1, 2)


def _unheads(o: torch.Tensor, g: Geometry, B: int, T: int, C: int) -> torch.Tensor:
    _, nh, _, hc = o.shape
    o = o.transpose(1, 2).reshape(B, T, g.n_groups, g.n_tokens, nh * hc)
    return from_tokens(o, g, C, g.ph, g.pw)


def _flex(g: Geometry, n_head: int, cosine: bool, scale: float) -> tuple[Callable[..., Any] | None, str]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception as e:
        return None, f"FlexAttention not importable ({e.__class__.__name__})"
    if g.hc_qk < 16 or g.hc_v < 16 or g.hc_qk != g.hc_v:
        return None, (
            f"FlexAttention needs equal head dims >= 16; this configuration has hc_qk {g.hc_qk}, hc_v {g.hc_v}"
        )
    compiled = torch.compile(flex_attention)
    holder: dict[str, Any] = {}
    n = g.n_tokens

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, C = v.shape[:3]
        qh, kh, vh = (
            _heads(q, g, g.phq, g.pwq, n_head),
            _heads(k, g, g.phq, g.pwq, n_head),
            _heads(v, g, g.ph, g.pw, n_head),
        )
        if cosine:
            qh, kh = F.normalize(qh, dim=-1), F.normalize(kh, dim=-1)
        if "mask" not in holder:
            L = qh.shape[2]
            holder["mask"] = create_block_mask(
                lambda b, h, i, j: i // n == j // n, None, None, L, L, device=str(q.device)
            )
        o = compiled(qh, kh, vh, block_mask=holder["mask"], scale=scale)
        return _unheads(o, g, B, T, C)

    return run, ""


def _natten(g: Geometry, n_head: int, cosine: bool, scale: float) -> tuple[Callable[..., Any] | None, str]:
    if g.hc_qk != g.hc_v:
        return None, f"NATTEN needs equal q/k and v head dims (hc_qk {g.hc_qk}, hc_v {g.hc_v})"
    try:
        natten = importlib.import_module("natten")
    except Exception as e:
        return None, f"natten not importable ({e.__class__.__name__})"
    na2d = getattr(natten, "na2d", None)
    if na2d is None:
        return None, "this NATTEN version has no na2d entry point"

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # NATTEN wants the token grid heads-last: [B*T, grid_h, grid_w, heads, hc]
        B, T, C = v.shape[:3]
        gh, gw = g.nWh * g.nPh, g.nWw * g.nPw

        def grid(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
            t = x.reshape(B * T, C, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1)
            return t.reshape(B * T, gh, gw, n_head, -1)

        qg, kg, vg = grid(q, g.phq, g.pwq), grid(k, g.phq, g.pwq), grid(v, g.ph, g.pw)
        if cosine:
            qg, kg = F.normalize(qg, dim=-1), F.normalize(kg, dim=-1)
        if g.mode == "local":  # non-overlapping windows: kernel = stride = patches per window
            o = na2d(qg, kg, vg, kernel_size=(g.nPh, g.nPw), stride=(g.nPh, g.nPw), scale=scale)
        else:  # the grid: every window at one in-window position = dilation by the patches per window
            o = na2d(qg, kg, vg, kernel_size=(g.nWh, g.nWw), dilation=(g.nPh, g.nPw), scale=scale)
        o = o.reshape(B * T, gh, gw, g.ph, g.pw, C).permute(0, 5, 1, 3, 2, 4)
        return o.reshape(v.shape)

    return run, ""


def _case(
    B: int,
    T: int,
    C: int,
    H: int,
    W: int,
    mode: str,
    count: int,
    patch: int,
    n_head: int,
    stride_qk: int,
    cosine: bool,
    bias: bool,
    dtype: torch.dtype,
    device: torch.device,
    quick: bool,
) -> Case:
    s = torch.finfo(dtype).bits // 8
    Hq, Wq = H // stride_qk, W // stride_qk
    kw: dict[str, Any] = {"num_patches": count} if mode == "local" else {"num_windows": count}
    q0 = torch.empty(1, 1, C, Hq, Wq, device="meta")
    g = geometry(
        q0,
        torch.empty(1, 1, C, H, W, device="meta"),
        mode=mode,
        patch_size=patch,
        n_head=n_head,
        num_patches=kw.get("num_patches"),
        num_windows=kw.get("num_windows"),
    )
    N = g.n_tokens

    def setup() -> list[torch.Tensor]:
        q = torch.randn(B, T, C, Hq, Wq, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, C, Hq, Wq, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(B, T, C, H, W, device=device, dtype=dtype, requires_grad=True)
        xs = [q, k, v]
        if bias:
            xs.append((0.02 * torch.randn(n_head, N, N, device=device, dtype=dtype)).requires_grad_())
        return xs

    common = {"mode": mode, "patch_size": patch, "n_head": n_head, "cosine": cosine, **kw}

    def ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return window_attention_reference(q, k, v, rel_pos_bias=b, **common)

    fns = standard_labels(ref, quick)
    notes: dict[str, str] = {}
    why = get_op("window_attention").backends["triton"].available()
    if why is None:
        fns["triton"] = lambda q, k, v, b=None: window_attention(q, k, v, rel_pos_bias=b, backend="triton", **common)
    else:
        notes["triton"] = why
    scale = default_scale(g.hc_qk, cosine)
    for label, probe in (("flex", _flex), ("natten", _natten)):
        if bias:
            notes[label] = "cannot add the relative-position bias after the softmax (score mods act before it)"
            continue
        if device.type != "cuda":
            notes[label] = "CUDA only"
            continue
        fn, why = probe(g, n_head, cosine, scale)
        if fn is None:
            notes[label] = why
        else:
            fns[label] = fn
    qk, vv = float(Hq * Wq), float(H * W)
    return Case(
        op="window_attention",
        name=(
            f"{mode} B{B} T{T} C{C} {H}x{W} patch{patch} {'nP' if mode == 'local' else 'nW'}{count} "
            f"heads{n_head} hc{g.hc_v} sqk{stride_qk}{' cos' if cosine else ''}{' bias' if bias else ''} "
            f"{str(dtype).replace('torch.', '')}"
        ),
        setup=setup,
        fns=fns,
        flops={"fwd": 2.0 * B * T * N * C * (qk + vv), "bwd": 2.0 * B * T * N * C * (3 * qk + 2 * vv)},
        bytes={"fwd": s * B * T * C * (2 * qk + 2 * vv), "bwd": s * B * T * C * (4 * qk + 3 * vv)},
        flop_formula="fwd 2·B·T·N·C·(Hq·Wq + H·W), bwd 2·B·T·N·C·(3·Hq·Wq + 2·H·W)",
        byte_formula="fwd s·B·T·C·(2·Hq·Wq + 2·H·W), bwd s·B·T·C·(4·Hq·Wq + 3·H·W)",
        notes=notes,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_case(1, 2, 4, 8, 8, "global", 2, 2, 2, 2, True, True, torch.float32, device, True)]
    bf16, fp32 = torch.bfloat16, torch.float32
    out = []
    for mode, count in (("local", 4), ("global", 8)):  # window 8 = 4 patches of 2; 64 / 8 = 8 windows
        out.append(_case(16, 12, 32, 64, 64, mode, count, 2, 32, 1, True, False, bf16, device, False))
        out.append(_case(16, 12, 32, 64, 64, mode, count, 2, 32, 1, True, False, fp32, device, False))
    for mode, count in (("local", 4), ("global", 2)):  # window 64 = 4 patches of 16; 128 / 64 = 2 windows
        out.append(_case(16, 12, 32, 128, 128, mode, count, 16, 32, 1, False, True, bf16, device, False))
    out.append(_case(16, 12, 32, 128, 128, "local", 4, 16, 32, 1, False, False, bf16, device, False))
    return out
