"""ReLU² family: relu2 (Triton, CUDA) and relu2_mlp (Triton fused GEMMs, hybrid cuBLAS + Triton) against the
eager reference. Every test names the backend it exercises."""

from __future__ import annotations

import contextlib
import copy
import importlib
import re

import pytest
import torch
from fm_engine.kernels import relu2 as K
from torch import nn

import fm_engine
from fm_engine import ops
from fm_engine.ops._dispatch import interpreting
from fm_engine.ops.relu2 import relu2_mlp_reference, relu2_mlp_triton_with_seed
from fm_engine.testing import assert_parity, assert_parity_tensor

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The shapes below sit around the tiles the kernels really launch with here: the MLP's one interpreter
# tile (MM_TILE), or on a GPU the largest tile edge of its autotune configs (sizes around it are partial
# tiles of the smaller configs too); the element-wise kernels' block (256 interpreted, the largest tuned
# block on a GPU).
TILE = (
    K.MM_TILE
    if interpreting()
    else max(max(c.kwargs["BM"], c.kwargs["BN"]) for cs in K.MM_CONFIGS.values() for c in cs)
)
EW_BLOCK = K.EW_BLOCK_INTERPRETER if interpreting() else max(c.kwargs["BLOCK"] for c in K.EW_CONFIGS)
MLP_BACKENDS = ["triton", "hybrid"]


def triton_relu2(x: torch.Tensor) -> torch.Tensor:
    return ops.relu2(x, backend="triton")


def triton_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return ops.relu2_mlp(x, w1, w2, backend="triton")


def mlp_on(backend: str):
    return lambda x, w1, w2: ops.relu2_mlp(x, w1, w2, backend=backend)


def mlp_weights(d: int, h: int, dout: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    w1 = torch.randn(h, d, device=device) / d**0.5
    w2 = torch.randn(dout, h, device=device) / h**0.5
    return w1.to(dtype), w2.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, EW_BLOCK - 1, EW_BLOCK, EW_BLOCK + 1, 3 * EW_BLOCK + 17])
def test_relu2_triton_parity(dtype: torch.dtype, n: int, device: torch.device) -> None:
    x = torch.randn(n, device=device).to(dtype)
    assert_parity(triton_relu2, lambda t: torch.relu(t) ** 2, [x], name=f"relu2 n={n}")


