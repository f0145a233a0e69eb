"""cross_attention (KERNELS.md K4): Triton backend vs the reference, outputs and every gradient.

Interpreter tiles are 16 x 16 (kernels/cross_attention.py), so sequence lengths 1, 15, 16, 17, 33
cover single, partial and multiple tiles, and the forward / dQ key splits (3 in the interpreter).
"""

from __future__ import annotations

import pytest
import torch

from fm_engine import ops
from fm_engine.ops import BackendUnsupportedError
from fm_engine.ops.cross_attention import cross_attention, cross_attention_reference
from fm_engine.testing import assert_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def qkv(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype, device: torch.device):
    q = torch.randn(b, hq, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    return q, k, v


def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> None:
    hkv = k.shape[1]
    # with a single key the softmax is constant: dq and dk are exactly 0 and only rounding noise
    # remains, which a relative bound cannot judge; dv (= sum of dO over the queries) is still checked
    grad = [False, False, True] if k.shape[2] == 1 else True
    with ops.trace() as calls:
        assert_parity(
            lambda q, k, v: cross_attention(q, k, v, kv_heads=hkv, scale=scale, backend="triton"),
            lambda q, k, v: cross_attention_reference(q, k, v, kv_heads=hkv, scale=scale),
            [q, k, v],
            grad=grad,
            name=f"cross_attention q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype}",
        )
    assert calls[0] == ("cross_attention", "triton")


# (B, Hq, Hkv, Nq, Nk, D): tile edges for Nq and Nk, GQA groups 1 and 2, every head dim
SHAPES = [
    (1, 2, 1, 17, 33, 16),  # group 2, partial query and key tiles, 3 key tiles -> split merge
    (2, 2, 2, 1, 50, 32),  # one query, group 1, batch 2
    (1, 4, 2, 16, 15, 64),  # exact query tile, key tile - 1
    (1, 2, 1, 15, 1, 64),  # a single key
    (1, 2, 2, 33, 16, 128),  # exact key tile, no split
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    check(*qkv(*shape, dtype=dtype, device=device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_random_shapes(dtype: torch.dtype, device: torch.device) -> None:
    hkv = int(torch.randint(1, 3, ()))
    group = int(torch.randint(1, 3, ()))
    nq = int(torch.randint(1, 40, ()))
    nk = int(torch.randint(2, 60, ()))
    d = [16, 32, 64][int(torch.randint(0, 3, ()))]
    check(*qkv(1, hkv * group, hkv, nq, nk, d, dtype, device))


def test_custom_scale_and_large_logits(device: torch.device) -> None:
    q, k, v = qkv(1, 2, 1, 20, 40, 32, torch.bfloat16, device)
    check(q * 4, k * 4, v, scale=0.5)  # logits of order 100: the running max must keep exp finite


def test_strided_inputs(device: torch.device) -> None:
    """The module passes [B, N, H, D] projections transposed to [B, H, N, D] (not contiguous)."""
    b, n, nk, d = 2, 19, 20, 16
    q = torch.randn(b, n, 4, d, device=device, dtype=torch.float16).transpose(1, 2)
    k = torch.randn(b, nk, 2, d, device=device, dtype=torch.float16).transpose(1, 2)
    v = torch.randn(b, nk, 2, d, device=device, dtype=torch.float16).transpose(1, 2)
    assert not q.is_contiguous()
    check(q, k, v)


@pytest.mark.parametrize("splits", [2, 5])
def test_key_splits_merge_exactly(splits: int, device: torch.device) -> None:
    """Every split count (including uneven key ranges) gives the same forward output and dQ as one pass."""
    from fm_engine.kernels import cross_attention as K

    q, k, v = qkv(1, 2, 1, 18, 75, 16, torch.float32, device)  # 5 key tiles
    scale = 16**-0.5
    o1, lse1 = K.forward(q, k, v, 1, scale, splits=1)
    o, lse = K.forward(q, k, v, 1, scale, splits=splits)
    torch.testing.assert_close(o, o1, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(lse, lse1, rtol=2e-6, atol=2e-6)
    ref = cross_attention_reference(q.double(), k.double(), v.double(), kv_heads=1)
    torch.testing.assert_close(o.double(), ref, rtol=1e-5, atol=1e-5)
    do = torch.randn_like(o)
    g1 = K.backward(do, q, k, v, o1, lse1, 1, scale, splits=1)
    g = K.backward(do, q, k, v, o, lse, 1, scale, splits=splits)
    for a, b in zip(g, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_under_torch_compile(device: torch.device) -> None:
    """fullgraph compile of the public op on the Triton backend (custom ops), forward and backward."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, 20, 40, 32, torch.float32, device))
    compiled = torch.compile(
        lambda q, k, v: cross_attention(q, k, v, kv_heads=2, backend="triton"), fullgraph=True, backend="aot_eager"
    )
    o = compiled(q, k, v)
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    ref = cross_attention_reference(q, k, v, kv_heads=2)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_nan_with_many_equal_keys(device: torch.device) -> None:
    q = torch.zeros(1, 2, 17, 16, device=device, dtype=torch.bfloat16)
    k = torch.zeros(1, 1, 49, 16, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, 1, 49, 16, device=device, dtype=torch.bfloat16)
    o = cross_attention(q, k, v, kv_heads=1, backend="triton")
    assert torch.isfinite(o).all()
    torch.testing.assert_close(o.float(), v.float().mean(2, keepdim=True).expand(1, 2, 17, 16), rtol=2e-2, atol=2e-2)


# --- what the Triton backend refuses (and automatic dispatch sends to the reference) ---------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"dropout_p": 0.1}, "dropout"),
        ({"key_padding_mask": "mask"}, "key_padding_mask"),
        ({"d": 48}, "head_dim 48"),
        ({"dtype": torch.float64}, "dtype torch.float64"),
    ],
)
def test_triton_refuses_with_reason(kwargs: dict, reason: str, device: torch.device) -> None:
    d = kwargs.pop("d", 32)
    dtype = kwargs.pop("dtype", torch.float32)
    q, k, v = qkv(1, 2, 1, 5, 9, d, dtype, device)
    if kwargs.get("key_padding_mask") == "mask":
        kwargs["key_padding_mask"] = torch.zeros(1, 9, dtype=torch.bool, device=device)
    with pytest.raises(BackendUnsupportedError, match=reason):
        cross_attention(q, k, v, kv_heads=1, backend="triton", **kwargs)
    ex = ops.explain(cross_attention, q, k, v, kv_heads=1, **kwargs)
    assert ex.chosen == "reference"
    with ops.trace() as calls:
        cross_attention(q, k, v, kv_heads=1, **kwargs)
    assert calls == [("cross_attention", "reference")]


def test_auto_dispatch_uses_triton(device: torch.device) -> None:
    q, k, v = qkv(1, 2, 1, 5, 9, 32, torch.bfloat16, device)
    assert ops.explain(cross_attention, q, k, v, kv_heads=1).chosen == "triton"


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs(device: torch.device) -> None:
    q, k, v = qkv(1, 4, 2, 5, 9, 32, torch.float32, device)
    with pytest.raises(ValueError, match="kv_heads: 3 does not match"):
        cross_attention(q, k, v, kv_heads=3)
    q3 = torch.randn(1, 3, 5, 32, device=device)
    k3, v3 = k[:, :2], v[:, :2]
    with pytest.raises(ValueError, match="must be a multiple of kv_heads"):
        cross_attention(q3, k3, v3, kv_heads=2)
    with pytest.raises(ValueError, match="v: shape"):
        cross_attention(q, k, v[:, :, :4], kv_heads=2)
    with pytest.raises(ValueError, match="head_dim 16 differs"):
        cross_attention(q, k[..., :16], v[..., :16], kv_heads=2)
    with pytest.raises(ValueError, match="one dtype"):
        cross_attention(q, k.half(), v.half(), kv_heads=2)
    with pytest.raises(ValueError, match="q: expected a 4-D tensor"):
        cross_attention(q[0], k, v, kv_heads=2)
    with pytest.raises(ValueError, match="dropout_p: expected a probability"):
        cross_attention(q, k, v, kv_heads=2, dropout_p=1.5)
    with pytest.raises(ValueError, match="key_padding_mask: expected a bool tensor"):
        cross_attention(q, k, v, kv_heads=2, key_padding_mask=torch.zeros(1, 9, device=device))
    with pytest.raises(ValueError, match="q: dtype int64 is not supported"):
        cross_attention(q.long(), k, v, kv_heads=2)


# --- GPU: parity at the AViT shape ----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 4])
def test_gpu_parity_avit_shape(batch: int) -> None:
    """B 1 / 4, Nq 768 pooled queries, Nk 27,648 high-resolution keys, 8 query / 4 KV heads of 64, bf16."""
    q, k, v = qkv(batch, 8, 4, 768, 27648, 64, torch.bfloat16, torch.device("cuda"))
    check(q, k, v)


@pytest.mark.gpu
def test_gpu_parity_fp32_and_head_dims() -> None:
    dev = torch.device("cuda")
    check(*qkv(1, 8, 4, 768, 4099, 64, torch.float32, dev))
    for d in (16, 32, 128):
        check(*qkv(2, 4, 2, 300, 5000, d, torch.float16, dev))


@pytest.mark.gpu
def test_gpu_deterministic() -> None:
    dev = torch.device("cuda")
    q, k, v = (t.requires_grad_() for t in qkv(1, 8, 4, 768, 9000, 64, torch.bfloat16, dev))
    runs = []
    for _ in range(2):
        o = cross_attention(q, k, v, kv_heads=4, backend="triton")
        runs.append((o, *torch.autograd.grad(o, (q, k, v), torch.ones_like(o))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)
