"""ST-CNNT attention modules on [B, T, C, H, W] (docs/MODELS.md 2.2-2.6).

Constructor contract (every module maps x: [B, T, C_in, H, W] -> [B, T, C_out, H, W]):

``SpatialLocalAttention(C_in, C_out, H, W, window_size=None, patch_size=None, num_wind=8, num_patch=4, ...)``
``SpatialGlobalAttention(...)``  same arguments
``SpatialViTAttention(C_in, C_out, H, W, window_size=None, num_wind=8, ...)``
``TemporalAttention(C_in, C_out, ..., stride_qk=2, is_causal=False)``

Window sizing (pixels; every size is an int or an (h, w) pair), resolved once from the build-time
frame H x W: window = ``window_size`` if given, else ``(H // num_wind_h, W // num_wind_w)``; patch =
``patch_size`` if given, else ``window // num_patch``. Then, at run time:

* local (L): the patch size and the patches per window (window // patch) stay fixed; the number of windows
  follows the input's H, W. The relative-position table covers the nPh x nPw patch grid of a window.
* global (G): the number of windows (H // window at build time) and the patch size stay fixed; the patches per
  window follow H, W. The table covers the nWh x nWw window grid.
* ViT (V): a token is a whole window; the window size stays fixed and the window count follows H, W; the
  table (when on) covers the build-time window grid, so the bias needs inputs of the build-time size.

Common arguments: ``a_type`` "conv" (Q, K: Conv2DExt kernel_size / stride_qk / padding; V: Conv2DExt
kernel_size / stride / padding) or "lin" (Q, K, V: one Linear per patch token of v's patch size, stride_qk
unused; for TemporalAttention a per-pixel Linear over channels); ``n_head``; ``att_dropout_p`` (training
only); ``cosine_att``; ``normalize_Q_K``; ``att_with_relative_position_bias`` (default True; spatial modules
only; the bias is added after the softmax, kept from the original); ``att_with_output_proj`` (default True:
Conv2DExt(C_out, C_out, kernel_size, 1, padding) for "conv", the per-token Linear for "lin");
``backend`` (None = the innermost ``fm_engine.use_backend`` block, else automatic; passed to
fm_engine.ops.window_attention / temporal_attention).

Head sizes: spatial hc = C_out*ph*pw / n_head (and C_out*(ph/s)*(pw/s) / n_head for Q/K with stride_qk s);
temporal D = C_out*H*W / n_head (Q/K: C_out*(H/s)*(W/s) / n_head). Sizes that do not divide raise
ValueError naming them, at construction when the build-time sizes already fail, else in forward.

Parameter names follow the original: ``query``, ``key``, ``value``, ``output_proj``,
``relative_position_bias_table`` ([(2*Nh-1)*(2*Nw-1), n_head], trunc-normal std 0.02) and the buffer
``relative_position_index`` ([N, N], not saved in the state dict).
"""

from __future__ import annotations

import torch
from torch import nn

from fm_engine.nn.conv import Conv2DExt
from fm_engine.ops.temporal_attention import temporal_attention
from fm_engine.ops.window_attention import pair, window_attention

A_TYPES = ("conv", "lin")


