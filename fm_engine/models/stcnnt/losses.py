"""MRI image losses for ST-CNNT denoising (docs/MODELS.md 2.10), on [B, T, C, H, W] tensors.

Every function takes ``pred`` and ``target`` of the same shape [B, T, C, H, W] and returns a scalar.
For complex MRI images C = 2 holds [real, imag]; :class:`MRILoss` then evaluates the image-quality
terms (SSIM, MS-SSIM, Gaussian derivatives) on the magnitude, as the denoising model's training does.

* ``mse``, ``l1``: means over every element.
* ``ssim`` (2-D, per frame and channel) and ``ssim3d`` (over (T, H, W) per channel): Gaussian window
  of 5 (sigma 1.5), "valid" positions only, constants C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L the data
  range; loss = 1 - mean SSIM. Along T the 3-D window is min(5, T) long (short series still work).
* ``msssim``: multi-scale SSIM over ``levels`` scales (2x average pooling between scales) with the
  standard weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333) truncated to ``levels`` and renormalised;
  MS-SSIM = prod_j relu(cs_j)^w_j * relu(ssim_last)^w_last per image; loss = 1 - mean.
* ``psnr``: 10 log10(L^2 / mse); as a loss its negative (minimising it maximises PSNR).
* ``perpendicular``: the complex perpendicular loss; with P = |Re(X) Im(Y) - Im(X) Re(Y)| / |X| the
  distance of the target Y from the line through the prediction X, the per-pixel term is P where X and
  Y point within 90 degrees of each other and 2|Y| - P otherwise; loss = mean over complex pixels (the
  original divided the sum by the element count of the 2-channel target, i.e. half this mean).
* ``gaussian_deriv`` (2-D) / ``gaussian_deriv3d``: L1 distance between first-order Gaussian derivatives
  (along H and W; and T for 3-D) of pred and target, sigmas (0.5, 1.0, 1.25), kernel half-width
  ceil(3 sigma), zero padding ("same" size), averaged over sigmas and axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
LOSS_NAMES = ("mse", "l1", "ssim", "ssim3d", "msssim", "psnr", "perpendicular", "gaussian_deriv", "gaussian_deriv3d")


def _check_pair(pred: torch.Tensor, target: torch.Tensor, where: str) -> None:
    if pred.dim() != 5:
        raise ValueError(f"{where}: expected pred of shape [B, T, C, H, W], got {tuple(pred.shape)}")
    if pred.shape != target.shape:
        raise ValueError(f"{where}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")


def _gauss_1d(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _check_pair(pred, target, "mse_loss")
    return torch.mean((pred - target) ** 2)


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    _check_pair(pred, target, "l1_loss")
    return torch.mean(torch.abs(pred - target))


def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """10 log10(data_range^2 / mse); pred, target: [B, T, C, H, W]."""
    _check_pair(pred, target, "psnr")
    mse = torch.mean((pred - target) ** 2)
    return 10.0 * torch.log10(data_range**2 / (mse + torch.finfo(pred.dtype).eps))


def psnr_loss(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    return -psnr(pred, target, data_range)


def _ssim_maps(
    x: torch.Tensor, y: torch.Tensor, kernel: torch.Tensor, data_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SSIM and contrast-structure maps of x, y: [N, 1, *spatial] with a normalised kernel (valid conv)."""
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mu_x, mu_y = conv(x, kernel), conv(y, kernel)
    sxx = conv(x * x, kernel) - mu_x**2
    syy = conv(y * y, kernel) - mu_y**2
    sxy = conv(x * y, kernel) - mu_x * mu_y
    cs = (2 * sxy + c2) / (sxx + syy + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs
    return ssim, cs


def _check_window(size: tuple[int, ...], window: tuple[int, ...], where: str) -> None:
    if any(s < w for s, w in zip(size, window, strict=True)):
        raise ValueError(f"{where}: image size {list(size)} is smaller than the SSIM window {list(window)}")


def ssim(
    pred: torch.Tensor, target: torch.Tensor, window: int = 5, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Mean 2-D SSIM over every frame and channel of pred, target: [B, T, C, H, W]."""
    _check_pair(pred, target, "ssim")
    H, W = pred.shape[3:]
    _check_window((H, W), (window, window), "ssim")
    g = _gauss_1d(window, sigma, pred.dtype, pred.device)
    k = (g[:, None] * g[None, :])[None, None]
    s, _ = _ssim_maps(pred.reshape(-1, 1, H, W), target.reshape(-1, 1, H, W), k, data_range)
    return s.mean()


def ssim3d(
    pred: torch.Tensor, target: torch.Tensor, window: int = 5, sigma: float = 1.5, data_range: float = 1.0
) -> torch.Tensor:
    """Mean 3-D SSIM over (T, H, W) of every channel of pred, target: [B, T, C, H, W]."""
    _check_pair(pred, target, "ssim3d")
    B, T, C, H, W = pred.shape
    wt = min(window, T)
    _check_window((H, W), (window, window), "ssim3d")
    g = _gauss_1d(window, sigma, pred.dtype, pred.device)
    gt = _gauss_1d(wt, sigma, pred.dtype, pred.device)
    k = (gt[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]
    x = pred.transpose(1, 2).reshape(B * C, 1, T, H, W)
    y = target.transpose(1, 2).reshape(B * C, 1, T, H, W)
    s, _ = _ssim_maps(x, y, k, data_range)
    return s.mean()


def ms_ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    levels: int = 5,
    window: int = 5,
    sigma: float = 1.5,
    data_range: float = 1.0,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Mean multi-scale SSIM of pred, target: [B, T, C, H, W] (per frame and channel)."""
    _check_pair(pred, target, "ms_ssim")
    H, W = pred.shape[3:]
    w = list(weights if weights is not None else MS_SSIM_WEIGHTS[:levels])
    if len(w) != levels or levels < 1:
        raise ValueError(f"ms_ssim: need {levels} weights (levels >= 1), got {len(w)}")
    need = window * 2 ** (levels - 1)
    if min(H, W) < need:
        raise ValueError(
            f"ms_ssim: image {H}x{W} is too small for {levels} levels with window {window} (needs >= {need})"
        )
    wt = torch.tensor(w, dtype=pred.dtype, device=pred.device)
    wt = wt / wt.sum()
    g = _gauss_1d(window, sigma, pred.dtype, pred.device)
    k = (g[:, None] * g[None, :])[None, None]
    x, y = pred.reshape(-1, 1, H, W), target.reshape(-1, 1, H, W)
    terms = []
    for lev in range(levels):
        s, cs = _ssim_maps(x, y, k, data_range)
        val = s if lev == levels - 1 else cs
        terms.append(torch.relu(val.flatten(1).mean(1)) ** wt[lev])
        if lev < levels - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    return torch.stack(terms, 0).prod(0).mean()


def perpendicular_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Complex perpendicular loss of pred, target: [B, T, 2, H, W] ([real, imag] channels)."""
    _check_pair(pred, target, "perpendicular_loss")
    if pred.shape[2] != 2:
        raise ValueError(f"perpendicular_loss: needs C = 2 ([real, imag]) channels, got C = {pred.shape[2]}")
    xr, xi = pred[:, :, 0], pred[:, :, 1]
    yr, yi = target[:, :, 0], target[:, :, 1]
    eps = torch.finfo(pred.dtype).eps
    mag_x = torch.sqrt(xr**2 + xi**2 + eps)
    mag_y = torch.sqrt(yr**2 + yi**2)
    p = torch.abs(xr * yi - xi * yr) / mag_x
    same_side = (xr * yr + xi * yi) >= 0  # cos(angle between X and Y) >= 0
    return torch.where(same_side, p, 2 * mag_y - p).mean()


def _deriv_kernels(sigma: float, dims: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    r = math.ceil(3 * sigma)
    x = torch.arange(-r, r + 1, dtype=dtype, device=device)
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    dg = -x / sigma**2 * g
    kernels = []
    for axis in range(dims):
        k = None
        for a in range(dims):
            v = dg if a == axis else g
            shape = [1] * dims
            shape[a] = -1
            v = v.reshape(shape)
            k = v if k is None else k * v
        assert k is not None  # dims >= 1 here: the inner loop ran
        kernels.append(k[None, None])
    return kernels


def gaussian_deriv_loss(
    pred: torch.Tensor, target: torch.Tensor, sigmas: Sequence[float] = (0.5, 1.0, 1.25), dims: int = 2
) -> torch.Tensor:
    """L1 of first-order Gaussian derivatives of pred - target: [B, T, C, H, W].

    dims = 2: derivatives along H and W per frame; dims = 3: along T, H and W per channel.
    """
    _check_pair(pred, target, "gaussian_deriv_loss")
    if dims not in (2, 3):
        raise ValueError(f"gaussian_deriv_loss: dims must be 2 or 3, got {dims}")
    B, T, C, H, W = pred.shape
    # the derivative filter is linear, so filtering the difference equals the difference of the filtered images
    d = pred - target
    d = d.reshape(-1, 1, H, W) if dims == 2 else d.transpose(1, 2).reshape(B * C, 1, T, H, W)
    conv = F.conv2d if dims == 2 else F.conv3d
    total = d.new_zeros(())
    n = 0
    for sigma in sigmas:
        for k in _deriv_kernels(sigma, dims, pred.dtype, pred.device):
            pad = [s // 2 for s in k.shape[2:]]
            total = total + torch.mean(torch.abs(conv(d, k, padding=pad)))
            n += 1
    return total / n


def magnitude(x: torch.Tensor) -> torch.Tensor:
    """|x| of a [B, T, 2, H, W] complex image as [B, T, 1, H, W] (eps inside the root keeps the gradient finite)."""
    return torch.sqrt(x[:, :, 0:1] ** 2 + x[:, :, 1:2] ** 2 + torch.finfo(x.dtype).eps)


class MRILoss(nn.Module):
    """Weighted sum of the losses named in ``losses`` (see :data:`LOSS_NAMES`) with ``weights``.

    pred, target: [B, T, C, H, W]. With ``complex_i`` (C = 2, [real, imag]) SSIM, MS-SSIM and the
    Gaussian-derivative terms use the magnitude; MSE, L1, PSNR and the perpendicular loss the channels.
    """

    def __init__(
        self,
        losses: Sequence[str] = ("mse", "l1", "ssim", "perpendicular"),
        weights: Sequence[float] | None = None,
        complex_i: bool = True,
        data_range: float = 1.0,
        msssim_levels: int = 3,
    ) -> None:
        super().__init__()
        losses = tuple(losses)
        weights = tuple(weights) if weights is not None else (1.0,) * len(losses)
        if len(weights) != len(losses):
            raise ValueError(f"MRILoss: {len(losses)} losses but {len(weights)} weights")
        for name in losses:
            if name not in LOSS_NAMES:
                raise ValueError(f"MRILoss: unknown loss {name!r}; known: {LOSS_NAMES}")
        if "perpendicular" in losses and not complex_i:
            raise ValueError("MRILoss: the perpendicular loss needs complex_i=True ([real, imag] channels)")
        self.losses, self.weights = losses, weights
        self.complex_i, self.data_range, self.msssim_levels = complex_i, data_range, msssim_levels

    def term(self, name: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The unweighted loss ``name`` of pred, target: [B, T, C, H, W]."""
        if name == "mse":
            return mse_loss(pred, target)
        if name == "l1":
            return l1_loss(pred, target)
        if name == "psnr":
            return psnr_loss(pred, target, self.data_range)
        if name == "perpendicular":
            return perpendicular_loss(pred, target)
        p, t = (magnitude(pred), magnitude(target)) if self.complex_i else (pred, target)
        if name == "ssim":
            return 1.0 - ssim(p, t, data_range=self.data_range)
        if name == "ssim3d":
            return 1.0 - ssim3d(p, t, data_range=self.data_range)
        if name == "msssim":
            return 1.0 - ms_ssim(p, t, levels=self.msssim_levels, data_range=self.data_range)
        return gaussian_deriv_loss(p, t, dims=3 if name == "gaussian_deriv3d" else 2)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_pair(pred, target, "MRILoss")
        if self.complex_i and pred.shape[2] != 2:
            raise ValueError(f"MRILoss(complex_i=True): needs C = 2 ([real, imag]), got C = {pred.shape[2]}")
        total = pred.new_zeros(())
        for name, w in zip(self.losses, self.weights, strict=True):
            total = total + w * self.term(name, pred, target)
        return total
