"""MiT-UB Vision Transformer (docs/MODELS.md 1.2, 1.3): full-precision stem, pre-norm GQA / ReLU² layers, no CLS."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from fm_engine.models.mitub.layers import EncoderLayer, PatchEmbed3d
from fm_engine.nn import PatchEmbed2d
from fm_engine.nn._backend_arg import refuse_backend_argument
from fm_engine.nn.tokens import gather_tokens  # re-exported: its home was this module

__all__ = ["ViT", "check_token_index", "gather_tokens"]


def check_token_index(token_index: torch.Tensor | None, batch: int, tokens: int) -> None:
    """``token_index``: None or an int64 tensor [B, K] of token positions in [0, tokens).

    The range of the positions is checked here only for CPU tensors: on a GPU that check would stall the
    host until the device catches up (a synchronisation per step), so there the gather that uses the
    positions catches an out-of-range one (a device-side assertion)."""
    if token_index is None:
        return
    if not isinstance(token_index, torch.Tensor) or token_index.dtype != torch.long or token_index.dim() != 2:
        raise ValueError("token_index: expected an int64 tensor [B, K] of token positions")
    if token_index.shape[0] != batch:
        raise ValueError(f"token_index: batch {token_index.shape[0]} differs from the image batch {batch}")
    on_host = token_index.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and token_index.numel() and (int(token_index.min()) < 0 or int(token_index.max()) >= tokens):
        raise ValueError(f"token_index: positions must lie in [0, {tokens})")


@refuse_backend_argument
class ViT(nn.Module):
    """MiT-UB ViT backbone.

    image [B, C, H, W] (``spatial_dims=2``) or [B, C, D, H, W] (``spatial_dims=3``), raw integers
    (uint8 / uint16 / int16) or floats, with an intensity affine ``image * intensity_scale +
    intensity_offset`` applied in fp32 by the stem -> tokens [B, N, dim] after the output LayerNorm,
    N = prod(token grid) in row-major grid order (no CLS token: heads average-pool).

    Layers: stem (2-D: ``fm_engine.nn.PatchEmbed2d``, conv with bias, LayerNorm, fractional factorized
    position Linear(2, dim); 3-D: :class:`~fm_engine.models.mitub.layers.PatchEmbed3d`, Conv3d without
    bias, tokens in (d, h, w) order against a (d, h, w) position grid, **fixed**), ``depth`` pre-norm
    encoder layers (GQA with ``heads`` / ``kv_heads`` of ``head_dim``, ReLU² MLP of ``mlp_ratio * dim``
    with hidden dropout ``dropout``, no biases), output LayerNorm ``norm``. Attention dropout
    ``attn_dropout`` acts in training only (**fixed**). Positions are fractional, so any image size
    divisible by ``patch`` runs without rebuilding.

    ``fsdp_units`` / ``checkpoint_units``: the module classes a trainer shards as FSDP units and
    recomputes under activation checkpointing (the encoder layers), read from the model so that the
    trainer names no model class.
    """

    fsdp_units: ClassVar[tuple[type[nn.Module], ...]] = (EncoderLayer,)
    checkpoint_units: ClassVar[tuple[type[nn.Module], ...]] = (EncoderLayer,)

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 512,
        patch: int = 16,
        depth: int = 12,
        heads: int = 8,
        kv_heads: int | None = 4,
        head_dim: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims}")
        if depth < 0:
            raise ValueError(f"depth: expected >= 0, got {depth}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            dim=dim,
            patch=patch,
            depth=depth,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            spatial_dims=spatial_dims,
        )
        self.dim = dim
        self.patch = patch
        self.spatial_dims = spatial_dims
        if spatial_dims == 2:
            self.stem: nn.Module = PatchEmbed2d(in_channels, dim, patch)
        else:
            self.stem = PatchEmbed3d(in_channels, dim, patch)
        self.blocks = nn.ModuleList(
            EncoderLayer(dim, heads, kv_heads, head_dim, mlp_ratio, dropout, attn_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def token_grid(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """Token grid for an image of spatial size (H, W) or (D, H, W)."""
        if len(spatial_size) != self.spatial_dims:
            raise ValueError(f"spatial_size: expected {self.spatial_dims} sizes, got {tuple(spatial_size)}")
        return tuple(int(s) // self.patch for s in spatial_size)

    def mask_grid(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """Grid on which M-JEPA masks live: the token grid."""
        return self.token_grid(spatial_size)

    def _check_image(self, image: torch.Tensor) -> None:
        if not isinstance(image, torch.Tensor) or image.dim() != self.spatial_dims + 2:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"image: expected a {self.spatial_dims + 2}-D tensor, got {shape}")

    def embed(self, image: torch.Tensor, intensity_scale: float = 1.0, intensity_offset: float = 0.0) -> torch.Tensor:
        """Stem only: image -> tokens [B, N, dim] with positions, before any encoder layer."""
        self._check_image(image)
        return self.stem(image, intensity_scale, intensity_offset)

    def encode(self, tokens: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
        """Encoder layers + output norm on stem tokens [B, N, dim]; with ``token_index`` [B, K] only the
        selected tokens are encoded (M-JEPA context) -> [B, K, dim]."""
        check_token_index(token_index, tokens.shape[0], tokens.shape[1])
        x = tokens if token_index is None else gather_tokens(tokens, token_index)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(
        self,
        image: torch.Tensor,
        intensity_scale: float = 1.0,
        intensity_offset: float = 0.0,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image -> [B, N, dim] (or [B, K, dim] for the tokens selected by ``token_index``), after the final norm."""
        return self.encode(self.embed(image, intensity_scale, intensity_offset), token_index)
