"""Masked autoencoding pieces: per-image random masking, patchify, the norm-pix target, the masked MSE."""

from __future__ import annotations

import torch


def random_masking(
    x: torch.Tensor, ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image random masking of tokens x: [B, L, D].

    Keeps ``int(L * (1 - ratio))`` tokens chosen by argsort of uniform noise [B, L] (drawn if not given).
    Returns (kept tokens [B, keep, D], mask [B, L] with 1 = masked, ids_restore [B, L], ids_shuffle [B, L]):
    ``ids_shuffle[:, :keep]`` are the kept positions, ``ids_shuffle[:, keep:]`` the masked ones, and
    gathering the shuffled sequence with ``ids_restore`` puts every token back at its position.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a mask ratio in [0, 1), got {ratio}")
    b, length, d = x.shape
    keep = int(length * (1 - ratio))
    if keep < 1:
        raise ValueError(f"ratio: {ratio} keeps no token of {length}")
    if noise is None:
        noise = torch.rand(b, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
    mask = torch.ones(b, length, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore, ids_shuffle


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """images [B, C, H, W] -> patches [B, (H/p)(W/p), p*p*C], row-major tokens, pixels (ph, pw, C) with C fastest."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"images: H, W = {h}, {w} must be multiples of patch {patch}")
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int = 1) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B, gh*gw, p*p*C] -> [B, C, gh*p, gw*p]."""
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * patch, gw * patch)


def norm_pix(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalisation (x - mean) / sqrt(var + eps), unbiased variance; patches [..., P]."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=True)
    return (patches - mean) / (var + eps).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over pixels, averaged over masked patches only. pred, target [B, L, P]; mask [B, L] (1 = masked)."""
    if pred.shape != target.shape or mask.shape != pred.shape[:2]:
        raise ValueError(
            f"mask: expected shape {tuple(pred.shape[:2])}, got {tuple(mask.shape)} "
            f"(pred {tuple(pred.shape)}, target {tuple(target.shape)})"
        )
    per_patch = ((pred - target) ** 2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()