def test_relu2_triton_shapes_and_nan(device: torch.device) -> None:
    x = torch.randn(3, 5, 7, device=device)
    x[0, 0, 0] = float("nan")
    x[1, 1, 1] = float("inf")
    x[2, 2, 2] = -float("inf")
    y = triton_relu2(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, torch.relu(x) ** 2, equal_nan=True)
    assert torch.isnan(y[0, 0, 0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2_triton_nan_inf_gradients(dtype: torch.dtype, device: torch.device) -> None:
    """NaN and +-inf inputs, in a whole block and in the masked last block: outputs and gradients match
    eager's non-finite values (relu keeps NaN; 2 * relu(inf) * dy is +-inf)."""
    x = torch.randn(2 * EW_BLOCK + 3, device=device)
    for i in (5, EW_BLOCK + 1, 2 * EW_BLOCK + 1):
        x[i], x[i + 1] = float("nan"), float("inf")
    x[7] = -float("inf")
    assert_parity(triton_relu2, lambda t: torch.relu(t) ** 2, [x.to(dtype)], name="relu2 NaN/inf")


def test_relu2_empty(device: torch.device) -> None:
    x = torch.empty(0, 4, device=device)
    assert triton_relu2(x).shape == (0, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "m,d,h,dout",
    [
        (1, 16, 16, 16),
        (TILE - 1, TILE + 1, 3 * TILE, TILE - 1),
        (TILE, TILE, TILE, TILE),
        (TILE + 1, 2 * TILE + 3, 2 * TILE - 1, 2 * TILE + 1),
        (3 * TILE + 5, 24, 72, 24),
    ],
)
@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_relu2_mlp_parity(
    backend: str, dtype: torch.dtype, m: int, d: int, h: int, dout: int, device: torch.device
) -> None:
    x = torch.randn(m, d, device=device).to(dtype)
    w1, w2 = mlp_weights(d, h, dout, dtype, device)
    assert_parity(mlp_on(backend), relu2_mlp_reference, [x, w1, w2], name=f"relu2_mlp {backend} {m}x{d}->{h}->{dout}")


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 20), (20,), (1, 1, 20)])
def test_relu2_mlp_leading_shapes(backend: str, shape: tuple[int, ...], device: torch.device) -> None:
    x = torch.randn(*shape, device=device)
    w1, w2 = mlp_weights(20, 36, 20, torch.float32, device)
    assert_parity(mlp_on(backend), relu2_mlp_reference, [x, w1, w2], name=f"relu2_mlp {backend} {shape}")
    assert mlp_on(backend)(x, w1, w2).shape == (*shape[:-1], 20)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_relu2_mlp_noncontiguous(backend: str, device: torch.device) -> None:
    # non-contiguous inputs and weights: cuBLAS reads the strides, the fused design copies them once
    x = torch.randn(24, 33, device=device).t()  # [33, 24], not contiguous
    w1 = torch.randn(40, 24, device=device).div(5).t().contiguous().t()
    w2 = torch.randn(40, 24, device=device).div(6).t()  # [24, 40], not contiguous
    assert not x.is_contiguous() and not w2.is_contiguous()
    assert_parity(mlp_on(backend), relu2_mlp_reference, [x, w1, w2], name=f"relu2_mlp {backend} non-contiguous")


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_mlp_dropout_matches_mask(backend: str, dtype: torch.dtype, device: torch.device) -> None:
    """The kernels' dropout equals the reference with the same keep mask, forward and backward."""
    from fm_engine.kernels.relu2 import dropout_keep_mask

    p = 0.3
    m, d, h = 37, 24, 40  # M * H = 1480: a whole interpreter block and a partial one
    x = torch.randn(m, d, device=device).to(dtype)
    w1, w2 = mlp_weights(d, h, d, dtype, device)
    _, seed = relu2_mlp_triton_with_seed(x, w1, w2, p, backend)
    keep = dropout_keep_mask(seed, m, h, p, device)
    frac = keep.float().mean().item()
    assert 0.55 < frac < 0.85, f"keep fraction {frac} for p={p}"

    def fast(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)  # same seed draw as below
        return relu2_mlp_triton_with_seed(x, w1, w2, p, backend)[0]

    torch.manual_seed(1)
    _, seed1 = relu2_mlp_triton_with_seed(x, w1, w2, p, backend)
    keep1 = dropout_keep_mask(seed1, m, h, p, device)

    def masked_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        hid = torch.relu(x @ w1.t()) ** 2
        return (hid * keep1.to(hid.dtype) / (1 - p)) @ w2.t()

    assert_parity(fast, masked_reference, [x, w1, w2], name=f"relu2_mlp {backend} dropout")


def test_relu2_mlp_designs_draw_one_mask(device: torch.device) -> None:
    """Same seed, same mask: the fused and the hybrid design compute the same dropped MLP."""
    x = torch.randn(19, 16, device=device)
    w1, w2 = mlp_weights(16, 48, 16, torch.float32, device)
    torch.manual_seed(3)
    a, sa = relu2_mlp_triton_with_seed(x, w1, w2, 0.4, "triton")
    torch.manual_seed(3)
    b, sb = relu2_mlp_triton_with_seed(x, w1, w2, 0.4, "hybrid")
    assert sa == sb
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_relu2_mlp_dropout_reproducible(backend: str, device: torch.device) -> None:
    x = torch.randn(9, 16, device=device)
    w1, w2 = mlp_weights(16, 32, 16, torch.float32, device)
    torch.manual_seed(5)
    a = ops.relu2_mlp(x, w1, w2, 0.5, backend=backend)
    torch.manual_seed(5)
    b = ops.relu2_mlp(x, w1, w2, 0.5, backend=backend)
    c = ops.relu2_mlp(x, w1, w2, 0.5, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _saved_hidden_tensors(fn, x, w1, w2) -> int:
    """How many tensors of hidden size autograd keeps for backward."""
    m, h = x.numel() // x.shape[-1], w1.shape[0]
    count = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal count
        if t.numel() == m * h:
            count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w1, w2).sum()
    return count


