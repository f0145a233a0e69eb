"""fm_engine.nn stems (PatchEmbed2d, AdaptiveStem2d) and Attention: names, checkpoint loading, and the
Triton backend matching the reference weight for weight, outputs and parameter gradients."""

from __future__ import annotations

import pytest
import torch

from fm_engine import ops
from fm_engine.nn import AdaptiveStem2d, Attention, PatchEmbed2d
from fm_engine.testing import assert_parity_tensor

KV_KEYS = {"kv_proj.weight", "kv_proj.bias", "kv_norm.weight", "kv_norm.bias", "kv_pos.weight", "kv_pos.bias"}


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial values for every parameter (LayerNorm starts at 1 / 0 otherwise)."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return module


def test_vit_stem_state_dict_loads_into_avit_stem(device: torch.device) -> None:
    vit = randomize(PatchEmbed2d(1, 32, 4)).to(device)
    avit = AdaptiveStem2d(1, 32, kv_dim=16, patch=4, target_grid=(2, 3), backend="triton").to(device)
    result = avit.load_state_dict(vit.state_dict(), strict=False)
    assert set(result.missing_keys) == KV_KEYS
    assert result.unexpected_keys == []
    # the query path is then the ViT stem on max-pooled conv features
    image = torch.randint(0, 65536, (1, 1, 16, 24), dtype=torch.int64).to(torch.uint16).to(device)
    pooled_vit = PatchEmbed2d(1, 32, 4, pool_to=(2, 3), backend="triton").to(device)
    pooled_vit.load_state_dict(vit.state_dict())
    q, kv = avit(image, intensity_scale=1 / 65535)
    assert q.shape == (1, 6, 32) and kv.shape == (1, 24, 16)
    torch.testing.assert_close(q, pooled_vit(image, intensity_scale=1 / 65535), rtol=0, atol=0)


def stem_grads(stem: torch.nn.Module, image: torch.Tensor, backend: str, g: list[torch.Tensor]) -> tuple:
    stem.backend = backend
    stem.zero_grad()
    with ops.trace() as calls:
        outs = stem(image, intensity_scale=1 / 65535)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, g)
    assert {c[1] for c in calls} == {backend}
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in stem.named_parameters()}


def test_adaptive_stem_triton_matches_reference(device: torch.device) -> None:
    stem = randomize(AdaptiveStem2d(1, 24, kv_dim=16, patch=4, target_grid=(3, 5))).to(device)
    image = torch.randint(0, 65536, (2, 1, 28, 40), dtype=torch.int64).to(torch.uint16).to(device)
    g = [torch.randn(2, 15, 24, device=device), torch.randn(2, 70, 16, device=device)]
    out_t, grads_t = stem_grads(stem, image, "triton", g)
    out_r, grads_r = stem_grads(stem, image, "reference", g)
    stem64 = AdaptiveStem2d(1, 24, kv_dim=16, patch=4, target_grid=(3, 5)).to(device).double()
    stem64.load_state_dict(stem.state_dict())
    out_h, grads_h = stem_grads(stem64, image, "reference", [x.double() for x in g])
    for i in range(2):
        assert_parity_tensor(f"stem output {i}", out_t[i], out_r[i], out_h[i], torch.float32)
    assert set(grads_t) == set(grads_h) and len(grads_t) == 12
    for n in grads_t:
        assert_parity_tensor(f"grad {n}", grads_t[n], grads_r[n], grads_h[n], torch.float32)


def test_attention_parameter_names() -> None:
    attn = Attention(64, heads=4, kv_heads=2, kv_dim=32, head_dim=16)
    shapes = {n: tuple(p.shape) for n, p in attn.named_parameters()}
    assert shapes == {
        "q_proj.weight": (64, 64),
        "k_proj.weight": (32, 32),
        "v_proj.weight": (32, 32),
        "out_proj.weight": (64, 64),
    }
    with pytest.raises(ValueError, match="heads: 3 must be a multiple of kv_heads 2"):
        Attention(64, heads=3, kv_heads=2)


def attention_run(attn: Attention, x: torch.Tensor, kv: torch.Tensor | None, backend: str, g: torch.Tensor):
    attn.backend = backend
    attn.zero_grad()
    x = x.detach().requires_grad_()
    kv = None if kv is None else kv.detach().requires_grad_()
    with ops.trace() as calls:
        y = attn(x, kv)
    y.backward(g)
    assert calls == [("cross_attention", backend)]
    grads = {n: p.grad.clone() for n, p in attn.named_parameters()}
    grads["x"] = x.grad
    if kv is not None:
        grads["kv"] = kv.grad
    return y.detach(), grads


@pytest.mark.parametrize("cross", [True, False], ids=["cross", "self"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_triton_matches_reference(cross: bool, dtype: torch.dtype, device: torch.device) -> None:
    """AViT decoder cross-attention (kv_dim != dim, GQA 2:1, Nq != Nk) and self-attention."""
    attn = Attention(32, heads=4, kv_heads=2, kv_dim=24 if cross else None, head_dim=16).to(device)
    x = torch.randn(2, 7, 32, device=device)
    kv = torch.randn(2, 19, 24, device=device) if cross else None
    g = torch.randn(2, 7, 32, device=device)
    attn = attn.to(dtype)
    cast = lambda t: None if t is None else t.to(dtype)
    y_t, gr_t = attention_run(attn, cast(x), cast(kv), "triton", cast(g))
    y_r, gr_r = attention_run(attn, cast(x), cast(kv), "reference", cast(g))
    attn64 = Attention(32, heads=4, kv_heads=2, kv_dim=24 if cross else None, head_dim=16).to(device).double()
    attn64.load_state_dict(attn.state_dict())
    kv64 = None if kv is None else cast(kv).double()
    y_h, gr_h = attention_run(attn64, cast(x).double(), kv64, "reference", cast(g).double())
    assert_parity_tensor("attention output", y_t, y_r, y_h, dtype)
    for n in gr_h:
        assert_parity_tensor(f"grad {n}", gr_t[n], gr_r[n], gr_h[n], dtype)


def test_attention_dropout_and_masks_run_triton(device: torch.device) -> None:
    # attention dropout runs inside the Triton kernels (training only); masks too
    attn = Attention(32, heads=2, kv_heads=1, head_dim=16, dropout=0.5, backend="triton").to(device)
    x = torch.randn(1, 5, 32, device=device)
    with ops.trace() as calls:
        a, b = attn.train()(x), attn(x)
        c, d = attn.eval()(x), attn(x)
        attn(x, key_padding_mask=torch.zeros(1, 5, dtype=torch.bool, device=device))
    assert calls == [("cross_attention", "triton")] * 5
    assert not torch.equal(a, b) and torch.equal(c, d)
