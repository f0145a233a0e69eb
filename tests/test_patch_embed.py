"""patch_embed (KERNELS.md K5): the Triton stem vs the reference, outputs and every parameter gradient.

The stem must match an fp64 reference to fp32 rounding (normwise relative error <= 1e-5) for raw
integer images at full range, whatever TF32 and autocast say. Interpreter tiles: 16 tokens x 16 of
the patch dimension, so grids and patch sizes below cross tile edges (on a GPU the tiles are larger, and
the same shapes are single partial tiles).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fm_engine import ops
from fm_engine.ops import BackendUnsupportedError
from fm_engine.ops.patch_embed import patch_embed, patch_embed_reference
from fm_engine.testing import assert_parity, assert_parity_tensor


def raw_image(b: int, c: int, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random pixels over the dtype's full range (both extremes always present)."""
    if dtype.is_floating_point:
        return torch.randn(b, c, h, w, device=device).to(dtype)
    info = torch.iinfo(dtype)
    x = torch.randint(int(info.min), int(info.max) + 1, (b, c, h, w), dtype=torch.int64)
    x.view(-1)[0], x.view(-1)[-1] = int(info.min), int(info.max)
    return x.to(dtype).to(device)


def stem_params(c: int, dim: int, patch: int, device: torch.device) -> list[torch.Tensor]:
    """weight, bias, norm_weight, norm_bias, pos_weight, pos_bias (fp32)."""
    w = torch.randn(dim, c, patch, patch, device=device) / patch
    return (
        [w]
        + [torch.randn(dim, device=device) for _ in range(3)]
        + [torch.randn(dim, 2, device=device)]
        + [torch.randn(dim, device=device)]
    )


SCALE = {torch.uint8: 1 / 255, torch.uint16: 1 / 65535, torch.int16: 1 / 32768, torch.float32: 1.0, torch.bfloat16: 1.0}


def check(image: torch.Tensor, params: list[torch.Tensor], **kw: object) -> None:
    kw.setdefault("intensity_scale", SCALE[image.dtype])
    with ops.trace() as calls:
        assert_parity(
            lambda *p: patch_embed(image, *p, backend="triton", **kw),
            lambda *p: patch_embed_reference(image, *p, **kw),
            params,
            name=f"patch_embed {image.dtype} {tuple(image.shape)} {kw}",
        )
    assert calls[0] == ("patch_embed", "triton")


