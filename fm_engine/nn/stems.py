"""Full-precision stems: ``PatchEmbed2d`` (ViT) and ``AdaptiveStem2d`` (AViT), over ``ops.patch_embed``."""

from __future__ import annotations

import torch
from torch import nn

from fm_engine import ops
from fm_engine.ops.patch_embed import token_grid


class PatchEmbed2d(nn.Module):
    """Conv patch embedding -> (optional AdaptiveMaxPool2d) -> LayerNorm -> + factorized position.

    image [B, C, H, W] (raw integers or floats) -> tokens [B, Ht*Wt, dim], all computed in fp32.
    Parameters: ``proj`` Conv2d(in_ch, dim, patch, stride=patch, bias=True), ``norm`` LayerNorm(dim),
    ``pos`` Linear(2, dim) applied to [-1, 1] grid coordinates (any grid size shares it).
    """

    def __init__(
        self, in_ch: int, dim: int, patch: int, pool_to: tuple[int, int] | None = None, backend: str | None = None
    ) -> None:
        super().__init__()
        self.patch = patch
        if pool_to is not None and len(pool_to) != 2:
            raise ValueError(f"pool_to: expected two sizes (Ht, Wt), got {pool_to}")
        self.pool_to: tuple[int, int] | None = (int(pool_to[0]), int(pool_to[1])) if pool_to is not None else None
        self.proj = nn.Conv2d(in_ch, dim, patch, stride=patch, bias=True)
        self.norm = nn.LayerNorm(dim)
        self.pos = nn.Linear(2, dim)
        self.backend = backend

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """Token grid (Ht, Wt) for an H x W image."""
        return token_grid(h, w, self.patch, self.pool_to)

    def forward(
        self,
        image: torch.Tensor,
        intensity_scale: float = 1.0,
        intensity_offset: float = 0.0,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        return ops.patch_embed(
            image,
            self.proj.weight,
            self.proj.bias,  # type: ignore[arg-type]  # bias=True above
            self.norm.weight,
            self.norm.bias,
            self.pos.weight,
            self.pos.bias,
            patch=self.patch,
            pool_to=self.pool_to,
            intensity_scale=intensity_scale,
            intensity_offset=intensity_offset,
            out_dtype=out_dtype,
            eps=self.norm.eps,
            backend=self.backend,
        )


class AdaptiveStem2d(PatchEmbed2d):
    """AViT stem: pooled query path (the inherited ``proj``/``norm``/``pos``, so a ViT stem's
    state_dict loads into it) plus a full-resolution key/value path ``kv_proj``/``kv_norm``/``kv_pos``
    of width ``kv_dim`` with its own position encoding.

    image [B, C, H, W] -> (queries [B, Gh*Gw, dim], keys/values [B, (H/p)*(W/p), kv_dim]).
    """

    def __init__(
        self, in_ch: int, dim: int, kv_dim: int, patch: int, target_grid: tuple[int, int], backend: str | None = None
    ) -> None:
        super().__init__(in_ch, dim, patch, pool_to=target_grid, backend=backend)
        self.kv_proj = nn.Conv2d(in_ch, kv_dim, patch, stride=patch, bias=True)
        self.kv_norm = nn.LayerNorm(kv_dim)
        self.kv_pos = nn.Linear(2, kv_dim)

    def forward(  # type: ignore[override]
        self,
        image: torch.Tensor,
        intensity_scale: float = 1.0,
        intensity_offset: float = 0.0,
        out_dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q = super().forward(image, intensity_scale, intensity_offset, out_dtype)
        kv = ops.patch_embed(
            image,
            self.kv_proj.weight,
            self.kv_proj.bias,  # type: ignore[arg-type]  # bias=True above
            self.kv_norm.weight,
            self.kv_norm.bias,
            self.kv_pos.weight,
            self.kv_pos.bias,
            patch=self.patch,
            pool_to=None,
            intensity_scale=intensity_scale,
            intensity_offset=intensity_offset,
            out_dtype=out_dtype,
            eps=self.kv_norm.eps,
            backend=self.backend,
        )
        return q, kv
