"""Normalisation and stochastic depth for ST-CNNT on the [B, T, C, H, W] layout (docs/MODELS.md 2.1, 2.7).

Norm modes (``norm_mode``):

* ``"layer"``: LayerNorm over [C, H, W] with an affine of that shape; the model is tied to the H, W
  it was built for (another size raises ValueError).
* ``"batch2d"`` / ``"instance2d"``: BatchNorm2d / InstanceNorm2d over (H, W) with B*T as the batch.
* ``"batch3d"`` / ``"instance3d"``: BatchNorm3d / InstanceNorm3d over (T, H, W).

Instance norms carry a per-channel affine (``affine=True``) so every mode has learnable scale and shift.
All modes except ``"layer"`` accept any H, W.
"""

from __future__ import annotations

import torch
from torch import nn

NORM_MODES = ("layer", "batch2d", "instance2d", "batch3d", "instance3d")


def _check_5d(x: torch.Tensor, where: str) -> None:
    if x.dim() != 5:
        raise ValueError(f"{where}: expected x of shape [B, T, C, H, W], got {x.dim()}-D shape {tuple(x.shape)}")


class STNorm(nn.Module):
    """Normalisation of x [B, T, C, H, W] -> [B, T, C, H, W] in one of :data:`NORM_MODES`.

    ``H``, ``W`` are needed (and binding) only for ``"layer"``.
    """

    def __init__(self, norm_mode: str, C: int, H: int | None = None, W: int | None = None) -> None:
        super().__init__()
        if norm_mode not in NORM_MODES:
            raise ValueError(f"norm_mode must be one of {NORM_MODES}, got {norm_mode!r}")
        self.norm_mode = norm_mode
        self.C = C
        if norm_mode == "layer":
            if H is None or W is None:
                raise ValueError("norm_mode 'layer' normalises over [C, H, W] and needs H and W")
            self.norm: nn.Module = nn.LayerNorm([C, H, W])
        elif norm_mode == "batch2d":
            self.norm = nn.BatchNorm2d(C)
        elif norm_mode == "instance2d":
            self.norm = nn.InstanceNorm2d(C, affine=True)
        elif norm_mode == "batch3d":
            self.norm = nn.BatchNorm3d(C)
        else:
            self.norm = nn.InstanceNorm3d(C, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_5d(x, f"STNorm({self.norm_mode})")
        B, T, C, H, W = x.shape
        if C != self.C:
            raise ValueError(f"STNorm({self.norm_mode}): built for C={self.C}, got C={C}")
        if self.norm_mode == "layer":
            assert isinstance(self.norm, nn.LayerNorm)
            shape = tuple(self.norm.normalized_shape)
            if (C, H, W) != shape:
                raise ValueError(
                    f"STNorm(layer) normalises over [C, H, W] = {list(shape)} and cannot take an input of "
                    f"[C, H, W] = {[C, H, W]}; use a batch/instance norm mode for variable image sizes"
                )
            return self.norm(x)
        if self.norm_mode.endswith("2d"):
            return self.norm(x.reshape(B * T, C, H, W)).reshape(B, T, C, H, W)
        return self.norm(x.transpose(1, 2)).transpose(1, 2)

    def extra_repr(self) -> str:
        return f"norm_mode={self.norm_mode!r}, C={self.C}"


class StochasticDepth(nn.Module):
    """Per-sample ("row" mode) stochastic depth: in training, drop the whole branch output of each
    sample with probability ``p`` and scale the kept ones by 1/(1-p); identity in eval or when p = 0.

    x: [B, ...] -> same shape.
    """

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"stochastic depth probability p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}, mode='row'"
