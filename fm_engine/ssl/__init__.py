"""Pre-training objectives: M-JEPA, MAE, diffusion MAE, MoCo v2 (+ purposive pruner), top-K NT-Xent."""