@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_relu2_mlp_keeps_one_hidden_tensor(backend: str, p: float, device: torch.device) -> None:
    x = torch.randn(33, 16, device=device, requires_grad=True)
    w1, w2 = (w.requires_grad_() for w in mlp_weights(16, 48, 16, torch.float32, device))
    assert _saved_hidden_tensors(lambda *a: ops.relu2_mlp(*a, p, backend=backend), x, w1, w2) == 1
    assert _saved_hidden_tensors(lambda *a: relu2_mlp_reference(*a, p), x, w1, w2) >= 2


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_relu2_mlp_under_torch_compile(backend: str, device: torch.device) -> None:
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    w1, w2 = (w.requires_grad_() for w in mlp_weights(16, 32, 16, torch.float32, device))

    def f(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        return ops.relu2_mlp(x, w1, w2, backend=backend) + ops.relu2(x, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, w1, w2)
    y.square().sum().backward()
    grads = [t.grad.clone() for t in (x, w1, w2)]
    for t in (x, w1, w2):
        t.grad = None
    (relu2_mlp_reference(x, w1, w2) + torch.relu(x) ** 2).square().sum().backward()
    for g, t in zip(grads, (x, w1, w2)):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-4)


def test_relu2_mlp_module_loads_eager_state_dict(device: torch.device) -> None:
    class EagerMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(24, 64, bias=False)
            self.fc2 = nn.Linear(64, 24, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)) ** 2)

    eager = EagerMLP().to(device)
    mod = fm_engine.nn.ReLU2MLP(24, 64, dropout=0.1, backend="triton").to(device)
    mod.load_state_dict(eager.state_dict(), strict=True)
    mod.eval()  # dropout off in eval
    x = torch.randn(3, 7, 24, device=device)
    with ops.trace() as calls:
        y = mod(x)
    assert calls == [("relu2_mlp", "triton")]
    ref = eager(x)
    ref_hi = copy.deepcopy(eager).double()(x.double())
    assert_parity_tensor("ReLU2MLP", y, ref, ref_hi, torch.float32)


def test_relu2_module_and_backend_argument(device: torch.device) -> None:
    x = torch.randn(4, 8, device=device)
    with ops.trace() as calls:
        fm_engine.nn.ReLU2(backend="reference")(x)
        fm_engine.nn.ReLU2(backend="triton")(x)
    assert calls == [("relu2", "reference"), ("relu2", "triton")]


# --- bad inputs -------------------------------------------------------------------------------


def test_bad_inputs_name_the_problem(device: torch.device) -> None:
    x = torch.randn(4, 8, device=device)
    w1, w2 = mlp_weights(8, 16, 8, torch.float32, device)
    with pytest.raises(ValueError, match=r"x: dtype int64 is not supported"):
        ops.relu2(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"w1: shape \(16, 8\) does not match x's last dim 9"):
        ops.relu2_mlp(torch.randn(4, 9, device=device), w1, w2)
    with pytest.raises(ValueError, match=r"w2: shape .* does not match hidden size 16"):
        ops.relu2_mlp(x, w1, torch.randn(8, 15, device=device))
    with pytest.raises(ValueError, match=r"w1: expected a 2-D tensor"):
        ops.relu2_mlp(x, w1[None], w2)
    with pytest.raises(ValueError, match=r"tensors must share one dtype"):
        ops.relu2_mlp(x, w1.half(), w2)
    with pytest.raises(ValueError, match=r"tensors must be on one device"):
        ops.relu2_mlp(x, w1.to("meta"), w2)
    with pytest.raises(ValueError, match=r"dropout_p: expected a probability in \[0, 1\), got 1.0"):
        ops.relu2_mlp(x, w1, w2, 1.0)
    with pytest.raises(ValueError, match=r"x: expected a torch.Tensor"):
        ops.relu2([1.0, 2.0])


