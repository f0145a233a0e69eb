"""ReLU² benchmarks (docs/KERNELS.md K3): the element-wise relu2 and the ReLU² MLP.

relu2_mlp, tokens M, widths D -> H -> D; labels: reference (eager), compile, compile-max (torch.compile
max-autotune, which K3's target names), triton (fused GEMMs), hybrid (cuBLAS GEMMs + Triton element-wise
passes). The formulas are the op's floor, what any implementation must do, so the harness's fractions
say how far a run is from its roofline:
  FLOP  fwd = 4·M·D·H (two GEMMs), bwd = 8·M·D·H (four GEMMs: dH = dY W2, dW2, dW1, dX)
  bytes fwd = s·(2·M·D + 2·D·H + M·H)     (read x, W1, W2, write y; write the one kept hidden tensor)
  bytes bwd = s·(3·M·D + 4·D·H + M·H)     (read dy, x, W1, W2 and the kept hidden tensor; write dx, dW1, dW2)
At both K3 shapes the FLOP are the binding ceiling (M 49152, 512->2048: 206 GFLOP and 0.5 GB forward, i.e.
0.26 ms at 800 TFLOP/s against 0.12 ms at 4.2 TB/s), so "% matmul peak" is the roofline fraction; the
designs' own traffic is modelled in kernels/relu2.py (fused moves 7·s·M·H of hidden traffic, hybrid 12,
eager about 16).
relu2 on [R, n]: bytes fwd = 2·s·R·n, bwd = 3·s·R·n (read x, dy; write dx); no FLOP figure (memory-bound):
"% copy BW" is the roofline fraction (target >= 90% fwd+bwd).
s = bytes per element. Peers: eager, torch.compile (default, max-autotune), Liger's ReLU² when importable.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

from fm_engine import ops
from fm_engine.ops.relu2 import relu2_mlp_reference, relu2_reference

from .harness import Case, standard_labels


def _liger_relu2() -> tuple[Callable[..., Any] | None, str]:
    """Liger's ReLU² if the package is importable (its location has moved between releases)."""
    try:
        importlib.import_module("liger_kernel")
    except Exception as e:
        return None, f"liger_kernel not importable ({e.__class__.__name__})"
    for mod, attr in (
        ("liger_kernel.transformers.functional", "liger_relu_squared"),
        ("liger_kernel.ops.relu_squared", "LigerReLUSquaredFunction"),
    ):
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except Exception:
            continue
        return (obj.apply if hasattr(obj, "apply") else obj), ""
    return None, "liger_kernel importable but has no ReLU² op in this version"


def _mlp_on(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, *, backend: str) -> torch.Tensor:
    return ops.relu2_mlp(x, w1, w2, backend=backend)


def _mlp_case(m: int, d: int, h: int, dtype: torch.dtype, device: torch.device, quick: bool) -> Case:
    s = torch.finfo(dtype).bits // 8

    def setup() -> list[torch.Tensor]:
        x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
        w1 = (torch.randn(h, d, device=device) / d**0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(d, h, device=device) / h**0.5).to(dtype).requires_grad_()
        return [x, w1, w2]

    fns = standard_labels(relu2_mlp_reference, quick, max_autotune=True)  # K3 names max-autotune
    notes = {}
    for b in ("triton", "hybrid"):
        why = ops.get_op("relu2_mlp").backends[b].available()
        if why is None:
            fns[b] = functools.partial(_mlp_on, backend=b)
        else:
            notes[b] = why
    return Case(
        op="relu2_mlp",
        name=f"M{m} {d}->{h}->{d} {str(dtype).replace('torch.', '')}",
        setup=setup,
        fns=fns,
        flops={"fwd": 4.0 * m * d * h, "bwd": 8.0 * m * d * h},
        bytes={"fwd": s * (2.0 * m * d + 2 * d * h + m * h), "bwd": s * (3.0 * m * d + 4 * d * h + m * h)},
        flop_formula="fwd 4·M·D·H, bwd 8·M·D·H",
        byte_formula="floor: fwd s(2MD + 2DH + MH), bwd s(3MD + 4DH + MH)",
        notes=notes,
    )


def _relu2_case(rows: int, n: int, dtype: torch.dtype, device: torch.device, quick: bool) -> Case:
    s = torch.finfo(dtype).bits // 8
    fns = standard_labels(relu2_reference, quick, max_autotune=True)
    notes = {}
    for b in ("triton", "cuda"):
        why = ops.get_op("relu2").backends[b].available()
        if why is None:
            fns[b] = functools.partial(ops.relu2, backend=b)
        else:
            notes[b] = why
    liger, why = _liger_relu2()
    if liger is not None:
        # Liger's function returns (y, x) and treats the last dim as a row: a [rows, n] input
        fns["liger"] = lambda x: (lambda out: out[0] if isinstance(out, tuple) else out)(liger(x))
    else:
        notes["liger"] = why
    return Case(
        op="relu2",
        name=f"{rows}x{n} {str(dtype).replace('torch.', '')}",
        setup=lambda: [torch.randn(rows, n, device=device, dtype=dtype, requires_grad=True)],
        fns=fns,
        bytes={"fwd": 2.0 * s * rows * n, "bwd": 3.0 * s * rows * n},
        byte_formula="fwd 2·s·R·n, bwd 3·s·R·n",
        notes=notes,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_mlp_case(64, 32, 64, torch.float32, device, True), _relu2_case(16, 256, torch.float32, device, True)]
    bf16 = torch.bfloat16
    return [
        _mlp_case(64 * 768, 512, 2048, bf16, device, False),
        _mlp_case(4 * 768, 768, 3072, bf16, device, False),
        _mlp_case(4 * 768, 512, 2048, torch.float32, device, False),
        _relu2_case(64 * 768, 2048, bf16, device, False),
        _relu2_case(64 * 768, 2048, torch.float32, device, False),
    ]
