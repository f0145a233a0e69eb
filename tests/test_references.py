"""Each op's eager reference checked on its own against the literal definitions of tests/literal.py.

The kernel tests use the references as their oracle (``assert_parity`` runs the same reference for its
low-precision and float64 sides), so a bug in a reference would pass them. Here every reference is compared,
forward and gradient, in float64, with a definition written out element by element, token by token, at the
special values (+-inf, NaN, -0.0, empty tensors, length-1 axes) and at every non-default setting it takes.
"""

from __future__ import annotations

import math

import literal as L
import pytest
import torch

from fm_engine import ops
from fm_engine.ops.cross_attention import cross_attention_reference
from fm_engine.ops.patch_embed import patch_embed_reference
from fm_engine.ops.relu2 import relu2_mlp_reference, relu2_reference
from fm_engine.ops.temporal_attention import temporal_attention_reference
from fm_engine.ops.window_attention import geometry, window_attention_reference

F64 = torch.float64
INF, NAN = math.inf, math.nan
SPECIAL = [-INF, -1e300, -2.5, -1.0, -1e-300, -0.0, 0.0, 1e-300, 0.5, 3.0, 1e150, INF, NAN]


def same(actual: torch.Tensor, expected: torch.Tensor, *, signs: bool = False, tol: float = 1e-12) -> None:
    """Equal up to rounding, NaN where NaN; ``signs``: the sign bits of zeros must match too."""
    expected = expected.to(actual.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)
    if signs:
        assert torch.equal(torch.signbit(actual), torch.signbit(expected)), (actual, expected)


def grads_match(ref_out: torch.Tensor, lit_out: torch.Tensor, inputs: dict[str, torch.Tensor], tol=1e-10) -> None:
    """Backpropagate one random output gradient through both graphs; every input gets the same gradient."""
    names = [n for n, t in inputs.items() if t.requires_grad]
    dy = torch.randn_like(ref_out)
    g_ref = torch.autograd.grad(ref_out, [inputs[n] for n in names], dy, allow_unused=True)
    g_lit = torch.autograd.grad(lit_out, [inputs[n] for n in names], dy, allow_unused=True)
    for n, a, b in zip(names, g_ref, g_lit, strict=True):
        a = torch.zeros_like(inputs[n]) if a is None else a
        b = torch.zeros_like(inputs[n]) if b is None else b
        try:
            same(a, b, tol=tol)
        except AssertionError as e:
            raise AssertionError(f"gradient of {n}: {e}") from None


def leaf(*shape: int, low: float | None = None) -> torch.Tensor:
    t = torch.randn(*shape, dtype=F64)
    if low is not None:
        t = t.abs() + low
    return t.requires_grad_()


# --- relu2 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu2_reference_special_values(dtype: torch.dtype) -> None:
    x = torch.tensor(SPECIAL, dtype=dtype)
    y = relu2_reference(x)
    same(y, L.relu2(x), signs=True)  # +0.0 for every x <= 0: -0.0 is a bug; 0 at -inf, never NaN
    assert y.dtype == dtype
    xg = x.clone().requires_grad_()
    dy = torch.rand(len(SPECIAL), dtype=dtype) + 0.5
    (g,) = torch.autograd.grad(relu2_reference(xg), xg, dy)
    same(g, L.relu2_grad(x, dy))


def test_relu2_reference_shapes() -> None:
    for shape in [(0,), (3, 0, 2), (1,), (), (1, 1, 1), (4, 5)]:
        x = torch.randn(shape, dtype=F64)
        y = relu2_reference(x)
        same(y, L.relu2(x), signs=True)
        xg = x.clone().requires_grad_()
        dy = torch.randn(shape, dtype=F64)
        (g,) = torch.autograd.grad(relu2_reference(xg), xg, dy)
        same(g, L.relu2_grad(x, dy))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_relu2_fast_backends_special_values(backend: str, device: torch.device) -> None:
    # the kernels at the same special values, against the literal definition rather than the reference
    x = torch.tensor(SPECIAL, dtype=torch.float32, device=device)
    v = ops.get_op("relu2").verdict(backend, (x,), {})
    if not v.ok:
        pytest.skip(v.reason)
    xg = x.clone().requires_grad_()
    y = ops.relu2(xg, backend=backend)
    same(y.cpu(), L.relu2(x.cpu()).float(), signs=True, tol=1e-6)
    dy = torch.rand_like(x) + 0.5
    (g,) = torch.autograd.grad(y, xg, dy)
    same(g.cpu(), L.relu2_grad(x.cpu(), dy.cpu()).float(), tol=1e-6)


