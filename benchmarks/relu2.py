"""ReLU² benchmarks (KERNELS.md K3): the element-wise relu2 and the fused relu2_mlp.

relu2_mlp, tokens M, widths D -> H -> D:
  FLOP  fwd = 4·M·D·H (two GEMMs), bwd = 8·M·D·H (four GEMMs: dX, dW1, dW2 and the dH product)
  bytes fwd = s·(2·M·D + 2·D·H + 2·M·H)   (read x, W1, W2; write r once and read it once; write y)
  bytes bwd = s·(4·M·D + 4·D·H + 5·M·H)   (read dy twice, read x, write dx; read W1, W2, write dW1, dW2;
                                          read r twice, write da once and read it twice)
relu2 on [R, n]: bytes fwd = 2·s·R·n, bwd = 3·s·R·n (read x, dy; write dx); no FLOP figure (memory-bound).
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


def _mlp_case(m: int, d: int, h: int, dtype: torch.dtype, device: torch.device, quick: bool) -> Case:
    s = torch.finfo(dtype).bits // 8

    def setup() -> list[torch.Tensor]:
        x = torch.randn(m, d, device=device, dtype=dtype, requires_grad=True)
        w1 = (torch.randn(h, d, device=device) / d**0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(d, h, device=device) / h**0.5).to(dtype).requires_grad_()
        return [x, w1, w2]

    fns = standard_labels(relu2_mlp_reference, quick, max_autotune=True)  # K3 names max-autotune
    notes = {}
    if device.type == "cuda" or ops.get_op("relu2_mlp").backends["triton"].available() is None:
        fns["triton"] = lambda x, w1, w2: ops.relu2_mlp(x, w1, w2, backend="triton")
    else:
        notes["triton"] = ops.get_op("relu2_mlp").backends["triton"].available() or ""
    return Case(
        op="relu2_mlp",
        name=f"M{m} {d}->{h}->{d} {str(dtype).replace('torch.', '')}",
        setup=setup,
        fns=fns,
        flops={"fwd": 4.0 * m * d * h, "bwd": 8.0 * m * d * h},
        bytes={"fwd": s * (2.0 * m * d + 2 * d * h + 2 * m * h), "bwd": s * (4.0 * m * d + 4 * d * h + 5 * m * h)},
        flop_formula="fwd 4·M·D·H, bwd 8·M·D·H",
        byte_formula="fwd s(2MD + 2DH + 2MH), bwd s(4MD + 4DH + 5MH)",
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
