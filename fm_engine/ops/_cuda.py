"""Glue between torch tensors and the raw-pointer CUDA extension fm_engine._C."""

from __future__ import annotations

import torch

# Must match enum DType in csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def ext():
    from fm_engine import _C

    if _C is None:
        from fm_engine import _C_status

        raise RuntimeError(_C_status())
    return _C


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
