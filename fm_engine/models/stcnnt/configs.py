"""Registry entries of the ST-CNNT family (docs/MODELS.md 2.10).

* ``stcnnt-mri-hrnet-production``: the production MRI denoising model (HR-Net, C 32, 2 levels, block strings
  "T1L1G1" / "T1L1G1T1L1G1", parallel cells, cosine attention, no relative-position bias, batch2d norm,
  mixer kernel 3, scale ratio 1, 32 heads, window 8, patch 2) on 64 x 64 frames, T = 12.
* ``stcnnt-hrnet-parser-default``: the same MRI task on the parser-default backbone (sequential cells,
  window 64 / patch 16, 32 heads, relative-position bias, mixer kernel 5, scale ratio 4, instance2d norm,
  HR-Net C 32, 2 levels, "T1L1G1") on 256 x 256 frames, T = 12.
* ``stcnnt-hrnet-classification``: the classification model (stride-2 stem, production-like HR-Net,
  2048-wide features, 10 classes) on 2-D 64 x 64 RGB images (T = 1).

MRI ``loss`` hooks: :class:`~fm_engine.models.stcnnt.losses.MRILoss` with MSE, L1, SSIM and the
perpendicular loss (weights 1) on synthetic noisy / clean pairs
(:func:`~fm_engine.models.stcnnt.mri.synthetic_mri_pair`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.models.registry import ModelSpec, register_model
from fm_engine.models.stcnnt.classification import STCNNTClassifier
from fm_engine.models.stcnnt.config import CellConfig
from fm_engine.models.stcnnt.losses import MRILoss
from fm_engine.models.stcnnt.mri import PRODUCTION_CELL, STCNNTMRI, synthetic_mri_pair

PARSER_DEFAULT_CELL = CellConfig()  # the CellConfig defaults are the parser defaults

_MRI_LOSS = MRILoss(losses=("mse", "l1", "ssim", "perpendicular"), weights=(1.0, 1.0, 1.0, 1.0))


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _mri_example(full: tuple[int, int, int], small: tuple[int, int, int]) -> Any:
    def example(model: nn.Module, batch_size: int, device: torch.device | str, small_: bool) -> tuple[Any, ...]:
        T, H, W = small if small_ else full
        gen = torch.Generator().manual_seed(0)
        return synthetic_mri_pair(batch_size, T, H, W, dtype=_dtype_of(model), device=device, generator=gen)

    return example


def mri_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The weighted MRI loss of the model's output on (noisy input, clean target)."""
    x, y = batch
    return _MRI_LOSS(model(x), y)


def _cls_example(model: STCNNTClassifier, batch_size: int, device: torch.device | str, small: bool) -> tuple[Any, ...]:
    H = 32 if small else 64
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 1, model.C_in, H, H, generator=gen).to(device=device, dtype=_dtype_of(model))
    labels = torch.randint(0, model.num_classes, (batch_size,), generator=gen).to(device)
    return x, labels


def cls_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, labels = batch
    return F.cross_entropy(model(x), labels)


def _no_dropout(cell: CellConfig) -> CellConfig:
    """The cell without attention dropout or stochastic depth."""
    return cell.replace(att_dropout_p=0.0, dropout_p=0.0)


def _register() -> None:
    register_model(
        ModelSpec(
            name="stcnnt-mri-hrnet-production",
            family="stcnnt",
            factory=STCNNTMRI,
            input_size=(12, 64, 64),
            in_channels=3,
            patch=2,
            example=_mri_example((12, 64, 64), (2, 16, 16)),
            loss=mri_loss,
            description="ST-CNNT MRI denoising, production HR-Net (parallel cells, window 8, patch 2), 64x64, T 12",
            defaults=dict(
                C=32,
                num_levels=2,
                block_str=("T1L1G1", "T1L1G1T1L1G1"),
                H=64,
                W=64,
                window=8,
                patch=2,
                cfg=PRODUCTION_CELL,
            ),
            dropout_off=dict(cfg=_no_dropout(PRODUCTION_CELL)),
        )
    )
    register_model(
        ModelSpec(
            name="stcnnt-hrnet-parser-default",
            family="stcnnt",
            factory=STCNNTMRI,
            input_size=(12, 256, 256),
            in_channels=3,
            patch=16,
            example=_mri_example((12, 256, 256), (1, 128, 128)),
            loss=mri_loss,
            description="ST-CNNT MRI denoising on the parser-default HR-Net (sequential cells, window 64, patch 16)",
            defaults=dict(
                C=32,
                num_levels=2,
                block_str="T1L1G1",
                H=256,
                W=256,
                window=64,
                patch=16,
                cfg=PARSER_DEFAULT_CELL,
            ),
            dropout_off=dict(cfg=_no_dropout(PARSER_DEFAULT_CELL)),
        )
    )
    register_model(
        ModelSpec(
            name="stcnnt-hrnet-classification",
            family="stcnnt",
            factory=STCNNTClassifier,
            input_size=(1, 64, 64),
            in_channels=3,
            patch=2,
            example=_cls_example,
            loss=cls_loss,
            description="ST-CNNT classifier: stride-2 stem, HR-Net, 1x1 conv to 2048, pooled, linear to 10 classes",
            defaults=dict(
                C_in=3,
                num_classes=10,
                C=32,
                num_levels=2,
                block_str="T1L1G1",
                H=64,
                W=64,
                window=8,
                patch=2,
                cfg=PRODUCTION_CELL,
            ),
            dropout_off=dict(cfg=_no_dropout(PRODUCTION_CELL)),
        )
    )


_register()
