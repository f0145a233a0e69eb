"""ST-CNNT cells (docs/MODELS.md 2.7): one attention module plus an optional mixer, on [B, T, C, H, W].

* ``input_proj`` = Conv2DExt(C_in -> C_out, 3x3) when C_in != C_out, else identity.
* Conv mixer: Conv2DExt(C -> r*C_out, k, pad) -> GELU(tanh) -> Conv2DExt(r*C_out -> C_out, k, pad).
* Linear mixer: per patch token (a ph x pw patch flattened in (ph, pw, C) order, C fastest, D = C*ph*pw):
  Linear(D_in -> r*D_out) -> GELU(tanh) -> Linear(r*D_out -> D_out). It gets the same residual as the
  conv mixer (the original dropped the residual of the linear mixer; **fixed**).
* Sequential cell (pre-norm): x = input_proj(x) + SD(attn(n1(x))); x = x + SD(mixer(n2(x))).
* Parallel cell: y = input_proj(x) + SD(attn(n1(x))) + SD(mixer(n1(x))) (one norm; its mixer maps C_in -> C_out).

SD is per-sample stochastic depth (p = ``dropout_p``, identity in eval).
"""

from __future__ import annotations

from typing import TypedDict

import torch
from torch import nn

from fm_engine.models.stcnnt.config import CellConfig
from fm_engine.models.stcnnt.norms import STNorm, StochasticDepth
from fm_engine.models.stcnnt.windows import WindowSpec
from fm_engine.nn.conv import Conv2DExt
from fm_engine.nn.stcnnt_attention import (
    SpatialGlobalAttention,
    SpatialLocalAttention,
    SpatialViTAttention,
    TemporalAttention,
)

ATT_MODES = ("local", "global", "temporal", "vit")


class _CommonAttentionKwargs(TypedDict):
    """Keyword arguments shared by every attention module of a cell."""

    a_type: str
    n_head: int
    att_dropout_p: float
    cosine_att: bool
    normalize_Q_K: bool
    att_with_output_proj: bool


class _SpatialAttentionKwargs(_CommonAttentionKwargs):
    """Keyword arguments shared by the spatial attention modules of a cell."""

    H: int
    W: int
    window_size: tuple[int, int]
    stride_qk: int
    att_with_relative_position_bias: bool


