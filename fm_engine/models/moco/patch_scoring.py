"""Patch-scoring head (MoCo chest X-ray, docs/MODELS.md 4): per-patch scores, supervised softmax pooling
and the top-K contrastive variant (the README's idea, which the original code never built).

A backbone here is any module with ``forward_tokens(images) -> [B, 1 + N, D]`` (CLS first) and a
``grid`` attribute for the token grid at its native size (``ViT``, ``ConvStemViT``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from fm_engine.ssl.ntxent import nt_xent


class PatchScorer(nn.Module):
    """Linear(D, hidden) -> ReLU -> Linear(hidden, 1) on every patch token; [B, N, D] -> scores [B, N]."""

    def __init__(self, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens).squeeze(-1)


def score_map(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Scores [B, N] on the row-major token grid -> [B, gh, gw] (the explainability map)."""
    if scores.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"scores: {scores.shape[1]} tokens do not fill the grid {grid}")
    return scores.reshape(scores.shape[0], *grid)


def _patch_tokens(backbone: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    forward_tokens = cast(Callable[[torch.Tensor], torch.Tensor], backbone.forward_tokens)
    tokens = forward_tokens(images)[:, 1:]
    patch = getattr(backbone, "patch", 8)
    grid = (images.shape[-2] // patch, images.shape[-1] // patch)
    return tokens, grid


class PatchScoringClassifier(nn.Module):
    """Supervised use: softmax over all patch scores, weighted sum of the patch tokens, Linear(D, classes).

    images -> (logits [B, classes], score map [B, gh, gw]).
    """

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        self.backbone = backbone
        self.scorer = PatchScorer(dim, hidden)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, grid = _patch_tokens(self.backbone, images)
        scores = self.scorer(tokens)
        pooled = (scores.softmax(dim=1).unsqueeze(-1) * tokens).sum(dim=1)
        return self.fc(pooled), score_map(scores, grid)


class TopKPatchContrastive(nn.Module):
    """Contrastive use: per view keep the K highest-scoring patch tokens, weight them by a softmax over
    their scores (which gives the scorer gradients), sum, project (Linear(D, D) -> ReLU -> Linear(D, out)),
    and train two views with NT-Xent (temperature 0.1 by default).

    ``forward(images)`` -> (embedding [B, out_dim], score map [B, gh, gw]); ``loss(view1, view2)`` -> scalar.
    """

    def __init__(
        self,
        backbone: nn.Module,
        dim: int,
        k: int = 16,
        out_dim: int = 128,
        hidden: int = 128,
        temperature: float = 0.1,
    ) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k: expected a positive int, got {k}")
        self.backbone = backbone
        self.scorer = PatchScorer(dim, hidden)
        self.projector = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, out_dim))
        self.k, self.temperature = k, temperature

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, grid = _patch_tokens(self.backbone, images)
        scores = self.scorer(tokens)
        top, idx = scores.topk(min(self.k, scores.shape[1]), dim=1)
        picked = tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        pooled = (top.softmax(dim=1).unsqueeze(-1) * picked).sum(dim=1)
        return self.projector(pooled), score_map(scores, grid)

    def loss(self, view1: torch.Tensor, view2: torch.Tensor) -> torch.Tensor:
        z1, _ = self(view1)
        z2, _ = self(view2)
        return nt_xent(z1, z2, self.temperature)
