"""Task heads for MiT-UB backbones (docs/MODELS.md 1.6) and a linear-probe utility.

Heads take backbone tokens [B, N, dim] (after the backbone's final norm) and average-pool them:
the backbones have no CLS token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationHead(nn.Module):
    """tokens [B, N, dim] -> average pool -> LayerNorm -> Linear(dim, classes) -> logits [B, classes].

    ``loss(logits, labels)``: cross-entropy, labels [B] int64.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(tokens.mean(dim=1)))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


class ViewHead(ClassificationHead):
    """Mammographic view classification (CC vs MLO by default): a :class:`ClassificationHead`
    with ``num_views`` classes; label ``i`` is ``views[i]``."""

    def __init__(self, dim: int, views: tuple[str, ...] = ("CC", "MLO")) -> None:
        super().__init__(dim, len(views))
        self.views = tuple(views)


class TriageHead(nn.Module):
    """tokens [B, N, dim] -> average pool -> Dropout(0.1) -> Linear(dim, 1) -> logits [B].

    ``loss(logits, labels)``: BCE-with-logits, labels [B] in {0, 1}. Metric: AUROC.
    """

    def __init__(self, dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(tokens.mean(dim=1))).squeeze(-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.to(torch.float32))


class BackboneWithHead(nn.Module):
    """``head(backbone(image, intensity_scale, intensity_offset))``; image [B, C, ...] -> head output.

    The names ``backbone.*`` / ``head.*`` keep a backbone checkpoint loadable with a prefix.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, image: torch.Tensor, intensity_scale: float = 1.0, intensity_offset: float = 0.0) -> torch.Tensor:
        return self.head(self.backbone(image, intensity_scale, intensity_offset))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        head_loss = cast(Callable[[torch.Tensor, torch.Tensor], torch.Tensor], self.head.loss)
        return head_loss(logits, labels)


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    batch_size: int = 32,
    intensity_scale: float = 1.0,
    intensity_offset: float = 0.0,
) -> torch.Tensor:
    """Average-pooled frozen features: images [N, C, ...] -> [N, dim] fp32 (backbone run in eval mode)."""
    was_training = backbone.training
    backbone.eval()
    try:
        feats = [
            backbone(images[i : i + batch_size], intensity_scale, intensity_offset).float().mean(dim=1)
            for i in range(0, images.shape[0], batch_size)
        ]
    finally:
        backbone.train(was_training)
    return torch.cat(feats)


def fit_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    steps: int = 200,
    lr: float = 0.05,
    weight_decay: float = 1e-4,
    log_every: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Fit ``LayerNorm -> Linear`` on frozen features [N, dim] with labels [N] (int64) by full-batch AdamW.

    Returns the probe (``probe(features) -> logits [N, classes]``). ``num_classes`` defaults to max(label) + 1.
    """
    if features.dim() != 2:
        raise ValueError(f"features: expected [N, dim], got shape {tuple(features.shape)}")
    if labels.shape != features.shape[:1]:
        raise ValueError(f"labels: expected shape ({features.shape[0]},), got {tuple(labels.shape)}")
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    features = features.detach().float()
    probe = nn.Sequential(nn.LayerNorm(features.shape[1]), nn.Linear(features.shape[1], num_classes))
    probe.to(features.device)
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(probe(features), labels)
        loss.backward()
        opt.step()
        if log_every is not None:
            log_every(step, float(loss))
    return probe.eval()
