"""Studies in a flat batch and the bottleneck-cls study mean (docs/MODELS.md 3.2).

A batch is every image of every study, flat [ΣN_i, ...], plus ``lengths`` (images per study, in
order). Study ids are computed once per forward; the per-layer mean uses ``index_add`` and a
gather, with no host synchronisation and no Python loop over studies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class Studies(NamedTuple):
    """index: [B] study id of each image; counts: [S] images per study (float); first: [S] first image."""

    index: torch.Tensor  # type: ignore[assignment]  # a field named like tuple.index, by design
    counts: torch.Tensor
    first: torch.Tensor

    @property
    def num_studies(self) -> int:
        return self.counts.shape[0]


def make_studies(lengths: torch.Tensor | Sequence[int], n_images: int, device: torch.device | None = None) -> Studies:
    """Study bookkeeping for a flat batch of ``n_images``. lengths: [S] positive ints summing to n_images.

    Validating the sum reads ``lengths`` on the host once per forward (never per layer).
    """
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.dim() != 1 or lengths.numel() == 0 or lengths.dtype.is_floating_point:
        raise ValueError(f"lengths: expected a non-empty 1-D integer tensor of images per study, got {lengths!r}")
    # the value check reads the device; torch.compile(fullgraph=True) traces without it
    if not torch.compiler.is_compiling() and (bool((lengths < 1).any()) or int(lengths.sum()) != n_images):
        raise ValueError(f"lengths: expected positive counts summing to the {n_images} images, got {lengths.tolist()}")
    lengths = lengths.long()
    index = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    return Studies(index, lengths.float(), first)


def study_mean(values: torch.Tensor, studies: Studies) -> torch.Tensor:
    """Mean of values [B, D] over each study -> [S, D]."""
    sums = values.new_zeros(studies.num_studies, values.shape[-1]).index_add(0, studies.index, values)
    return sums / studies.counts.to(values.dtype)[:, None]


def study_mean_cls(x: torch.Tensor, studies: Studies) -> torch.Tensor:
    """Replace each image's cls token x[:, 0] by the mean cls of its study. x: [B, 1 + N, D] -> same shape."""
    mean = study_mean(x[:, 0], studies)
    return torch.cat([mean[studies.index][:, None], x[:, 1:]], dim=1)
