"""Pre-training objectives: M-JEPA, MAE, diffusion MAE, MoCo v2 (+ purposive pruner), top-K NT-Xent."""

from fm_engine.ssl.mjepa import MJEPA, adamw_param_groups

__all__ = ["MJEPA", "adamw_param_groups"]
