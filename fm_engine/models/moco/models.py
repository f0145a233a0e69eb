"""MoCo chest X-ray models (docs/MODELS.md 4) and their registry entries.

* ``moco-resnet50``: ResNet-50 (2048-d) -> projector Linear(2048, 2048) -> BatchNorm1d -> ReLU ->
  Linear(2048, 128); momentum 0.99 (0.999 as an option), queue 65,536, temperature 0.2, queue updated
  after every step (**fixed**: one variant of the original never updated it).
* ``moco-vit-b16`` / ``moco-vit-s16``: the ViT's CLS output (768 / 384) into the same projector.
* ``moco-convstem-vit``: the hybrid ConvStem ViT (its own 128-d normalised head) as the MoCo encoder.
* ``moco-vit-s16-topk``: top-K patch-scoring head with NT-Xent (T 0.1) on ViT-S/16 patch tokens.
* ``moco-vit-s16-patchscore``: supervised softmax patch pooling on ViT-S/16 (cross-entropy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.models.moco.convstem import ConvStemViT
from fm_engine.models.moco.patch_scoring import PatchScoringClassifier, TopKPatchContrastive
from fm_engine.models.registry import ModelSpec, register_model
from fm_engine.models.resnet import ResNet50
from fm_engine.models.vit import vit_b16, vit_s16
from fm_engine.ssl.moco import MoCo, ProjectedEncoder, bn_projector


def moco_resnet50(
    base_width: int = 64,
    hidden: int = 2048,
    out_dim: int = 128,
    queue_size: int = 65536,
    momentum: float = 0.99,
    temperature: float = 0.2,
    in_chans: int = 3,
) -> MoCo:
    """MoCo v2 on ResNet-50 with the BN projector (chest X-ray recipe)."""
    backbone = ResNet50(num_classes=None, in_chans=in_chans, base_width=base_width)
    enc = ProjectedEncoder(backbone, bn_projector(backbone.feature_dim, hidden, out_dim))
    return MoCo(enc, dim=out_dim, queue_size=queue_size, momentum=momentum, temperature=temperature)


def moco_vit(
    variant: str = "b16",
    hidden: int = 2048,
    out_dim: int = 128,
    queue_size: int = 65536,
    momentum: float = 0.99,
    temperature: float = 0.2,
    **vit_overrides: Any,
) -> MoCo:
    """MoCo v2 on ViT-B/16 or ViT-S/16: CLS features -> BN projector. ``vit_overrides`` go to the ViT."""
    if variant not in ("b16", "s16"):
        raise ValueError(f"variant: expected 'b16' or 's16', got {variant!r}")
    vit = (vit_b16 if variant == "b16" else vit_s16)(**vit_overrides)
    enc = ProjectedEncoder(vit, bn_projector(vit.dim, hidden, out_dim))
    return MoCo(enc, dim=out_dim, queue_size=queue_size, momentum=momentum, temperature=temperature)


def moco_convstem_vit(
    queue_size: int = 65536, momentum: float = 0.99, temperature: float = 0.2, **vit_overrides: Any
) -> MoCo:
    """MoCo v2 with the ConvStem ViT as encoder (its head already gives 128-d normalised embeddings)."""
    enc = ConvStemViT(**vit_overrides)
    last = enc.head[-1]
    assert isinstance(last, nn.Linear)
    return MoCo(enc, dim=last.out_features, queue_size=queue_size, momentum=momentum, temperature=temperature)


def topk_vit_s16(
    k: int = 16, out_dim: int = 128, temperature: float = 0.1, **vit_overrides: Any
) -> TopKPatchContrastive:
    vit = vit_s16(**vit_overrides)
    return TopKPatchContrastive(vit, vit.dim, k=k, out_dim=out_dim, temperature=temperature)


def patchscore_vit_s16(num_classes: int = 14, **vit_overrides: Any) -> PatchScoringClassifier:
    vit = vit_s16(**vit_overrides)
    return PatchScoringClassifier(vit, vit.dim, num_classes)


def _two_views(model: nn.Module, batch_size: int, device: torch.device, small: bool, size: int) -> tuple[Any, ...]:
    b = max(batch_size, 2)  # BatchNorm in training mode needs two examples
    s = 32 if small else size
    return (torch.rand(b, 3, s, s, device=device), torch.rand(b, 3, s, s, device=device))


def _moco_loss(model: MoCo | TopKPatchContrastive, batch: tuple[Any, ...]) -> torch.Tensor:
    return model.loss(*batch)


def _cls_example(model: PatchScoringClassifier, batch_size: int, device: torch.device, small: bool) -> tuple[Any, ...]:
    s = 32 if small else 224
    n = model.fc.out_features
    return (torch.rand(batch_size, 3, s, s, device=device), torch.randint(0, n, (batch_size,), device=device))


def _cls_loss(model: nn.Module, batch: tuple[Any, ...]) -> torch.Tensor:
    logits, _ = model(batch[0])
    return F.cross_entropy(logits, batch[1])


def _register() -> None:
    views = lambda m, b, d, s: _two_views(m, b, d, s, 224)
    for name, factory, desc in (
        ("moco-resnet50", moco_resnet50, "MoCo v2 ResNet-50, BN projector, m 0.99, queue 65536, T 0.2"),
        ("moco-vit-b16", lambda **kw: moco_vit("b16", **kw), "MoCo v2 ViT-B/16 (CLS), BN projector, m 0.99"),
        ("moco-vit-s16", lambda **kw: moco_vit("s16", **kw), "MoCo v2 ViT-S/16 (CLS), BN projector, m 0.99"),
        ("moco-convstem-vit", moco_convstem_vit, "MoCo v2 with the hybrid ConvStem ViT (D 384, post-LN)"),
        ("moco-vit-s16-topk", topk_vit_s16, "top-K (16) patch-scoring head + NT-Xent (T 0.1) on ViT-S/16"),
    ):
        register_model(
            ModelSpec(
                name=name,
                family="moco",
                factory=factory,
                input_size=(224, 224),
                in_channels=3,
                patch=None if "resnet" in name else (8 if "convstem" in name else 16),
                example=views,
                loss=_moco_loss,
                description=desc,
            )
        )
    register_model(
        ModelSpec(
            name="moco-vit-s16-patchscore",
            family="moco",
            factory=patchscore_vit_s16,
            input_size=(224, 224),
            in_channels=3,
            patch=16,
            example=_cls_example,
            loss=_cls_loss,
            description="supervised softmax patch-score pooling on ViT-S/16, 14 classes, cross-entropy",
        )
    )


_register()
