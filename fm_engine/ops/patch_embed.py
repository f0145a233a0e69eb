"""Full-precision patch embedding with fractional factorized positions (docs/KERNELS.md K5, docs/MODELS.md 1.2/1.4).

``patch_embed(image, weight, bias, norm_weight, norm_bias, pos_weight, pos_bias, *, patch,
pool_to=None, intensity_scale=1.0, intensity_offset=0.0, out_dtype=None, eps=1e-5)``

image: [B, C, H, W] uint8 / uint16 / int16 / float32 / bfloat16 raw values; weight: [D, C, p, p];
bias, norm_weight, norm_bias, pos_bias: [D]; pos_weight: [D, 2]. Returns tokens [B, Ht*Wt, D] in
row-major grid order (h outer, w inner), where (Ht, Wt) = pool_to or (H // p, W // p).

Computation, all in fp32 ieee (fp64 when the parameters are fp64) whatever autocast / TF32 say:
x = image * intensity_scale + intensity_offset; conv (kernel = stride = p, bias); optional
AdaptiveMaxPool2d(pool_to) on the raw conv features; LayerNorm(eps); + pos, where
pos(i, j) = pos_weight[:, 0] * u_i + pos_weight[:, 1] * v_j + pos_bias with u = linspace(-1, 1, Ht),
v = linspace(-1, 1, Wt) (an axis of length 1 gives 0, **fixed**: the original produced NaN).
Output dtype: ``out_dtype``, else the autocast dtype when autocast is on, else the parameters' dtype.

Backends: reference (conv2d with TF32 off, adaptive_max_pool2d, layer_norm, all with autocast off)
and triton (kernels/patch_embed.py): a conv (+ max pool) kernel reading the raw image (once per path
when bins do not overlap) with fp32-exact 3xTF32 tensor-core products (an explicit split of every operand
into two TF32 values; error analysis in kernels/patch_embed.py), then a LayerNorm + position kernel, so
TF32 and autocast settings cannot change its result. Its backward gives gradients for every parameter
(weight, bias, norm_weight, norm_bias, pos_weight, pos_bias; the image gets none) in three kernels: the
LayerNorm backward with the bias / norm / position gradients as per-program sums, the routing of pooled
gradients back to their conv tokens, and the conv weight gradient as a 3xTF32 GEMM over patches gathered
from the raw image again.
The Triton backend takes fp32 parameters, images of uint8 / uint16 / int16 / float32 / bfloat16,
dims up to 4096 and fp32 / bf16 / fp16 outputs; an image that requires grad goes to the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, OpCall, autocast_dtype, public, triton_available, triton_device_ok
from fm_engine.ops._exact import conv_ieee

IMAGE_DTYPES = (torch.uint8, torch.uint16, torch.int16, torch.float32, torch.bfloat16, torch.float64)
_TRITON_IMAGE_DTYPES = (torch.uint8, torch.uint16, torch.int16, torch.float32, torch.bfloat16)
_TRITON_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MAX_DIM = 4096  # the LayerNorm kernel holds a token's whole feature row in registers


def grid_coords(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``linspace(-1, 1, n)``; a single token sits at 0."""
    if n == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


