"""MiT-UB Adaptive ViT (docs/MODELS.md 1.4) and the explicit ViT -> AViT conversion."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from fm_engine.models.mitub.layers import DecoderLayer, EncoderLayer
from fm_engine.models.mitub.vit import ViT, check_token_index
from fm_engine.nn import AdaptiveStem2d
from fm_engine.nn._backend_arg import refuse_backend_argument
from fm_engine.nn.tokens import gather_tokens

log = logging.getLogger(__name__)


@refuse_backend_argument
class AViT(nn.Module):
    """Adaptive ViT for high-resolution 2-D images.

    image [B, C, H, W] (raw integers or floats, intensity affine applied in fp32 by the stem) ->
    [B, Gh*Gw, dim] on the fixed ``target_grid`` (Gh, Gw), after the output LayerNorm.

    Stem (``fm_engine.nn.AdaptiveStem2d``): query path conv -> AdaptiveMaxPool2d(target_grid) on the raw
    conv features -> LayerNorm -> + position on the target grid; key/value path conv (width ``kv_dim``)
    -> LayerNorm -> + its own position on the full (H/p, W/p) grid; both in [-1, 1] coordinates.
    Body: ``depth`` encoder layers on the queries (parameter names as in :class:`ViT`, so a ViT loads),
    then ``high_res_depth`` decoder layers (self-attention, cross-attention to the high-resolution
    tokens, ReLU² MLP; LayerScale ``layer_scale`` = 1e-5 on each branch), then the output norm.
    Attention dropout acts in training only (**fixed**).

    M-JEPA context (``forward(image, token_index=idx)``, docs/MODELS.md 1.5 step 4): the queries are kept at
    the cells ``idx`` and the decoder layers cross-attend only to the high-resolution keys/values inside
    those cells (a nearest resize of the cell mask to the key/value grid), so no region outside the
    context reaches the output at any resolution. The original restricted the keys/values the same way
    but padded ragged counts with zeros that were attended to (**fixed**: exact counts without padding
    when the key/value grid is a multiple of the target grid, else padding behind a key-padding mask).

    ``fsdp_units`` / ``checkpoint_units``: the module classes a trainer shards as FSDP units and
    recomputes under activation checkpointing (the encoder and the decoder layers).
    """

    fsdp_units: ClassVar[tuple[type[nn.Module], ...]] = (EncoderLayer, DecoderLayer)
    checkpoint_units: ClassVar[tuple[type[nn.Module], ...]] = (EncoderLayer, DecoderLayer)

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 512,
        patch: int = 16,
        depth: int = 12,
        heads: int = 8,
        kv_heads: int | None = 4,
        kv_dim: int = 256,
        target_grid: Sequence[int] = (32, 24),
        high_res_depth: int = 4,
        head_dim: int = 64,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
        attn_dropout: float = 0.1,
        layer_scale: float = 1e-5,
    ) -> None:
        super().__init__()
        target_grid = tuple(int(g) for g in target_grid)
        if len(target_grid) != 2 or min(target_grid) < 1:
            raise ValueError(f"target_grid: expected two positive sizes, got {target_grid}")
        self.config: dict[str, Any] = dict(
            in_channels=in_channels,
            dim=dim,
            patch=patch,
            depth=depth,
            heads=heads,
            kv_heads=kv_heads,
            kv_dim=kv_dim,
            target_grid=target_grid,
            high_res_depth=high_res_depth,
            head_dim=head_dim,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attn_dropout=attn_dropout,
            layer_scale=layer_scale,
        )
        self.dim = dim
        self.patch = patch
        self.spatial_dims = 2
        self.target_grid = target_grid
        self.stem = AdaptiveStem2d(in_channels, dim, kv_dim, patch, target_grid)
        self.blocks = nn.ModuleList(
            EncoderLayer(dim, heads, kv_heads, head_dim, mlp_ratio, dropout, attn_dropout) for _ in range(depth)
        )
        self.high_res_blocks = nn.ModuleList(
            DecoderLayer(dim, kv_dim, heads, kv_heads, head_dim, mlp_ratio, dropout, attn_dropout, layer_scale)
            for _ in range(high_res_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def token_grid(self, spatial_size: Sequence[int]) -> tuple[int, int]:
        """Output grid: always ``target_grid`` (the image's own grid (H/p, W/p) must be at least as large)."""
        h, w = (int(s) // self.patch for s in spatial_size)
        if h < self.target_grid[0] or w < self.target_grid[1]:
            raise ValueError(f"image: token grid {(h, w)} is smaller than target_grid {self.target_grid}")
        return self.target_grid

    def mask_grid(self, spatial_size: Sequence[int]) -> tuple[int, int]:
        """Grid on which M-JEPA masks live: the pooled target grid."""
        return self.token_grid(spatial_size)

    def embed(
        self, image: torch.Tensor, intensity_scale: float = 1.0, intensity_offset: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stem only -> (queries [B, Gh*Gw, dim], high-resolution keys/values [B, (H/p)*(W/p), kv_dim])."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError("image: expected a 4-D tensor [B, C, H, W]")
        self.token_grid(image.shape[-2:])
        return self.stem(image, intensity_scale, intensity_offset)

    def encode(
        self,
        queries: torch.Tensor,
        kv: torch.Tensor,
        token_index: torch.Tensor | None = None,
        kv_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encoder + decoder layers + output norm on stem outputs.

        queries: [B, Gh*Gw, dim]; kv: [B, Nk, kv_dim], attended exactly as given (the full
        high-resolution grid, or keys/values the caller gathered, e.g. with :meth:`context_kv`);
        ``token_index`` [B, K] keeps a subset of the queries; ``kv_padding_mask`` [B, Nk] bool, True =
        padding (never attended). -> [B, K, dim] ([B, Gh*Gw, dim] without ``token_index``).
        """
        check_token_index(token_index, queries.shape[0], queries.shape[1])
        if kv.dim() != 3 or kv.shape[0] != queries.shape[0]:
            raise ValueError(f"kv: expected [B={queries.shape[0]}, Nk, kv_dim], got shape {tuple(kv.shape)}")
        if kv_padding_mask is not None and (
            kv_padding_mask.dtype != torch.bool or tuple(kv_padding_mask.shape) != tuple(kv.shape[:2])
        ):
            raise ValueError(
                f"kv_padding_mask: expected a bool tensor of shape {tuple(kv.shape[:2])}, "
                f"got {kv_padding_mask.dtype} {tuple(kv_padding_mask.shape)}"
            )
        x = queries if token_index is None else gather_tokens(queries, token_index)
        for block in self.blocks:
            x = block(x)
        for block in self.high_res_blocks:
            x = block(x, kv, kv_padding_mask)
        return self.norm(x)

    def context_kv(
        self, kv: torch.Tensor, token_index: torch.Tensor, kv_grid: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The high-resolution keys/values inside the cells of ``token_index`` (see :func:`context_kv_index`).

        kv: [B, Hk*Wk, kv_dim] on ``kv_grid`` (Hk, Wk); token_index: [B, K] distinct cells of the target
        grid -> (kv [B, M, kv_dim], padding [B, M] bool or None). Padding slots hold zeros.
        """
        if kv.dim() != 3 or kv.shape[1] != math.prod(kv_grid):
            raise ValueError(
                f"kv: expected [B, {math.prod(kv_grid)}, kv_dim] for kv_grid {tuple(kv_grid)}, got {tuple(kv.shape)}"
            )
        check_token_index(token_index, kv.shape[0], math.prod(self.target_grid))
        on_host = token_index.device.type == "cpu" and not torch.compiler.is_compiling()
        if on_host and token_index.shape[1] > 1 and bool((token_index.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("token_index: the cells of one example must be distinct")
        index, padding = context_kv_index(token_index, self.target_grid, kv_grid)
        sub = gather_tokens(kv, index)
        if padding is not None:
            sub = sub.masked_fill(padding[..., None], 0.0)
        return sub, padding

    def forward(
        self,
        image: torch.Tensor,
        intensity_scale: float = 1.0,
        intensity_offset: float = 0.0,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """image [B, C, H, W] -> [B, Gh*Gw, dim] after the final norm.

        With ``token_index`` [B, K] (distinct cells of the target grid, the M-JEPA context) both inputs
        of the body are restricted to those cells: the queries to ``token_index`` and the
        high-resolution keys/values to the tokens inside those cells (:meth:`context_kv`), so nothing of
        the image outside the kept cells reaches the output except through the overlap of adaptive-pool
        bins when the grids are not multiples -> [B, K, dim].
        """
        q, kv = self.embed(image, intensity_scale, intensity_offset)
        if token_index is None:
            return self.encode(q, kv)
        kv_grid = (image.shape[-2] // self.patch, image.shape[-1] // self.patch)
        kv, padding = self.context_kv(kv, token_index, kv_grid)
        return self.encode(q, kv, token_index, padding)


def kv_cells(grid: Sequence[int], kv_grid: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Target-grid cell of every key/value token -> [Hk*Wk] int64, row-major over ``kv_grid``.

    Token (r, c) of the key/value grid (Hk, Wk) lies in cell (floor(r*Gh/Hk), floor(c*Gw/Wk)) of the
    target grid (Gh, Gw): a nearest resize of a target-grid mask to the key/value grid.
    """
    (gh, gw), (hk, wk) = grid, kv_grid
    rows = torch.arange(hk, device=device) * gh // hk
    cols = torch.arange(wk, device=device) * gw // wk
    return (rows[:, None] * gw + cols[None, :]).reshape(-1)


def _axis_counts(g: int, n: int) -> list[int]:
    """How many of ``n`` key/value rows fall in each of the ``g`` cells of one axis."""
    counts = [0] * g
    for r in range(n):
        counts[r * g // n] += 1
    return counts


def max_context_kv(grid: Sequence[int], kv_grid: Sequence[int], cells: int) -> int:
    """The most key/value tokens ``cells`` distinct target-grid cells can hold (a static bound)."""
    rows, cols = _axis_counts(grid[0], kv_grid[0]), _axis_counts(grid[1], kv_grid[1])
    sizes = sorted((a * b for a in rows for b in cols), reverse=True)
    return sum(sizes[: min(cells, len(sizes))])


def context_kv_index(
    token_index: torch.Tensor, grid: Sequence[int], kv_grid: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions of the key/value tokens inside the target-grid cells ``token_index``.

    token_index: [B, K] distinct cells of ``grid`` (Gh, Gw); ``kv_grid`` (Hk, Wk) >= grid. A key/value
    token belongs to the cell :func:`kv_cells` gives. Returns (index [B, M] into the row-major key/value
    grid, padding [B, M] bool, True = padding, or None):

    * ``kv_grid`` an integer multiple of ``grid`` (every registry size: 192x144 over 32x24): each cell
      holds sh*sw = (Hk/Gh)*(Wk/Gw) tokens, so M = K*sh*sw for every example and there is no padding;
      the tokens come cell by cell (in ``token_index`` order), row-major inside a cell.
    * otherwise cells hold different numbers of tokens and the count differs from example to example:
      M = :func:`max_context_kv` (the most any K cells can hold, known from the shapes alone, so no
      value is read back from the device and the shape is static); each row lists its tokens in
      increasing order, then padding slots (index 0, padding True) that a key-padding mask keeps out of
      attention (**fixed**: the original padded with zeros that were attended to).
    """
    (gh, gw), (hk, wk) = (int(g) for g in grid), (int(g) for g in kv_grid)
    if hk < gh or wk < gw:
        raise ValueError(f"kv_grid: {(hk, wk)} is smaller than the target grid {(gh, gw)}")
    b, k = token_index.shape
    dev = token_index.device
    if hk % gh == 0 and wk % gw == 0:
        sh, sw = hk // gh, wk // gw
        rows = (token_index // gw)[..., None] * sh + torch.arange(sh, device=dev)  # [B, K, sh]
        cols = (token_index % gw)[..., None] * sw + torch.arange(sw, device=dev)  # [B, K, sw]
        return (rows[..., :, None] * wk + cols[..., None, :]).reshape(b, k * sh * sw), None
    kept = torch.zeros(b, gh * gw, dtype=torch.bool, device=dev).scatter_(1, token_index, True)
    keep = kept[:, kv_cells((gh, gw), (hk, wk), dev)]  # [B, Hk*Wk]
    m = max_context_kv((gh, gw), (hk, wk), k)
    # a stable sort of (not kept) puts the kept positions first, in increasing order
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :m]
    padding = torch.arange(m, device=dev)[None] >= keep.sum(dim=1, keepdim=True)
    return order.masked_fill(padding, 0), padding


class Conversion(NamedTuple):
    """Result of :func:`convert_vit_to_avit`: the AViT, the parameter names copied from the ViT and
    the AViT parameter names that start fresh (kv stem and decoder layers)."""

    model: AViT
    copied: list[str]
    new: list[str]


def convert_vit_to_avit(vit: ViT, avit: AViT | str, **overrides: Any) -> Conversion:
    """Copy every weight of a 2-D ``vit`` into an AViT of the same width.

    ``avit``: an AViT instance, or a registry name (built with the ViT's width, depth, heads, patch and
    channels, plus ``overrides``, e.g. ``convert_vit_to_avit(vit, "vit-i1-p16-d512-a32_24")``). Every
    ViT parameter lands under the same name (stem query path, encoder layers, output norm); the kv
    stem and the decoder layers keep their fresh initialisation, and their LayerScale 1e-5 makes the
    AViT start close to the ViT run on max-pooled patch features. Raises ValueError when a ViT weight
    has no place or a different shape in the AViT.
    """
    if not isinstance(vit, ViT) or vit.spatial_dims != 2:
        raise ValueError("vit: expected a 2-D fm_engine.models.mitub.ViT")
    model: nn.Module | str = avit
    if isinstance(model, str):
        from fm_engine.models.registry import create_model

        keep = (
            "in_channels",
            "dim",
            "patch",
            "depth",
            "heads",
            "kv_heads",
            "head_dim",
            "mlp_ratio",
            "dropout",
            "attn_dropout",
        )
        model = create_model(model, **{**{k: vit.config[k] for k in keep}, **overrides})
    if not isinstance(model, AViT):
        raise ValueError(f"avit: expected an AViT or the name of a registered AViT, got {type(model).__name__}")
    avit = model
    src = vit.state_dict()
    dst = avit.state_dict()
    extra = [k for k in src if k not in dst]
    if extra:
        raise ValueError(f"avit: has no place for ViT weights {extra}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(dst[k].shape)}" for k, v in src.items() if v.shape != dst[k].shape]
    if bad:
        raise ValueError(f"avit: shapes differ from the ViT's: {bad}")
    with torch.no_grad():
        for k, v in src.items():
            dst[k].copy_(v)
    copied = list(src)
    new = [k for k in dst if k not in src]
    log.info("converted ViT -> AViT: %d tensors copied, %d new: %s", len(copied), len(new), new)
    return Conversion(avit, copied, new)
