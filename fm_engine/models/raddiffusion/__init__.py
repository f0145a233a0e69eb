"""RadDiffusion: multi-view chest X-ray ViT with a bottleneck-cls token; MAE and diffusion-MAE objectives,
study-level fine-tuning (registered in fm_engine.models.registry on import)."""

from __future__ import annotations

from typing import Any

import torch

from fm_engine.models.raddiffusion.evaluate import CHEXPERT_LABELS, linear_probe, map_uncertain, pos_weight
from fm_engine.models.raddiffusion.model import (
    SIZES,
    CrossSelfDecoder,
    EncoderOutput,
    MAEDecoder,
    RadDiffusionClassifier,
    RadDiffusionDiffMAE,
    RadDiffusionEncoder,
    RadDiffusionMAE,
)
from fm_engine.models.raddiffusion.study import Studies, make_studies, study_mean, study_mean_cls
from fm_engine.models.registry import ModelSpec, register_model

__all__ = [
    "CHEXPERT_LABELS",
    "SIZES",
    "CrossSelfDecoder",
    "EncoderOutput",
    "MAEDecoder",
    "RadDiffusionClassifier",
    "RadDiffusionDiffMAE",
    "RadDiffusionEncoder",
    "RadDiffusionMAE",
    "Studies",
    "example_lengths",
    "linear_probe",
    "make_studies",
    "map_uncertain",
    "pos_weight",
    "study_mean",
    "study_mean_cls",
]


def example_lengths(n_images: int) -> list[int]:
    """Split n images into studies of 3, 2, 3, 2, ... images (the last one takes the rest)."""
    out, left, i = [], n_images, 0
    while left > 0:
        n = min(left, 3 if i % 2 == 0 else 2)
        out.append(n)
        left -= n
        i += 1
    return out


def _images(
    model: RadDiffusionMAE | RadDiffusionDiffMAE | RadDiffusionClassifier,
    batch_size: int,
    device: torch.device,
    small: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    p = model.encoder.patch
    s = max(2 * p, 64) if small else model.encoder.image_size
    images = torch.rand(batch_size, 1, s, s, device=device) * 2 - 1
    return images, torch.tensor(example_lengths(batch_size), device=device)


def _pretrain_loss(model: RadDiffusionMAE | RadDiffusionDiffMAE, batch: tuple[Any, ...]) -> torch.Tensor:
    return model.loss(*batch)


def _finetune_example(
    model: RadDiffusionClassifier, batch_size: int, device: torch.device, small: bool
) -> tuple[Any, ...]:
    images, lengths = _images(model, batch_size, device, small)
    labels = (torch.rand(lengths.numel(), model.head.out_features, device=device) < 0.3).float()
    return images, lengths, labels


def _finetune_loss(model: RadDiffusionClassifier, batch: tuple[Any, ...]) -> torch.Tensor:
    images, lengths, labels = batch
    return model.loss(images, lengths, labels, pos_weight(labels))


def _register() -> None:
    for size, cfg in SIZES.items():
        common = dict(family="raddiffusion", input_size=(256, 256), in_channels=1, patch=cfg["patch"])
        enc = f"{cfg['dim']}/{cfg['depth']}/{cfg['heads']}, patch {cfg['patch']}, mask {cfg['mask_ratio']}"
        register_model(
            ModelSpec(
                name=f"raddiffusion-{size}-mae",
                factory=lambda size=size, **kw: RadDiffusionMAE(size, **kw),
                example=_images,
                loss=_pretrain_loss,
                description=f"RadDiffusion {size} MAE ({enc})",
                **common,
            )
        )
        register_model(
            ModelSpec(
                name=f"raddiffusion-{size}-dmae",
                factory=lambda size=size, **kw: RadDiffusionDiffMAE(size, "a", **kw),
                example=_images,
                loss=_pretrain_loss,
                description=f"RadDiffusion {size} diffusion MAE, decoder (a)",
                **common,
            )
        )
        register_model(
            ModelSpec(
                name=f"raddiffusion-{size}-dmae-cs",
                factory=lambda size=size, **kw: RadDiffusionDiffMAE(size, "cross-self", **kw),
                example=_images,
                loss=_pretrain_loss,
                description=f"RadDiffusion {size} diffusion MAE, cross-self decoder (b)",
                **common,
            )
        )
        register_model(
            ModelSpec(
                name=f"raddiffusion-{size}-finetune",
                factory=lambda size=size, **kw: RadDiffusionClassifier(size, **kw),
                example=_finetune_example,
                loss=_finetune_loss,
                description=f"RadDiffusion {size} study classifier, 14 CheXpert labels, BCE pos_weight 1/sqrt(freq)",
                **common,
            )
        )


_register()
