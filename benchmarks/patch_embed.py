"""Full-precision stem benchmarks (docs/KERNELS.md K5), at the AViT shape.

image [B, C, H, W] uint16, patch p, T_conv = (H/p)·(W/p) conv tokens, K = C·p², output T tokens of width D.
AViT: B 1 / 4, 1 x 3072 x 2304, p 16 (T_conv 27,648, K 256); query path D 512 pooled to 32 x 24
(T 768), key/value path D 256 on the full grid (T 27,648); output bf16 (the autocast dtype).
The formulas are the op's floor (what any fp32-exact implementation must do):
  FLOP  fwd = 2·B·T_conv·K·D       (the conv as a GEMM; pooling, LayerNorm and position are O(B·T·D))
        bwd = 2·B·T·K·D            (the weight gradient: each of the T output tokens' gradients reaches one
                                    conv token per channel; T = T_conv on the full grid)
  bytes fwd = B·C·H·W·s_img + 4·D·K + B·T·D·(s_out + 4)   (image once, weight, tokens written, fp32
                                                           features kept for the LayerNorm backward)
        bwd = B·T·D·(s_out + 4) + B·C·H·W·s_img + 4·D·K    (read dY, the features and the image, write dW)
The ceiling for fp32-exact products on tensor cores is a sixth of the bf16 matmul peak (three TF32 products
per product, TF32 at half the bf16 rate on A100/H100/H200): "% matmul peak" of 16.7 is that roofline; the
copy-bandwidth fraction is small at these shapes (the stem is compute-bound).
Peers: the eager fp32 stem (conv -> pool -> norm -> position, TF32 off) and torch.compile of it.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from fm_engine import ops
from fm_engine.ops.patch_embed import patch_embed_reference

from .harness import Case, standard_labels


class _StemKwargs(TypedDict):
    """The keyword arguments every benchmarked stem takes."""

    patch: int
    pool_to: tuple[int, int] | None
    intensity_scale: float
    out_dtype: torch.dtype


def _case(
    b: int, h: int, w: int, patch: int, dim: int, pool: tuple[int, int] | None, device: torch.device, quick: bool
) -> Case:
    c = 1
    k = c * patch * patch
    t_conv = (h // patch) * (w // patch)
    t = pool[0] * pool[1] if pool else t_conv
    kw: _StemKwargs = {"patch": patch, "pool_to": pool, "intensity_scale": 1 / 65535, "out_dtype": torch.bfloat16}

    def setup() -> list[torch.Tensor]:
        image = torch.randint(0, 65536, (b, c, h, w), dtype=torch.int32, device=device).to(torch.uint16)
        params = [torch.randn(dim, c, patch, patch, device=device) / patch]
        params += [torch.randn(dim, device=device) for _ in range(3)]
        params += [torch.randn(dim, 2, device=device), torch.randn(dim, device=device)]
        return [image] + [p.requires_grad_() for p in params]

    fns = standard_labels(lambda img, *p: patch_embed_reference(img, *p, **kw), quick)
    notes: dict[str, str] = {}
    why = ops.get_op("patch_embed").backends["triton"].available()
    if why is None:
        fns["triton"] = lambda img, *p: ops.patch_embed(img, *p, backend="triton", **kw)
    else:
        notes["triton"] = why
    img_bytes = 2.0 * b * c * h * w
    path = f"pool {pool[0]}x{pool[1]}" if pool else "full grid"
    return Case(
        op="patch_embed",
        name=f"B{b} {c}x{h}x{w} u16 p{patch} D{dim} {path}",
        setup=setup,
        fns=fns,
        flops={"fwd": 2.0 * b * t_conv * k * dim, "bwd": 2.0 * b * t * k * dim},
        bytes={
            "fwd": img_bytes + 4.0 * dim * k + (2.0 + 4.0) * b * t * dim,
            "bwd": (2.0 + 4.0) * b * t * dim + img_bytes + 4.0 * dim * k,
        },
        flop_formula="fwd 2·B·T_conv·K·D, bwd 2·B·T·K·D; fp32-exact ceiling = bf16 peak / 6",
        byte_formula="fwd B·C·H·W·s_img + 4·D·K + B·T·D·(s_out + 4), bwd the same (dY, features, image, dW)",
        notes=notes,
    )


def cases(device: torch.device, quick: bool) -> list[Case]:
    if quick:
        return [_case(1, 64, 48, 8, 32, (4, 3), device, True), _case(1, 64, 48, 8, 16, None, device, True)]
    out = []
    for b in (1, 4):
        out.append(_case(b, 3072, 2304, 16, 512, (32, 24), device, False))
        out.append(_case(b, 3072, 2304, 16, 256, None, device, False))
    return out
