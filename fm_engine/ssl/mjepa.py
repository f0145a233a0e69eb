"""M-JEPA pre-training objective of MiT-UB (docs/MODELS.md 1.5).

``MJEPA(encoder)`` wraps a MiT-UB backbone (``ViT`` or ``AViT``) with an EMA target copy, a predictor
and the loss. A training step is::

    objective.update_ema()                       # once per optimiser step, BEFORE the forward
    out = objective(images, labels, intensity_scale=1 / 65535)
    out["loss"].backward()

Masks (True = kept) are drawn per example with exact counts on coarsened grids: the context keeps
round(context_ratio * cells) cells of the grid coarsened by ``context_coarsen``, the target keeps
round(target_ratio * cells) cells of the grid coarsened by ``target_coarsen`` (at least one cell
each); cells are upsampled to tokens. They live on the encoder's ``mask_grid``: the token grid of the
ViT, the pooled target grid of the AViT. The token grid must be divisible by both coarsening factors
so that every example keeps the same number of tokens.

Static shapes: with the masks drawn here, every tensor shape of a step is known from the config (the
kept counts follow from the ratios; the predictor input is padded to the largest possible union of
context and target, ``min(N, Kc + Kt)``; the AViT's context keys/values follow from the kept cells and
the grids, see :func:`fm_engine.models.mitub.avit.context_kv_index`). No step reads a value back from
the device, and a compiled or autotuned step never meets a new shape: a predictor padded to each
batch's own union length made every step launch the fused kernels at a new size (Triton re-tuned and
re-compiled them each step), made ``torch.compile`` recompile, and synchronised the host twice. Masks
passed in by the caller still work (their counts are then read back once).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fm_engine.nn.tokens import gather_tokens, grid_positions
from fm_engine.nn.transformer import EncoderLayer


def coarse_mask(
    batch: int,
    grid: Sequence[int],
    coarsen: int,
    ratio: float,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    name: str = "coarsen",
) -> torch.Tensor:
    """Random masks [B, prod(grid)] (True = kept), row-major over ``grid``.

    Each example keeps exactly ``clamp(round(ratio * cells), 1, cells)`` cells of the grid coarsened by
    ``coarsen`` on every axis, each cell covering ``coarsen`` tokens per axis. ``name`` is the argument
    named in the error when ``grid`` is not divisible by ``coarsen``.
    """
    grid = tuple(int(g) for g in grid)
    if coarsen < 1 or any(g % coarsen for g in grid):
        raise ValueError(f"{name}: token grid {grid} is not divisible by {coarsen}")
    cgrid = tuple(g // coarsen for g in grid)
    cells = math.prod(cgrid)
    keep = _kept_cells(cells, ratio)
    scores = torch.rand(batch, cells, device=device, generator=generator)
    chosen = scores.argsort(dim=1)[:, :keep]
    m = torch.zeros(batch, cells, dtype=torch.bool, device=device).scatter_(1, chosen, True).view(batch, *cgrid)
    for axis in range(len(grid)):
        m = m.repeat_interleave(coarsen, dim=axis + 1)
    return m.reshape(batch, -1)


def _kept_cells(cells: int, ratio: float) -> int:
    return min(max(round(ratio * cells), 1), cells)


def kept_tokens(grid: Sequence[int], coarsen: int, ratio: float) -> int:
    """Tokens each example keeps in :func:`coarse_mask` (known without drawing a mask)."""
    cells = math.prod([int(g) // coarsen for g in grid])  # a list: dynamo cannot trace prod(generator)
    return _kept_cells(cells, ratio) * coarsen ** len(grid)


def mask_to_index(mask: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Bool mask [B, N] with the same count K in every row -> sorted positions [B, K] (int64).

    ``count``: K when the caller knows it (no device read-back, no check); None: read the row counts
    back and check that they agree (a host synchronisation on a GPU)."""
    if count is not None:
        k = count
    else:
        counts = mask.sum(dim=1)
        if counts.numel() and bool((counts != counts[0]).any()):
            raise ValueError(f"mask: rows keep different numbers of tokens {counts.tolist()}")
        k = int(counts[0]) if counts.numel() else 0
    # a stable sort of (not kept) puts the kept positions first, in increasing order
    return torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :k]