# (image dtype, B, C, H, W, patch, dim, pool_to)
CASES = [
    (torch.uint16, 2, 1, 32, 48, 4, 24, (3, 5)),  # non-divisible bins (8 -> 3, 12 -> 5), batch 2
    (torch.uint16, 1, 1, 64, 16, 4, 32, None),  # 16 x 4 grid: a full token tile, patch dim 16 = one k tile
    (torch.uint8, 1, 3, 12, 20, 2, 40, (1, 4)),  # pooled axis of length 1 -> position 0, 3 channels
    (torch.int16, 1, 1, 8, 64, 8, 32, None),  # negative pixels, 1 x 8 grid (axis of length 1)
    (torch.float32, 1, 2, 20, 12, 4, 17, (5, 3)),  # odd dim (masked feature lanes), pool to the full grid
    (torch.bfloat16, 1, 1, 36, 12, 2, 16, (7, 6)),  # 18 x 6 -> 7 x 6: overlapping bins, 17-token grid rows
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-{c[3]}x{c[4]}-p{c[5]}-d{c[6]}-pool{c[7]}")
def test_parity(case: tuple, device: torch.device) -> None:
    dtype, b, c, h, w, p, dim, pool = case
    check(
        raw_image(b, c, h, w, dtype, device),
        stem_params(c, dim, p, device),
        patch=p,
        pool_to=pool,
        intensity_offset=-0.5,
    )


def test_uint16_full_range_is_exact_to_fp32(device: torch.device) -> None:
    """Pixels 0..65535 with a DICOM-style rescale: fp32 rounding of the fp64 result, also in the features."""
    image = raw_image(1, 1, 16, 32, torch.uint16, device)
    params = stem_params(1, 16, 8, device)
    kw = {"patch": 8, "intensity_scale": 0.731, "intensity_offset": -1024.0}
    out = patch_embed(image, *params, backend="triton", **kw)
    ref64 = patch_embed_reference(image, *[p.double() for p in params], **kw)
    assert_parity_tensor("uint16 stem", out, out, ref64, torch.float32)


def test_tf32_and_autocast_do_not_change_the_result(device: torch.device) -> None:
    """TF32 on and autocast bf16: still fp32-exact (checked with out_dtype=float32), and the default
    output is that same fp32 result rounded once to bf16; gradients too."""
    image = raw_image(2, 1, 24, 32, torch.uint16, device)
    params = stem_params(1, 24, 4, device)
    kw = {"patch": 4, "pool_to": (4, 5), "intensity_scale": 1 / 65535}
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y_default = patch_embed(image, *params, backend="triton", **kw)
            check(image, params, out_dtype=torch.float32, **kw)
            y32 = patch_embed(image, *params, backend="triton", out_dtype=torch.float32, **kw)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev
    assert y_default.dtype == torch.bfloat16
    assert torch.equal(y_default, y32.to(torch.bfloat16))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_outputs(out_dtype: torch.dtype, device: torch.device) -> None:
    image = raw_image(1, 1, 16, 24, torch.uint16, device)
    params = stem_params(1, 16, 4, device)
    kw = {"patch": 4, "pool_to": (3, 4), "intensity_scale": 1 / 65535, "out_dtype": out_dtype}
    y = patch_embed(image, *params, backend="triton", **kw)
    assert y.dtype == out_dtype
    ref_lowp = patch_embed_reference(image, *params, **kw)
    ref64 = patch_embed_reference(image, *[p.double() for p in params], **{**kw, "out_dtype": torch.float64})
    assert_parity_tensor("stem output", y, ref_lowp, ref64, out_dtype)


def test_max_pool_routes_ties_like_pytorch(device: torch.device) -> None:
    """Zero conv weights make those features equal (= bias) over every bin while the patches differ,
    so the weight gradient shows where the max pool routed: to the first element of each bin in
    scan order, as adaptive_max_pool2d's backward does (the bins overlap here)."""
    image = raw_image(1, 1, 20, 12, torch.uint8, device)
    params = stem_params(1, 16, 2, device)
    params[0][:8] = 0.0
    check(image, params, patch=2, pool_to=(4, 4))


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_weight_grad_splits(splits: int, device: torch.device) -> None:
    """The token-split weight-gradient GEMM against an fp64 unfold + matmul.

    Splits hold whole token tiles (BLOCK_T: 16 in the interpreter, larger on a GPU): 2 x 3 x gw tokens with
    gw = 5 * BLOCK_T / 16 is just under two tiles, so 2 and 4 requested splits run 2."""
    from fm_engine.kernels import patch_embed as K

    gw = 5 * K.dweight_tiles()["BLOCK_T"] // 16
    n = 2 * 3 * gw
    image = raw_image(2, 2, 12, 4 * gw, torch.int16, device)
    dconv = torch.randn(2, 3 * gw, 24, device=device)
    no_arg = torch.empty(0, dtype=torch.int32, device=device)
    dw = K.weight_grad(image, dconv, no_arg, 4, 1 / 32768, 0.25, splits=splits)
    x = image.double() / 32768 + 0.25
    patches = x.reshape(2, 2, 3, 4, gw, 4).permute(0, 2, 4, 1, 3, 5).reshape(n, 32)
    ref = (dconv.reshape(n, 24).double().T @ patches).reshape(24, 2, 4, 4)
    assert_parity_tensor("dW", dw, dw, ref, torch.float32)


@pytest.mark.parametrize("splits", [1, 4])
def test_weight_grad_pooled_gather(splits: int, device: torch.device) -> None:
    """The pooled weight gradient (a gather of the argmax patches) against an fp64 scatter + matmul."""
    from fm_engine.kernels import patch_embed as K

    image = raw_image(2, 2, 12, 20, torch.uint16, device)
    g = torch.randn(2, 4, 24, device=device)
    arg = torch.randint(0, 15, (2, 4, 24), dtype=torch.int32, device=device)
    dw = K.weight_grad(image, g, arg, 4, 1 / 65535, -0.5, splits=splits)
    dconv = torch.zeros(2, 15, 24, dtype=torch.float64, device=device).scatter_add_(1, arg.long(), g.double())
    x = image.double() / 65535 - 0.5
    patches = x.reshape(2, 2, 3, 4, 5, 4).permute(0, 2, 4, 1, 3, 5).reshape(30, 32)
    ref = (dconv.reshape(30, 24).T @ patches).reshape(24, 2, 4, 4)
    assert_parity_tensor("pooled dW", dw, dw, ref, torch.float32)


def test_under_torch_compile(device: torch.device) -> None:
    """fullgraph compile of the public op on the Triton backend (custom ops), forward and backward,
    under autocast."""
    image = raw_image(1, 1, 16, 24, torch.uint16, device)
    params = [p.requires_grad_() for p in stem_params(1, 16, 4, device)]
    kw = {"patch": 4, "pool_to": (3, 5), "intensity_scale": 1 / 65535}
    compiled = torch.compile(
        lambda img, *p: patch_embed(img, *p, backend="triton", **kw), fullgraph=True, backend="aot_eager"
    )
    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = compiled(image, *params)
    assert y.dtype == torch.bfloat16
    g = torch.randn_like(y, dtype=torch.float32)
    grads = torch.autograd.grad(y.float(), params, g)
    # the reference with the same bf16 output, so both backward passes see the same bf16-rounded dY
    ref = patch_embed_reference(image, *params, out_dtype=torch.bfloat16, **kw)
    ref_grads = torch.autograd.grad(ref.float(), params, g)
    torch.testing.assert_close(y, ref)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_reference_matches_torch_modules(device: torch.device, no_tf32: None) -> None:
    """The reference itself: Conv2d -> AdaptiveMaxPool2d -> LayerNorm -> + Linear(2, D) on linspace grids
    (TF32 off: the reference keeps the conv in fp32, and so must the eager chain it is compared with)."""
    image = raw_image(1, 1, 24, 20, torch.uint16, device)
    w, b, nw, nb, pw, pb = stem_params(1, 8, 4, device)
    y = patch_embed_reference(image, w, b, nw, nb, pw, pb, patch=4, pool_to=(4, 1), intensity_scale=1 / 65535)
    x = image.float() / 65535
    feat = F.adaptive_max_pool2d(F.conv2d(x, w, b, stride=4), (4, 1)).flatten(2).transpose(1, 2)
    coords = torch.stack(torch.meshgrid(torch.linspace(-1, 1, 4), torch.zeros(1), indexing="ij"), -1).reshape(-1, 2)
    expected = F.layer_norm(feat, (8,), nw, nb) + F.linear(coords.to(device), pw, pb)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


# --- refusals and bad inputs ------------------------------------------------------------------------


def test_triton_refusals(device: torch.device) -> None:
    image = raw_image(1, 1, 8, 8, torch.uint16, device)
    params = stem_params(1, 16, 4, device)
    with pytest.raises(BackendUnsupportedError, match=r"image dtype torch\.float64"):
        patch_embed(image.double(), *params, patch=4, backend="triton")
    with pytest.raises(BackendUnsupportedError, match="parameters not all float32"):
        patch_embed(image, *[p.double() for p in params], patch=4, backend="triton")
    img_f = image.float().requires_grad_()
    with pytest.raises(BackendUnsupportedError, match="image requires grad"):
        patch_embed(img_f, *params, patch=4, backend="triton")
    with ops.trace() as calls:
        patch_embed(img_f, *params, patch=4)
    assert calls == [("patch_embed", "reference")]
    ex = ops.explain(patch_embed, image, *params, patch=4, backend="triton")
    assert ex.chosen == "triton" and {v.backend: v.ok for v in ex.verdicts}["triton"], str(ex)


def test_bad_inputs(device: torch.device) -> None:
    image = raw_image(1, 1, 8, 12, torch.uint16, device)
    p = stem_params(1, 16, 4, device)
    with pytest.raises(ValueError, match="image: dtype int32 is not supported"):
        patch_embed(image.int(), *p, patch=4)
    with pytest.raises(ValueError, match="image: expected a 4-D tensor"):
        patch_embed(image[0], *p, patch=4)
    with pytest.raises(ValueError, match="patch: 2 does not match"):
        patch_embed(image, *p, patch=2)
    with pytest.raises(ValueError, match="image: size 8x12 is not divisible by patch 8"):
        patch_embed(image, *stem_params(1, 16, 8, device), patch=8)
    with pytest.raises(ValueError, match="image: 1 channels, weight expects 3"):
        patch_embed(image, *stem_params(3, 16, 4, device), patch=4)
    with pytest.raises(ValueError, match=r"pos_weight: expected shape \(16, 2\)"):
        patch_embed(image, *p[:4], p[4][:, :1], p[5], patch=4)
    with pytest.raises(ValueError, match=r"norm_bias: expected shape \(16,\)"):
        patch_embed(image, p[0], p[1], p[2], p[3][:8], p[4], p[5], patch=4)
    with pytest.raises(ValueError, match=r"pool_to: .* is larger than the token grid"):
        patch_embed(image, *p, patch=4, pool_to=(3, 3))
    with pytest.raises(ValueError, match="pool_to: expected two positive ints"):
        patch_embed(image, *p, patch=4, pool_to=(0, 1))


# --- GPU: parity at the AViT shape ----------------------------------------------------------------


@pytest.mark.gpu
def test_gpu_parity_avit_stem() -> None:
    """uint16 3072 x 2304, patch 16: key/value path kv_dim 256 on the full 192 x 144 grid and query path
    dim 512 pooled to 32 x 24; fp32-exact with TF32 on.

    The pooled path routes each weight gradient to the argmax of its bin; with 393K pooled outputs of
    36 candidates, some bin has two candidates within fp32 rounding of each other, where any two
    correct fp32 computations may pick different winners (a large change of one dW term). So that
    path uses dyadic data (pixels * 2^-16, weights k/8 with |k| <= 2): every conv output is then exact
    in fp32 and fp64 alike, and the routing is the same by construction."""
    dev = torch.device("cuda")
    image = raw_image(1, 1, 3072, 2304, torch.uint16, dev)
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        check(image, stem_params(1, 256, 16, dev), patch=16)
        params = stem_params(1, 512, 16, dev)
        params[0] = torch.randint(-2, 3, params[0].shape, device=dev).float() / 8
        params[1] = torch.randint(-8, 9, params[1].shape, device=dev).float() / 8
        check(image, params, patch=16, pool_to=(32, 24), intensity_scale=2.0**-16)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.mark.gpu
def test_gpu_parity_vit_stem_batch() -> None:
    """The ViT stem at 512 x 384 (32 x 24 tokens), batch 4, float images, bf16 autocast output."""
    dev = torch.device("cuda")
    image = raw_image(4, 1, 512, 384, torch.float32, dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        check(image, stem_params(1, 512, 16, dev), patch=16, out_dtype=torch.float32)
