"""MoCo v2: momentum key encoder, a queue of L2-normalised keys, InfoNCE; purposive pruner; shuffle-BN.

Used by the MoCo chest X-ray models (m 0.99, BN projector) and Adam (m 0.999, MLP fc, pruner).
The queue is updated after **every** step (one variant of the chest X-ray code never updated it and
collapsed; **fixed**). Shuffle-BN and the key gather only act under ``torch.distributed`` with more
than one process; on one process they are no-ops.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [B, ...] from every rank along dim 0 (identity on one process); no gradient."""
    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle-BN, step 1: a random permutation of the global batch; returns this rank's share and the
    index that undoes it. On one process returns ``(x, None)`` (BN statistics are then per batch anyway)."""
    world = _world_size()
    if world == 1:
        return x, None
    gathered = concat_all_gather(x)
    perm = torch.randperm(gathered.shape[0], device=x.device)
    dist.broadcast(perm, src=0)  # every rank must use the same permutation
    unshuffle = torch.argsort(perm)
    rank = dist.get_rank()
    return gathered[perm.view(world, -1)[rank]], unshuffle.view(world, -1)[rank]


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Shuffle-BN, step 2: bring the key encoder's outputs back to this rank's original order."""
    if unshuffle is None:
        return x
    return concat_all_gather(x)[unshuffle]


def purposive_prune(cos: torch.Tensor, threshold: float) -> torch.Tensor:
    """Adam's purposive pruner. cos: [B, 1 + K] cosines (positive first, before dividing by T).

    Negatives (columns 1..K) with cosine >= ``threshold`` become -inf, so they drop out of the softmax;
    the positive (column 0) is never pruned. Returns a new tensor of the same shape.
    """
    if cos.dim() != 2 or cos.shape[1] < 1:
        raise ValueError(f"cos: expected [B, 1 + K], got shape {tuple(cos.shape)}")
    prune = cos >= threshold
    prune[:, 0] = False
    return cos.masked_fill(prune, float("-inf"))


class MoCo(nn.Module):
    """MoCo v2 around an encoder that maps images to embeddings [B, dim].

    ``encoder_q`` is trained; ``encoder_k`` is its momentum copy (no gradients), updated as
    ``k = m·k + (1 - m)·q`` before each key pass. ``queue``: [queue_size, dim] L2-normalised keys
    (a ring buffer; ``queue_ptr`` is the next row to write). logits = [q·k+, q·queue] / T, label 0.
    ``prune_threshold``: with a value, the purposive pruner drops negatives with cosine >= it.
    """

    queue: torch.Tensor
    queue_ptr: torch.Tensor

    def __init__(
        self,
        encoder: nn.Module,
        dim: int = 128,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        prune_threshold: float | None = None,
    ) -> None:
        super().__init__()
        if queue_size < 1:
            raise ValueError(f"queue_size: expected a positive int, got {queue_size}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum: expected a value in [0, 1], got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.dim, self.queue_size = dim, queue_size
        self.momentum, self.temperature, self.prune_threshold = momentum, temperature, prune_threshold
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        for pq, pk in zip(self.encoder_q.parameters(), self.encoder_k.parameters(), strict=True):
            pk.mul_(self.momentum).add_(pq.detach(), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write keys [B, dim] (gathered from all ranks) at the pointer, wrapping around; ptr += B mod K."""
        keys = concat_all_gather(keys)
        n = keys.shape[0]
        if n > self.queue_size:
            raise ValueError(f"keys: {n} keys per step exceed queue_size {self.queue_size}")
        # index arithmetic stays on the device: no host sync for the pointer
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % self.queue_size
        self.queue[idx] = keys.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + n) % self.queue_size)

    def encode_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            im_k, unshuffle = batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            return batch_unshuffle(k, unshuffle)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, update: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """im_q, im_k: two views [B, C, H, W] -> (logits [B, 1 + K], labels [B] of zeros).

        ``update=True`` (training) runs the momentum update and enqueues the keys after computing
        the logits; ``update=False`` leaves both encoders and the queue untouched (evaluation).
        """
        if im_q.shape[0] != im_k.shape[0]:
            raise ValueError(f"im_k: batch {im_k.shape[0]} differs from im_q's batch {im_q.shape[0]}")
        q = F.normalize(self.encoder_q(im_q), dim=1)
        if update:
            self.momentum_update()
        k = self.encode_keys(im_k)
        l_pos = (q * k).sum(dim=1, keepdim=True)
        l_neg = q @ self.queue.clone().detach().to(q.dtype).t()
        cos = torch.cat([l_pos, l_neg], dim=1)
        if self.prune_threshold is not None:
            cos = purposive_prune(cos, self.prune_threshold)
        logits = cos / self.temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        if update:
            self.enqueue(k)
        return logits, labels

    def loss(self, im_q: torch.Tensor, im_k: torch.Tensor, update: bool = True) -> torch.Tensor:
        """InfoNCE: cross-entropy of the logits with label 0 (the positive key)."""
        logits, labels = self(im_q, im_k, update=update)
        return F.cross_entropy(logits, labels)


class ProjectedEncoder(nn.Module):
    """``projector(backbone(x))``: a backbone producing features [B, F] and a projection head."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


def bn_projector(in_dim: int = 2048, hidden: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """MoCo chest X-ray projector: Linear -> BatchNorm1d -> ReLU -> Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


def mlp_projector(in_dim: int = 2048, hidden: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """MoCo v2 fc head: Linear -> ReLU -> Linear (no BN)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