def contrastive_loss(pooled: torch.Tensor, margin: float = 0.5, gather: bool = True) -> torch.Tensor:
    """Mean over pairs i != j of relu(cos(p_i, p_j) - margin); pooled: [B, D] -> scalar.

    With ``gather`` and an initialised process group of several ranks, the pairs run over the examples of
    every rank (the other ranks' vectors enter without gradient). A single example gives 0.
    """
    p = F.normalize(pooled.float(), dim=-1)
    b = p.shape[0]
    others, offset = p, 0
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(p) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, p.detach().contiguous())
        rank = dist.get_rank()
        parts[rank] = p
        others, offset = torch.cat(parts), rank * b
    sim = p @ others.T
    not_self = torch.ones_like(sim, dtype=torch.bool)
    not_self[torch.arange(b, device=p.device), torch.arange(b, device=p.device) + offset] = False
    if others.shape[0] < 2:  # a single example has no pair
        return sim.sum() * 0.0
    return torch.relu(sim - margin)[not_self].mean()


_NO_DECAY_NAME = re.compile(r"(^|\.)[a-z_]*pos\.|(^|\.)query_token$|(^|\.)bias$|norm")


def adamw_param_groups(module: nn.Module, weight_decay: float = 0.05) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters of ``module``: weight decay on matrices and
    convolution kernels; none on biases, norms, LayerScale, position Linears (``*pos``) and the query token."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or _NO_DECAY_NAME.search(name) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _units(*groups: Sequence[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    """The classes of ``groups`` in order, each once."""
    return tuple(dict.fromkeys(c for g in groups for c in g))


class MJEPA(nn.Module):
    """M-JEPA objective around a MiT-UB backbone.

    encoder: a ``ViT`` or ``AViT`` (anything with ``dim``, ``config`` (heads, kv_heads, head_dim, mlp_ratio,
    dropout, attn_dropout), ``spatial_dims``, ``mask_grid(spatial_size)`` and
    ``forward(images, intensity_scale, intensity_offset, token_index=None) -> [B, N | K, dim]`` after its
    final norm; optionally ``fsdp_units`` / ``checkpoint_units``, tuples of its layer classes, which
    :attr:`fsdp_units` and :attr:`checkpoint_units` pass on to a trainer).

    * ``ema_encoder``: a frozen copy, always in eval mode, updated only by :meth:`update_ema`
      (``ema = m * ema + (1 - m) * online``, m = ``ema_momentum``; deterministic, so identical on every
      DDP rank given identical online weights).
    * target: the EMA encoder on the full image, no grad, after its final norm, at target positions.
    * context: the online encoder on the context tokens only: ``encoder(images, ..., token_index=context)``.
      The AViT restricts both of its inputs there: the pooled queries to the context cells and the
      high-resolution keys/values to the tokens inside those cells (docs/MODELS.md 1.5 step 4; see
      :meth:`fm_engine.models.mitub.AViT.forward`), so nothing outside the context reaches it.
    * predictor: ``predictor_depth`` fresh encoder layers of the backbone width over context ∪ target
      positions. Target positions carry the learned ``query_token`` (trunc-normal std 1) plus the
      predictor's own position ``predictor_pos`` (Linear on [-1, 1] grid coordinates); context-only
      positions carry their context embedding (**fixed**: the original swapped the two at
      non-overlapping positions). The union is ragged across the batch: it is padded and the padding
      is masked out of attention with a key-padding mask (**fixed**: the original attended to it).
      Predictions are read at the target positions.
    * loss = JEPA + contrastive. JEPA: mean over examples of 1 - cos(flatten(pred_b), flatten(target_b))
      (one cosine over each example's whole flattened prediction, **kept**). Contrastive: on the token
      means p_b of the predictions, mean over pairs i != j of relu(cos(p_i, p_j) - margin), gathered
      across ranks when torch.distributed is initialised.
    * optional probe (``probe_classes``): LayerNorm -> Linear on the average-pooled EMA features
      (stop-grad); its cross-entropy is added to "loss" when labels are given (it only trains the probe).
    """

    def __init__(
        self,
        encoder: nn.Module,
        *,
        predictor_depth: int = 4,
        context_ratio: float = 0.5,
        context_coarsen: int = 4,
        target_ratio: float = 0.25,
        target_coarsen: int = 2,
        ema_momentum: float = 0.95,
        margin: float = 0.5,
        probe_classes: int | None = None,
    ) -> None:
        super().__init__()
        for n, v in (("context_ratio", context_ratio), ("target_ratio", target_ratio)):
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{n}: expected a ratio in (0, 1], got {v}")
        for n, v in (("context_coarsen", context_coarsen), ("target_coarsen", target_coarsen)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{n}: expected a positive int, got {v}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ValueError(f"ema_momentum: expected a value in [0, 1], got {ema_momentum}")
        if predictor_depth < 1:
            raise ValueError(f"predictor_depth: expected >= 1, got {predictor_depth}")
        cfg = getattr(encoder, "config", None)
        need = ("heads", "kv_heads", "head_dim", "mlp_ratio", "dropout", "attn_dropout")
        if not isinstance(cfg, dict) or any(k not in cfg for k in need) or not hasattr(encoder, "mask_grid"):
            raise ValueError("encoder: expected a MiT-UB backbone (ViT / AViT) with config and mask_grid")
        self.context_ratio, self.context_coarsen = float(context_ratio), context_coarsen
        self.target_ratio, self.target_coarsen = float(target_ratio), target_coarsen
        self.ema_momentum, self.margin = float(ema_momentum), float(margin)
        dim = cast(int, encoder.dim)
        self.encoder = encoder
        self.ema_encoder = copy.deepcopy(encoder).requires_grad_(False).eval()
        self.predictor = nn.ModuleList(
            EncoderLayer(
                dim,
                cfg["heads"],
                cfg["kv_heads"],
                cfg["head_dim"],
                cfg["mlp_ratio"],
                cfg["dropout"],
                cfg["attn_dropout"],
            )
            for _ in range(predictor_depth)
        )
        self.query_token = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.trunc_normal_(self.query_token, std=1.0)
        self.predictor_pos = nn.Linear(cast(int, encoder.spatial_dims), dim)
        self.probe = (
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, probe_classes)) if probe_classes is not None else None
        )

    @property
    def fsdp_units(self) -> tuple[type[nn.Module], ...]:
        """Module classes to shard as FSDP units: the encoder's ``fsdp_units`` (they occur in the online and the
        EMA encoder; an encoder that declares none adds none) and the predictor's encoder layer."""
        return _units(getattr(self.encoder, "fsdp_units", ()), (EncoderLayer,))

    @property
    def checkpoint_units(self) -> tuple[type[nn.Module], ...]:
        """Module classes to recompute under activation checkpointing: the encoder's ``checkpoint_units`` and
        the predictor's encoder layer (a trainer applies them to the online encoder and the predictor only:
        the EMA pass runs without grad)."""
        return _units(getattr(self.encoder, "checkpoint_units", ()), (EncoderLayer,))

    def train(self, mode: bool = True) -> MJEPA:
        super().train(mode)
        self.ema_encoder.eval()  # the target pass never uses dropout
        return self

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema = m * ema + (1 - m) * online for every parameter and floating buffer (m = ema_momentum)."""
        m = self.ema_momentum
        for e, o in zip(self.ema_encoder.parameters(), self.encoder.parameters(), strict=True):
            e.copy_(m * e + (1.0 - m) * o.to(e.dtype))
        for eb, ob in zip(self.ema_encoder.buffers(), self.encoder.buffers(), strict=True):
            eb.copy_(m * eb + (1.0 - m) * ob.to(eb.dtype) if eb.is_floating_point() else ob)

    def _mask_grid(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """The encoder's token grid for a spatial size (the encoder is duck-typed: see the class docstring)."""
        mask_grid = cast(Callable[[Sequence[int]], tuple[int, ...]], self.encoder.mask_grid)
        return mask_grid(spatial_size)

    def param_groups(self, weight_decay: float = 0.05) -> list[dict[str, Any]]:
        """AdamW groups of the trainable parameters (see :func:`adamw_param_groups`)."""
        return adamw_param_groups(self, weight_decay)

    def masks(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context_mask, target_mask), each [B, N] bool (True = kept) on the encoder's mask grid."""
        grid = self._mask_grid(images.shape[2:])
        b, dev = images.shape[0], images.device
        ctx = coarse_mask(
            b, grid, self.context_coarsen, self.context_ratio, device=dev, generator=generator, name="context_coarsen"
        )
        tgt = coarse_mask(
            b, grid, self.target_coarsen, self.target_ratio, device=dev, generator=generator, name="target_coarsen"
        )
        return ctx, tgt

    def predictor_inputs(
        self,
        context: torch.Tensor,
        context_index: torch.Tensor,
        target_mask: torch.Tensor,
        grid: Sequence[int],
        extra_padding: int = 0,
        target_count: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded predictor input over context ∪ target.

        context: [B, Kc, D] encoder output at ``context_index`` [B, Kc]; target_mask: [B, N] keeping
        ``target_count`` tokens per row (None: read back from the mask).
        Returns (x [B, L, D], padding [B, L] bool, True = padding, positions [B, L] grid index of each
        slot; padding slots point at 0). L = min(N, Kc + Kt) + ``extra_padding``: the largest union
        any draw can have, so L depends on the config only (see the module docstring).
        """
        b, n = target_mask.shape
        d = context.shape[-1]
        on_grid = context.new_zeros(b, n, d).scatter(1, context_index[..., None].expand(-1, -1, d), context)
        context_mask = torch.zeros_like(target_mask).scatter_(1, context_index, True)
        pos = self.predictor_pos(grid_positions(tuple(grid), context.device, self.predictor_pos.weight.dtype))
        query = (self.query_token + pos[None]).to(context.dtype).expand(b, -1, -1)
        x = torch.where(target_mask[..., None], query, on_grid)
        union = context_mask | target_mask
        lengths = union.sum(dim=1)
        kt = target_count if target_count is not None else int(target_mask[:1].sum())
        length = min(n, context_index.shape[1] + kt) + int(extra_padding)
        order = torch.argsort((~union).to(torch.int8), dim=1, stable=True)
        if length > n:
            order = torch.cat([order, order.new_zeros(b, length - n)], dim=1)
        positions = order[:, :length]
        padding = torch.arange(length, device=x.device)[None] >= lengths[:, None]
        positions = positions.masked_fill(padding, 0)
        x = gather_tokens(x, positions).masked_fill(padding[..., None], 0.0)
        return x, padding, positions

    def predict(
        self,
        context: torch.Tensor,
        context_index: torch.Tensor,
        target_mask: torch.Tensor,
        grid: Sequence[int],
        extra_padding: int = 0,
        target_count: int | None = None,
    ) -> torch.Tensor:
        """Predictions at the target positions (increasing grid order) -> [B, Kt, D]."""
        x, padding, positions = self.predictor_inputs(
            context, context_index, target_mask, grid, extra_padding, target_count
        )
        for layer in self.predictor:
            x = layer(x, key_padding_mask=padding)
        is_target = torch.gather(target_mask, 1, positions) & ~padding
        return gather_tokens(x, mask_to_index(is_target, target_count))

    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        intensity_scale: float = 1.0,
        intensity_offset: float = 0.0,
        *,
        masks: tuple[torch.Tensor, torch.Tensor] | None = None,
        extra_padding: int = 0,
    ) -> dict[str, torch.Tensor]:
        """images [B, C, ...] (raw or float) -> dict with "loss", "jepa_loss", "contrastive_loss",
        "context_mask", "target_mask" ([B, N] bool) and, with a probe, "probe_logits" (+ "probe_loss" when
        ``labels`` [B] are given). ``masks`` overrides the random (context, target) masks;
        ``extra_padding`` adds padding slots to the predictor input (the result does not change)."""
        grid = self._mask_grid(images.shape[2:])
        if masks is None:
            context_mask, target_mask = self.masks(images)
            kc = kept_tokens(grid, self.context_coarsen, self.context_ratio)
            kt: int | None = kept_tokens(grid, self.target_coarsen, self.target_ratio)
        else:
            (context_mask, target_mask), kc, kt = masks, None, None
        if context_mask.shape != target_mask.shape or context_mask.shape != (images.shape[0], math.prod(grid)):
            raise ValueError(f"masks: expected two bool tensors [{images.shape[0]}, {math.prod(grid)}]")
        target_index = mask_to_index(target_mask, kt)
        context_index = mask_to_index(context_mask, kc)
        kt = target_index.shape[1]

        with torch.no_grad():
            full = self.ema_encoder(images, intensity_scale, intensity_offset)
        target = gather_tokens(full, target_index)
        context = self.encoder(images, intensity_scale, intensity_offset, token_index=context_index)
        pred = self.predict(context, context_index, target_mask, grid, extra_padding, kt)

        jepa = (1.0 - F.cosine_similarity(pred.flatten(1).float(), target.flatten(1).float(), dim=1)).mean()
        contrastive = contrastive_loss(pred.mean(dim=1), self.margin)
        out = {
            "loss": jepa + contrastive,
            "jepa_loss": jepa.detach(),
            "contrastive_loss": contrastive.detach(),
            "context_mask": context_mask,
            "target_mask": target_mask,
        }
        if self.probe is not None:
            logits = self.probe(full.mean(dim=1).detach())
            out["probe_logits"] = logits
            if labels is not None:
                probe_loss = F.cross_entropy(logits.float(), labels)
                out["probe_loss"] = probe_loss.detach()
                out["loss"] = out["loss"] + probe_loss
        return out
