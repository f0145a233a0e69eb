"""RadDiffusion (docs/MODELS.md 3): multi-view chest X-ray ViT with a bottleneck-cls token, MAE and diffusion MAE.

Encoder sizes (256x256, 1 channel): xs (patch 32, 256/6/8/1024, decoder 128/2/4/512, mask 0.5),
s (patch 32, 768/6/12/3072, decoder 512/4/16/2048, mask 0.75), b (patch 16, 768/12/12/3072,
decoder 512/8/16/2048, mask 0.5). Pre-LN, LayerNorm eps 1e-12, exact GELU, qkv bias, dropout 0,
init normal(0.02), fixed 2-D sin-cos positions with an all-zero cls row. After every encoder and
decoder layer each image's cls token becomes the mean cls of its study (the only path between
the images of a study). Images are expected in [-1, 1].

Fixed behaviours of the original code: evaluation and fine-tuning run without masking; the study
feature is taken at each study's own first image; the cross-self decoder scatters its masked
predictions back to their positions correctly at any mask ratio (the original assumed 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.models.raddiffusion.study import Studies, make_studies, study_mean_cls
from fm_engine.models.vit import MLP, ViT, ViTBlock, init_normal_, sincos_pos_embed_2d
from fm_engine.nn import Attention
from fm_engine.nn._backend_arg import refuse_backend_argument
from fm_engine.ssl.diffusion_mae import DiffusionSchedule
from fm_engine.ssl.mae import masked_mse, norm_pix, patchify, random_masking, unpatchify

SIZES: dict[str, dict] = {
    "xs": dict(
        patch=32,
        dim=256,
        depth=6,
        heads=8,
        mlp_dim=1024,
        dec_dim=128,
        dec_depth=2,
        dec_heads=4,
        dec_mlp_dim=512,
        mask_ratio=0.5,
    ),
    "s": dict(
        patch=32,
        dim=768,
        depth=6,
        heads=12,
        mlp_dim=3072,
        dec_dim=512,
        dec_depth=4,
        dec_heads=16,
        dec_mlp_dim=2048,
        mask_ratio=0.75,
    ),
    "b": dict(
        patch=16,
        dim=768,
        depth=12,
        heads=12,
        mlp_dim=3072,
        dec_dim=512,
        dec_depth=8,
        dec_heads=16,
        dec_mlp_dim=2048,
        mask_ratio=0.5,
    ),
}
EPS = 1e-12


class EncoderOutput(NamedTuple):
    """latent: [B, 1 + keep, D] (cls first, after the final norm); mask: [B, L] (1 = masked);
    ids_restore / ids_shuffle: [B, L] (see :func:`fm_engine.ssl.mae.random_masking`); keep: visible count."""

    latent: torch.Tensor
    mask: torch.Tensor
    ids_restore: torch.Tensor
    ids_shuffle: torch.Tensor
    keep: int
    studies: Studies
    grid: tuple[int, int]


@refuse_backend_argument
class RadDiffusionEncoder(ViT):
    """images [ΣN_i, 1, H, W] + lengths [S] -> :class:`EncoderOutput` (``mask_ratio=0``: no masking)."""

    def __init__(
        self,
        image_size: int = 256,
        patch: int = 32,
        dim: int = 256,
        depth: int = 6,
        heads: int = 8,
        mlp_dim: int = 1024,
    ) -> None:
        super().__init__(
            image_size=image_size,
            patch=patch,
            in_chans=1,
            dim=dim,
            depth=depth,
            heads=heads,
            mlp_dim=mlp_dim,
            eps=EPS,
            pos="sincos",
            final_norm=True,
            init_std=0.02,
        )

    def forward(  # type: ignore[override]
        self,
        images: torch.Tensor,
        lengths: torch.Tensor | Sequence[int],
        mask_ratio: float = 0.0,
        noise: torch.Tensor | None = None,
    ) -> EncoderOutput:
        grid = self.token_grid(images)
        studies = make_studies(lengths, images.shape[0], images.device)
        x, cls = self.embed_patches(images)
        b, length, _ = x.shape
        if mask_ratio > 0:
            x, mask, ids_restore, ids_shuffle = random_masking(x, mask_ratio, noise)
        else:  # evaluation: every token, no shuffle (the original kept masking on here; fixed)
            mask = x.new_zeros(b, length)
            ids_restore = ids_shuffle = torch.arange(length, device=x.device).expand(b, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = study_mean_cls(blk(x), studies)
        return EncoderOutput(self.norm(x), mask, ids_restore, ids_shuffle, x.shape[1] - 1, studies, grid)


@refuse_backend_argument
class MAEDecoder(nn.Module):
    """MAE decoder with the study cls mean after every layer.

    Linear(dim -> dec_dim) on [cls, visible]; learned mask tokens at the masked positions (or, with
    ``noisy_embed``, the tokens of the noisy image's own patch embedding: diffusion decoder (a));
    unshuffle; fixed sin-cos positions; pre-LN layers; LayerNorm; Linear(dec_dim -> p²·C).
    Returns predictions for every patch [B, L, p²·C].
    """

    def __init__(
        self,
        dim: int,
        dec_dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        patch: int,
        in_chans: int = 1,
        noisy_embed: bool = False,
    ) -> None:
        super().__init__()
        self.patch, self.dec_dim = patch, dec_dim
        self.decoder_embed = nn.Linear(dim, dec_dim)
        # decoder (a) fills every masked position from the noisy image: a mask token would be an unused
        # parameter (and DDP rejects those), so it exists only in the plain MAE decoder
        self.mask_token = None if noisy_embed else nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.noise_embed = nn.Conv2d(in_chans, dec_dim, patch, stride=patch) if noisy_embed else None
        self.blocks = nn.ModuleList(ViTBlock(dec_dim, heads, mlp_dim, eps=EPS) for _ in range(depth))
        self.norm = nn.LayerNorm(dec_dim, eps=EPS)
        self.pred = nn.Linear(dec_dim, patch * patch * in_chans)
        init_normal_(self, 0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, enc: EncoderOutput, noisy_images: torch.Tensor | None = None) -> torch.Tensor:
        x = self.decoder_embed(enc.latent)
        b, length = enc.mask.shape
        fill = x.new_zeros(1, 1, self.dec_dim) if self.mask_token is None else self.mask_token.to(x.dtype)
        tokens = torch.cat([x[:, 1:], fill.expand(b, length - enc.keep, -1)], dim=1)
        tokens = torch.gather(tokens, 1, enc.ids_restore[..., None].expand(-1, -1, self.dec_dim))
        if self.noise_embed is not None:
            if noisy_images is None:
                raise ValueError("noisy_images: decoder (a) needs the noisy image")
            noisy = self.noise_embed(noisy_images).flatten(2).transpose(1, 2)
            tokens = torch.where(enc.mask[..., None].bool(), noisy, tokens)
        pos = sincos_pos_embed_2d(self.dec_dim, *enc.grid).to(x)[None]
        x = torch.cat([x[:, :1], tokens], dim=1) + pos
        for blk in self.blocks:
            x = study_mean_cls(blk(x), enc.studies)
        return self.pred(self.norm(x))[:, 1:]


@refuse_backend_argument
class CrossSelfLayer(nn.Module):
    """Decoder (b) layer on query tokens x [B, M, d] with context ctx [B, 1 + keep, d], each branch pre-norm:
    ``x += cross(norm1(x), norm_ctx(ctx)); x += self(norm2(x)); x += mlp(norm3(x))``."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        hd = dim // heads
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.norm_ctx = nn.LayerNorm(dim, eps=EPS)
        self.cross_attn = Attention(dim, heads, head_dim=hd, bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.self_attn = Attention(dim, heads, head_dim=hd, bias=True)
        self.norm3 = nn.LayerNorm(dim, eps=EPS)
        self.mlp = MLP(dim, mlp_dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x), kv=self.norm_ctx(ctx))
        x = x + self.self_attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))


