"""Argument checks shared by every op's validator: each raises ValueError naming the argument."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def floating(name: str, x: torch.Tensor, dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES) -> None:
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(
            f"{name}: dtype {str(x.dtype).replace('torch.', '')} is not supported; expected one of {allowed}"
        )


def ndim(name: str, x: torch.Tensor, n: int | tuple[int, ...], layout: str) -> None:
    ok = (n,) if isinstance(n, int) else n
    if x.dim() not in ok:
        raise ValueError(f"{name}: expected a {'/'.join(map(str, ok))}-D tensor {layout}, got shape {tuple(x.shape)}")


def same_device(**tensors: torch.Tensor) -> None:
    devs = {k: v.device for k, v in tensors.items()}
    if len(set(devs.values())) > 1:
        raise ValueError("tensors must be on one device, got " + ", ".join(f"{k} on {d}" for k, d in devs.items()))


def same_dtype(**tensors: torch.Tensor) -> None:
    dts = {k: v.dtype for k, v in tensors.items()}
    if len(set(dts.values())) > 1:
        raise ValueError("tensors must share one dtype, got " + ", ".join(f"{k} {d}" for k, d in dts.items()))


def probability(name: str, p: float) -> None:
    if not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p}")


def dropout_capture(dropout_p: float, x: torch.Tensor) -> str | None:
    """A fast backend's refusal of dropout while a CUDA graph is being captured on ``x``'s device, else None.

    The fast kernels draw their dropout seed on the host at each call, so a captured graph would replay one
    frozen mask; the reference draws on the device and runs instead (under ``auto``)."""
    if dropout_p > 0.0 and x.is_cuda and torch.cuda.is_current_stream_capturing():
        return "dropout during CUDA graph capture (the seed is drawn on the host and would be frozen in the graph)"
    return None
