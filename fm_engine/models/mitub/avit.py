"""MiT-UB Adaptive ViT (MODELS.md 1.4) and the explicit ViT -> AViT conversion."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from fm_engine.models.mitub.layers import DecoderLayer, EncoderLayer
from fm_engine.models.mitub.vit import ViT, check_token_index, gather_tokens
from fm_engine.nn import AdaptiveStem2d

log = logging.getLogger(__name__)


class AViT(nn.Module):
    """Adaptive ViT for high-resolution 2-D images.

    image [B, C, H, W] (raw integers or floats, intensity affine applied in fp32 by the stem) ->
    [B, Gh*Gw, dim] on the fixed ``target_grid`` (Gh, Gw), after the output LayerNorm.

    Stem (``fm_engine.nn.AdaptiveStem2d``): query path conv -> AdaptiveMaxPool2d(target_grid) on the raw
    conv features -> LayerNorm -> + position on the target grid; key/value path conv (width ``kv_dim``)
    -> LayerNorm -> + its own position on the full (H/p, W/p) grid; both in [-1, 1] coordinates.
    Body: ``depth`` encoder layers on the queries (parameter names as in :class:`ViT`, so a ViT loads),
    then ``high_res_depth`` decoder layers (self-attention, cross-attention to the high-resolution
    tokens, ReLU² MLP; LayerScale ``layer_scale`` = 1e-5 on each branch), then the output norm.
    Attention dropout acts in training only (**fixed**).
    """

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 512,
        patch: int = 16,
        depth: int = 12,
        heads: int = 8,
        kv_heads: int | None = 4,
        kv_dim: int = 256,
        target_grid: Sequence[int] = (32, 24),
        high_res_depth: int = 4,
        head_dim: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layer_scale: float = 1e-5,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        target_grid = tuple(int(g) for g in target_grid)
        if len(target_grid) != 2 or min(target_grid) < 1:
            raise ValueError(f"target_grid: expected two positive sizes, got {target_grid}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            dim=dim,
            patch=patch,
            depth=depth,
            heads=heads,
            kv_heads=kv_heads,
            kv_dim=kv_dim,
            target_grid=target_grid,
            high_res_depth=high_res_depth,
            head_dim=head_dim,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            layer_scale=layer_scale,
        )
        self.dim = dim
        self.patch = patch
        self.spatial_dims = 2
        self.target_grid = target_grid
        self.stem = AdaptiveStem2d(in_channels, dim, kv_dim, patch, target_grid, backend=backend)
        self.blocks = nn.ModuleList(
            EncoderLayer(dim, heads, kv_heads, head_dim, mlp_ratio, dropout, attn_dropout, backend=backend)
            for _ in range(depth)
        )
        self.high_res_blocks = nn.ModuleList(
            DecoderLayer(dim, kv_dim, heads, kv_heads, head_dim, mlp_ratio, dropout, attn_dropout, layer_scale, backend)
            for _ in range(high_res_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def token_grid(self, spatial_size: Sequence[int]) -> tuple[int, int]:
        """Output grid: always ``target_grid`` (the image's own grid (H/p, W/p) must be at least as large)."""
        h, w = (int(s) // self.patch for s in spatial_size)
        if h < self.target_grid[0] or w < self.target_grid[1]:
            raise ValueError(f"image: token grid {(h, w)} is smaller than target_grid {self.target_grid}")
        return self.target_grid

    def mask_grid(self, spatial_size: Sequence[int]) -> tuple[int, int]:
        """Grid on which M-JEPA masks live: the pooled target grid."""
        return self.token_grid(spatial_size)

    def embed(
        self, image: torch.Tensor, intensity_scale: float = 1.0, intensity_offset: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem only -> (queries [B, Gh*Gw, dim], high-resolution keys/values [B, (H/p)*(W/p), kv_dim])."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError("image: expected a 4-D tensor [B, C, H, W]")
        self.token_grid(image.shape[-2:])
        return self.stem(image, intensity_scale, intensity_offset)

    def encode(self, queries: torch.Tensor, kv: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder + decoder layers + output norm; ``token_index`` [B, K] keeps a subset of the queries
        (the high-resolution keys/values stay complete) -> [B, K, dim]."""
        check_token_index(token_index, queries.shape[0], queries.shape[1])
        x = queries if token_index is None else gather_tokens(queries, token_index)
        for block in self.blocks:
            x = block(x)
        for block in self.high_res_blocks:
            x = block(x, kv)
        return self.norm(x)

    def forward(
        self,
        image: torch.Tensor,
        intensity_scale: float = 1.0,
        intensity_offset: float = 0.0,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image -> [B, Gh*Gw, dim] (or [B, K, dim] for ``token_index``), after the final norm."""
        q, kv = self.embed(image, intensity_scale, intensity_offset)
        return self.encode(q, kv, token_index)


class Conversion(NamedTuple):
    """Result of :func:`convert_vit_to_avit`: the AViT, the parameter names copied from the ViT and
    the AViT parameter names that start fresh (kv stem and decoder layers)."""

    model: AViT
    copied: list[str]
    new: list[str]


def convert_vit_to_avit(vit: ViT, avit: AViT | str, **overrides: Any) -> Conversion:
    """Copy every weight of a 2-D ``vit`` into an AViT of the same width.

    ``avit``: an AViT instance, or a registry name (built with the ViT's width, depth, heads, patch and
    channels, plus ``overrides``, e.g. ``convert_vit_to_avit(vit, "vit-i1-p16-d512-a32_24")``). Every
    ViT parameter lands under the same name (stem query path, encoder layers, output norm); the kv
    stem and the decoder layers keep their fresh initialisation, and their LayerScale 1e-5 makes the
    AViT start close to the ViT run on max-pooled patch features. Raises ValueError when a ViT weight
    has no place or a different shape in the AViT.
    """
    if not isinstance(vit, ViT) or vit.spatial_dims != 2:
        raise ValueError("vit: expected a 2-D fm_engine.models.mitub.ViT")
    model: nn.Module | str = avit
    if isinstance(model, str):
        from fm_engine.models.registry import create_model

        keep = (
            "in_channels",
            "dim",
            "patch",
            "depth",
            "heads",
            "kv_heads",
            "head_dim",
            "mlp_ratio",
            "dropout",
            "attn_dropout",
        )
        model = create_model(model, **{**{k: vit.config[k] for k in keep}, **overrides})
    if not isinstance(model, AViT):
        raise ValueError(f"avit: expected an AViT or the name of a registered AViT, got {type(model).__name__}")
    avit = model
    src = vit.state_dict()
    dst = avit.state_dict()
    extra = [k for k in src if k not in dst]
    if extra:
        raise ValueError(f"avit: has no place for ViT weights {extra}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(dst[k].shape)}" for k, v in src.items() if v.shape != dst[k].shape]
    if bad:
        raise ValueError(f"avit: shapes differ from the ViT's: {bad}")
    with torch.no_grad():
        for k, v in src.items():
            dst[k].copy_(v)
    copied = list(src)
    new = [k for k in dst if k not in src]
    log.info("converted ViT -> AViT: %d tensors copied, %d new: %s", len(copied), len(new), new)
    return Conversion(avit, copied, new)
