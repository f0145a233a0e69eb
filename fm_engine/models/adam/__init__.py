"""Adam / Eden: anatomy-driven MoCo v2 on ResNet-50 with the purposive pruner and staged training
(registered in fm_engine.models.registry on import)."""

from __future__ import annotations

from typing import Any

import torch

from fm_engine.models.adam.model import AdamMoCo, AnatomyDecomposer, next_stage, train_stages
from fm_engine.models.registry import ModelSpec, register_model

__all__ = ["AdamMoCo", "AnatomyDecomposer", "next_stage", "train_stages"]


def _views(model: AdamMoCo, batch_size: int, device: torch.device, small: bool) -> tuple[Any, ...]:
    b = max(batch_size, 2)  # BatchNorm in training mode needs two examples
    n = model.granularity
    side = (32 if small else 224) * max(n, 1)
    crops, _ = model.decomposer(torch.rand(b, 3, side, side, device=device))
    return crops, crops + 0.05 * torch.randn_like(crops)


def _loss(model: AdamMoCo, batch: tuple[Any, ...]) -> torch.Tensor:
    return model.loss(*batch)


for _n in (0, 2, 4):
    register_model(
        ModelSpec(
            name="adam-resnet50" if _n == 0 else f"adam-resnet50-n{_n}",
            family="adam",
            factory=lambda _n=_n, **kw: AdamMoCo(**{"granularity": _n, **kw}),
            input_size=(224, 224),
            in_channels=3,
            patch=None,
            example=_views,
            loss=_loss,
            description=f"Adam MoCo v2 ResNet-50, granularity {_n}"
            + (", purposive pruner (cos >= 0.8)" if _n else "")
            + ", m 0.999, queue 65536, T 0.2",
        )
    )
