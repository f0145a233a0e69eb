"""Token-grid helpers shared by the backbones and the objectives: grid positions and token gathers.

``fm_engine.models.mitub.layers`` (``grid_positions``) and ``fm_engine.models.mitub.vit``
(``gather_tokens``) re-export them under the same names.
"""

from __future__ import annotations

import torch

from fm_engine.ops import grid_coords


def grid_positions(grid: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[-1, 1] coordinates of every cell of ``grid`` in row-major order -> [prod(grid), len(grid)].

    An axis of length 1 sits at 0 (**fixed**: the original divided by zero and produced NaN).
    """
    axes = [grid_coords(n, device, dtype) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))


def gather_tokens(x: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """x: [B, N, D], token_index: [B, K] -> [B, K, D]."""
    return torch.gather(x, 1, token_index[..., None].expand(-1, -1, x.shape[-1]))
