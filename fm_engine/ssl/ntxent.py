"""NT-Xent (SimCLR) contrastive loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent over two views. z1, z2: [B, D] (normalised here) -> scalar.

    For each of the 2B embeddings the positive is the other view of the same example and the
    negatives are the other 2B - 2 embeddings; cross-entropy of cosine / temperature, mean over 2B.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z2: expected the shape of z1 [B, D] {tuple(z1.shape)}, got {tuple(z2.shape)}")
    if z1.shape[0] < 2:
        raise ValueError(f"z1: NT-Xent needs at least 2 examples, got batch {z1.shape[0]}")
    if temperature <= 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = (z @ z.t()) / temperature
    sim = sim.masked_fill(torch.eye(2 * b, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(z.device)
    return F.cross_entropy(sim, target)
