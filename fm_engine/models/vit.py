"""Plain ViT encoder with a CLS token (ViT-B/16, ViT-S/16, the RadDiffusion encoders).

Pre-LN blocks ``x = x + attn(norm1(x)); x = x + mlp(norm2(x))`` with attention from
:class:`fm_engine.nn.Attention` (qkv bias, head dim = dim / heads) and a GELU MLP (exact erf GELU).
Positions are learned (trunc-normal 0.02, resampled bicubically for other grids) or fixed 2-D sin-cos
with an all-zero CLS row (computed for the input's token grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.nn import Attention
from fm_engine.nn._backend_arg import refuse_backend_argument


def sincos_pos_embed_2d(
    dim: int, grid_h: int, grid_w: int, cls_token: bool = True, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Fixed 2-D sin-cos positions: [(1 if cls_token) + grid_h*grid_w, dim], tokens row-major.

    The first dim/2 channels encode the row index, the last dim/2 the column index; each half is
    [sin(pos * w_k), cos(pos * w_k)] with w_k = 10000^(-k / (dim/4)), k = 0..dim/4-1. The CLS row is zero.
    """
    if dim % 4:
        raise ValueError(f"dim: {dim} must be a multiple of 4 for 2-D sin-cos positions")
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid_h, grid_w: expected positive sizes, got {grid_h}, {grid_w}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(pos: torch.Tensor) -> torch.Tensor:  # [n] -> [n, dim/2]
        ang = pos[:, None] * omega[None]
        return torch.cat([ang.sin(), ang.cos()], dim=1)

    hh, ww = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    emb = torch.cat([axis(hh.reshape(-1)), axis(ww.reshape(-1))], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb.to(dtype)


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Learned positions [1, 1 + gh*gw, D] (CLS row first) resampled bicubically to ``new_grid``."""
    if tuple(new_grid) == tuple(grid):
        return pos
    d = pos.shape[-1]
    g = pos[:, 1:].reshape(1, grid[0], grid[1], d).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=tuple(new_grid), mode="bicubic", align_corners=False)
    g = g.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], d)
    return torch.cat([pos[:, :1], g], dim=1)


class MLP(nn.Module):
    """``fc2(act(fc1(x)))``; x: [..., dim] -> [..., dim]. Dropout (if any) after the activation and fc2."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", dropout: float = 0.0) -> None:
        super().__init__()
        if act not in ("gelu", "relu"):
            raise ValueError(f"act: expected 'gelu' or 'relu', got {act!r}")
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


@refuse_backend_argument
class ViTBlock(nn.Module):
    """Pre-LN encoder block; x: [B, N, dim] -> [B, N, dim]."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, eps: float = 1e-6, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads: dim {dim} must be divisible by heads {heads}")
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, head_dim=dim // heads, bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """normal(0, std) for Linear and Conv weights, zero biases, LayerNorm (1, 0)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@refuse_backend_argument
class ViT(nn.Module):
    """ViT encoder with a CLS token.

    images: [B, in_chans, H, W] (H, W multiples of ``patch``) -> ``forward``: CLS features [B, dim];
    ``forward_tokens``: every token after the final norm, [B, 1 + (H/p)(W/p), dim] (CLS first).

    pos: "learned" (parameter [1, 1 + N, dim] for the ``image_size`` grid, trunc-normal 0.02,
    bicubically resampled for other grids) or "sincos" (fixed, CLS row zero, any grid).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch: int = 16,
        in_chans: int = 3,
        dim: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_dim: int | None = None,
        eps: float = 1e-6,
        pos: str = "learned",
        final_norm: bool = True,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size: {image_size} must be a multiple of patch {patch}")
        if pos not in ("learned", "sincos"):
            raise ValueError(f"pos: expected 'learned' or 'sincos', got {pos!r}")
        self.image_size, self.patch, self.in_chans, self.dim = image_size, patch, in_chans, dim
        self.pos = pos
        g = image_size // patch
        self.grid = (g, g)
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if pos == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, 1 + g * g, dim))
        else:
            self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, g, g)[None], persistent=False)
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_dim or 4 * dim, eps=eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps) if final_norm else nn.Identity()
        init_normal_(self, init_std)
        nn.init.normal_(self.cls_token, std=init_std)
        if pos == "learned":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def token_grid(self, images: torch.Tensor) -> tuple[int, int]:
        if images.dim() != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"images: expected [B, {self.in_chans}, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"images: H, W = {h}, {w} must be multiples of the patch size {self.patch}")
        return h // self.patch, w // self.patch

    def position(self, gh: int, gw: int, like: torch.Tensor) -> torch.Tensor:
        """Positions for a (gh, gw) grid: [1, 1 + gh*gw, dim] (CLS row first)."""
        if (gh, gw) == self.grid:
            return self.pos_embed.to(like.dtype)
        if self.pos == "sincos":
            return sincos_pos_embed_2d(self.dim, gh, gw).to(like)[None]
        return resample_pos_embed(self.pos_embed, self.grid, (gh, gw)).to(like.dtype)

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions [B, N, dim] and the CLS token with its position [B, 1, dim]."""
        gh, gw = self.token_grid(images)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        pos = self.position(gh, gw, x)
        cls = (self.cls_token + pos[:, :1]).expand(x.shape[0], -1, -1)
        return x + pos[:, 1:], cls

    def forward_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x, cls = self.embed_patches(images)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(images)[:, 0]


def vit_b16(**overrides: object) -> ViT:
    """ViT-B/16 at 224: dim 768, 12 layers, 12 heads, MLP 3072, LN eps 1e-6, learned positions."""
    cfg: dict = dict(image_size=224, patch=16, dim=768, depth=12, heads=12, mlp_dim=3072)
    return ViT(**{**cfg, **overrides})


def vit_s16(**overrides: object) -> ViT:
    """ViT-S/16 at 224: dim 384, 12 layers, 6 heads, MLP 1536, LN eps 1e-6, learned positions."""
    cfg: dict = dict(image_size=224, patch=16, dim=384, depth=12, heads=6, mlp_dim=1536)
    return ViT(**{**cfg, **overrides})


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
