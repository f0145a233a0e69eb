"""Resizing to the model size and the batched training augmentations.

Resizing (:func:`resize_pad`, per image, on the loader's CPU workers): the image is scaled by
``min(H_out / H, W_out / W)`` (aspect ratio kept) with antialiased bilinear interpolation, then padded
symmetrically (an odd remainder goes to the bottom / right) to exactly ``(H_out, W_out)``.
**Padding value: 0**, i.e. for uint16 images the integer 0, which is the lowest value of the known output
range (black after the MONOCHROME1 inversion, the bottom of the window); for fp32 images the display value
0.0 (black). uint16 images are rounded back to integers after interpolation: they keep their 16-bit
quantisation step, never 8 bits.

Augmentations (:func:`augment_batch`, batched on the training device, MiT-UB recipe: random horizontal and
vertical flips plus intensity jitter): flips move integers without changing them; brightness / contrast
jitter is an affine map of the display value, so it is folded into each example's intensity affine
(``scale``, ``offset``) and the integers reach the full-precision stem unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def parse_size(text: str | Sequence[int]) -> tuple[int, int]:
    """ "3072x2304" or (3072, 2304) -> (H, W); ValueError naming ``size`` otherwise."""
    try:
        if isinstance(text, str):
            parts = text.lower().replace(",", "x").split("x")
            h, w = (int(p) for p in parts)
        else:
            h, w = (int(p) for p in text)
    except (ValueError, TypeError) as e:
        raise ValueError(f"size: expected HxW such as 3072x2304, got {text!r}") from e
    if h < 1 or w < 1:
        raise ValueError(f"size: expected positive sizes, got {text!r}")
    return h, w


def fit_size(h: int, w: int, size: tuple[int, int]) -> tuple[int, int]:
    """Size of an h x w image scaled to fit inside ``size`` with its aspect ratio kept."""
    s = min(size[0] / h, size[1] / w)
    return max(1, min(size[0], round(h * s))), max(1, min(size[1], round(w * s)))


def resize_pad(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """pixels [..., C, H, W] (uint16 or float32) -> [..., C, H_out, W_out], same dtype (see module docstring)."""
    if pixels.dim() < 3:
        raise ValueError(f"pixels: expected [..., C, H, W], got shape {tuple(pixels.shape)}")
    h, w = pixels.shape[-2:]
    nh, nw = fit_size(h, w, size)
    lead = pixels.shape[:-2]
    x = pixels
    if (nh, nw) != (h, w):
        x = pixels.reshape(-1, 1, h, w).to(torch.float32)
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        if pixels.dtype == torch.uint16:
            x = x.round_().clamp_(0, 65535).to(torch.int32).to(torch.uint16)
        else:
            x = x.to(pixels.dtype)
        x = x.reshape(*lead, nh, nw)
    ph, pw = size[0] - nh, size[1] - nw
    if ph or pw:
        out = torch.zeros(*lead, *size, dtype=x.dtype)
        top, left = ph // 2, pw // 2
        out[..., top : top + nh, left : left + nw] = x
        x = out
    return x


@dataclasses.dataclass
class AugmentConfig:
    """Probabilities of the flips and the half-ranges of the intensity jitter (0 disables one).

    contrast c ~ U(1 - contrast, 1 + contrast), brightness b ~ U(-brightness, brightness):
    display y -> (y - 0.5) * c + 0.5 + b."""

    hflip: float = 0.5
    vflip: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1


def augment_batch(
    images: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random flips and intensity jitter for a batch.

    images: [B, C, H, W] uint16 or float32 on any device; scale, offset: [B] float64 (display = images *
    scale + offset). Returns (images, scale, offset) of the same shapes and dtypes. The random draws come
    from ``generator`` (on the images' device) so that a run can be resumed with the same augmentations.
    """
    b = images.shape[0]
    dev = images.device
    u = torch.rand(b, 4, device=dev, generator=generator, dtype=torch.float64)
    is_u16 = images.dtype == torch.uint16
    x = images.to(torch.int32) if is_u16 else images  # flip kernels do not take uint16
    for col, p, dim in ((0, cfg.hflip, -1), (1, cfg.vflip, -2)):
        if p > 0:
            sel = (u[:, col] < p).view(b, *([1] * (x.dim() - 1)))
            x = torch.where(sel, x.flip(dim), x)
    if is_u16:
        x = x.to(torch.uint16)
    c = 1.0 + cfg.contrast * (2.0 * u[:, 2] - 1.0)
    br = cfg.brightness * (2.0 * u[:, 3] - 1.0)
    scale = scale.to(dev, torch.float64) * c
    offset = (offset.to(dev, torch.float64) - 0.5) * c + 0.5 + br
    return x, scale, offset


def stem_inputs(images: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """What the model's stem gets for a batch: (image, intensity_scale, intensity_offset).

    When every example shares one affine and the images are uint16, the integers go to the stem with that
    affine (the stem applies it in fp32). Otherwise the per-example affine is applied here in fp32
    (``images * scale[b] + offset[b]``, a 24-bit mantissa) and the stem gets scale 1, offset 0.
    images: [B, C, H, W]; scale, offset: [B].
    """
    s0, o0 = float(scale[0]), float(offset[0])
    if images.dtype == torch.uint16 and bool((scale == s0).all()) and bool((offset == o0).all()):
        return images, s0, o0
    shape = (-1,) + (1,) * (images.dim() - 1)
    x = images.to(torch.float32) * scale.to(torch.float32).view(shape) + offset.to(torch.float32).view(shape)
    return x, 1.0, 0.0
