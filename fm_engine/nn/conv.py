"""Convolutions on the ST-CNNT layout [B, T, C, H, W] (docs/MODELS.md 2.1).

``Conv2DExt`` folds B*T into the batch and applies one Conv2d per frame (weights shared over T);
``Conv3DExt`` applies a Conv3d over (T, H, W). Both honour ``bias`` (one old version of the original
silently dropped every bias; **fixed**).
"""

from __future__ import annotations

import torch
from torch import nn

from fm_engine.ops.window_attention import pair


def _pair0(name: str, x: int | tuple[int, int]) -> tuple[int, int]:
    """Like ``pair`` but 0 is allowed (padding)."""
    if isinstance(x, int) and x == 0:
        return (0, 0)
    if isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(v, int) and v >= 0 for v in x):
        return int(x[0]), int(x[1])
    return pair(name, x)


def _check_5d(name: str, x: torch.Tensor, channels: int) -> None:
    if x.dim() != 5:
        raise ValueError(f"{name}: expected a 5-D tensor [B, T, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[2] != channels:
        raise ValueError(f"{name}: expected C = {channels} channels at dim 2 of [B, T, C, H, W], got {x.shape[2]}")


class Conv2DExt(nn.Module):
    """Per-frame 2-D convolution. x: [B, T, C_in, H, W] -> [B, T, C_out, H', W'].

    ``separable=True``: depthwise k x k conv (groups = C_in, with the stride and padding) then a 1x1 conv
    to C_out; the bias (when on) sits on both. Parameters: ``conv2d`` (or ``depthwise`` + ``pointwise``).
    """

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        bias: bool = True,
        separable: bool = False,
    ) -> None:
        super().__init__()
        self.C_in, self.C_out = C_in, C_out
        ks, st, pd = pair("kernel_size", kernel_size), pair("stride", stride), _pair0("padding", padding)
        self.separable = separable
        if separable:
            self.depthwise = nn.Conv2d(C_in, C_in, ks, st, pd, groups=C_in, bias=bias)
            self.pointwise = nn.Conv2d(C_in, C_out, 1, 1, 0, bias=bias)
        else:
            self.conv2d = nn.Conv2d(C_in, C_out, ks, st, pd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_5d("x", x, self.C_in)
        B, T = x.shape[:2]
        y = x.reshape(B * T, *x.shape[2:])
        y = self.pointwise(self.depthwise(y)) if self.separable else self.conv2d(y)
        return y.reshape(B, T, *y.shape[1:])


class Conv3DExt(nn.Module):
    """3-D convolution over (T, H, W). x: [B, T, C_in, H, W] -> [B, T', C_out, H', W'].

    kernel_size / stride / padding: int or (t, h, w). Parameter: ``conv3d``.
    """

    def __init__(
        self,
        C_in: int,
        C_out: int,
        kernel_size: int | tuple[int, int, int] = 3,
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.C_in, self.C_out = C_in, C_out
        self.conv3d = nn.Conv3d(C_in, C_out, kernel_size, stride, padding, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_5d("x", x, self.C_in)
        y = self.conv3d(x.transpose(1, 2))  # Conv3d wants [B, C, T, H, W]
        return y.transpose(1, 2).contiguous()
