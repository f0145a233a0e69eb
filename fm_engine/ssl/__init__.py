"""Pre-training objectives: M-JEPA, MAE, diffusion MAE, MoCo v2 (+ purposive pruner), top-K NT-Xent."""

from fm_engine.ssl.diffusion_mae import DiffusionSchedule
from fm_engine.ssl.mae import masked_mse, norm_pix, patchify, random_masking, unpatchify
from fm_engine.ssl.mjepa import MJEPA, adamw_param_groups
from fm_engine.ssl.moco import MoCo, purposive_prune
from fm_engine.ssl.ntxent import nt_xent

__all__ = [
    "MJEPA",
    "DiffusionSchedule",
    "MoCo",
    "adamw_param_groups",
    "masked_mse",
    "norm_pix",
    "nt_xent",
    "patchify",
    "purposive_prune",
    "random_masking",
    "unpatchify",
]