def test_unsupported_backend_says_why(device: torch.device) -> None:
    xt = torch.randn(8, 6, device=device).t()
    with pytest.raises(ops.BackendUnsupportedError, match=r"triton.*non-contiguous"):
        ops.relu2(xt, backend="triton")
    # automatic dispatch takes the reference for it: same math, no error
    torch.testing.assert_close(ops.relu2(xt), torch.relu(xt) ** 2)
    for backend in MLP_BACKENDS:
        with pytest.raises(ops.BackendUnsupportedError, match=rf"'{backend}'.*float64"):
            ops.relu2_mlp(
                torch.randn(2, 4, dtype=torch.float64, device=device),
                torch.randn(4, 4, dtype=torch.float64, device=device),
                torch.randn(4, 4, dtype=torch.float64, device=device),
                backend=backend,
            )
    ex = ops.explain(
        ops.relu2_mlp, *(torch.randn(s, device=device) for s in ((2, 4), (4, 4), (4, 4))), backend="hybrid"
    )
    assert ex.chosen == "hybrid"
    # the device: what each backend refuses differs by machine kind, and each refusal says why
    cpu_x = torch.randn(4)
    built = fm_engine._C_status()  # None when the CUDA extension was built
    if torch.cuda.is_available():
        with pytest.raises(ops.BackendUnsupportedError, match=r"triton.*tensor on cpu \(Triton needs CUDA tensors"):
            ops.relu2(cpu_x, backend="triton")
        reason = r"x: on cpu \(the CUDA kernel needs a CUDA tensor\)" if built is None else re.escape(built)
        with pytest.raises(ops.BackendUnsupportedError, match=r"'cuda' cannot run this call: " + reason):
            ops.relu2(cpu_x, backend="cuda")
    else:
        assert interpreting()  # CPU tensors run in the interpreter
        torch.testing.assert_close(ops.relu2(cpu_x, backend="triton"), torch.relu(cpu_x) ** 2)
        reason = "no CUDA GPU" if built is None else re.escape(built)
        with pytest.raises(ops.BackendUnsupportedError, match=r"'cuda' cannot run this call: " + reason):
            ops.relu2(cpu_x, backend="cuda")
        with pytest.raises(ops.BackendUnsupportedError, match=r"triton.*tensor on meta"):
            ops.relu2(torch.empty(4, device="meta"), backend="triton")


