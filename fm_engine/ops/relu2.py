"""ReLU² (``relu(x)**2``) and the ReLU² MLP of MiT-UB (docs/KERNELS.md K3).

``relu2(x)``: element-wise; backward ``2 * relu(x) * dy``.
``relu2_mlp(x, w1, w2, dropout_p)`` = ``dropout(relu(x @ w1.T) ** 2) @ w2.T``, no biases.

Backends: reference (eager), triton (kernels/relu2.py), cuda (csrc/relu2.cu, element-wise only), and for
the MLP hybrid (vendor GEMMs with fm_engine's Triton element-wise kernels).
The Triton MLP puts relu in the epilogue of the first product and the square (and dropout) in the
prologue of the second, so the only hidden-sized tensor it writes, and keeps for backward, is
``relu(x @ w1.T)``; eager keeps two (relu output and its square, plus the dropout mask). The hybrid MLP
runs the four products in cuBLAS (``torch.mm``) and everything element-wise (relu, square, dropout, their
derivative, the squared hidden for dW2) in one Triton pass per direction, keeping ``x @ w1.T`` as its one
hidden-sized tensor. kernels/relu2.py has the byte and FLOP model of both designs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, OpCall, autocast_inputs, public

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --- reference ---------------------------------------------------------------------------------


def relu2_reference(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x) ** 2


def relu2_mlp_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    h = torch.relu(F.linear(x, w1)) ** 2
    if dropout_p > 0.0:
        h = F.dropout(h, dropout_p, training=True)
    return F.linear(h, w2)


# --- validation (once, for every backend) -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Relu2Call(OpCall):
    """A validated :func:`relu2` call."""

    x: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Relu2MlpCall(OpCall):
    """A validated :func:`relu2_mlp` call."""

    x: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    dropout_p: float


def _validate_relu2(x: torch.Tensor) -> Relu2Call:
    _checks.tensor("x", x)
    _checks.floating("x", x)
    return Relu2Call(x)


def _validate_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float = 0.0) -> Relu2MlpCall:
    for n, t in (("x", x), ("w1", w1), ("w2", w2)):
        _checks.tensor(n, t)
        _checks.floating(n, t)
    _checks.ndim("w1", w1, 2, "[hidden, dim]")
    _checks.ndim("w2", w2, 2, "[dim_out, hidden]")
    if x.dim() < 1:
        raise ValueError("x: expected shape [..., dim], got a 0-D tensor")
    if x.shape[-1] != w1.shape[1]:
        raise ValueError(
            f"w1: shape {tuple(w1.shape)} does not match x's last dim {x.shape[-1]} (expected [hidden, {x.shape[-1]}])"
        )
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"w2: shape {tuple(w2.shape)} does not match hidden size {w1.shape[0]} of w1 "
            f"(expected [dim_out, {w1.shape[0]}])"
        )
    _checks.same_device(x=x, w1=w1, w2=w2)
    _checks.same_dtype(x=x, w1=w1, w2=w2)
    _checks.probability("dropout_p", dropout_p)
    return Relu2MlpCall(x, w1, w2, dropout_p)


def _bucket_relu2(call: Relu2Call) -> tuple[dict, dict]:
    return {"dtype": call.x.dtype}, {"n": call.x.numel()}


def _bucket_mlp(call: Relu2MlpCall) -> tuple[dict, dict]:
    x, w1, w2 = call.x, call.w1, call.w2
    m = x.numel() // max(x.shape[-1], 1)
    flags = {"dtype": x.dtype, "dropout": call.dropout_p > 0}
    return flags, {"M": m, "D": w1.shape[1], "H": w1.shape[0], "O": w2.shape[0]}


RELU2 = Op("relu2", relu2_reference, _validate_relu2, bucket=_bucket_relu2)
RELU2_MLP = Op("relu2_mlp", relu2_mlp_reference, _validate_mlp, bucket=_bucket_mlp)


def relu2(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """``relu(x) ** 2`` element-wise. x: any shape, fp32/fp16/bf16 (fp64: reference only)."""
    return RELU2(x, backend=backend)


def relu2_mlp(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float = 0.0, *, backend: str | None = None
) -> torch.Tensor:
    """``dropout(relu(x @ w1.T) ** 2) @ w2.T``.

    x: [..., dim]; w1: [hidden, dim] (fc1.weight); w2: [dim_out, hidden] (fc2.weight) -> [..., dim_out].
    ``dropout_p`` is applied as given (pass 0.0 in eval); the triton and hybrid backends draw their mask
    with Triton's Philox generator seeded from torch's generator (the same mask for the same seed), so
    masks differ from the reference's.
    Under autocast, x and the weights are cast to the autocast dtype first, as ``F.linear`` would be.
    """
    x, w1, w2 = autocast_inputs(x, w1, w2)
    return RELU2_MLP(x, w1, w2, dropout_p, backend=backend)


public(RELU2, relu2)
public(RELU2_MLP, relu2_mlp)


# --- fast backends: torch custom ops over kernels/relu2.py and csrc/relu2.cu -------------------------

from fm_engine.ops import _cuda  # noqa: E402
from fm_engine.ops._dispatch import cuda_ext_available, triton_available, triton_device_ok  # noqa: E402


def _elementwise_supports(x: torch.Tensor) -> str | None:
    if x.dtype not in _FAST_DTYPES:
        return f"x: dtype {x.dtype} (fast backends take float32, float16, bfloat16)"
    if not x.is_contiguous():
        return "x: non-contiguous input (the fast kernels read a flat contiguous buffer)"
    return None


@torch.library.custom_op("fm_engine::relu2_triton", mutates_args=())
def _relu2_triton(x: torch.Tensor) -> torch.Tensor:
    from fm_engine.kernels import relu2 as K

    return K.relu2_forward(x)


@torch.library.custom_op("fm_engine::relu2_bwd_triton", mutates_args=())
def _relu2_bwd_triton(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    from fm_engine.kernels import relu2 as K

    return K.relu2_backward(x, dy.contiguous())


@torch.library.custom_op("fm_engine::relu2_cuda", mutates_args=())
def _relu2_cuda(x: torch.Tensor) -> torch.Tensor:
    from fm_engine import _alloc

    y = _alloc.empty_like(x)
    with torch.cuda.device(x.device):
        _cuda.ext().relu2_forward(
            _cuda.ptr(x), _cuda.ptr(y), x.numel(), _cuda.DTYPE_CODES[x.dtype], _cuda.stream(x.device)
        )
    return y


@torch.library.custom_op("fm_engine::relu2_bwd_cuda", mutates_args=())
def _relu2_bwd_cuda(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    from fm_engine import _alloc

    dy = dy.contiguous()
    dx = _alloc.empty_like(x)
    with torch.cuda.device(x.device):
        _cuda.ext().relu2_backward(
            _cuda.ptr(x), _cuda.ptr(dy), _cuda.ptr(dx), x.numel(), _cuda.DTYPE_CODES[x.dtype], _cuda.stream(x.device)
        )
    return dx


for _op in (_relu2_triton, _relu2_cuda):
    _op.register_fake(lambda x: x.new_empty(x.shape))
for _op in (_relu2_bwd_triton, _relu2_bwd_cuda):
    _op.register_fake(lambda x, dy: x.new_empty(x.shape))


def _save_x(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0])


_relu2_triton.register_autograd(lambda ctx, dy: _relu2_bwd_triton(ctx.saved_tensors[0], dy), setup_context=_save_x)
_relu2_cuda.register_autograd(lambda ctx, dy: _relu2_bwd_cuda(ctx.saved_tensors[0], dy), setup_context=_save_x)


def _relu2_triton_supports(call: Relu2Call) -> str | None:
    return triton_device_ok(call.x) or _elementwise_supports(call.x)


def _relu2_cuda_supports(call: Relu2Call) -> str | None:
    if call.x.device.type != "cuda":
        return f"x: on {call.x.device} (the CUDA kernel needs a CUDA tensor)"
    return _elementwise_supports(call.x)


def _relu2_triton_call(call: Relu2Call) -> torch.Tensor:
    return _relu2_triton(call.x)


def _relu2_cuda_call(call: Relu2Call) -> torch.Tensor:
    return _relu2_cuda(call.x)


# the Triton backends' sources: the kernel module and the kernel modules it imports
_TRITON_SOURCES = ("fm_engine.kernels.relu2", "fm_engine.kernels._aot", "fm_engine.kernels._autotune")

RELU2.register(
    "triton", _relu2_triton_call, available=triton_available, supports=_relu2_triton_supports, sources=_TRITON_SOURCES
)
RELU2.register(
    "cuda",
    _relu2_cuda_call,
    available=cuda_ext_available,
    supports=_relu2_cuda_supports,
    sources=(_cuda.source("relu2"),),
)


# The MLP: the forward draws a dropout seed from torch's CPU generator (so torch.manual_seed makes it
# reproducible) and returns it as a tensor, which backward reads to regenerate the same mask.
_SEED_MAX = 2**31 - 1


@torch.library.custom_op("fm_engine::relu2_mlp_fwd_triton", mutates_args=())
def _mlp_fwd_triton(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import relu2 as K

    seed = int(torch.randint(0, _SEED_MAX, (1,)).item()) if dropout_p > 0 else 0
    y, r = K.mlp_forward(x, w1, w2, dropout_p, seed)
    return y, r, torch.tensor([seed], dtype=torch.int64)


@_mlp_fwd_triton.register_fake
def _mlp_fwd_fake(x, w1, w2, dropout_p):
    return x.new_empty(x.shape[0], w2.shape[0]), x.new_empty(x.shape[0], w1.shape[0]), torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("fm_engine::relu2_mlp_bwd_triton", mutates_args=())
def _mlp_bwd_triton(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    r: torch.Tensor,
    seed: torch.Tensor,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import relu2 as K

    return K.mlp_backward(dy, x, w1, w2, r, dropout_p, int(seed.item()))


@_mlp_bwd_triton.register_fake
def _mlp_bwd_fake(dy, x, w1, w2, r, seed, dropout_p):
    # the kernels write fresh contiguous gradients whatever the inputs' strides
    return (x.new_empty(x.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape))


def _mlp_setup(ctx, inputs, output) -> None:
    x, w1, w2, p = inputs
    _, r, seed = output
    ctx.save_for_backward(x, w1, w2, r, seed)  # r: the one hidden-sized tensor kept
    ctx.p = p


def _mlp_backward(ctx, dy, _dr, _dseed):
    x, w1, w2, r, seed = ctx.saved_tensors
    dx, dw1, dw2 = _mlp_bwd_triton(dy, x, w1, w2, r, seed, ctx.p)
    return dx, dw1, dw2, None


_mlp_fwd_triton.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# The hybrid: same wiring, cuBLAS products and Triton element-wise passes (kernels/relu2.py: hybrid_*).
@torch.library.custom_op("fm_engine::relu2_mlp_fwd_hybrid", mutates_args=())
def _mlp_fwd_hybrid(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import relu2 as K

    seed = int(torch.randint(0, _SEED_MAX, (1,)).item()) if dropout_p > 0 else 0
    y, a = K.hybrid_forward(x, w1, w2, dropout_p, seed)
    return y, a, torch.tensor([seed], dtype=torch.int64)


@torch.library.custom_op("fm_engine::relu2_mlp_bwd_hybrid", mutates_args=())
def _mlp_bwd_hybrid(
    dy: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    a: torch.Tensor,
    seed: torch.Tensor,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import relu2 as K

    return K.hybrid_backward(dy, x, w1, w2, a, dropout_p, int(seed.item()))


_mlp_fwd_hybrid.register_fake(_mlp_fwd_fake)  # same outputs: y, the one hidden tensor, the seed
_mlp_bwd_hybrid.register_fake(_mlp_bwd_fake)


def _mlp_backward_hybrid(ctx, dy, _da, _dseed):
    x, w1, w2, a, seed = ctx.saved_tensors
    dx, dw1, dw2 = _mlp_bwd_hybrid(dy, x, w1, w2, a, seed, ctx.p)
    return dx, dw1, dw2, None


_mlp_fwd_hybrid.register_autograd(_mlp_backward_hybrid, setup_context=_mlp_setup)


def _mlp_call(fwd: Any, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, p: float) -> torch.Tensor:
    lead = x.shape[:-1]
    y, _, _ = fwd(x.reshape(-1, x.shape[-1]), w1, w2, float(p))
    return y.reshape(*lead, w2.shape[0])


def _relu2_mlp_triton(call: Relu2MlpCall) -> torch.Tensor:
    return _mlp_call(_mlp_fwd_triton, call.x, call.w1, call.w2, call.dropout_p)


def _relu2_mlp_hybrid(call: Relu2MlpCall) -> torch.Tensor:
    return _mlp_call(_mlp_fwd_hybrid, call.x, call.w1, call.w2, call.dropout_p)


def relu2_mlp_triton_with_seed(
    x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, dropout_p: float, backend: str = "triton"
) -> tuple[torch.Tensor, int]:
    """The Triton (or hybrid) MLP on x [M, D] plus the dropout seed it drew (tests rebuild the mask from it)."""
    fwd = _mlp_fwd_hybrid if backend == "hybrid" else _mlp_fwd_triton
    y, _, seed = fwd(x, w1, w2, float(dropout_p))
    return y, int(seed.item())


def _relu2_mlp_triton_supports(call: Relu2MlpCall) -> str | None:
    x, w1, w2, dropout_p = call.x, call.w1, call.w2, call.dropout_p
    reason = triton_device_ok(x, w1, w2)
    if reason:
        return reason
    if x.dtype not in _FAST_DTYPES:
        return f"x: dtype {x.dtype} (the fast MLPs take float32, float16, bfloat16)"
    if (reason := _checks.dropout_capture(dropout_p, x)) is not None:
        return reason
    if dropout_p > 0 and x.numel() // max(x.shape[-1], 1) * w1.shape[0] >= 2**31:
        return "dropout with tokens x hidden >= 2^31 elements (the Philox offsets are 32-bit)"
    return None


RELU2_MLP.register(
    "triton",
    _relu2_mlp_triton,
    available=triton_available,
    supports=_relu2_mlp_triton_supports,
    sources=_TRITON_SOURCES,
)
# The hybrid's GEMMs run anywhere torch does; its element-wise passes need Triton (a GPU, or the interpreter).
RELU2_MLP.register(
    "hybrid",
    _relu2_mlp_hybrid,
    available=triton_available,
    supports=_relu2_mlp_triton_supports,
    sources=_TRITON_SOURCES,
)
