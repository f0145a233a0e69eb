"""ST-CNNT MRI denoising model (docs/MODELS.md 2.10) and synthetic noisy / clean pairs for it.

x: [B, T, 3, H, W] = [real, imag, g-factor] -> [B, T, 2, H, W] = [real, imag]:

    pre = Conv2DExt(3 -> C, 3x3)(x)
    y, _ = HR-Net(pre)                      # [B, T, C * (2**L - 1), H, W]
    y[:, :, :C] += pre                      # long residual on the level-0 channels
    out = Conv2DExt(C * (2**L - 1) -> 2, 3x3)(y)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.models.stcnnt.backbones import STCNNTHRNet
from fm_engine.models.stcnnt.config import CellConfig
from fm_engine.nn._backend_arg import refuse_backend_argument
from fm_engine.nn.conv import Conv2DExt

#: the production MRI denoising cell options (docs/MODELS.md 2.10)
PRODUCTION_CELL = CellConfig(
    n_head=32,
    cell_type="parallel",
    norm_mode="batch2d",
    cosine_att=True,
    att_with_rel_pos_bias=False,
    mixer_kernel=3,
    mixer_padding=1,
    scale_ratio_in_mixer=1.0,
)


@refuse_backend_argument
class STCNNTMRI(nn.Module):
    """MRI denoising: HR-Net backbone between a 3x3 pre conv and a 3x3 post conv (see the module docstring).

    ``H``, ``W`` are the build-time frame size (window sizing; the model takes other sizes whose frames fit
    the windows of every level unless ``cfg.norm_mode == "layer"``).
    """

    def __init__(
        self,
        C: int = 32,
        num_levels: int = 2,
        block_str: str | Sequence[str] = ("T1L1G1", "T1L1G1T1L1G1"),
        *,
        H: int = 64,
        W: int = 64,
        window: int | Sequence[int] = 8,
        patch: int | Sequence[int] = 2,
        window_sizing_method: str = "mixed",
        cfg: CellConfig = PRODUCTION_CELL,
        C_in: int = 3,
        C_out: int = 2,
    ) -> None:
        super().__init__()
        self.C, self.C_in, self.C_out = C, C_in, C_out
        self.pre = Conv2DExt(C_in, C, 3, 1, 1)
        self.backbone = STCNNTHRNet(
            C,
            C,
            num_levels,
            block_str,
            H=H,
            W=W,
            window=window,
            patch=patch,
            window_sizing_method=window_sizing_method,
            cfg=cfg,
        )
        self.post = Conv2DExt(self.backbone.C_out, C_out, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, 3, H, W] ([real, imag, g-factor]) -> [B, T, 2, H, W] ([real, imag])."""
        if x.dim() != 5:
            raise ValueError(f"STCNNTMRI: expected x of shape [B, T, {self.C_in}, H, W] (rank 5), got {tuple(x.shape)}")
        if x.shape[2] != self.C_in:
            raise ValueError(
                f"STCNNTMRI: expected C = {self.C_in} input channels ([real, imag, g-factor]), got {x.shape[2]}"
            )
        pre = self.pre(x)
        y, _ = self.backbone(pre)
        y = torch.cat((y[:, :, : self.C] + pre, y[:, :, self.C :]), dim=2)
        return self.post(y)


def synthetic_mri_pair(
    B: int,
    T: int,
    H: int,
    W: int,
    *,
    noise_sigma: float = 0.1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic complex MRI-like series and their noisy versions.

    Returns (x [B, T, 3, H, W] = [noisy real, noisy imag, g-factor], y [B, T, 2, H, W] = clean [real, imag]).
    Clean images are smooth (bilinear upsampling of a coarse random field, slowly varying over T); the
    noise is Gaussian with a per-pixel standard deviation noise_sigma * g, g a smooth map in [1, 2].
    """

    def smooth(c: int, scale: int) -> torch.Tensor:
        hh, ww = max(H // scale, 1), max(W // scale, 1)
        coarse = torch.randn(B * T, c, hh, ww, generator=generator, dtype=torch.float32)
        return F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False).reshape(B, T, c, H, W)

    base = smooth(2, 8)
    clean = 0.5 * (base + base.mean(1, keepdim=True))  # frames of one series share most of their content
    g = 1.0 + torch.sigmoid(smooth(1, 16))
    noisy = clean + noise_sigma * g * torch.randn(B, T, 2, H, W, generator=generator, dtype=torch.float32)
    x = torch.cat((noisy, g), dim=2)
    return x.to(device=device, dtype=dtype), clean.to(device=device, dtype=dtype)