class PatchLinear(nn.Module):
    """One Linear per patch token: x [B, T, C_in, H, W] -> [B, T, C_out, H, W]; the token is a
    ph x pw patch flattened in (ph, pw, C) order (C fastest), mapped C_in*ph*pw -> C_out*ph*pw."""

    def __init__(self, C_in: int, C_out: int, patch: tuple[int, int], bias: bool = True) -> None:
        super().__init__()
        self.C_out, self.patch = C_out, patch
        self.linear = nn.Linear(C_in * patch[0] * patch[1], C_out * patch[0] * patch[1], bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C, H, W = x.shape
        ph, pw = self.patch
        if H % ph or W % pw:
            raise ValueError(f"x: frame {H}x{W} is not divisible into {ph}x{pw} patches")
        t = x.reshape(B, T, C, H // ph, ph, W // pw, pw).permute(0, 1, 3, 5, 4, 6, 2)
        y = self.linear(t.reshape(B, T, H // ph, W // pw, ph * pw * C))
        y = y.reshape(B, T, H // ph, W // pw, ph, pw, self.C_out).permute(0, 1, 6, 2, 4, 3, 5)
        return y.reshape(B, T, self.C_out, H, W)


class PixelLinear(nn.Module):
    """Linear over channels at every pixel: x [B, T, C_in, H, W] -> [B, T, C_out, H, W]."""

    def __init__(self, C_in: int, C_out: int, bias: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(C_in, C_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.transpose(2, -1)).transpose(2, -1)


def relative_position_index(grid: tuple[int, int]) -> torch.Tensor:
    """Swin-style index [N, N] into a table of (2*Nh-1)*(2*Nw-1) rows for tokens on an Nh x Nw grid
    (row-major): row (i, j) holds the index of the relative offset token_i - token_j."""
    nh, nw = grid
    coords = torch.stack(torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing="ij")).flatten(1)  # 2 N
    rel = coords[:, :, None] - coords[:, None, :]  # 2 N N
    return (rel[0] + nh - 1) * (2 * nw - 1) + (rel[1] + nw - 1)


def _check_input(x: torch.Tensor, C_in: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x: expected a 5-D tensor [B, T, C, H, W], got {shape}")
    if x.shape[2] != C_in:
        raise ValueError(f"x: expected C_in = {C_in} channels at dim 2 of [B, T, C, H, W], got {x.shape[2]}")


class _STCNNTAttentionBase(nn.Module):
    def __init__(
        self,
        C_in: int,
        C_out: int,
        a_type: str,
        n_head: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int],
        padding: int | tuple[int, int],
        stride_qk: int | tuple[int, int],
        att_dropout_p: float,
        cosine_att: bool,
        normalize_Q_K: bool,
        att_with_output_proj: bool,
        backend: str | None,
        lin_patch: tuple[int, int] | None,
    ) -> None:
        super().__init__()
        if a_type not in A_TYPES:
            raise ValueError(f"a_type: expected one of {A_TYPES}, got {a_type!r}")
        if not isinstance(n_head, int) or n_head < 1:
            raise ValueError(f"n_head: expected a positive int, got {n_head!r}")
        if not 0.0 <= float(att_dropout_p) < 1.0:
            raise ValueError(f"att_dropout_p: expected a probability in [0, 1), got {att_dropout_p}")
        self.C_in, self.C_out, self.a_type, self.n_head = C_in, C_out, a_type, n_head
        self.stride_qk = pair("stride_qk", stride_qk) if a_type == "conv" else (1, 1)
        self.att_dropout_p = float(att_dropout_p)
        self.cosine_att, self.normalize_Q_K = bool(cosine_att), bool(normalize_Q_K)
        self.backend = backend
        if a_type == "conv":
            self.query: nn.Module = Conv2DExt(C_in, C_out, kernel_size, self.stride_qk, padding)
            self.key: nn.Module = Conv2DExt(C_in, C_out, kernel_size, self.stride_qk, padding)
            self.value: nn.Module = Conv2DExt(C_in, C_out, kernel_size, stride, padding)
            self.output_proj: nn.Module | None = (
                Conv2DExt(C_out, C_out, kernel_size, 1, padding) if att_with_output_proj else None
            )
        else:
            make = (lambda a, b: PatchLinear(a, b, lin_patch)) if lin_patch is not None else PixelLinear
            self.query, self.key, self.value = make(C_in, C_out), make(C_in, C_out), make(C_in, C_out)
            self.output_proj = make(C_out, C_out) if att_with_output_proj else None

    def _project(self, o: torch.Tensor) -> torch.Tensor:
        return self.output_proj(o) if self.output_proj is not None else o

    def _dropout(self) -> float:
        return self.att_dropout_p if self.training else 0.0


class _SpatialAttention(_STCNNTAttentionBase):
    """Shared by the local, global and ViT modules: window sizing, bias table, the op call."""

    mode: str
    relative_position_index: torch.Tensor

    def __init__(
        self,
        C_in: int,
        C_out: int = 16,
        H: int = 128,
        W: int = 128,
        window_size: int | tuple[int, int] | None = None,
        patch_size: int | tuple[int, int] | None = None,
        num_wind: int | tuple[int, int] = 8,
        num_patch: int | tuple[int, int] = 4,
        a_type: str = "conv",
        n_head: int = 8,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        stride_qk: int | tuple[int, int] = 1,
        att_dropout_p: float = 0.0,
        cosine_att: bool = False,
        normalize_Q_K: bool = False,
        att_with_relative_position_bias: bool = True,
        att_with_output_proj: bool = True,
        backend: str | None = None,
    ) -> None:
        Hb, Wb = pair("H", H)[0], pair("W", W)[0]
        if window_size is not None:
            window = pair("window_size", window_size)
        else:
            nw = pair("num_wind", num_wind)
            window = (Hb // nw[0], Wb // nw[1])
            if min(window) < 1:
                raise ValueError(f"num_wind: {nw} windows do not fit a {Hb}x{Wb} frame")
        if patch_size is not None:
            patch = pair("patch_size", patch_size)
        else:
            npch = pair("num_patch", num_patch)
            patch = (window[0] // npch[0], window[1] // npch[1])
            if min(patch) < 1:
                raise ValueError(f"num_patch: {npch} patches do not fit a {window[0]}x{window[1]} window")
        if self.mode == "vit":
            patch = window
        if window[0] % patch[0] or window[1] % patch[1]:
            raise ValueError(f"patch_size: {patch} does not divide the window {window}")
        if Hb % window[0] or Wb % window[1]:
            raise ValueError(f"window_size: {window} does not divide the build-time frame {Hb}x{Wb}")
        super().__init__(
            C_in,
            C_out,
            a_type,
            n_head,
            kernel_size,
            stride,
            padding,
            stride_qk,
            att_dropout_p,
            cosine_att,
            normalize_Q_K,
            att_with_output_proj,
            backend,
            patch,
        )
        self.window, self.patch = window, patch
        self.num_patch = (window[0] // patch[0], window[1] // patch[1])
        self.num_wind = (Hb // window[0], Wb // window[1])
        s = self.stride_qk
        if patch[0] % s[0] or patch[1] % s[1]:
            raise ValueError(f"stride_qk: {s} must divide the patch size {patch} (Q/K patches shrink by the stride)")
        d_v, d_qk = C_out * patch[0] * patch[1], C_out * (patch[0] // s[0]) * (patch[1] // s[1])
        if d_v % n_head or d_qk % n_head:
            raise ValueError(
                f"n_head: {n_head} heads do not divide the token sizes C_out*ph*pw = {d_v} (V) and {d_qk} (Q/K, "
                f"stride_qk {s}) into whole head dims"
            )
        # token grid of one attention group: fixed for local (patches per window) and global (windows)
        self.grid = self.num_patch if self.mode == "local" else self.num_wind
        if att_with_relative_position_bias:
            n_rel = (2 * self.grid[0] - 1) * (2 * self.grid[1] - 1)
            self.relative_position_bias_table: nn.Parameter | None = nn.Parameter(torch.zeros(n_rel, n_head))
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
            self.register_buffer("relative_position_index", relative_position_index(self.grid), persistent=False)
        else:
            self.relative_position_bias_table = None

    def relative_position_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The gathered bias [n_head, N, N] (N = Nh*Nw tokens per group), or None when off."""
        if self.relative_position_bias_table is None:
            return None
        n = self.grid[0] * self.grid[1]
        b = self.relative_position_bias_table[self.relative_position_index.reshape(-1)]
        b = b.reshape(n, n, self.n_head).permute(2, 0, 1)
        return b.to(dtype) if dtype is not None else b

    def _op_geometry(self, H: int, W: int) -> dict:
        ph, pw = self.patch
        if self.mode == "local":
            wh, ww = self.num_patch[0] * ph, self.num_patch[1] * pw
            if H % wh or W % ww:
                raise ValueError(
                    f"x: frame {H}x{W} is not divisible into windows of {self.num_patch[0]}x{self.num_patch[1]} "
                    f"patches of {ph}x{pw} pixels ({wh}x{ww})"
                )
            return {"mode": "local", "num_patches": self.num_patch}
        if self.mode == "global":
            nwh, nww = self.num_wind
            if H % (nwh * ph) or W % (nww * pw):
                raise ValueError(f"x: frame {H}x{W} is not divisible into {nwh}x{nww} windows of {ph}x{pw} patches")
            return {"mode": "global", "num_windows": self.num_wind}
        if H % ph or W % pw:
            raise ValueError(f"x: frame {H}x{W} is not divisible into {ph}x{pw} windows")
        nw = (H // ph, W // pw)
        if self.relative_position_bias_table is not None and nw != self.num_wind:
            raise ValueError(
                f"x: frame {H}x{W} gives {nw[0]}x{nw[1]} windows but the relative-position bias was built for "
                f"{self.num_wind[0]}x{self.num_wind[1]}"
            )
        return {"mode": "global", "num_windows": nw}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, C_in, H, W] -> [B, T, C_out, H, W]."""
        _check_input(x, self.C_in)
        geo = self._op_geometry(x.shape[3], x.shape[4])
        q, k, v = self.query(x), self.key(x), self.value(x)
        o = window_attention(
            q,
            k,
            v,
            **geo,
            patch_size=self.patch,
            n_head=self.n_head,
            cosine=self.cosine_att,
            normalize_qk=self.normalize_Q_K,
            rel_pos_bias=self.relative_position_bias(q.dtype),
            dropout_p=self._dropout(),
            backend=self.backend,
        )
        return self._project(o)


class SpatialLocalAttention(_SpatialAttention):
    """Local window attention (L): the patches of one window attend to each other (docs/MODELS.md 2.3)."""

    mode = "local"


class SpatialGlobalAttention(_SpatialAttention):
    """Global grid attention (G, MaxViT-style): the same patch position in every window attends across
    windows (docs/MODELS.md 2.4). Height and width keep their own window counts (**fixed**)."""

    mode = "global"


class SpatialViTAttention(_SpatialAttention):
    """ViT-style attention (V): a token is a whole window (wh, ww, C); all windows of a frame attend to each
    other (docs/MODELS.md 2.5). ``patch_size`` / ``num_patch`` are ignored (the patch is the window)."""

    mode = "vit"


class TemporalAttention(_STCNNTAttentionBase):
    """Temporal attention (T): T x T attention per (batch, head), a head being C_out / n_head whole channel
    maps (docs/MODELS.md 2.6). ``stride_qk`` is the original's ``stride_t`` (default 2: Q, K at H/2 x W/2).
    ``is_causal``: frame i attends to frames <= i."""

    def __init__(
        self,
        C_in: int,
        C_out: int = 16,
        a_type: str = "conv",
        n_head: int = 8,
        kernel_size: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 1,
        stride_qk: int | tuple[int, int] = 2,
        att_dropout_p: float = 0.0,
        cosine_att: bool = False,
        normalize_Q_K: bool = False,
        is_causal: bool = False,
        att_with_output_proj: bool = True,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            C_in,
            C_out,
            a_type,
            n_head,
            kernel_size,
            stride,
            padding,
            stride_qk,
            att_dropout_p,
            cosine_att,
            normalize_Q_K,
            att_with_output_proj,
            backend,
            None,
        )
        self.is_causal = bool(is_causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, C_in, H, W] -> [B, T, C_out, H, W]."""
        _check_input(x, self.C_in)
        H, W = x.shape[3:]
        s = self.stride_qk
        if H % s[0] or W % s[1]:
            raise ValueError(f"x: frame {H}x{W} is not divisible by stride_qk {s}")
        q, k, v = self.query(x), self.key(x), self.value(x)
        o = temporal_attention(
            q,
            k,
            v,
            n_head=self.n_head,
            cosine=self.cosine_att,
            normalize_qk=self.normalize_Q_K,
            causal=self.is_causal,
            dropout_p=self._dropout(),
            backend=self.backend,
        )
        return self._project(o)
