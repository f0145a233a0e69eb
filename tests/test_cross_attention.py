"""cross_attention (docs/KERNELS.md K4): Triton backend vs the reference, outputs and every gradient.

Sequence lengths are written for the interpreter's 16-key tiles (kernels/cross_attention.py): 1, 15, 16,
17, 33 cover single, partial and multiple tiles, and the forward / dQ key splits (up to 3 in the
interpreter). On a GPU the tiles are larger (32 keys for fp32, 64 for fp16 / bf16), so ``at_tile`` moves
each length to the same place relative to the real key tile, and the small-shape tests split the keys as
the interpreter does (a GPU's own policy splits only large key ranges on small grids).
"""

from __future__ import annotations

import pytest
import torch
from fm_engine.kernels import cross_attention as K
from fm_engine.kernels._attention_dropout import dropout_keep_mask

from fm_engine import ops, use_backend
from fm_engine.ops import BackendUnsupportedError
from fm_engine.ops.cross_attention import cross_attention, cross_attention_reference
from fm_engine.testing import assert_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def key_tile(dtype: torch.dtype, d: int) -> int:
    """Keys per forward tile of the kernels here (16 in the interpreter)."""
    return K.candidates("fwd", dtype, d, None, False, False)[0]["BLOCK_N"]


def at_tile(n: int, tile: int) -> int:
    """``n``, written for 16-key tiles, at the same place relative to ``tile``-key tiles: 15 -> tile - 1,
    33 -> 2 tile + 1, 50 -> 3 tile + 2 (the identity for tile 16)."""
    whole = round(n / 16)
    return whole * tile + n - 16 * whole


@pytest.fixture(autouse=True)
def _interpreter_key_splits(request: pytest.FixtureRequest, device: torch.device, monkeypatch: pytest.MonkeyPatch):
    """On a GPU, split the keys of every multi-tile call up to 3 ways as the interpreter does, so the small
    shapes below run the split merge there too (gpu-marked tests keep the GPU's own policy)."""
    if device.type == "cuda" and request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(K, "num_splits", lambda programs, n_kblocks, dev: min(3, n_kblocks))
        monkeypatch.setattr(K, "bwd_splits", lambda kv_programs, n_kblocks, dev: min(3, n_kblocks))


def qkv(b: int, hq: int, hkv: int, nq: int, nk: int, d: int, dtype: torch.dtype, device: torch.device):
    q = torch.randn(b, hq, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, nk, d, device=device, dtype=dtype)
    return q, k, v


def _replayed_seed(torch_seed: int) -> int:
    """The dropout seed a fast backend draws right after ``torch.manual_seed(torch_seed)``."""
    from fm_engine.kernels._attention_dropout import draw_seed

    torch.manual_seed(torch_seed)
    return draw_seed()