# --- GPU (skipped without CUDA) ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_relu2_cuda_parity(dtype: torch.dtype, offset: int) -> None:
    # offset 1 misaligns the pointers: the CUDA kernel must take its scalar path. The slice is taken inside
    # the functions: assert_parity clones its inputs, and a clone is a fresh (aligned) allocation.
    x = torch.randn(1 << 20 | 5, device="cuda").to(dtype)

    def fast(t: torch.Tensor) -> torch.Tensor:
        t = t[offset:]
        assert t.data_ptr() % 16 == offset * t.element_size()
        return ops.relu2(t, backend="cuda")

    assert_parity(fast, lambda t: torch.relu(t[offset:]) ** 2, [x], name=f"relu2 cuda offset {offset}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2_mlp_parity_real_size(backend: str, dtype: torch.dtype) -> None:
    x = torch.randn(8 * 768, 512, device="cuda").to(dtype)
    w1, w2 = mlp_weights(512, 2048, 512, dtype, torch.device("cuda"))
    assert_parity(mlp_on(backend), relu2_mlp_reference, [x, w1, w2], name=f"relu2_mlp {backend} 6144x512->2048->512")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_relu2_mlp_deterministic(backend: str) -> None:
    x = torch.randn(4096, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w1, w2 = (w.requires_grad_() for w in mlp_weights(512, 2048, 512, torch.bfloat16, torch.device("cuda")))
    outs = []
    for _ in range(2):
        y = mlp_on(backend)(x, w1, w2)
        gx, g1, g2 = torch.autograd.grad(y.float().square().sum(), (x, w1, w2))
        outs.append((y, gx, g1, g2))
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("split", [1, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu2_mlp_weight_grads_split_k(split: int, dtype: torch.dtype, device: torch.device) -> None:
    """Weight gradients with 1, 3 or 4 K slices (the split is part of the tuned config) match the reference."""
    import triton
    from fm_engine.kernels import relu2 as K

    m, d, h = 5 * TILE + 3, 16, 32  # K = m: slices of 32, 32, 32 (and 16 / empty) tokens, a partial last tile
    x = torch.randn(m, d, device=device).to(dtype)
    w1, w2 = mlp_weights(d, h, d, dtype, device)
    dy = torch.randn(m, d, device=device).to(dtype)
    _, r = K.mlp_forward(x, w1, w2, 0.0, 0)
    with contextlib.ExitStack() as stack:
        for (wgrad, _, _), tuned in K.GEMMS.items():
            if wgrad:  # every weight-gradient family, whichever this launch picks, runs its first config
                base = K.WGRAD_INTERPRETER if not torch.cuda.is_available() else tuned.configs[0]
                cfg = triton.Config(
                    {**base.kwargs, "SPLIT": split}, num_warps=base.num_warps, num_stages=base.num_stages
                )
                stack.enter_context(tuned.override([cfg]))
        _, dw1, dw2 = K.mlp_backward(dy, x, w1, w2, r, 0.0, 0)

    def ref_grads(cast: torch.dtype | None) -> tuple[torch.Tensor, ...]:
        xs, a, b, g = (t.to(cast) if cast else t for t in (x, w1, w2, dy))
        a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
        return torch.autograd.grad(relu2_mlp_reference(xs, a, b), (a, b), g)

    lo, hi = ref_grads(None), ref_grads(torch.float64)
    assert_parity_tensor("dw1 split-K", dw1, lo[0], hi[0], dtype)
    assert_parity_tensor("dw2 split-K", dw2, lo[1], hi[1], dtype)


@pytest.mark.parametrize("backend", ["reference", *MLP_BACKENDS])
def test_relu2_mlp_under_autocast(backend: str, device: torch.device) -> None:
    """bf16 autocast with fp32 weights: inputs are cast like F.linear's, gradients reach the fp32 weights."""
    mod = fm_engine.nn.ReLU2MLP(16, 32, backend=backend).to(device)
    x = torch.randn(5, 16, device=device)
    with torch.autocast(device.type, torch.bfloat16):
        y = mod(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert mod.fc1.weight.grad is not None and mod.fc1.weight.grad.dtype == torch.float32
    ref = relu2_mlp_reference(x.bfloat16(), mod.fc1.weight.bfloat16(), mod.fc2.weight.bfloat16())
    ref_hi = relu2_mlp_reference(x.double(), mod.fc1.weight.double(), mod.fc2.weight.double())
    assert_parity_tensor("autocast relu2_mlp", y, ref, ref_hi, torch.bfloat16)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_relu2_mlp_propagates_nan(backend: str, device: torch.device) -> None:
    """A NaN input row gives a NaN output row, as in eager (relu and dropout keep NaN)."""
    x = torch.randn(20, 16, device=device)
    x[3, 5] = float("nan")
    w1, w2 = mlp_weights(16, 32, 16, torch.float32, device)
    for p in (0.0, 0.5):
        y = ops.relu2_mlp(x, w1, w2, p, backend=backend)
        assert torch.isnan(y[3]).all(), f"p={p}: NaN was not propagated"
        assert torch.isfinite(y[torch.arange(20) != 3]).all()
    assert_parity(mlp_on(backend), relu2_mlp_reference, [x, w1, w2], name=f"relu2_mlp {backend} with NaN")


def test_custom_ops_pass_opcheck(device: torch.device) -> None:
    """Fake (meta) implementations match the real kernels: shapes, dtypes and strides, autograd wiring."""
    R = importlib.import_module("fm_engine.ops.relu2")  # the module (fm_engine.ops.relu2 is also a function)

    x = torch.randn(24, 33, device=device).t()  # non-contiguous: the fakes must still say "contiguous output"
    w1 = torch.randn(40, 24, device=device, requires_grad=True)
    w2 = torch.randn(16, 40, device=device, requires_grad=True)
    xc = torch.randn(7, 9, device=device, requires_grad=True)
    r = torch.relu(torch.randn(33, 40, device=device))
    dy = torch.randn(33, 16, device=device)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(R._relu2_triton, (xc,), test_utils=tests)
    torch.library.opcheck(R._relu2_bwd_triton, (xc.detach(), torch.randn(7, 9, device=device)), test_utils=tests)
    torch.library.opcheck(R._mlp_fwd_triton, (x.requires_grad_(), w1, w2, 0.0), test_utils=tests)
    seed = torch.tensor([0], dtype=torch.int64)
    torch.library.opcheck(R._mlp_bwd_triton, (dy, x.detach(), w1.detach(), w2.detach(), r, seed, 0.0), test_utils=tests)
    torch.library.opcheck(R._mlp_fwd_hybrid, (x, w1, w2, 0.1), test_utils=tests)
    a = torch.randn(33, 40, device=device)
    torch.library.opcheck(R._mlp_bwd_hybrid, (dy, x.detach(), w1.detach(), w2.detach(), a, seed, 0.1), test_utils=tests)


@pytest.mark.parametrize("backend", MLP_BACKENDS)
def test_relu2_mlp_under_inductor_noncontiguous(backend: str, device: torch.device) -> None:
    """torch.compile's default backend checks the custom ops' output strides against their fakes."""
    x = torch.randn(16, 2, 9, device=device).permute(1, 2, 0).requires_grad_()  # [2, 9, 16], not contiguous
    w1, w2 = (w.requires_grad_() for w in mlp_weights(16, 32, 16, torch.float32, device))
    f = torch.compile(lambda x, w1, w2: ops.relu2_mlp(x, w1, w2, backend=backend), fullgraph=True)
    y = f(x, w1, w2)
    gx, g1, g2 = torch.autograd.grad(y.square().sum(), (x, w1, w2))
    ref = relu2_mlp_reference(x, w1, w2)
    rx, r1, r2 = torch.autograd.grad(ref.square().sum(), (x, w1, w2))
    for a, b in ((y, ref), (gx, rx), (g1, r1), (g2, r2)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", MLP_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_relu2_mlp_parity_gpu_tile_edges(backend: str, dtype: torch.dtype) -> None:
    # several full 128-tiles plus a partial one in every dimension
    m, d, h = 8 * 128 + 1, 3 * 32 + 1, 2 * 128 + 1
    x = torch.randn(m, d, device="cuda").to(dtype)
    w1, w2 = mlp_weights(d, h, d, dtype, torch.device("cuda"))
    assert_parity(mlp_on(backend), relu2_mlp_reference, [x, w1, w2], name=f"relu2_mlp {backend} GPU tile edges")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [(1 << 22) + 5, 1 << 22])
def test_relu2_triton_parity_gpu_sizes(dtype: torch.dtype, n: int) -> None:
    """Whole 16-byte-vector blocks and a masked tail at a size the tuner tunes for."""
    x = torch.randn(n, device="cuda").to(dtype)
    assert_parity(triton_relu2, lambda t: torch.relu(t) ** 2, [x], name=f"relu2 n={n}")