def factorized_position(grid: tuple[int, int], pos_weight: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
    """Position encoding [Ht*Wt, D] for a token grid (Ht, Wt), row-major."""
    ht, wt = grid
    u = grid_coords(ht, pos_weight.device, pos_weight.dtype)
    v = grid_coords(wt, pos_weight.device, pos_weight.dtype)
    # W[:, 0] u_i + W[:, 1] v_j + b, i.e. Linear(2, D) on the (u, v) grid, written element-wise so it
    # runs in full precision whatever the TF32 / matmul-precision settings are
    pos = u[:, None, None] * pos_weight[:, 0] + v[None, :, None] * pos_weight[:, 1] + pos_bias
    return pos.reshape(ht * wt, -1)


def output_dtype(image: torch.Tensor, param_dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return autocast_dtype(image.device.type) or param_dtype


def token_grid(h: int, w: int, patch: int, pool_to: tuple[int, int] | None) -> tuple[int, int]:
    return tuple(pool_to) if pool_to is not None else (h // patch, w // patch)  # type: ignore[return-value]


def patch_embed_reference(
    image: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    *,
    patch: int,
    pool_to: tuple[int, int] | None = None,
    intensity_scale: float = 1.0,
    intensity_offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    cdt = torch.promote_types(weight.dtype, torch.float32)
    odt = output_dtype(image, weight.dtype, out_dtype)
    # TF32 off for the conv (conv_ieee); the position is element-wise (no matmul), so no global matmul flag
    # is touched
    with torch.autocast(image.device.type, enabled=False):
        x = image.to(cdt) * intensity_scale + intensity_offset
        feat = conv_ieee(x, weight.to(cdt), bias.to(cdt), (patch, patch))
        if pool_to is not None:
            feat = F.adaptive_max_pool2d(feat, tuple(pool_to))
        grid = (feat.shape[-2], feat.shape[-1])
        tokens = feat.flatten(2).transpose(1, 2)
        tokens = F.layer_norm(tokens, (tokens.shape[-1],), norm_weight.to(cdt), norm_bias.to(cdt), eps)
        tokens = tokens + factorized_position(grid, pos_weight.to(cdt), pos_bias.to(cdt))
    return tokens.to(odt)


@dataclasses.dataclass(frozen=True)
class PatchEmbedCall(OpCall):
    """A validated :func:`patch_embed` call; ``out``: the output dtype it resolves to (``out_dtype``, else the
    autocast dtype, else the parameters')."""

    image: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    pos_weight: torch.Tensor
    pos_bias: torch.Tensor
    patch: int
    pool_to: tuple[int, int] | None
    intensity_scale: float
    intensity_offset: float
    out_dtype: torch.dtype | None
    eps: float
    out: torch.dtype

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        return (self.weight, self.bias, self.norm_weight, self.norm_bias, self.pos_weight, self.pos_bias)


def _validate(
    image: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    *,
    patch: int,
    pool_to: tuple[int, int] | None = None,
    intensity_scale: float = 1.0,
    intensity_offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    eps: float = 1e-5,
) -> PatchEmbedCall:
    _checks.tensor("image", image)
    _checks.floating("image", image, IMAGE_DTYPES)
    _checks.ndim("image", image, 4, "[B, C, H, W]")
    _checks.tensor("weight", weight)
    _checks.floating("weight", weight)
    _checks.ndim("weight", weight, 4, "[dim, C, patch, patch]")
    d, c = weight.shape[0], weight.shape[1]
    if not isinstance(patch, int) or patch < 1 or weight.shape[2:] != (patch, patch):
        raise ValueError(f"patch: {patch} does not match weight's kernel {tuple(weight.shape[2:])}")
    if image.shape[1] != c:
        raise ValueError(f"image: {image.shape[1]} channels, weight expects {c}")
    h, w = image.shape[-2:]
    if h < patch or w < patch:
        raise ValueError(f"image: size {h}x{w} is smaller than one patch ({patch})")
    if h % patch or w % patch:
        raise ValueError(f"image: size {h}x{w} is not divisible by patch {patch}")
    for n, t in (("bias", bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias), ("pos_bias", pos_bias)):
        _checks.tensor(n, t)
        if t.shape != (d,):
            raise ValueError(f"{n}: expected shape ({d},), got {tuple(t.shape)}")
    _checks.tensor("pos_weight", pos_weight)
    if pos_weight.shape != (d, 2):
        raise ValueError(f"pos_weight: expected shape ({d}, 2), got {tuple(pos_weight.shape)}")
    _checks.same_device(image=image, weight=weight, pos_weight=pos_weight)
    if pool_to is not None:
        if len(pool_to) != 2 or any((not isinstance(s, int)) or s < 1 for s in pool_to):
            raise ValueError(f"pool_to: expected two positive ints, got {pool_to}")
        if pool_to[0] > h // patch or pool_to[1] > w // patch:
            raise ValueError(f"pool_to: {tuple(pool_to)} is larger than the token grid {(h // patch, w // patch)}")
    out = output_dtype(image, weight.dtype, out_dtype)
    return PatchEmbedCall(
        image, weight, bias, norm_weight, norm_bias, pos_weight, pos_bias, patch, pool_to, intensity_scale,
        intensity_offset, out_dtype, eps, out,
    )  # fmt: skip


def _bucket(call: PatchEmbedCall) -> tuple[dict, dict]:
    image, weight, pool_to = call.image, call.weight, call.pool_to
    flags = {
        "image": image.dtype,
        "out": call.out,
        "param": weight.dtype,
        "patch": call.patch,
        "channels": image.shape[1],
        "pool": pool_to is not None,
    }
    sizes = {"B": image.shape[0], "H": image.shape[2], "W": image.shape[3], "D": weight.shape[0]}
    if pool_to is not None:
        sizes["tokens"] = pool_to[0] * pool_to[1]
    return flags, sizes


PATCH_EMBED = Op("patch_embed", patch_embed_reference, _validate, bucket=_bucket)


def patch_embed(
    image: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    *,
    patch: int,
    pool_to: tuple[int, int] | None = None,
    intensity_scale: float = 1.0,
    intensity_offset: float = 0.0,
    out_dtype: torch.dtype | None = None,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """Full-precision stem. image [B, C, H, W] -> tokens [B, Ht*Wt, D] (see module docstring)."""
    return PATCH_EMBED(
        image,
        weight,
        bias,
        norm_weight,
        norm_bias,
        pos_weight,
        pos_bias,
        patch=patch,
        pool_to=pool_to,
        intensity_scale=intensity_scale,
        intensity_offset=intensity_offset,
        out_dtype=out_dtype,
        eps=eps,
        backend=backend,
    )


public(PATCH_EMBED, patch_embed)


# --- Triton backend ------------------------------------------------------------------------------


@torch.library.custom_op("fm_engine::patch_embed_fwd", mutates_args=())
def _fwd(
    image: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    patch: int,
    pool_h: int,
    pool_w: int,
    intensity_scale: float,
    intensity_offset: float,
    out_dtype: torch.dtype,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import patch_embed as K

    return K.forward(
        image,
        weight,
        bias,
        norm_weight,
        norm_bias,
        pos_weight,
        pos_bias,
        patch,
        pool_h,
        pool_w,
        intensity_scale,
        intensity_offset,
        out_dtype,
        eps,
    )


@_fwd.register_fake
def _(
    image: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    pos_weight: torch.Tensor,
    pos_bias: torch.Tensor,
    patch: int,
    pool_h: int,
    pool_w: int,
    intensity_scale: float,
    intensity_offset: float,
    out_dtype: torch.dtype,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    b, d = image.shape[0], weight.shape[0]
    th, tw = (pool_h, pool_w) if pool_h > 0 else (image.shape[2] // patch, image.shape[3] // patch)
    nt = th * tw
    feat = weight.new_empty((b, nt, d), dtype=torch.float32)
    arg = weight.new_empty((b, nt, d) if pool_h > 0 else (0,), dtype=torch.int32)
    return (weight.new_empty((b, nt, d), dtype=out_dtype), feat, feat.new_empty((b, nt)), feat.new_empty((b, nt)), arg)


@torch.library.custom_op("fm_engine::patch_embed_bwd", mutates_args=())
def _bwd(
    dy: torch.Tensor,
    image: torch.Tensor,
    norm_weight: torch.Tensor,
    feat: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    arg: torch.Tensor,
    patch: int,
    pool_h: int,
    pool_w: int,
    intensity_scale: float,
    intensity_offset: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import patch_embed as K

    return K.backward(
        dy, image, norm_weight, feat, mean, rstd, arg, patch, pool_h, pool_w, intensity_scale, intensity_offset
    )


@_bwd.register_fake
def _(
    dy: torch.Tensor,
    image: torch.Tensor,
    norm_weight: torch.Tensor,
    feat: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    arg: torch.Tensor,
    patch: int,
    pool_h: int,
    pool_w: int,
    intensity_scale: float,
    intensity_offset: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    d = feat.shape[-1]
    vec = [feat.new_empty((d,)) for _ in range(4)]
    return (feat.new_empty((d, image.shape[1], patch, patch)), vec[0], vec[1], vec[2], feat.new_empty((d, 2)), vec[3])


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    image, _w, _b, norm_weight, _nb, _pw, _pb, patch, pool_h, pool_w, scale, offset, _odt, _eps = inputs
    _y, feat, mean, rstd, arg = output
    ctx.mark_non_differentiable(feat, mean, rstd, arg)
    ctx.save_for_backward(image, norm_weight, feat, mean, rstd, arg)
    ctx.patch, ctx.pool, ctx.scale, ctx.offset = patch, (pool_h, pool_w), scale, offset


def _backward(ctx: Any, dy: torch.Tensor, *_unused: torch.Tensor) -> tuple:
    image, norm_weight, feat, mean, rstd, arg = ctx.saved_tensors
    grads = _bwd(dy, image, norm_weight, feat, mean, rstd, arg, ctx.patch, *ctx.pool, ctx.scale, ctx.offset)
    return (None, *grads) + (None,) * 7


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _triton_supports(call: PatchEmbedCall) -> str | None:
    image, weight, params = call.image, call.weight, call.params
    reason = triton_device_ok(image, *params)
    if reason:
        return reason
    if image.dtype not in _TRITON_IMAGE_DTYPES:
        return f"image dtype {image.dtype} (the Triton stem reads uint8, uint16, int16, float32, bfloat16)"
    if any(p.dtype != torch.float32 for p in params):
        return "parameters not all float32 (the Triton stem keeps fp32 parameters)"
    if call.out not in _TRITON_OUT_DTYPES:
        return f"output dtype {call.out} (the Triton stem writes float32, bfloat16, float16)"
    if weight.shape[0] > _TRITON_MAX_DIM:
        return (
            f"dim {weight.shape[0]} > {_TRITON_MAX_DIM} (the LayerNorm kernel keeps a token's feature row in registers)"
        )
    if image.requires_grad:
        return "image requires grad (the Triton stem gives parameter gradients only)"
    if image.shape[0] == 0:
        return "an empty batch"
    return None


def _triton_patch_embed(call: PatchEmbedCall) -> torch.Tensor:
    pool_to = call.pool_to
    ph, pw = (int(pool_to[0]), int(pool_to[1])) if pool_to is not None else (0, 0)
    return _fwd(
        call.image,
        *call.params,
        call.patch,
        ph,
        pw,
        float(call.intensity_scale),
        float(call.intensity_offset),
        call.out,
        float(call.eps),
    )[0]


PATCH_EMBED.register(
    "triton",
    _triton_patch_embed,
    available=triton_available,
    supports=_triton_supports,
    sources=("fm_engine.kernels.patch_embed", "fm_engine.kernels._aot", "fm_engine.kernels._autotune"),
)