@refuse_backend_argument
class CrossSelfDecoder(nn.Module):
    """Diffusion decoder (b) "cross-self": queries are the noisy masked patches (own patch embedding +
    sin-cos positions); the context is [cls, visible] decoder tokens (Linear(dim -> dec_dim) + positions).
    Returns [B, L, p²·C] with the masked predictions scattered to their own positions (zeros at visible
    ones; the original's scatter was only right at mask ratio 0.5, **fixed**). The queries carry no cls
    token, so no study mean happens inside this decoder: study information enters through the context's
    cls, which the encoder already averaged over the study.
    """

    def __init__(
        self,
        dim: int,
        dec_dim: int,
        depth: int,
        heads: int,
        mlp_dim: int,
        patch: int,
        in_chans: int = 1,
    ) -> None:
        super().__init__()
        self.patch, self.dec_dim = patch, dec_dim
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.noise_embed = nn.Conv2d(in_chans, dec_dim, patch, stride=patch)
        self.layers = nn.ModuleList(CrossSelfLayer(dec_dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dec_dim, eps=EPS)
        self.pred = nn.Linear(dec_dim, patch * patch * in_chans)
        init_normal_(self, 0.02)

    def forward(self, enc: EncoderOutput, noisy_images: torch.Tensor | None = None) -> torch.Tensor:
        if noisy_images is None:
            raise ValueError("noisy_images: the cross-self decoder needs the noisy image")
        b, length = enc.mask.shape
        d = self.dec_dim
        pos = sincos_pos_embed_2d(d, *enc.grid).to(enc.latent)[None].expand(b, -1, -1)  # [B, 1 + L, d]
        kept_ids, masked_ids = enc.ids_shuffle[:, : enc.keep], enc.ids_shuffle[:, enc.keep :]
        ctx_pos = torch.cat([pos[:, :1], torch.gather(pos[:, 1:], 1, kept_ids[..., None].expand(-1, -1, d))], 1)
        ctx = self.decoder_embed(enc.latent) + ctx_pos
        noisy = self.noise_embed(noisy_images).flatten(2).transpose(1, 2) + pos[:, 1:]
        x = torch.gather(noisy, 1, masked_ids[..., None].expand(-1, -1, d))
        for layer in self.layers:
            x = layer(x, ctx)
        out = self.pred(self.norm(x))
        full = out.new_zeros(b, length, out.shape[-1])
        return full.scatter(1, masked_ids[..., None].expand(-1, -1, out.shape[-1]), out)


def _target(images: torch.Tensor, patch: int) -> torch.Tensor:
    return norm_pix(patchify(images, patch))


@refuse_backend_argument
class RadDiffusionMAE(nn.Module):
    """MAE objective. ``forward(images [ΣN, 1, H, W], lengths)`` -> (loss, pred [B, L, p²], mask [B, L]).

    Target: norm-pix patches (unbiased var + 1e-6); loss: MSE averaged over masked patches only.
    """

    def __init__(self, size: str = "xs", image_size: int = 256, **overrides: object) -> None:
        super().__init__()
        cfg = _config(size, overrides)
        self.mask_ratio = float(cfg["mask_ratio"])
        self.encoder = _encoder(cfg, image_size)
        self.decoder = MAEDecoder(
            cfg["dim"],
            cfg["dec_dim"],
            cfg["dec_depth"],
            cfg["dec_heads"],
            cfg["dec_mlp_dim"],
            cfg["patch"],
        )

    def forward(
        self, images: torch.Tensor, lengths: torch.Tensor | Sequence[int], noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder(images, lengths, self.mask_ratio, noise)
        pred = self.decoder(enc)
        return masked_mse(pred, _target(images, self.encoder.patch), enc.mask), pred, enc.mask

    def loss(self, images: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self(images, lengths)[0]


@refuse_backend_argument
class RadDiffusionDiffMAE(nn.Module):
    """Diffusion MAE objective (100 steps, beta = linspace(1e-4, 0.2, 100)², no timestep embedding).

    Per image t ~ U{0..99}; masked patches take x_t = sqrt(ab_t)·x + sqrt(1 - ab_t)·noise, visible ones
    stay clean, clip to [-1, 1]. The encoder sees the clean visible patches; the decoder ("a": noisy
    patch tokens replace the mask tokens; "cross-self": decoder (b)) predicts x0 in norm-pix space;
    loss = MSE over masked patches. ``forward`` -> (loss, pred [B, L, p²], mask [B, L]).
    """

    def __init__(
        self,
        size: str = "xs",
        decoder: str = "a",
        image_size: int = 256,
        **overrides: object,
    ) -> None:
        super().__init__()
        if decoder not in ("a", "cross-self"):
            raise ValueError(f"decoder: expected 'a' or 'cross-self', got {decoder!r}")
        cfg = _config(size, overrides)
        self.mask_ratio = float(cfg["mask_ratio"])
        self.schedule = DiffusionSchedule(100, 1e-4, 0.2)
        self.encoder = _encoder(cfg, image_size)
        args = (cfg["dim"], cfg["dec_dim"], cfg["dec_depth"], cfg["dec_heads"], cfg["dec_mlp_dim"], cfg["patch"])
        self.decoder_kind = decoder
        self.decoder = MAEDecoder(*args, noisy_embed=True) if decoder == "a" else CrossSelfDecoder(*args)

    def _noisy(
        self, images: torch.Tensor, enc: EncoderOutput, t: torch.Tensor, noise: torch.Tensor | None
    ) -> torch.Tensor:
        p = self.encoder.patch
        noisy = self.schedule.noise_masked(patchify(images, p), enc.mask, t, noise)
        return unpatchify(noisy, p, enc.grid)

    def forward(
        self,
        images: torch.Tensor,
        lengths: torch.Tensor | Sequence[int],
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        mask_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        enc = self.encoder(images, lengths, self.mask_ratio, mask_noise)
        if t is None:
            t = self.schedule.sample_t(images.shape[0], images.device)
        pred = self.decoder(enc, self._noisy(images, enc, t, noise))
        return masked_mse(pred, _target(images, self.encoder.patch), enc.mask), pred, enc.mask

    def loss(self, images: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self(images, lengths)[0]

    @torch.no_grad()
    def sample(
        self,
        images: torch.Tensor,
        lengths: torch.Tensor | Sequence[int],
        mask_noise: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Iterative reconstruction of the masked patches: for t = 99 .. 0, re-noise the current estimate's
        masked patches at t, predict x0 (norm-pix), map it back to pixels with the patch mean / std
        estimated from the noisy patch (:meth:`DiffusionSchedule.x0_patch_stats`), keep the visible
        patches. ``start``: initial pixel estimate (default: zeros at masked patches).
        Returns (reconstruction [B, 1, H, W] in [-1, 1], mask [B, L])."""
        p = self.encoder.patch
        enc = self.encoder(images, lengths, self.mask_ratio, mask_noise)
        clean = patchify(images, p)
        m = enc.mask[..., None].bool()
        est = torch.where(m, patchify(start, p) if start is not None else torch.zeros_like(clean), clean)
        for step in range(self.schedule.steps - 1, -1, -1):
            t = torch.full((images.shape[0],), step, device=images.device, dtype=torch.long)
            noisy = self.schedule.noise_masked(est, enc.mask, t)
            pred = self.decoder(enc, unpatchify(noisy, p, enc.grid))
            mean, std = self.schedule.x0_patch_stats(noisy, t)
            est = torch.where(m, (pred * std + mean).clamp(-1.0, 1.0), clean)
        return unpatchify(est, p, enc.grid), enc.mask


@refuse_backend_argument
class RadDiffusionClassifier(nn.Module):
    """Study-level fine-tuning: encoder without masking -> the final (normed) cls at each study's own first
    image (= the study mean of the final cls) -> Linear(dim, 14). ``forward`` -> logits [S, num_labels]."""

    def __init__(
        self,
        size: str = "xs",
        num_labels: int = 14,
        image_size: int = 256,
        **overrides: object,
    ) -> None:
        super().__init__()
        cfg = _config(size, overrides)
        self.encoder = _encoder(cfg, image_size)
        self.head = nn.Linear(cfg["dim"], num_labels)
        init_normal_(self.head, 0.02)

    def study_features(self, images: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """[S, dim]: the study cls, read at each study's own first image (index bug of the original fixed)."""
        enc = self.encoder(images, lengths, 0.0)
        return enc.latent[enc.studies.first, 0]

    def forward(self, images: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        return self.head(self.study_features(images, lengths))

    def loss(
        self,
        images: torch.Tensor,
        lengths: torch.Tensor | Sequence[int],
        labels: torch.Tensor,
        pos_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """BCE-with-logits against labels [S, num_labels] (uncertain already mapped to 1), optional pos_weight."""
        logits = self(images, lengths)
        if labels.shape != logits.shape:
            raise ValueError(f"labels: expected shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=pos_weight)


def _config(size: str, overrides: dict) -> dict:
    if size not in SIZES:
        raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
    unknown = set(overrides) - set(SIZES[size])
    if unknown:
        raise ValueError(f"overrides: unknown keys {sorted(unknown)}; expected some of {sorted(SIZES[size])}")
    return {**SIZES[size], **overrides}


def _encoder(cfg: dict, image_size: int) -> RadDiffusionEncoder:
    return RadDiffusionEncoder(image_size, cfg["patch"], cfg["dim"], cfg["depth"], cfg["heads"], cfg["mlp_dim"])