# --- relu2_mlp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4, 6, 3), (2, 3, 4, 8, 2), (1, 1, 1, 1), (0, 3, 4, 2)])
def test_relu2_mlp_reference(shape: tuple[int, ...]) -> None:
    *lead, d, h, o = shape
    x, w1, w2 = leaf(*lead, d), leaf(h, d), leaf(o, h)
    ins = {"x": x, "w1": w1, "w2": w2}
    y = relu2_mlp_reference(x, w1, w2)
    ly = L.relu2_mlp(x, w1, w2)
    same(y, ly)
    if y.numel():
        grads_match(y, ly, ins)


def test_relu2_mlp_reference_infinite_and_nan_preactivations() -> None:
    x = torch.tensor([[-INF, 1.0], [NAN, 1.0], [1.0, 1.0]], dtype=F64)
    w1 = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64)  # hidden 0 = x[:, 0]
    w2 = torch.tensor([[1.0, 1.0], [2.0, -1.0]], dtype=F64)
    y = relu2_mlp_reference(x, w1, w2)
    # -inf pre-activation: relu² gives 0, not NaN; hidden 1 = 0.5 * (-inf) + 0.5 = -inf too: row 0 is all zeros
    same(y, L.relu2_mlp(x, w1, w2))
    assert torch.equal(y[0], torch.zeros(2, dtype=F64)) and torch.isnan(y[1]).all()


def test_relu2_mlp_reference_dropout_scales_the_squared_hidden() -> None:
    p = 0.4
    x = torch.rand(6, 3, dtype=F64) + 0.1
    w1 = torch.rand(8, 3, dtype=F64) + 0.1  # every pre-activation > 0: a zero after dropout is a dropped unit
    w2 = torch.randn(5, 8, dtype=F64)
    torch.manual_seed(7)
    hidden = relu2_mlp_reference(x, w1, torch.eye(8, dtype=F64), p)  # the dropped squared hidden itself
    keep = hidden != 0
    assert 0 < keep.sum() < keep.numel()
    a = L.relu2_mlp(x, w1, torch.eye(8, dtype=F64))
    same(hidden[keep], a[keep] / (1 - p))  # kept units scaled by 1 / (1 - p), after the square
    torch.manual_seed(7)  # the same draw again, through w2
    xg, w1g, w2g = (t.clone().requires_grad_() for t in (x, w1, w2))
    y = relu2_mlp_reference(xg, w1g, w2g, p)
    ly = L.relu2_mlp(xg, w1g, w2g, keep=keep, p=p)
    same(y, ly)
    grads_match(y, ly, {"x": xg, "w1": w1g, "w2": w2g})


# --- cross_attention ------------------------------------------------------------------------------------


CROSS_CASES = {
    "gqa": dict(B=2, Hq=4, kv=2, Nq=3, Nk=5, D=4),
    "mha": dict(B=1, Hq=3, kv=3, Nq=2, Nk=4, D=3),
    "one-kv-head": dict(B=1, Hq=4, kv=1, Nq=2, Nk=3, D=2),
    "length-1": dict(B=1, Hq=1, kv=1, Nq=1, Nk=1, D=1),
}


@pytest.mark.parametrize("name", list(CROSS_CASES))
@pytest.mark.parametrize("variant", ["plain", "scale", "mask", "dropout", "mask-dropout"])
def test_cross_attention_reference(name: str, variant: str) -> None:
    c = CROSS_CASES[name]
    q, k, v = (
        leaf(c["B"], c["Hq"], c["Nq"], c["D"]),
        leaf(c["B"], c["kv"], c["Nk"], c["D"]),
        leaf(c["B"], c["kv"], c["Nk"], c["D"]),
    )
    kw: dict = {"kv_heads": c["kv"]}
    lit: dict = {}
    if variant == "scale":
        kw["scale"] = 2.7
    if variant in ("mask", "mask-dropout"):
        mask = torch.rand(c["B"], c["Nk"]) < 0.4
        mask[0] = True  # batch 0: every key padding -> output 0, gradients 0
        if c["B"] > 1:
            mask[1, 0] = False
        kw["key_padding_mask"] = mask
    if variant in ("dropout", "mask-dropout"):
        kw["dropout_p"] = lit["p"] = 0.3
        kw["dropout_mask"] = lit["keep"] = torch.rand(c["B"], c["Hq"], c["Nq"], c["Nk"]) > 0.3
    y = cross_attention_reference(q, k, v, **kw)
    ly = L.cross_attention(q, k, v, kv_heads=c["kv"], scale=kw.get("scale"),
                           key_padding_mask=kw.get("key_padding_mask"), **lit)  # fmt: skip
    same(y, ly)
    if variant != "plain" and "mask" in variant:
        assert torch.equal(y[0], torch.zeros_like(y[0]))
    grads_match(y, ly, {"q": q, "k": k, "v": v})


