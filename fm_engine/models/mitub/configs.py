"""Registry entries of the MiT-UB configurations (docs/MODELS.md 1.1).

Every entry's ``loss`` hook runs the M-JEPA objective; the wrapper (EMA copy, predictor) is built once
per model instance and cached on it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fm_engine.models.mitub.avit import AViT
from fm_engine.models.mitub.vit import ViT
from fm_engine.models.registry import ModelSpec, register_model

_MAMMO = dict(in_channels=1, patch=16, head_dim=64)
_VIT_512 = dict(**_MAMMO, dim=512, depth=12, heads=8, kv_heads=4)
_VIT_768 = dict(**_MAMMO, dim=768, depth=24, heads=12, kv_heads=6)
_CIFAR = dict(in_channels=3, patch=4, dim=384, depth=12, heads=12, kv_heads=12, head_dim=32)

# name -> (constructor, defaults, full input size, reduced input size for CPU smoke runs, description)
CONFIGS: dict[str, tuple[type[nn.Module], dict[str, Any], tuple[int, int], tuple[int, int], str]] = {
    "vit-i1-p16-d512": (ViT, _VIT_512, (512, 384), (64, 64), "mammography ViT, dim 512, 32x24 tokens"),
    "vit-i1-p16-d512-a16_12": (
        AViT,
        dict(**_VIT_512, kv_dim=256, target_grid=(16, 12), high_res_depth=4),
        (3072, 2304),
        (256, 192),
        "mammography AViT, dim 512, pooled to 16x12",
    ),
    "vit-i1-p16-d512-a32_24": (
        AViT,
        dict(**_VIT_512, kv_dim=256, target_grid=(32, 24), high_res_depth=4),
        (3072, 2304),
        (512, 384),
        "mammography AViT, dim 512, pooled to 32x24",
    ),
    "vit-i1-p16-d768": (ViT, _VIT_768, (512, 384), (64, 64), "mammography ViT, dim 768"),
    # the original code built this one at dim 512 too (**fixed**: dim 768, matching its ViT)
    "vit-i1-p16-d768-a16_12": (
        AViT,
        dict(**_VIT_768, kv_dim=256, target_grid=(16, 12), high_res_depth=6),
        (3072, 2304),
        (256, 192),
        "mammography AViT, dim 768, pooled to 16x12",
    ),
    # the original code built this one at dim 512 (**fixed**: dim 768, matching its ViT)
    "vit-i1-p16-d768-a32_24": (
        AViT,
        dict(**_VIT_768, kv_dim=256, target_grid=(32, 24), high_res_depth=6),
        (3072, 2304),
        (512, 384),
        "mammography AViT, dim 768, pooled to 32x24",
    ),
    "vit-cifar10": (ViT, _CIFAR, (32, 32), (16, 16), "CIFAR-10 ViT, dim 384, head dim 32"),
    "vit-cifar10-adaptive": (
        AViT,
        dict(**_CIFAR, kv_dim=64, target_grid=(4, 4), high_res_depth=4),
        (32, 32),
        (16, 16),
        "CIFAR-10 AViT, pooled to 4x4",
    ),
}


def example_images(
    model: ViT | AViT, batch_size: int, device: torch.device | str, size: tuple[int, int]
) -> tuple[torch.Tensor, float]:
    """Synthetic raw images [B, C, H, W] (uint16 for 1 channel, uint8 for RGB) and their intensity scale."""
    c = model.config["in_channels"]
    if c == 1:
        img = torch.randint(0, 4096, (batch_size, c, *size), dtype=torch.int32).to(torch.uint16)
        return img.to(device), 1.0 / 4095.0
    return torch.randint(0, 256, (batch_size, c, *size), dtype=torch.uint8).to(device), 1.0 / 255.0


def mjepa_objective(model: nn.Module) -> nn.Module:
    """The cached M-JEPA wrapper of ``model`` (built on first use, on the model's device and dtype).

    Cached as a plain attribute rather than in a WeakKeyDictionary: the wrapper references the model,
    so a dictionary entry would keep its own key alive; as an attribute it dies with the model and is
    carried along by ``copy.deepcopy(model)``. Not a registered submodule: ``state_dict`` is unchanged.
    """
    obj = model.__dict__.get("_mjepa_objective")
    if obj is None:
        from fm_engine.ssl.mjepa import MJEPA

        p = next(model.parameters())
        obj = MJEPA(model).to(device=p.device, dtype=p.dtype)
        model.__dict__["_mjepa_objective"] = obj
    return obj


def mjepa_loss(model: nn.Module, batch: tuple[Any, ...]) -> torch.Tensor:
    images, scale = batch
    return mjepa_objective(model)(images, intensity_scale=scale)["loss"]


def _register() -> None:
    for name, (cls, defaults, size, small, desc) in CONFIGS.items():

        def example(model: ViT | AViT, batch_size: int, device: Any, small_: bool, _s=size, _m=small) -> tuple:
            return example_images(model, batch_size, device, _m if small_ else _s)

        register_model(
            ModelSpec(
                name=name,
                family="mitub",
                factory=cls,
                input_size=size,
                in_channels=defaults["in_channels"],
                patch=defaults["patch"],
                example=example,
                loss=mjepa_loss,
                description=desc,
                defaults=dict(defaults),
                dropout_off=dict(dropout=0.0, attn_dropout=0.0),
            )
        )


_register()
