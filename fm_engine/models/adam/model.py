"""Adam / Eden (docs/MODELS.md 5): anatomy-driven MoCo v2 on ResNet-50.

* Backbone: ResNet-50 with torchvision names; MoCo v2 ``fc`` = Linear(2048, 2048) -> ReLU ->
  Linear(2048, 128) (no BN), so ``encoder_q.*`` loads into torchvision's resnet50 apart from ``fc``.
* Key encoder by momentum 0.999; queue 65,536 x 128; temperature 0.2; shuffle-BN across ranks under DDP.
* Anatomy decomposer (a data transform): granularity n = 0 is the whole image; n > 0 picks a random cell
  of the n x n grid and both views are made from that same cell.
* Purposive pruner for n > 0: negatives with cosine >= 0.8 to the query are dropped (logit -inf) before
  the cross-entropy with label 0; the positive is never pruned.
* Staged training n = 0, 2, 4: each stage starts from the previous stage's full state (both encoders,
  the queue and its pointer), see :func:`next_stage` and :func:`train_stages`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fm_engine.models.resnet import ResNet50
from fm_engine.ssl.moco import MoCo, mlp_projector


class AnatomyDecomposer:
    """Granularity-n crop. images [B, C, H, W] -> (crops [B, C, H//n, W//n], cells [B, 2] (row, col)).

    n = 0 returns the whole image (cells all zero). For n > 0 every image gets its own uniformly drawn
    cell of the n x n grid of (H//n) x (W//n) cells (remainder rows / columns at the bottom / right are
    never used). Make both views from the returned crops so they come from the same cell.
    """

    def __init__(self, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n: expected a granularity 0, 1, 2, ..., got {n!r}")
        self.n = n

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dim() != 4:
            raise ValueError(f"images: expected [B, C, H, W], got shape {tuple(images.shape)}")
        b, c, h, w = images.shape
        if self.n == 0:
            return images, torch.zeros(b, 2, dtype=torch.long, device=images.device)
        n = self.n
        ch, cw = h // n, w // n
        if ch < 1 or cw < 1:
            raise ValueError(f"images: {h}x{w} is too small for a {n}x{n} grid")
        cells = torch.randint(0, n, (b, 2), generator=generator, device="cpu").to(images.device)
        grid = images[:, :, : n * ch, : n * cw].reshape(b, c, n, ch, n, cw).permute(0, 2, 4, 1, 3, 5)
        crops = grid[torch.arange(b, device=images.device), cells[:, 0], cells[:, 1]]
        return crops, cells


class AdamMoCo(MoCo):
    """MoCo v2 of Adam at one granularity. ``forward`` / ``loss`` take two views [B, 3, H, W] of the same
    decomposed crops; the purposive pruner acts when ``granularity > 0``. ``config`` holds the constructor
    arguments (used by :func:`next_stage`)."""

    def __init__(
        self,
        granularity: int = 0,
        base_width: int = 64,
        in_chans: int = 3,
        out_dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        prune_threshold: float = 0.8,
    ) -> None:
        backbone = ResNet50(num_classes=None, in_chans=in_chans, base_width=base_width)
        backbone.fc = mlp_projector(backbone.feature_dim, backbone.feature_dim, out_dim)
        super().__init__(
            backbone,
            dim=out_dim,
            queue_size=queue_size,
            momentum=momentum,
            temperature=temperature,
            prune_threshold=prune_threshold if granularity > 0 else None,
        )
        self.granularity = granularity
        self.decomposer = AnatomyDecomposer(granularity)
        self.config: dict[str, Any] = dict(
            granularity=granularity,
            base_width=base_width,
            in_chans=in_chans,
            out_dim=out_dim,
            queue_size=queue_size,
            momentum=momentum,
            temperature=temperature,
            prune_threshold=prune_threshold,
        )

    def training_loss(
        self, images: torch.Tensor, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """One step's loss from raw images [B, C, H, W]: decompose at this stage's granularity, draw two
        views of the same crops with ``augment`` (identity if None), MoCo loss (queue updated)."""
        crops, _ = self.decomposer(images)
        aug = augment if augment is not None else (lambda x: x)
        return self.loss(aug(crops), aug(crops))


def next_stage(model: AdamMoCo, granularity: int) -> AdamMoCo:
    """The next stage's model: same configuration at ``granularity``, starting from ``model``'s full state
    (query and key encoders, queue, queue pointer; BN running statistics). ``model`` is left unchanged."""
    if not isinstance(model, AdamMoCo):
        raise ValueError(f"model: expected an AdamMoCo, got {type(model).__name__}")
    nxt = AdamMoCo(**{**model.config, "granularity": granularity})
    nxt.load_state_dict(model.state_dict())
    return nxt.to(next(model.parameters()).device).train(model.training)


def train_stages(
    model: AdamMoCo,
    batches: Callable[[int], Iterable[torch.Tensor]],
    stages: Sequence[int] = (0, 2, 4),
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[AdamMoCo, list[list[float]]]:
    """Staged training: for each granularity in ``stages`` hand the full state over (:func:`next_stage`;
    the first stage reuses ``model`` if it is already at that granularity), build an optimizer over
    the query encoder (default: SGD lr 0.03, momentum 0.9, wd 1e-4) and train on ``batches(n)``
    (raw images [B, C, H, W]). Returns (final model, per-stage loss lists)."""
    if make_optimizer is None:
        make_optimizer = lambda ps: torch.optim.SGD(ps, lr=0.03, momentum=0.9, weight_decay=1e-4)
    losses: list[list[float]] = []
    for n in stages:
        if n != model.granularity or losses:
            model = next_stage(model, n)
        opt = make_optimizer([p for p in model.encoder_q.parameters() if p.requires_grad])
        stage_losses = []
        for images in batches(n):
            loss = model.training_loss(images, augment)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            stage_losses.append(float(loss.detach()))
        losses.append(stage_losses)
    return model, losses
