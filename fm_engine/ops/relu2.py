"""ReLU² (``relu(x)**2``) and the ReLU² MLP of MiT-UB (KERNELS.md K3).

``relu2(x)``: element-wise; backward ``2 * relu(x) * dy``.
``relu2_mlp(x, w1, w2, dropout_p)`` = ``dropout(relu(x @ w1.T) ** 2) @ w2.T``, no biases.

Backends: reference (eager), triton (kernels/relu2.py), cuda (csrc/relu2.cu, element-wise only).
The Triton MLP puts relu in the epilogue of the first product and the square (and dropout) in the
prologue of the second, so the only hidden-sized tensor it writes, and keeps for backward, is
``relu(x @ w1.T)``; eager keeps two (relu output and its square, plus the dropout mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, public

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- reference ---------------------------------------------------------------------------------

def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) ** 2


def relu2_mlp_reference(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    h = torch.relu(F.linear(x, w1)) ** 2
    if dropout_p > 0.0:
        h = F.dropout(h, dropout_p, training=True)
    return F.linear(h, w2)


# --- validation (once, for every backend) -------------------------------------------------------

def _validate_relu2(x: torch.Tensor) -> None:
    _checks.tensor("x", x)
    _checks.floating("x", x)


def _validate_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float = 0.0) -> None:
    for n, t in (("x", x), ("w1", w1), ("w2", w2)):
        _checks.tensor(n, t)
        _checks.floating(n, t)
    _checks.ndim("w1", w1, 2, "[hidden, dim]")
    _checks.ndim("w2", w2, 2, "[dim_out, hidden]")
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., dim], got a 0-D tensor")
    if x.shape[-1] != w1.shape[1]:
        raise ValueError(f"w1: shape {tuple(w1.shape)} does not match x's last dim {x.shape[-1]} (expected [hidden, {x.shape[-1]}])")
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(f"w2: shape {tuple(w2.shape)} does not match hidden size {w1.shape[0]} of w1 (expected [dim_out, {w1.shape[0]}])")
    _checks.same_device(x=x, w1=w1, w2=w2)
    _checks.same_dtype(x=x, w1=w1, w2=w2)
    _checks.probability("dropout_p", dropout_p)


RELU2 = Op("relu2", relu2_reference, _validate_relu2, preference=("cuda", "triton"))
RELU2_MLP = Op("relu2_mlp", relu2_mlp_reference, _validate_mlp, preference=("triton",))


def relu2(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``relu(x) ** 2`` element-wise. x: any shape, fp32/fp16/bf16 (fp64: reference only)."""
    return RELU2(x, backend=backend)


def relu2_mlp(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float = 0.0, *, backend: str | None = None
) -> torch.Tensor:
    """``dropout(relu(x @ w1.T) ** 2) @ w2.T``.

    x: [..., dim]; w1: [hidden, dim] (fc1.weight); w2: [dim_out, hidden] (fc2.weight) -> [..., dim_out].
    ``dropout_p`` is applied as given (pass 0.0 in eval); the Triton backend draws its mask with
    Triton's Philox generator seeded from torch's generator, so masks differ from the reference's.
    """
    return RELU2_MLP(x, w1, w2, dropout_p, backend=backend)


public(RELU2, relu2)
public(RELU2_MLP, relu2_mlp)
