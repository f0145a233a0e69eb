"""ST-CNNT backbones (docs/MODELS.md 2.9): U-Net with attention gates, HR-Net (2-5 levels) and "LLM".

All take x: [B, T, C_in, H, W] (T = time for 2D+T, slices for 3-D, 1 for 2-D images). Level l runs at
H / 2**l x W / 2**l; its window / patch sizes come from :func:`~fm_engine.models.stcnnt.windows.level_windows`
applied to the build-time size (``H``, ``W`` arguments), ``window`` and ``patch`` (pixels, level 0).
Local attention keeps the window size and global attention the window count when a model runs on
another frame size (only the ``layer`` norm forbids that); a frame that does not fit the windows of some
level raises ValueError naming the level.

Resampling: ``DownSample`` is either bilinear x0.5 (U-Net) or 2x2 space-to-depth (HR-Net), each step
followed by a 1x1 Conv2DExt; ``UpSample`` is bilinear x2 (align_corners=False) then a 1x1 Conv2DExt per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from fm_engine.models.stcnnt.blocks import STCNNTBlock
from fm_engine.models.stcnnt.config import CellConfig
from fm_engine.models.stcnnt.windows import WindowSpec, keep_window_size, level_windows
from fm_engine.nn.conv import Conv2DExt


def _frames(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    B, T = x.shape[:2]
    return x.reshape(B * T, *x.shape[2:]), B, T


class DownSample(nn.Module):
    """Halve H, W ``N`` times. x: [B, T, C_in, H, W] -> [B, T, C_out, H / 2**N, W / 2**N].

    method "interp": bilinear x0.5 then a 1x1 conv; "space_to_depth": 2x2 pixel-unshuffle (C -> 4C)
    then a 1x1 conv. Channels double per step up to C_out (the last step lands on C_out).
    """

    def __init__(self, N: int, C_in: int, C_out: int, method: str = "space_to_depth") -> None:
        super().__init__()
        if method not in ("interp", "space_to_depth"):
            raise ValueError(f"DownSample method must be 'interp' or 'space_to_depth', got {method!r}")
        self.method = method
        chans = [C_in] + [C_out if i == N - 1 else min(C_in << (i + 1), C_out) for i in range(N)]
        mult = 4 if method == "space_to_depth" else 1
        self.convs = nn.ModuleList(Conv2DExt(chans[i] * mult, chans[i + 1], 1, 1, 0) for i in range(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            f, B, T = _frames(x)
            if f.shape[-2] % 2 or f.shape[-1] % 2:
                raise ValueError(f"DownSample: frame {f.shape[-2]}x{f.shape[-1]} has an odd side and cannot be halved")
            if self.method == "space_to_depth":
                f = F.pixel_unshuffle(f, 2)
            else:
                f = F.interpolate(f, scale_factor=0.5, mode="bilinear", align_corners=False)
            x = conv(f.reshape(B, T, *f.shape[1:]))
        return x


class UpSample(nn.Module):
    """Double H, W ``N`` times: bilinear x2 then a 1x1 conv per step.
    x: [B, T, C_in, H, W] -> [B, T, C_out, H * 2**N, W * 2**N]; channels halve per step down to C_out."""

    def __init__(self, N: int, C_in: int, C_out: int) -> None:
        super().__init__()
        chans = [C_in] + [C_out if i == N - 1 else max(C_in >> (i + 1), C_out) for i in range(N)]
        self.convs = nn.ModuleList(Conv2DExt(chans[i], chans[i + 1], 1, 1, 0) for i in range(N))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            f, B, T = _frames(x)
            f = F.interpolate(f, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = conv(f.reshape(B, T, *f.shape[1:]))
        return x


class AttentionGate(nn.Module):
    """U-Net attention gate on a skip x [B, T, C, H, W] from the upsampled decoder tensor q [B, T, C_q, H, W]:
    g = sigmoid(psi(relu(phi(q) + theta(x)))) with 1x1 convs (psi: C -> 1, one gate per pixel); returns x * g."""

    def __init__(self, C_q: int, C: int) -> None:
        super().__init__()
        self.phi = Conv2DExt(C_q, C, 1, 1, 0)
        self.theta = Conv2DExt(C, C, 1, 1, 0)
        self.psi = Conv2DExt(C, 1, 1, 1, 0)

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.psi(torch.relu(self.phi(q) + self.theta(x))))


def _block_strs(block_str: str | Sequence[str], n: int) -> list[str]:
    if isinstance(block_str, str):
        return [block_str] * n
    strs = list(block_str)
    if len(strs) < n:
        raise ValueError(f"block_str: need {n} block strings (one per level / stage), got {len(strs)}: {strs}")
    return strs


def check_input(x: torch.Tensor, C_in: int, where: str) -> None:
    if x.dim() != 5:
        raise ValueError(
            f"{where}: expected x of shape [B, T, C, H, W] (rank 5), got rank {x.dim()} shape {tuple(x.shape)}"
        )
    if x.shape[2] != C_in:
        raise ValueError(f"{where}: expected C = {C_in} input channels at dim 2, got {x.shape[2]}")


def check_levels(where: str, H: int, W: int, n_halvings: int) -> None:
    f = 2**n_halvings
    if H % f or W % f:
        raise ValueError(f"{where}: frame {H}x{W} must be divisible by {f} to reach level {n_halvings} by halving")


class _Backbone(nn.Module):
    def __init__(
        self,
        C_in: int,
        C: int,
        H: int,
        W: int,
        window: int | Sequence[int],
        patch: int | Sequence[int],
        window_sizing_method: str,
        cfg: CellConfig | None,
    ) -> None:
        super().__init__()
        self.C_in, self.C = C_in, C
        self.H, self.W = H, W
        self.window = (window, window) if isinstance(window, int) else tuple(window)
        self.patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        self.window_sizing_method = window_sizing_method
        self.cfg = cfg if cfg is not None else CellConfig()

    def _specs(self, n: int) -> list[WindowSpec]:
        return level_windows(self.H, self.W, self.window, self.patch, n, self.window_sizing_method)  # type: ignore[arg-type]

    def _block(self, block_str: str, C_in: int, C_out: int, spec: WindowSpec, name: str) -> STCNNTBlock:
        return STCNNTBlock(block_str, C_in, C_out, spec, self.cfg, name=name)


class STCNNTUNet(_Backbone):
    """U-Net with attention gates. x: [B, T, C_in, H, W] -> [B, T, C, H, W].

    Encoder D_l at H / 2**l maps C_in -> C (l = 0) or 2**(l-1) C -> 2**l C; down = bilinear x0.5 + 1x1 conv;
    bridge at H / 2**L on 2**(L-1) C; decoder U_l: up (bilinear x2 + 1x1 conv) of the tensor from below,
    attention gate on the skip x_l, concat [gated skip, up] (2**(l+1) C) -> block -> 2**(l-1) C (C at l = 0).
    ``block_str``: one string, or one per level plus one for the bridge.
    """

    def __init__(
        self,
        C_in: int,
        C: int = 32,
        num_levels: int = 2,
        block_str: str | Sequence[str] = "T1L1G1",
        *,
        H: int,
        W: int,
        window: int | Sequence[int] = 8,
        patch: int | Sequence[int] = 2,
        window_sizing_method: str = "mixed",
        cfg: CellConfig | None = None,
        use_attention_gate: bool = True,
    ) -> None:
        super().__init__(C_in, C, H, W, window, patch, window_sizing_method, cfg)
        if not 1 <= num_levels <= 5:
            raise ValueError(f"num_levels must be in 1..5, got {num_levels}")
        L = self.num_levels = num_levels
        strs = _block_strs(block_str, L + 1)
        specs = self._specs(L)
        self.specs = specs + [keep_window_size((H // 2**L, W // 2**L), specs[-1].window, specs[-1].patch)]
        self.enc = nn.ModuleList(
            self._block(strs[lev], C_in if lev == 0 else C << (lev - 1), C << lev, specs[lev], f"level {lev} (D{lev})")
            for lev in range(L)
        )
        self.down = nn.ModuleList(DownSample(1, C << lev, C << lev, method="interp") for lev in range(L))
        self.bridge = self._block(strs[L], C << (L - 1), C << (L - 1), self.specs[L], f"level {L} (bridge)")
        self.up = nn.ModuleList(UpSample(1, C << lev, C << lev) for lev in range(L))
        self.use_attention_gate = use_attention_gate
        self.gate = nn.ModuleList(AttentionGate(C << lev, C << lev) for lev in range(L)) if use_attention_gate else None
        self.dec = nn.ModuleList(
            self._block(
                strs[lev], C << (lev + 1), C if lev == 0 else C << (lev - 1), specs[lev], f"level {lev} (U{lev})"
            )
            for lev in range(L)
        )

    def check_size(self, H: int, W: int) -> None:
        check_levels("STCNNTUNet", H, W, self.num_levels)
        for lev in range(self.num_levels):
            cast(STCNNTBlock, self.enc[lev]).check_size(H >> lev, W >> lev)
            cast(STCNNTBlock, self.dec[lev]).check_size(H >> lev, W >> lev)
        self.bridge.check_size(H >> self.num_levels, W >> self.num_levels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.C_in, "STCNNTUNet")
        self.check_size(x.shape[3], x.shape[4])
        skips = []
        for lev in range(self.num_levels):
            x = self.enc[lev](x)
            skips.append(x)
            x = self.down[lev](x)
        y = self.bridge(x)
        for lev in reversed(range(self.num_levels)):
            y = self.up[lev](y)
            s = self.gate[lev](y, skips[lev]) if self.gate is not None else skips[lev]
            y = self.dec[lev](torch.cat((s, y), dim=2))
        return y


class STCNNTHRNet(_Backbone):
    """HR-Net with 2 to 5 levels (level 5 crashed in the original; **fixed**).

    x: [B, T, C_in, H, W] -> (y [B, T, C * (2**L - 1), H, W], [y_0 .. y_{L-1}]) with
    y_l: [B, T, 2**l C, H / 2**l, W / 2**l].

    Block B_{l,s} (level l, stage s) has 2**l C channels. Stage 0 is B_{0,0}: C_in -> C. Stage s >= 1 runs
    B_{l,s} for l = 0..s on the sum of every earlier output of level l (x_{l,l} .. x_{l,s-1}: dense, as in the
    original) and of the previous stage's outputs x_{k,s-1} of the finer levels k < l, brought to level l by
    space-to-depth downsampling (e.g. x_{1,3} = B_{1,3}(x_{1,2} + x_{1,1} + down(x_{0,2}))).
    Fusion: y_l = output block_l(sum over all levels k of x_{k,L-1} resampled to level l: downsample from
    finer, bilinear upsample + 1x1 conv from coarser). Output: concat(y_0, up(y_1), ..., up(y_{L-1})) along C,
    each up keeping its channels.
    ``block_str``: one string, or one per level.
    """

    def __init__(
        self,
        C_in: int,
        C: int = 32,
        num_levels: int = 2,
        block_str: str | Sequence[str] = "T1L1G1",
        *,
        H: int,
        W: int,
        window: int | Sequence[int] = 8,
        patch: int | Sequence[int] = 2,
        window_sizing_method: str = "mixed",
        cfg: CellConfig | None = None,
    ) -> None:
        super().__init__(C_in, C, H, W, window, patch, window_sizing_method, cfg)
        if not 2 <= num_levels <= 5:
            raise ValueError(f"num_levels must be in 2..5 for the HR-Net, got {num_levels}")
        L = self.num_levels = num_levels
        strs = _block_strs(block_str, L)
        self.specs = specs = self._specs(L)
        blocks = {}
        downs = {}
        for s in range(L):
            for lev in range(s + 1):
                c_in = C_in if s == 0 else C << lev
                blocks[f"B{lev}{s}"] = self._block(strs[lev], c_in, C << lev, specs[lev], f"level {lev} (B{lev}{s})")
                if s > 0:
                    for k in range(min(lev, s - 1) + 1):
                        if k < lev:
                            downs[f"s{s}_{k}_{lev}"] = DownSample(lev - k, C << k, C << lev)
        self.blocks = nn.ModuleDict(blocks)
        self.stage_down = nn.ModuleDict(downs)
        fuse: dict[str, nn.Module] = {}
        for lev in range(L):
            for k in range(L):
                if k < lev:
                    fuse[f"{k}_{lev}"] = DownSample(lev - k, C << k, C << lev)
                elif k > lev:
                    fuse[f"{k}_{lev}"] = UpSample(k - lev, C << k, C << lev)
        self.fuse = nn.ModuleDict(fuse)
        self.out_blocks = nn.ModuleList(
            self._block(strs[lev], C << lev, C << lev, specs[lev], f"level {lev} (output {lev})") for lev in range(L)
        )
        self.out_up = nn.ModuleList(UpSample(lev, C << lev, C << lev) for lev in range(1, L))
        self.C_out = C * (2**L - 1)

    def check_size(self, H: int, W: int) -> None:
        check_levels("STCNNTHRNet", H, W, self.num_levels - 1)
        for name, block in self.blocks.items():
            lev = int(name[1])
            cast(STCNNTBlock, block).check_size(H >> lev, W >> lev)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        check_input(x, self.C_in, "STCNNTHRNet")
        self.check_size(x.shape[3], x.shape[4])
        L = self.num_levels
        hist: list[list[torch.Tensor]] = [[self.blocks["B00"](x)]]  # hist[l]: outputs of level l, stage order
        for s in range(1, L):
            cur = []
            for lev in range(s + 1):
                # dense over the earlier outputs of this level, plus the previous stage's finer levels downsampled
                terms = list(hist[lev]) if lev < s else []
                terms += [self.stage_down[f"s{s}_{k}_{lev}"](hist[k][-1]) for k in range(min(lev, s))]
                cur.append(self.blocks[f"B{lev}{s}"](torch.stack(terms, 0).sum(0) if len(terms) > 1 else terms[0]))
            for lev, t in enumerate(cur):
                if lev == len(hist):
                    hist.append([])
                hist[lev].append(t)
        prev = [h[-1] for h in hist]
        levels = []
        for lev in range(L):
            y = prev[lev]
            for k in range(L):
                if k != lev:
                    y = y + self.fuse[f"{k}_{lev}"](prev[k])
            levels.append(self.out_blocks[lev](y))
        y = torch.cat([levels[0]] + [self.out_up[lev - 1](levels[lev]) for lev in range(1, L)], dim=2)
        return y, levels


class STCNNTLLM(_Backbone):
    """ "LLM" backbone: a stack of blocks, all at full resolution. x: [B, T, C_in, H, W] -> [B, T, C_last, H, W].

    Stage channels C, C, 2C, 4C, 8C (first ``num_stages`` of them, then doubling). With dense skips (default)
    the input of stage i > 0 is the concatenation along C of all earlier stage outputs (whose channels add
    up to stage i's width); without them it is the previous stage's output.
    """

    def __init__(
        self,
        C_in: int,
        C: int = 32,
        num_stages: int = 5,
        block_str: str | Sequence[str] = "T1L1G1",
        *,
        H: int,
        W: int,
        window: int | Sequence[int] = 8,
        patch: int | Sequence[int] = 2,
        window_sizing_method: str = "mixed",
        cfg: CellConfig | None = None,
        dense_skips: bool = True,
    ) -> None:
        super().__init__(C_in, C, H, W, window, patch, window_sizing_method, cfg)
        if num_stages < 1:
            raise ValueError(f"num_stages must be positive, got {num_stages}")
        strs = _block_strs(block_str, num_stages)
        spec = self._specs(1)[0]
        self.widths = [C] + [C << max(i - 1, 0) for i in range(1, num_stages)]
        self.dense_skips = dense_skips
        stages = []
        for i in range(num_stages):
            if i == 0:
                c_in = C_in
            else:
                c_in = sum(self.widths[:i]) if dense_skips else self.widths[i - 1]
            stages.append(self._block(strs[i], c_in, self.widths[i], spec, f"stage {i}"))
        self.stages = nn.ModuleList(stages)
        self.C_out = self.widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.C_in, "STCNNTLLM")
        for st in self.stages:
            cast(STCNNTBlock, st).check_size(x.shape[3], x.shape[4])
        outs: list[torch.Tensor] = []
        for i, st in enumerate(self.stages):
            if i == 0:
                inp = x
            else:
                inp = torch.cat(outs, dim=2) if self.dense_skips else outs[-1]
            outs.append(st(inp))
        return outs[-1]
