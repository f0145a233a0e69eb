"""Batched augmentations on image tensors (GPU or CPU) for the MoCo chest X-ray and Adam recipes.

Built on kornia (imported lazily; optional dependency ``fm_engine[vision]``). Every pipeline takes
images [B, C, H, W] with values in [0, 1] and draws independent parameters per image.

Grayscale: chest X-rays have one channel but both recipes end with ImageNet normalisation for
3-channel backbones. The 1 -> 3 channel step is explicit: :func:`gray_to_rgb` repeats the channel and
is the first step of a recipe built with ``expand_gray=True``; with ``expand_gray=False`` a 1-channel
input is an error, never a silent broadcast.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def gray_to_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 3, H, W] by repeating the channel (a copy, not a broadcast view)."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images: expected a grayscale batch [B, 1, H, W], got shape {tuple(images.shape)}")
    return images.repeat(1, 3, 1, 1)


def _blur_kernel(size: int) -> int:
    k = max(3, int(0.1 * size))  # about 10% of the side, as in the MoCo v2 / SimCLR recipes
    return k if k % 2 else k + 1


class Recipe(nn.Module):
    """A named augmentation pipeline: optional explicit gray -> RGB, then the kornia transforms.

    images [B, C, H, W] in [0, 1] -> [B, 3, size, size] (normalised). ``two_views`` draws two
    independent augmentations of the same images.
    """

    def __init__(self, name: str, transforms: nn.Module, expand_gray: bool, params: dict | None = None) -> None:
        super().__init__()
        self.name, self.transforms, self.expand_gray = name, transforms, expand_gray
        self.params = dict(params or {})  # the recipe's settings, for logs and checks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images: expected [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images: expected floating values in [0, 1], got dtype {images.dtype}")
        if images.shape[1] == 1:
            if not self.expand_gray:
                raise ValueError(f"images: {self.name} needs 3 channels; pass expand_gray=True to repeat grayscale")
            images = gray_to_rgb(images)
        return self.transforms(images)

    def two_views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(images), self(images)


def moco_cxr_augment(
    size: int = 224, backbone: str = "resnet", rotation: float = 10.0, expand_gray: bool = True
) -> Recipe:
    """MoCo chest X-ray recipe: RandomResizedCrop (scale 0.8-1 for ResNet, 0.7-1 for ViT), horizontal
    flip, rotation up to ``rotation`` degrees (the recipe uses 10-15), colour jitter (0.4, 0.4, 0.4, 0.1,
    p 0.8), Gaussian blur (sigma 0.1-2, p 0.5), ImageNet normalisation."""
    import kornia.augmentation as K

    if backbone not in ("resnet", "vit"):
        raise ValueError(f"backbone: expected 'resnet' or 'vit', got {backbone!r}")
    scale = (0.8, 1.0) if backbone == "resnet" else (0.7, 1.0)
    k = _blur_kernel(size)
    t = nn.Sequential(
        K.RandomResizedCrop((size, size), scale=scale),
        K.RandomHorizontalFlip(),
        K.RandomRotation(degrees=rotation, p=1.0),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGaussianBlur((k, k), sigma=(0.1, 2.0), p=0.5),
        K.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)),
    )
    params = dict(
        size=size,
        scale=scale,
        flip=True,
        rotation=rotation,
        jitter=(0.4, 0.4, 0.4, 0.1, 0.8),
        blur_sigma=(0.1, 2.0),
        blur_p=0.5,
        blur_kernel=k,
    )
    return Recipe(f"moco_cxr_augment({backbone})", t, expand_gray, params)


def adam_augment(size: int = 224, expand_gray: bool = True) -> Recipe:
    """Adam recipe: RandomResizedCrop(size, scale 0.2-1), colour jitter (0.4, 0.4, 0.4, 0.1, p 0.8),
    Gaussian blur (sigma 0.1-2, p 0.5), rotation up to 30 degrees, ImageNet normalisation; no flip and no
    random grayscale."""
    import kornia.augmentation as K

    k = _blur_kernel(size)
    t = nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.2, 1.0)),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGaussianBlur((k, k), sigma=(0.1, 2.0), p=0.5),
        K.RandomRotation(degrees=30.0, p=1.0),
        K.Normalize(mean=torch.tensor(IMAGENET_MEAN), std=torch.tensor(IMAGENET_STD)),
    )
    params = dict(
        size=size,
        scale=(0.2, 1.0),
        flip=False,
        rotation=30.0,
        jitter=(0.4, 0.4, 0.4, 0.1, 0.8),
        blur_sigma=(0.1, 2.0),
        blur_p=0.5,
        blur_kernel=k,
    )
    return Recipe("adam_augment", t, expand_gray, params)
