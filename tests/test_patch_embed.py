"""patch_embed (docs/KERNELS.md K5): the Triton stem vs the reference, outputs and every parameter gradient.

The stem must match an fp64 reference to fp32 rounding (normwise relative error <= 1e-5) for raw
integer images at full range, whatever TF32 and autocast say. Interpreter tiles: 16 tokens x 16 of
the patch dimension, so grids and patch sizes below cross tile edges (on a GPU the tiles are larger, and
the same shapes are single partial tiles).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

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


def smallest_pool_gap(image: torch.Tensor, weight: torch.Tensor, kw: dict) -> float:
    """The smallest gap, over every channel and pooling bin of ``kw["pool_to"]``, between a bin's largest and
    second-largest conv feature (fp64), relative to that channel's largest |feature| (inf where every bin holds
    one token)."""
    x = image.double() * kw.get("intensity_scale", 1.0) + kw.get("intensity_offset", 0.0)
    feat = F.conv2d(x, weight.double(), stride=kw["patch"])  # the conv bias shifts a channel's bin alike
    pool = kw["pool_to"]
    gh, gw = feat.shape[-2:]
    scale = feat.abs().amax(dim=(0, 2, 3)).clamp_min(1e-300)
    gap = float("inf")
    for i in range(pool[0]):
        for j in range(pool[1]):
            rows = slice((i * gh) // pool[0], -(-((i + 1) * gh) // pool[0]))
            cols = slice((j * gw) // pool[1], -(-((j + 1) * gw) // pool[1]))
            win = feat[:, :, rows, cols].flatten(2)
            if win.shape[-1] > 1:
                top = win.topk(2, dim=-1).values
                gap = min(gap, float(((top[..., 0] - top[..., 1]) / scale[None, :]).min()))
    return gap


def check(image: torch.Tensor, params: list[torch.Tensor], separate_maxima: bool = True, **kw: object) -> None:
    """Parity of the Triton stem with the reference, outputs and every parameter gradient. ``separate_maxima``:
    False where a test makes exact ties on purpose (they route like PyTorch)."""
    kw.setdefault("intensity_scale", SCALE[image.dtype])
    params = list(params)  # a redraw below must not change the caller's weights (a test compares runs around it)
    if separate_maxima and kw.get("pool_to") is not None:
        # Max pooling routes a gradient to one token per bin: where two tokens' features tie to within the
        # features' own fp32 rounding, the fp64 reference, the fp32 reference and the kernels may each route to
        # a different one, and a weight gradient differs by a whole patch (seen once in hundreds of draws).
        # The parity rule holds where the maximum is determined: redraw the weight's low-order part until every
        # bin's maximum leads by 1e-5 of the channel's scale (its test construction is kept).
        for _ in range(50):
            if smallest_pool_gap(image, params[0], kw) > 1e-5:
                break
            params[0] = params[0] * (1 + 1e-3 * torch.randn_like(params[0]))
        else:
            raise AssertionError("could not draw conv weights whose pooled maxima are separated")
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


@pytest.mark.parametrize("pool", [None, (3, 2)], ids=["full", "pooled"])
def test_full_range_uint16_large_weights_at_the_error_bound(pool: tuple[int, int] | None, device: torch.device) -> None:
    """The split products' error bound (3·2^-22 |x||w| per product) at its edge: raw uint16 pixels 0..65535
    with a DICOM rescale (|x| up to 5e4 next to an offset of -1024), weights of every magnitude up to 1e4
    with a large shared component (so the products nearly cancel in the LayerNorm's centring), patch 8
    (K 64). fp32-exact against fp64, outputs and every gradient; one TF32 product per term would miss
    the 1e-5 bound by about two orders of magnitude."""
    image = raw_image(2, 1, 48, 32, torch.uint16, device)
    image.view(-1)[1::7] = 65535
    params = stem_params(1, 24, 8, device)
    w = params[0]
    params[0] = (w * torch.exp2(torch.randint(-12, 14, w.shape, device=device).float()) + 3e3).clamp(-1e4, 1e4)
    params[1] = params[1] * 1e6
    check(image, params, patch=8, pool_to=pool, intensity_scale=0.731, intensity_offset=-1024.0)


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
    check(image, params, separate_maxima=False, patch=2, pool_to=(4, 4))


def _dweight_config(split: int) -> triton.Config:
    from fm_engine.kernels import patch_embed as K

    base = K.DWEIGHT_INTERPRETER if not torch.cuda.is_available() else K._dweight_kernel.configs[0]
    return triton.Config({**base.kwargs, "SPLIT": split}, num_warps=base.num_warps, num_stages=base.num_stages)


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_weight_grad_splits(splits: int, device: torch.device) -> None:
    """The token-split 3xTF32 weight-gradient GEMM against an fp64 unfold + matmul."""
    from fm_engine.kernels import patch_embed as K

    image = raw_image(2, 2, 12, 20, torch.int16, device)
    dconv = torch.randn(2, 3 * 5, 24, device=device)
    with K._dweight_kernel.override([_dweight_config(splits)]):
        dw = K.weight_grad(image, dconv, torch.empty(0, dtype=torch.int32, device=device), 4, None, 1 / 32768, 0.25)
    x = image.double() / 32768 + 0.25
    patches = x.reshape(2, 2, 3, 4, 5, 4).permute(0, 2, 4, 1, 3, 5).reshape(30, 32)
    ref = (dconv.reshape(30, 24).double().T @ patches).reshape(24, 2, 4, 4)
    assert_parity_tensor("dW", dw, dw, ref, torch.float32)


@pytest.mark.parametrize("grid", [(8, 8, 3, 5), (9, 7, 4, 3), (6, 10, 6, 1)], ids=str)
def test_weight_grad_pooled_routing(grid: tuple[int, int, int, int], device: torch.device) -> None:
    """Pooled gradients routed back to their argmax conv tokens (bins overlapping or not, the same conv token
    chosen by several bins) and the weight-gradient GEMM, against an fp64 scatter + matmul."""
    from fm_engine.kernels import patch_embed as K

    gh, gw, th, tw = grid
    image = raw_image(2, 2, 4 * gh, 4 * gw, torch.uint16, device)
    g = torch.randn(2, th * tw, 24, device=device)
    # a valid argmax: each pooled token picks a conv token of its own bin, per channel
    arg = torch.empty(2, th, tw, 24, dtype=torch.int64)
    for i in range(th):
        for j in range(tw):
            hs, he = (i * gh) // th, -(-((i + 1) * gh) // th)
            ws, we = (j * gw) // tw, -(-((j + 1) * gw) // tw)
            rows = torch.randint(hs, he, (2, 24))
            cols = torch.randint(ws, we, (2, 24))
            arg[:, i, j] = rows * gw + cols
    arg = arg.reshape(2, th * tw, 24).to(torch.int32).to(device)
    for split in (1, 3):
        with K._dweight_kernel.override([_dweight_config(split)]):
            dw = K.weight_grad(image, g, arg, 4, (th, tw), 1 / 65535, -0.5)
        dconv = torch.zeros(2, gh * gw, 24, dtype=torch.float64, device=device).scatter_add_(1, arg.long(), g.double())
        x = image.double() / 65535 - 0.5
        patches = x.reshape(2, 2, gh, 4, gw, 4).permute(0, 2, 4, 1, 3, 5).reshape(2 * gh * gw, 32)
        ref = (dconv.reshape(-1, 24).T @ patches).reshape(24, 2, 4, 4)
        assert_parity_tensor(f"pooled dW split {split}", dw, dw, ref, torch.float32)


@pytest.mark.parametrize("affine", [(1.0, 0.0), (0.731, -1024.0), (1 / 65535, -0.5)], ids=["raw", "dicom", "unit"])
def test_split_products_reach_fp32_rounding(affine: tuple[float, float], device: torch.device) -> None:
    """Conv features and the weight gradient, full-range uint16 pixels, weights over 16 binary orders of
    magnitude: the 3xTF32 products are as accurate as an fp32 computation (max error <= 2x that of torch's
    fp32 conv / matmul + fp32's rounding of the result, against fp64). Stricter than the 1e-5 rule on
    purpose: a split into bf16 halves (16 significant bits) passes 1e-5 here but misses this by ~3x."""
    from fm_engine.kernels import patch_embed as K

    scale, offset = affine
    d, p = 32, 16
    image = raw_image(2, 1, 64, 48, torch.uint16, device)
    w = torch.randn(d, 1, p, p, device=device) * torch.exp2(torch.randint(-8, 8, (d, 1, p, p), device=device).float())
    zeros, ones = torch.zeros(d, device=device), torch.ones(d, device=device)
    for pool in (0, 2):
        _, feat, *_ = K.forward(
            image, w, zeros, ones, zeros, torch.zeros(d, 2, device=device), zeros, p, pool, pool, scale, offset,
            torch.float32, 1e-5,
        )  # fmt: skip
        conv64 = F.conv2d(image.double() * scale + offset, w.double(), stride=p)
        conv32 = F.conv2d(image.float() * scale + offset, w, stride=p)
        if pool:
            conv64, conv32 = F.adaptive_max_pool2d(conv64, pool), F.adaptive_max_pool2d(conv32, pool)
        ref64, ref32 = (c.flatten(2).transpose(1, 2) for c in (conv64, conv32))
        err, err32, top = ((feat.double() - ref64).abs().max(), (ref32.double() - ref64).abs().max(), ref64.abs().max())
        assert err <= 2 * err32 + 2.0**-24 * top, f"pool {pool}: {err / top:.2e} vs fp32 {err32 / top:.2e} relative"
    g = torch.randn(2, 12, d, device=device)
    dw = K.weight_grad(image, g, torch.empty(0, dtype=torch.int32), p, None, scale, offset)
    x64 = (image.double() * scale + offset).reshape(2, 1, 4, p, 3, p).permute(0, 2, 4, 1, 3, 5).reshape(24, p * p)
    ref64 = (g.reshape(24, d).double().T @ x64).reshape(d, 1, p, p)
    ref32 = (g.reshape(24, d).T @ x64.float()).reshape(d, 1, p, p)
    err, err32, top = ((dw.double() - ref64).abs().max(), (ref32.double() - ref64).abs().max(), ref64.abs().max())
    assert err <= 2 * err32 + 2.0**-24 * top, f"dW: {err / top:.2e} vs fp32 {err32 / top:.2e} relative"


def test_tf32_split_is_exact_and_tight(device: torch.device) -> None:
    """hi and lo are TF32 values (low 13 bits clear) and hi + lo is within 2^-22 relative of x, over signs and
    exponents, at rounding ties too."""
    from fm_engine.kernels.patch_embed import tf32_split

    x = torch.randn(4096, device=device) * torch.exp2(torch.randint(-40, 40, (4096,), device=device).float())
    ties = 1.0 + torch.arange(1, 65, device=device, dtype=torch.float32) * 2.0**-11 + 2.0**-12  # exactly half-way
    x = torch.cat([x, ties, -ties, torch.tensor([0.0, 65535.0, -1024.0, 1 / 65535], device=device)])
    hi, lo = tf32_split(x)
    for part in (hi, lo):
        assert not bool((part.view(torch.int32) & 0x1FFF).any())
    err = (x.double() - hi.double() - lo.double()).abs()
    assert bool((err <= 2.0**-22 * x.double().abs()).all()), float((err / x.double().abs().clamp_min(1e-300)).max())


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
