"""Weight-for-weight parity of the MiT-UB ViT and AViT on the test device: the Triton backend (named; in the
interpreter on CPU) vs the reference backend in the same dtype vs the reference in fp64, outputs and
every parameter gradient, under the parity rule of docs/KERNELS.md (fm_engine.testing)."""

from __future__ import annotations

import copy

import pytest
import torch

import fm_engine
from fm_engine import ops, use_backend
from fm_engine.ops._dispatch import Op
from fm_engine.testing import assert_parity_tensor

MODELS = {
    "vit": ("vit-i1-p16-d512", dict(dim=64, depth=1, heads=2, kv_heads=1)),
    "avit": (
        "vit-i1-p16-d512-a16_12",
        dict(dim=64, depth=1, heads=2, kv_heads=1, kv_dim=32, high_res_depth=1, target_grid=(2, 3)),
    ),
}


def _run(model, img, scale, cot, backend):
    params = [p for p in model.parameters()]
    with use_backend(backend):
        out = model(img, scale)
        grads = torch.autograd.grad(out, params, cot.to(out.dtype))
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_model_parity_fast_vs_reference(kind, dtype, monkeypatch, device, no_tf32):
    name, over = MODELS[kind]
    model = fm_engine.create_model(name, **over).eval()
    with torch.no_grad():  # LayerScale 1e-5 would hide the decoder layers from the comparison
        for blk in getattr(model, "high_res_blocks", []):
            for ls in (blk.ls1, blk.ls2, blk.ls3):
                ls.gamma.uniform_(0.5, 1.0)
    fast_model = model.to(device, dtype)
    hi_model = copy.deepcopy(model).double()
    # bf16 weights: the Triton stem keeps fp32 parameters and refuses them (checked below), so the stem
    # module names the reference; every other op runs on the triton backend the fast run names
    if dtype != torch.float32:
        fast_model.stem.backend = "reference"
    img = torch.randint(0, 65535, (2, 1, 64, 48), dtype=torch.int32).to(torch.uint16).to(device)
    scale = 1 / 65535
    n_tokens = 12 if kind == "vit" else 6
    cot = torch.randn(2, n_tokens, 64, dtype=torch.float64, device=device)

    # record, for every op call of the fast run, whether its Triton backend accepts the inputs
    verdicts: list[tuple[str, bool]] = []
    orig_call = Op.__call__

    def spy(self, *args, backend=None, **kwargs):
        ex = self.explain(*args, backend=backend, **kwargs)
        verdicts.append((self.name, any(v.backend == "triton" and v.ok for v in ex.verdicts)))
        return orig_call(self, *args, backend=backend, **kwargs)

    with monkeypatch.context() as mp, ops.trace() as calls:
        mp.setattr(Op, "__call__", spy)
        fast_out, fast_grads = _run(fast_model, img, scale, cot, "triton")
    assert {op for op, _ in calls} >= {"patch_embed", "cross_attention", "relu2_mlp"}
    print(sorted(set(calls)))
    assert len(calls) == len(verdicts)
    for (op, backend), (op2, triton_ok) in zip(calls, verdicts, strict=True):
        assert op == op2
        if op == "patch_embed" and dtype != torch.float32:
            assert backend == "reference" and not triton_ok, (op, backend, triton_ok)
        else:
            assert backend == "triton" and triton_ok, f"{op} ran on {backend} (Triton accepts it: {triton_ok})"

    ref_out, ref_grads = _run(fast_model, img, scale, cot, "reference")
    hi_out, hi_grads = _run(hi_model, img, scale, cot, "reference")
    assert fast_out.dtype == dtype
    assert_parity_tensor(f"{kind} output", fast_out, ref_out, hi_out, dtype)
    names = [n for n, _ in fast_model.named_parameters()]
    for n, gf, gl, gh in zip(names, fast_grads, ref_grads, hi_grads, strict=True):
        assert_parity_tensor(f"{kind} grad {n}", gf, gl, gh, dtype)


@pytest.mark.parametrize("size", [(64, 48), (80, 64)], ids=["multiple", "padded"])
def test_avit_context_pass_parity_fast_vs_reference(size, monkeypatch, device, no_tf32):
    """The M-JEPA context pass (``token_index``: queries and keys/values restricted to the kept cells) on the
    Triton backend vs the reference, forward and every parameter gradient. ``multiple``: 4x3 key/value tokens
    over the 2x3 grid, gathered without padding; ``padded``: 5x4 over 2x3, the examples keep 13 and 7 tokens,
    padded to 13 behind a key-padding mask that the Triton cross-attention takes."""
    name, over = MODELS["avit"]
    model = fm_engine.create_model(name, **over).eval()
    with torch.no_grad():
        for blk in model.high_res_blocks:
            for ls in (blk.ls1, blk.ls2, blk.ls3):
                ls.gamma.uniform_(0.5, 1.0)
    fast_model = model.to(device)
    fast_model.stem.backend = "reference"  # the stem's parity is the test above; this one is about the body
    hi_model = copy.deepcopy(model).double()
    img = torch.randint(0, 65535, (2, 1, *size), dtype=torch.int32).to(torch.uint16).to(device)
    idx = torch.tensor([[0, 1, 3], [2, 4, 5]], device=device)
    cot = torch.randn(2, 3, 64, dtype=torch.float64, device=device)

    def run(m, backend):
        params = list(m.parameters())
        with use_backend(backend):
            out = m(img, 1 / 65535, token_index=idx)
            grads = torch.autograd.grad(out, params, cot.to(out.dtype))
        return out.detach(), grads

    masks: list[torch.Tensor | None] = []
    orig_call = Op.__call__

    def spy(self, *args, backend=None, **kwargs):
        if self.name == "cross_attention" and args[1].shape[2] != args[0].shape[2]:  # the decoder's cross-attention
            masks.append(kwargs.get("key_padding_mask"))
        return orig_call(self, *args, backend=backend, **kwargs)

    with monkeypatch.context() as mp, ops.trace() as calls:
        mp.setattr(Op, "__call__", spy)
        fast_out, fast_grads = run(fast_model, "triton")
    assert {op for op, _ in calls} >= {"cross_attention", "relu2_mlp"}
    assert all(backend == "triton" for op, backend in calls if op != "patch_embed"), calls
    assert len(masks) == over["high_res_depth"]
    for m in masks:
        if size == (64, 48):
            assert m is None
        else:
            assert m is not None and m.sum(1).tolist() == [0, 6]
    ref_out, ref_grads = run(fast_model, "reference")
    hi_out, hi_grads = run(hi_model, "reference")
    assert_parity_tensor("avit context output", fast_out, ref_out, hi_out, torch.float32)
    names = [n for n, _ in fast_model.named_parameters()]
    for n, gf, gl, gh in zip(names, fast_grads, ref_grads, hi_grads, strict=True):
        assert_parity_tensor(f"avit context grad {n}", gf, gl, gh, torch.float32)
