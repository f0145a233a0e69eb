"""ST-CNNT classification model (docs/MODELS.md 2.10).

x: [B, T, C_in, H, W] -> logits [B, num_classes]:

    pre = GELU(Conv2DExt(C -> C, 3x3)(GELU(Conv2DExt(C_in -> C, 3x3, stride 2)(x))))   # H/2 x W/2
    y, _ = HR-Net(pre)
    logits = Linear(2048 -> classes)(mean over T, H, W of Conv2DExt(C_y -> 2048, 1x1)(y))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fm_engine.models.stcnnt.backbones import STCNNTHRNet
from fm_engine.models.stcnnt.config import CellConfig
from fm_engine.nn._backend_arg import refuse_backend_argument
from fm_engine.nn.conv import Conv2DExt


@refuse_backend_argument
class STCNNTClassifier(nn.Module):
    """Image / series classifier on an HR-Net backbone. ``H``, ``W``: build-time input size (before the
    stride-2 stem, so the backbone is built for H/2 x W/2)."""

    def __init__(
        self,
        C_in: int = 3,
        num_classes: int = 10,
        C: int = 32,
        num_levels: int = 2,
        block_str: str | Sequence[str] = "T1L1G1",
        *,
        H: int = 64,
        W: int = 64,
        window: int | Sequence[int] = 8,
        patch: int | Sequence[int] = 2,
        window_sizing_method: str = "mixed",
        cfg: CellConfig | None = None,
        feature_dim: int = 2048,
    ) -> None:
        super().__init__()
        self.C_in, self.num_classes = C_in, num_classes
        self.pre = nn.Sequential(Conv2DExt(C_in, C, 3, 2, 1), nn.GELU(), Conv2DExt(C, C, 3, 1, 1), nn.GELU())
        self.backbone = STCNNTHRNet(
            C,
            C,
            num_levels,
            block_str,
            H=H // 2,
            W=W // 2,
            window=window,
            patch=patch,
            window_sizing_method=window_sizing_method,
            cfg=cfg,
        )
        self.proj = Conv2DExt(self.backbone.C_out, feature_dim, 1, 1, 0)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, C_in, H, W] -> logits [B, num_classes]."""
        if x.dim() != 5 or x.shape[2] != self.C_in:
            raise ValueError(f"STCNNTClassifier: expected x of shape [B, T, {self.C_in}, H, W], got {tuple(x.shape)}")
        y, _ = self.backbone(self.pre(x))
        return self.head(self.proj(y).mean(dim=(1, 3, 4)))
