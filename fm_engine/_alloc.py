"""Output allocation for fast backends.

Kernels allocate their outputs through :func:`empty` so that tests can *poison* every fresh
output (NaN for floats, the maximum value for integers): an element a kernel forgets to write then
fails the parity check instead of passing by luck. Poisoning is on when ``FM_ENGINE_POISON=1``
(tests/conftest.py sets it) and costs one fill per output, so it stays off otherwise.
"""

from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    return os.environ.get("FM_ENGINE_POISON", "0") == "1"


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype != torch.bool:
        t.fill_(torch.iinfo(t.dtype).max)
    return t


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    return _poison(t) if poisoning() else t


def empty_like(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = torch.empty_like(x, dtype=dtype or x.dtype, memory_format=torch.contiguous_format)
    return _poison(t) if poisoning() else t