class ConvMixer(nn.Module):
    """x: [B, T, C_in, H, W] -> [B, T, C_out, H, W] by two per-frame convs with a tanh-GELU between."""

    def __init__(
        self, C_in: int, C_out: int, scale_ratio: float, kernel: int, padding: int, separable: bool = False
    ) -> None:
        super().__init__()
        hidden = max(round(scale_ratio * C_out), 1)
        self.conv1 = Conv2DExt(C_in, hidden, kernel, 1, padding, bias=True, separable=separable)
        self.act = nn.GELU(approximate="tanh")
        self.conv2 = Conv2DExt(hidden, C_out, kernel, 1, padding, bias=True, separable=separable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


def to_patch_tokens(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, H/ph, W/pw, ph*pw*C] (token vector in (ph, pw, C) order, C fastest)."""
    B, T, C, H, W = x.shape
    x = x.reshape(B, T, C, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 4, 6, 2)
    return x.reshape(B, T, H // ph, W // pw, ph * pw * C)


def from_patch_tokens(x: torch.Tensor, C: int, ph: int, pw: int) -> torch.Tensor:
    """Inverse of :func:`to_patch_tokens`."""
    B, T, gh, gw, _ = x.shape
    x = x.reshape(B, T, gh, gw, ph, pw, C).permute(0, 1, 6, 2, 4, 3, 5)
    return x.reshape(B, T, C, gh * ph, gw * pw)


class LinearMixer(nn.Module):
    """Per-patch-token MLP. x: [B, T, C_in, H, W] -> [B, T, C_out, H, W]; H, W multiples of the patch."""

    def __init__(self, C_in: int, C_out: int, patch: tuple[int, int], scale_ratio: float) -> None:
        super().__init__()
        self.C_out, self.patch = C_out, patch
        ph, pw = patch
        d_in, d_out = C_in * ph * pw, C_out * ph * pw
        hidden = max(round(scale_ratio * d_out), 1)
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.patch
        H, W = x.shape[3:]
        if H % ph or W % pw:
            raise ValueError(f"LinearMixer: frame {H}x{W} is not a whole number of {ph}x{pw} patches")
        t = self.fc2(self.act(self.fc1(to_patch_tokens(x, ph, pw))))
        return from_patch_tokens(t, self.C_out, ph, pw)


def make_attention(att_mode: str, C_in: int, C_out: int, spec: WindowSpec, cfg: CellConfig) -> nn.Module:
    """The attention module of one cell (fm_engine.nn.stcnnt_attention): x [B, T, C_in, H, W] -> [B, T, C_out, H, W]."""
    common = _CommonAttentionKwargs(
        a_type=cfg.a_type,
        n_head=cfg.n_head,
        att_dropout_p=cfg.att_dropout_p,
        cosine_att=cfg.cosine_att,
        normalize_Q_K=cfg.normalize_qk,
        att_with_output_proj=cfg.att_with_output_proj,
    )
    if att_mode == "temporal":
        return TemporalAttention(C_in, C_out, stride_qk=cfg.stride_t, is_causal=cfg.is_causal, **common)
    spatial = _SpatialAttentionKwargs(
        H=spec.H,
        W=spec.W,
        window_size=spec.window,
        stride_qk=cfg.stride_qk,
        att_with_relative_position_bias=cfg.att_with_rel_pos_bias,
        **common,
    )
    if att_mode == "local":
        return SpatialLocalAttention(C_in, C_out, patch_size=spec.patch, **spatial)
    if att_mode == "global":
        return SpatialGlobalAttention(C_in, C_out, patch_size=spec.patch, **spatial)
    if att_mode == "vit":
        return SpatialViTAttention(C_in, C_out, **spatial)
    raise ValueError(f"att_mode must be one of {ATT_MODES}, got {att_mode!r}")


class STCNNTCell(nn.Module):
    """One ST-CNNT cell. x: [B, T, C_in, H, W] -> [B, T, C_out, H, W].

    ``spec`` gives the window / patch of the cell's resolution level and its build-time H, W (used by
    the ``layer`` norm, which then only accepts that size).
    """

    def __init__(
        self, C_in: int, C_out: int, att_mode: str, with_mixer: bool, spec: WindowSpec, cfg: CellConfig
    ) -> None:
        super().__init__()
        if att_mode not in ATT_MODES:
            raise ValueError(f"att_mode must be one of {ATT_MODES}, got {att_mode!r}")
        self.C_in, self.C_out, self.att_mode, self.with_mixer = C_in, C_out, att_mode, with_mixer
        self.cell_type = cfg.cell_type
        self.spec = spec
        self.input_proj: nn.Module = (
            Conv2DExt(C_in, C_out, 3, 1, 1, bias=True, separable=cfg.separable_conv) if C_in != C_out else nn.Identity()
        )
        self.n1 = STNorm(cfg.norm_mode, C_in, spec.H, spec.W)
        self.attn = make_attention(att_mode, C_in, C_out, spec, cfg)
        self.sd = StochasticDepth(cfg.dropout_p)
        self.mixer: nn.Module | None = None
        if with_mixer:
            m_in = C_in if cfg.cell_type == "parallel" else C_out
            if cfg.mixer_type == "conv":
                self.mixer = ConvMixer(
                    m_in, C_out, cfg.scale_ratio_in_mixer, cfg.mixer_kernel, cfg.mixer_padding, cfg.separable_conv
                )
            else:
                self.mixer = LinearMixer(m_in, C_out, spec.patch, cfg.scale_ratio_in_mixer)
            if cfg.cell_type == "sequential":
                self.n2 = STNorm(cfg.norm_mode, C_out, spec.H, spec.W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.shape[2] != self.C_in:
            raise ValueError(f"STCNNTCell: expected x of shape [B, T, {self.C_in}, H, W], got {tuple(x.shape)}")
        h = self.n1(x)
        if self.cell_type == "parallel":
            y = self.input_proj(x) + self.sd(self.attn(h))
            if self.mixer is not None:
                y = y + self.sd(self.mixer(h))
            return y
        y = self.input_proj(x) + self.sd(self.attn(h))
        if self.mixer is not None:
            y = y + self.sd(self.mixer(self.n2(y)))
        return y

    def extra_repr(self) -> str:
        return f"{self.C_in} -> {self.C_out}, att_mode={self.att_mode!r}, mixer={self.with_mixer}, {self.cell_type}"