def test_cross_attention_reference_large_logits_stay_finite() -> None:
    q, k, v = leaf(1, 2, 3, 4), leaf(1, 1, 5, 4), leaf(1, 1, 5, 4)
    y = cross_attention_reference(q, k, v, kv_heads=1, scale=300.0)
    ly = L.cross_attention(q, k, v, kv_heads=1, scale=300.0)
    assert torch.isfinite(y).all()
    same(y, ly, tol=1e-9)
    grads_match(y, ly, {"q": q, "k": k, "v": v}, tol=1e-8)


# --- temporal_attention ----------------------------------------------------------------------------------

TEMPORAL_CASES = {
    "strided-qk": dict(B=2, T=3, C=4, H=2, W=2, Hq=1, Wq=1, n_head=2),
    "head-splits-a-channel": dict(B=1, T=4, C=2, H=2, W=3, Hq=2, Wq=3, n_head=4),  # 12 values / 4 heads: 3 each
    "one-frame": dict(B=1, T=1, C=2, H=2, W=2, Hq=2, Wq=2, n_head=1),
}
TEMPORAL_FLAGS = {
    "plain": {},
    "scale": {"scale": 0.37},
    "cosine": {"cosine": True},
    "cosine-and-normalize": {"cosine": True, "normalize_qk": True},
    "normalize_qk": {"normalize_qk": True},
    "causal": {"causal": True},
    "dropout": {"dropout_p": 0.25},
}


@pytest.mark.parametrize("name", list(TEMPORAL_CASES))
@pytest.mark.parametrize("flags", list(TEMPORAL_FLAGS))
def test_temporal_attention_reference(name: str, flags: str) -> None:
    c = TEMPORAL_CASES[name]
    kw = dict(TEMPORAL_FLAGS[flags])
    q, k = leaf(c["B"], c["T"], c["C"], c["Hq"], c["Wq"]), leaf(c["B"], c["T"], c["C"], c["Hq"], c["Wq"])
    v = leaf(c["B"], c["T"], c["C"], c["H"], c["W"])
    lit = dict(kw)
    if "dropout_p" in kw:
        kw["dropout_mask"] = lit["keep"] = torch.rand(c["B"], c["n_head"], c["T"], c["T"]) > 0.25
        lit["p"] = lit.pop("dropout_p")
    y = temporal_attention_reference(q, k, v, n_head=c["n_head"], **kw)
    ly = L.temporal_attention(q, k, v, n_head=c["n_head"], **lit)
    same(y, ly)
    grads_match(y, ly, {"q": q, "k": k, "v": v})


# --- window_attention -------------------------------------------------------------------------------------

WINDOW_CASES = {
    # local: 2 x 1 windows of 2 x 2 patches of 1 x 2 pixels (v); q, k at half width
    "local": dict(shape=(1, 2, 2, 4, 8), q_hw=(4, 4), mode="local", num_patches=(2, 2), patch_size=(1, 2), n_head=2),
    # global: 2 x 1 windows (rectangular grid), 1 x 2 patches per window of 2 x 1 pixels
    "global": dict(shape=(2, 1, 2, 4, 2), q_hw=(4, 2), mode="global", num_windows=(2, 1), patch_size=(2, 1), n_head=1),
    # one token per group (N = 1)
    "one-token": dict(shape=(1, 1, 2, 2, 2), q_hw=(2, 2), mode="local", num_patches=1, patch_size=2, n_head=2),
}
WINDOW_FLAGS = {
    "plain": {},
    "scale": {"scale": 1.9},
    "cosine": {"cosine": True},
    "normalize_qk": {"normalize_qk": True},
    "bias": {"rel_pos_bias": True},
    "dropout": {"dropout_p": 0.3},
}


