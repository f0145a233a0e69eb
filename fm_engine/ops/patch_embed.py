"""Full-precision patch embedding with fractional factorized positions (KERNELS.md K5, MODELS.md 1.2/1.4).

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, public

IMAGE_DTYPES = (torch.uint8, torch.uint16, torch.int16, torch.float32, torch.bfloat16, torch.float64)


def grid_coords(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``linspace(-1, 1, n)``; a single token sits at 0."""
    if n == 1:
        return torch.zeros(1, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


def factorized_position(
    grid: tuple[int, int], pos_weight: torch.Tensor, pos_bias: torch.Tensor
) -> torch.Tensor:
    """Position encoding [Ht*Wt, D] for a token grid (Ht, Wt), row-major."""
    ht, wt = grid
    u = grid_coords(ht, pos_weight.device, pos_weight.dtype)
    v = grid_coords(wt, pos_weight.device, pos_weight.dtype)
    coords = torch.stack(torch.meshgrid(u, v, indexing="ij"), dim=-1).reshape(-1, 2)
    return F.linear(coords, pos_weight, pos_bias)


def output_dtype(image: torch.Tensor, param_dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    dev = image.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return param_dtype


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
    with torch.autocast(image.device.type, enabled=False), torch.backends.cudnn.flags(
        enabled=torch.backends.cudnn.enabled, allow_tf32=False
    ):
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            x = image.to(cdt) * intensity_scale + intensity_offset
            feat = F.conv2d(x, weight.to(cdt), bias.to(cdt), stride=patch)
            if pool_to is not None:
                feat = F.adaptive_max_pool2d(feat, tuple(pool_to))
            grid = (feat.shape[-2], feat.shape[-1])
            tokens = feat.flatten(2).transpose(1, 2)
            tokens = F.layer_norm(tokens, (tokens.shape[-1],), norm_weight.to(cdt), norm_bias.to(cdt), eps)
            tokens = tokens + factorized_position(grid, pos_weight.to(cdt), pos_bias.to(cdt))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
    return tokens.to(odt)


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
) -> None:
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


PATCH_EMBED = Op("patch_embed", patch_embed_reference, _validate, preference=("triton",))


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
        image, weight, bias, norm_weight, norm_bias, pos_weight, pos_bias, patch=patch, pool_to=pool_to,
        intensity_scale=intensity_scale, intensity_offset=intensity_offset, out_dtype=out_dtype, eps=eps,
        backend=backend,
    )


public(PATCH_EMBED, patch_embed)
