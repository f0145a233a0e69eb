"""Weight-for-weight parity of tiny ST-CNNT models on the test device: the Triton backend (named; in the
interpreter on CPU) vs the eager reference in the same dtype vs the reference in float64, on outputs and
every parameter gradient (the parity rule of docs/KERNELS.md, fm_engine.testing)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fm_engine import ops, use_backend
from fm_engine.models.stcnnt import PRODUCTION_CELL, STCNNTMRI, CellConfig, STCNNTUNet, synthetic_mri_pair
from fm_engine.testing import assert_parity_tensor


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: one intra-op thread is several times faster than two on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ATTENTION_OPS = ("window_attention", "temporal_attention")


def _run(model: nn.Module, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], list]:
    model.zero_grad(set_to_none=True)
    with use_backend(backend), ops.trace() as calls:
        out = model(x)
        # one fixed cotangent for all three runs, drawn in float64
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        out.backward(cot.to(out.device, out.dtype))
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return out.detach(), grads, list(calls)


def check_model_parity(model: nn.Module, x: torch.Tensor, name: str) -> None:
    dtype = x.dtype
    model.train()
    fast_out, fast_g, calls = _run(copy.deepcopy(model), x, "triton")
    ref_out, ref_g, ref_calls = _run(copy.deepcopy(model), x, "reference")
    hi_out, hi_g, _ = _run(copy.deepcopy(model).double(), x.double(), "reference")

    # both attention ops ran, the reference run used only the reference, and the fast run used Triton for
    # every call (the models' shapes are all within its limits: at most 64 tokens per group / frames, no
    # dropout; a call it refused would have raised)
    assert {op for op, _ in calls} >= set(ATTENTION_OPS), calls
    assert all(b == "reference" for _, b in ref_calls)
    for op in ATTENTION_OPS:
        used = {b for o, b in calls if o == op}
        assert used == {"triton"}, f"{name}: {op} ran on {used}, expected Triton"

    assert_parity_tensor(f"{name} output", fast_out, ref_out, hi_out, dtype)
    assert set(fast_g) == set(hi_g)
    g_scale = max(float(g.abs().max()) for g in hi_g.values())
    for pname, gh in hi_g.items():
        if float(gh.abs().max()) <= 1e-9 * g_scale:
            # Gradients that vanish exactly (the K-conv bias: softmax ignores a per-query constant shift)
            # are pure rounding noise in the low-precision runs: the fast run may carry at most twice the
            # reference's noise plus one rounding unit at the scale of the model's gradients.
            err = float((fast_g[pname].double() - gh).abs().max())
            ref_err = float((ref_g[pname].double() - gh).abs().max())
            bound = 2 * ref_err + torch.finfo(dtype).eps * g_scale
            assert err <= bound, f"{name} grad {pname}: error {err:.3e} > {bound:.3e} (structurally zero gradient)"
            continue
        # Normwise over the layer's parameters: a layer's weight and bias gradients come from one output
        # gradient, whose rounding differences (fp32, a different summation order in the kernels) reach
        # both. Judged alone, the bias gradient of a cosine-attention Q / K conv is a sum that nearly
        # cancels (the normalisation removes the component along each token's q / k), so its own max is
        # far below the rounding the sum carries; measured against the layer's gradient, a wrong bias
        # gradient (error at its own size) still fails by orders of magnitude.
        layer = pname.rpartition(".")[0]
        scale = max(float(g.abs().max()) for n, g in hi_g.items() if n.rpartition(".")[0] == layer)
        assert_parity_tensor(f"{name} grad {pname}", fast_g[pname], ref_g[pname], hi_g[pname], dtype, scale=scale)


def test_tiny_mri_model_parity(device: torch.device, no_tf32: None) -> None:
    """Production-style cells (parallel, cosine attention, batch2d) on an HR-Net of 2 levels."""
    cfg = PRODUCTION_CELL.replace(n_head=1, dropout_p=0.0)
    model = STCNNTMRI(C=4, num_levels=2, block_str=("L1T1", "G1"), H=8, W=8, window=4, patch=2, cfg=cfg)
    x, _ = synthetic_mri_pair(1, 2, 8, 8)
    check_model_parity(model.to(device), x.to(device), "tiny MRI")


def test_tiny_unet_parity(device: torch.device, no_tf32: None) -> None:
    """Parser-default-style cells (sequential, relative-position bias, instance2d) on a 1-level U-Net."""
    cfg = CellConfig(n_head=2, mixer_kernel=3, mixer_padding=1, scale_ratio_in_mixer=1.0, dropout_p=0.0)
    model = STCNNTUNet(2, 4, 1, ["L1G1", "T1"], H=8, W=8, window=4, patch=2, cfg=cfg)
    x = torch.randn(1, 3, 2, 8, 8)
    check_model_parity(model.to(device), x.to(device), "tiny U-Net")