@pytest.mark.parametrize("name", list(WINDOW_CASES))
@pytest.mark.parametrize("flags", list(WINDOW_FLAGS))
def test_window_attention_reference(name: str, flags: str) -> None:
    c = dict(WINDOW_CASES[name])
    shape, q_hw = c.pop("shape"), c.pop("q_hw")
    kw = dict(WINDOW_FLAGS[flags])
    B, T, C = shape[:3]
    q, k, v = leaf(B, T, C, *q_hw), leaf(B, T, C, *q_hw), leaf(*shape)
    ins = {"q": q, "k": k, "v": v}
    g = geometry(q, v, mode=c["mode"], num_patches=c.get("num_patches"),
                                                     num_windows=c.get("num_windows"), patch_size=c["patch_size"],
                                                     n_head=c["n_head"])  # fmt: skip
    if flags == "normalize_qk" and g.hc_qk < 2:
        pytest.skip("normalize_qk needs a head dim of at least 2")
    lit = dict(kw)
    if kw.get("rel_pos_bias"):
        kw["rel_pos_bias"] = lit["rel_pos_bias"] = ins["bias"] = leaf(c["n_head"], g.n_tokens, g.n_tokens)
    if "dropout_p" in kw:
        keep = torch.rand(B, T, g.n_groups, c["n_head"], g.n_tokens, g.n_tokens) > 0.3
        kw["dropout_mask"] = lit["keep"] = keep
        lit["p"] = lit.pop("dropout_p")
    y = window_attention_reference(q, k, v, **c, **kw)
    ly = L.window_attention(q, k, v, **c, **lit)
    same(y, ly)
    grads_match(y, ly, ins)


# --- patch_embed -------------------------------------------------------------------------------------------

PATCH_CASES = {
    "plain": dict(image=(2, 1, 8, 12), patch=4),
    "pooled": dict(image=(1, 2, 12, 20), patch=4, pool_to=(2, 3)),  # 3 x 5 grid -> 2 x 3: overlapping bins
    "one-row": dict(image=(1, 1, 4, 12), patch=4),  # Ht = 1: u = 0, not NaN
    "one-token": dict(image=(1, 3, 8, 8), patch=4, pool_to=(1, 1)),
    "intensity-eps": dict(image=(1, 1, 8, 8), patch=2, intensity_scale=0.01, intensity_offset=-3.0, eps=0.5),
}


@pytest.mark.parametrize("name", list(PATCH_CASES))
@pytest.mark.parametrize("image_dtype", [torch.uint8, torch.float64])
def test_patch_embed_reference(name: str, image_dtype: torch.dtype) -> None:
    c = dict(PATCH_CASES[name])
    ishape = c.pop("image")
    C = ishape[1]
    D, p = 5, c["patch"]
    image = (torch.rand(ishape) * 255).round().to(image_dtype)
    params = {
        "weight": leaf(D, C, p, p),
        "bias": leaf(D),
        "norm_weight": leaf(D),
        "norm_bias": leaf(D),
        "pos_weight": leaf(D, 2),
        "pos_bias": leaf(D),
    }
    y = patch_embed_reference(image, *params.values(), **c)
    ly = L.patch_embed(image, *params.values(), **c)
    assert y.dtype == F64  # fp64 parameters: fp64 all through
    same(y, ly, tol=1e-9)
    grads_match(y, ly, params, tol=1e-9)


def test_patch_embed_reference_output_dtype() -> None:
    image = torch.randint(0, 4096, (1, 1, 8, 8), dtype=torch.int16)
    D = 4
    params = [
        torch.randn(D, 1, 4, 4),
        torch.randn(D),
        torch.randn(D),
        torch.randn(D),
        torch.randn(D, 2),
        torch.randn(D),
    ]
    ly = L.patch_embed(image, *[t.double() for t in params], patch=4, intensity_scale=1 / 4096)
    for out_dtype in (None, torch.bfloat16, torch.float16):
        y = patch_embed_reference(image, *params, patch=4, intensity_scale=1 / 4096, out_dtype=out_dtype)
        assert y.dtype == (out_dtype or torch.float32)
        same(y.double(), ly, tol=1e-2 if out_dtype else 1e-5)