def check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> None:
    hkv = k.shape[1]
    # with a single (valid) key the softmax is constant: dq and dk are exactly 0 and only rounding noise
    # remains, which a relative bound cannot judge; dv (= sum of dO over the queries) is still checked
    valid = torch.full((k.shape[0],), k.shape[2]) if key_padding_mask is None else (~key_padding_mask).sum(1)
    grad = [False, False, True] if bool((valid == 1).any()) else True
    kw = {"kv_heads": hkv, "scale": scale, "key_padding_mask": key_padding_mask, "dropout_p": dropout_p}
    masked = "" if key_padding_mask is None else f" {int(key_padding_mask.sum())} padding keys"
    torch_seed = int(torch.randint(0, 2**31 - 1, (1,)))

    def fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(torch_seed)  # the kernels' dropout seed is the next draw (replayed below)
        return cross_attention(q, k, v, backend="triton", **kw)

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        mask = None
        if dropout_p > 0:  # the kernels' own keep mask, [B, Hq, Nq, Nk]
            mask = dropout_keep_mask(_replayed_seed(torch_seed), (*q.shape[:3], k.shape[2]), dropout_p, q.device)
        return cross_attention_reference(q, k, v, dropout_mask=mask, **kw)

    with ops.trace() as calls:
        assert_parity(
            fast,
            reference,
            [q, k, v],
            grad=grad,
            name=f"cross_attention q{tuple(q.shape)} k{tuple(k.shape)} {q.dtype}{masked} p={dropout_p}",
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
    b, hq, hkv, nq, nk, d = shape
    t = key_tile(dtype, d)
    check(*qkv(b, hq, hkv, at_tile(nq, t), at_tile(nk, t), d, dtype, device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity_random_shapes(dtype: torch.dtype, device: torch.device) -> None:
    hkv = int(torch.randint(1, 3, ()))
    group = int(torch.randint(1, 3, ()))
    nq = int(torch.randint(1, 40, ()))
    nk = int(torch.randint(2, 60, ()))
    d = [16, 32, 64][int(torch.randint(0, 3, ()))]
    t = key_tile(dtype, d)
    check(*qkv(1, hkv * group, hkv, at_tile(nq, t), at_tile(nk, t), d, dtype, device))


def test_custom_scale_and_large_logits(device: torch.device) -> None:
    t = key_tile(torch.bfloat16, 32)
    q, k, v = qkv(1, 2, 1, at_tile(20, t), at_tile(40, t), 32, torch.bfloat16, device)
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
    t = key_tile(torch.float32, 16)
    q, k, v = qkv(1, 2, 1, at_tile(18, t), at_tile(75, t), 16, torch.float32, device)  # 5 key tiles
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


# --- key-padding mask ---------------------------------------------------------------------------
#
# In 16-key tiles (at_tile moves them to the real tile), with keys split up to 3 ways (the interpreter's
# kernels/cross_attention.py: num_splits, and _interpreter_key_splits on a GPU): with Nk 50 (4 key tiles,
# the last partial) the forward and dQ run 2 splits of 2 tiles (keys 0..31 and 32..49), and with Nk 33
# (3 tiles) 3 splits of one tile each.


def padding_mask(b: int, nk: int, device: torch.device, whole: tuple[int, int] | None = None) -> torch.Tensor:
    """Random padding (about 40% of the keys); keys ``whole[0]:whole[1]`` of batch 0 all padding;
    every key of the last batch element padding when b > 1 (its queries see no key at all)."""
    m = torch.rand(b, nk, device=device) < 0.4
    m[:, 0] = False  # batch 0 keeps a valid key whatever the random draw
    if whole is not None:
        m[0, whole[0] : whole[1]] = True
    if b > 1:
        m[-1] = True
    return m


# (B, Hq, Hkv, Nq, Nk, D, padded key range of batch 0)
MASK_SHAPES = [
    (2, 2, 1, 17, 50, 16, (16, 32)),  # group 2, a whole key tile padding (between two valid tiles)
    (2, 2, 1, 17, 50, 16, (1, 32)),  # ... and a whole split (keys 0..31 but the first) but one key
    (3, 2, 2, 1, 33, 32, (16, 32)),  # Nq 1, group 1: a whole one-tile split padding
    (2, 4, 2, 16, 50, 64, (32, 50)),  # the last (partial) tile and the last split all padding
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_mask_parity(shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    b, hq, hkv, nq, nk, d, whole = shape
    t = key_tile(dtype, d)
    nq, nk, whole = at_tile(nq, t), at_tile(nk, t), (at_tile(whole[0], t), at_tile(whole[1], t))
    mask = padding_mask(b, nk, device, whole)
    check(*qkv(b, hq, hkv, nq, nk, d, dtype=dtype, device=device), key_padding_mask=mask)


def test_mask_parity_random_shapes(device: torch.device) -> None:
    dtype = DTYPES[int(torch.randint(0, 3, ()))]
    hkv, group = int(torch.randint(1, 3, ())), int(torch.randint(1, 3, ()))
    nq, nk = int(torch.randint(1, 40, ())), int(torch.randint(2, 70, ()))
    t = key_tile(dtype, 16)
    nq, nk = at_tile(nq, t), at_tile(nk, t)
    b = int(torch.randint(1, 3, ()))
    mask = torch.rand(b, nk, device=device) < float(torch.rand(()))
    mask[:, torch.randperm(nk)[:2]] = False  # two valid keys: dq and dk are not just rounding noise
    check(*qkv(b, hkv * group, hkv, nq, nk, 16, dtype, device), key_padding_mask=mask)


def test_mask_strided_and_whole_split_merge_exactly(device: torch.device) -> None:
    """A non-contiguous mask; every split count gives the same output, log-sum-exp and gradients,
    including splits whose keys are all padding; padding keys get dK = dV = 0 exactly; a query whose
    keys are all padding gets o = 0, log-sum-exp -inf and zero gradients (the reference's SDPA gives 0)."""
    t = key_tile(torch.float32, 16)
    b, nk = 3, at_tile(75, t)  # 5 key tiles
    q, k, v = qkv(b, 2, 1, at_tile(18, t), nk, 16, torch.float32, device)
    wide = torch.rand(b, 2 * nk, device=device) < 0.3
    mask = wide[:, 5 : 5 + nk]  # batch stride 2 * nk: the kernels read it in place
    assert not mask.is_contiguous()
    mask[0, : 3 * t] = True  # 3 whole tiles: whole splits for every split count here
    mask[0, at_tile(70, t)] = False
    mask[1] = True  # batch 1: no valid key
    mask[2, at_tile(60, t) :] = True
    scale = 16**-0.5
    do = torch.randn_like(q)
    o1, lse1 = K.forward(q, k, v, 1, scale, mask, splits=1)
    g1 = K.backward(do, q, k, v, o1, lse1, 1, scale, mask, splits=1)
    for splits in (2, 5):  # key tiles 0-2 / 3-4 and one tile each: tiles 0-2 are padding in batch 0
        o, lse = K.forward(q, k, v, 1, scale, mask, splits=splits)
        torch.testing.assert_close(o, o1, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(lse, lse1, rtol=2e-6, atol=2e-6)
        g = K.backward(do, q, k, v, o, lse, 1, scale, mask, splits=splits)
        for a, c in zip(g, g1, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)
    ref = cross_attention_reference(q.double(), k.double(), v.double(), kv_heads=1, key_padding_mask=mask)
    torch.testing.assert_close(o1.double(), ref, rtol=1e-5, atol=1e-5)
    assert bool((o1[1] == 0).all()) and bool((lse1[1] == float("-inf")).all())
    assert torch.isfinite(lse1[[0, 2]]).all()
    dq, dk, dv = g1
    assert bool((dq[1] == 0).all())
    pad = mask[:, None, :, None].expand_as(dk)
    assert bool((dk[pad] == 0).all()) and bool((dv[pad] == 0).all())
    assert bool((dk[~pad] != 0).any()) and bool((dv[~pad] != 0).any())


def test_mask_under_torch_compile(device: torch.device) -> None:
    """fullgraph compile with a key-padding mask (an optional tensor argument of the custom ops)."""
    q, k, v = (t.requires_grad_() for t in qkv(2, 4, 2, 20, 40, 32, torch.float32, device))
    mask = padding_mask(2, 40, device, (0, 16))
    compiled = torch.compile(
        lambda q, k, v, m: cross_attention(q, k, v, kv_heads=2, key_padding_mask=m, backend="triton"),
        fullgraph=True,
        backend="aot_eager",
    )
    with ops.trace() as calls:
        o = compiled(q, k, v, mask)
    assert calls == [("cross_attention", "triton")]
    g = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v), g)
    ref = cross_attention_reference(q, k, v, kv_heads=2, key_padding_mask=mask)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_module_with_mask_runs_triton(dtype: torch.dtype, device: torch.device) -> None:
    """fm_engine.nn.Attention with a key-padding mask (the M-JEPA predictor's call) runs on the Triton kernels
    (named with use_backend), and matches the module on the reference backend (output and every parameter
    gradient)."""
    from fm_engine.nn import Attention
    from fm_engine.testing import assert_parity_tensor

    attn = Attention(32, heads=4, kv_heads=2, head_dim=16).to(device).to(dtype)
    x = torch.randn(2, 21, 32, device=device, dtype=dtype)
    mask = padding_mask(2, 21, device)
    mask[1] = False
    mask[1, 13:] = True  # ragged: batch 1 has 13 tokens then padding
    g = torch.randn(2, 21, 32, device=device, dtype=dtype)

    def run(module: torch.nn.Module, cast: torch.dtype, backend: str) -> tuple[torch.Tensor, dict]:
        module = module.to(cast)
        module.zero_grad()
        with use_backend(backend), ops.trace() as calls:
            y = module(x.to(cast), key_padding_mask=mask)
        assert calls == [("cross_attention", backend)]
        y.backward(g.to(cast))
        return y, {n: p.grad.clone() for n, p in module.named_parameters()}

    attn64 = Attention(32, heads=4, kv_heads=2, head_dim=16).to(device).double()
    attn64.load_state_dict(attn.state_dict())  # the same (rounded) weights, upcast
    y_t, gr_t = run(attn, dtype, "triton")
    y_r, gr_r = run(attn, dtype, "reference")
    y_h, gr_h = run(attn64, torch.float64, "reference")
    assert_parity_tensor("attention output", y_t, y_r, y_h, dtype)
    for n in gr_h:
        assert_parity_tensor(f"grad {n}", gr_t[n], gr_r[n], gr_h[n], dtype)


# --- what the Triton backend refuses (and automatic dispatch sends to the reference) ---------------


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"d": 48}, "head_dim 48"),
        ({"d": 48, "dropout_p": 0.1}, "head_dim 48"),
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


def test_triton_accepts_a_plain_call(device: torch.device) -> None:
    q, k, v = qkv(1, 2, 1, 5, 9, 32, torch.bfloat16, device)
    ex = ops.explain(cross_attention, q, k, v, kv_heads=1, backend="triton")
    assert ex.chosen == "triton" and {v.backend: v.ok for v in ex.verdicts}["triton"], str(ex)


# --- attention dropout inside the kernels ---------------------------------------------------------------

# (B, Hq, Hkv, Nq, Nk, D, dtype, p, padded): partial query / key tiles and the interpreter's 3-way key split
DROPOUT_CASES = [
    (1, 2, 1, 17, 33, 16, torch.float32, 0.3, False),
    (2, 4, 2, 16, 50, 32, torch.bfloat16, 0.1, True),
    (1, 2, 2, 5, 40, 64, torch.float16, 0.5, False),
    (2, 2, 1, 20, 50, 16, torch.float32, 0.2, True),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"B{c[0]}-Nq{c[3]}-Nk{c[4]}-{c[6]}-p{c[7]}-pad{c[8]}")
def test_dropout_parity(case: tuple, device: torch.device) -> None:
    """Output and every gradient against the reference applying the kernels' own keep mask."""
    *dims, dtype, p, padded = case
    mask = padding_mask(dims[0], dims[4], device, (16, 32)) if padded else None
    check(*qkv(*dims, dtype=dtype, device=device), key_padding_mask=mask, dropout_p=p)


def test_dropout_seed_is_reproducible_and_fresh(device: torch.device) -> None:
    q, k, v = qkv(1, 2, 1, 9, 20, 16, torch.float32, device)
    kw = {"kv_heads": 1, "dropout_p": 0.5, "backend": "triton"}
    torch.manual_seed(11)
    a = cross_attention(q, k, v, **kw)
    b = cross_attention(q, k, v, **kw)
    torch.manual_seed(11)
    assert torch.equal(a, cross_attention(q, k, v, **kw)) and not torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_rate(p: float, device: torch.device) -> None:
    """The keep mask (shared by the three attention kernels) keeps 1 - p of the elements, in every one of the
    four Philox words, in every row and column position, and independently of the neighbouring row."""
    rows, nk = 512, 259  # Nk not a multiple of 4: rows start new quads
    m = dropout_keep_mask(12345, (rows, nk), p, device).cpu()
    n = m.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(m.float().mean()) - (1 - p)) < 5 * sigma
    for w in range(4):  # each word of the 4x Philox output
        mw = m[:, w::4].float()
        assert abs(float(mw.mean()) - (1 - p)) < 5 * (p * (1 - p) / mw.numel()) ** 0.5
    per_col = m.float().mean(0)  # 512 draws per column
    assert float((per_col - (1 - p)).abs().max()) < 5.5 * (p * (1 - p) / rows) ** 0.5
    both = (m[1:] & m[:-1]).float().mean()  # P(keep, keep) of vertical neighbours = (1 - p)^2
    assert abs(float(both) - (1 - p) ** 2) < 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5
    assert not torch.equal(m, dropout_keep_mask(12346, (rows, nk), p, device).cpu())
    # a mask element depends only on (seed, row, key), not on how the rows are shaped
    assert torch.equal(m.reshape(8, 64, nk), dropout_keep_mask(12345, (8, 64, nk), p, device).cpu())


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
    for bad in (
        torch.zeros(1, 9, device=device),  # float, not bool
        torch.zeros(1, 9, dtype=torch.uint8, device=device),
        torch.zeros(1, 10, dtype=torch.bool, device=device),  # Nk + 1 keys
        torch.zeros(9, dtype=torch.bool, device=device),  # no batch dim
        torch.zeros(2, 9, dtype=torch.bool, device=device),  # wrong batch
        torch.zeros(1, 1, 9, dtype=torch.bool, device=device),
    ):
        for backend in (None, "triton"):
            with pytest.raises(ValueError, match="key_padding_mask: expected a bool tensor"):
                cross_attention(q, k, v, kv_heads=2, key_padding_mask=bad, backend=backend)
    with pytest.raises(ValueError, match="key_padding_mask"):
        cross_attention(q, k, v, kv_heads=2, key_padding_mask=[[False] * 9])
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


@pytest.mark.gpu
def test_gpu_dropout_parity_avit_shape() -> None:
    """Attention dropout 0.1 (MiT-UB's default) at the AViT shape, B 1, against the replayed mask."""
    check(*qkv(1, 8, 4, 768, 27648, 64, torch.bfloat16, torch.device("cuda")), dropout_p=0.1)
