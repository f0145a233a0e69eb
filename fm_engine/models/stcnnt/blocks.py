"""ST-CNNT blocks from block strings (docs/MODELS.md 2.8), on [B, T, C, H, W].

``STCNNTBlock("L1G1T1", C_in, C_out, spec, cfg)`` stacks one cell per letter pair: the first cell
maps C_in -> C_out, the others C_out -> C_out. With dense connections (default) cell c > 0 takes the
sum of the outputs of all previous cells; the block returns the last cell's output.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from fm_engine.models.stcnnt.cells import STCNNTCell
from fm_engine.models.stcnnt.config import CellConfig
from fm_engine.models.stcnnt.windows import WindowSpec, parse_block_string


class STCNNTBlock(nn.Module):
    """A stack of cells. x: [B, T, C_in, H, W] -> [B, T, C_out, H, W]."""

    def __init__(
        self, block_str: str, C_in: int, C_out: int, spec: WindowSpec, cfg: CellConfig, name: str = "block"
    ) -> None:
        super().__init__()
        self.block_str, self.name, self.spec, self.cfg = block_str, name, spec, cfg
        self.C_in, self.C_out = C_in, C_out
        self.dense = cfg.block_dense_connection
        kinds = parse_block_string(block_str)
        check_heads(name, kinds, C_in, C_out, spec, cfg)
        self.cells = nn.ModuleList(
            STCNNTCell(C_in if i == 0 else C_out, C_out, att, mix, spec, cfg) for i, (att, mix) in enumerate(kinds)
        )

    def check_size(self, H: int, W: int) -> None:
        """ValueError naming this block when a frame of H x W does not fit its windows and patches."""
        check_frame(
            self.name, [cast(STCNNTCell, c).att_mode for c in self.cells], H, W, self.C_out, self.spec, self.cfg
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for i, cell in enumerate(self.cells):
            if i == 0:
                inp = x
            elif self.dense:
                inp = outs[0] if i == 1 else torch.stack(outs, 0).sum(0)
            else:
                inp = outs[-1]
            outs.append(cell(inp))
        return outs[-1]

    def extra_repr(self) -> str:
        s = self.spec
        return f"{self.name}: {self.block_str!r}, {self.C_in} -> {self.C_out}, window {s.window}, patch {s.patch}"


def check_heads(
    name: str, kinds: list[tuple[str, bool]], C_in: int, C_out: int, spec: WindowSpec, cfg: CellConfig
) -> None:
    """Build-time check that n_head splits every cell's tokens of a block into whole heads."""
    n = cfg.n_head
    ph, pw = spec.patch
    for att, _ in kinds:
        if att in ("local", "global"):
            s = cfg.stride_qk
            if ph % s or pw % s:
                raise ValueError(
                    f"{name}: patch {ph}x{pw} at this level is not divisible by stride_qk = {s} "
                    f"(frame {spec.H}x{spec.W})"
                )
            sizes = {"v": C_out * ph * pw, "q/k": C_out * (ph // s) * (pw // s)}
        elif att == "vit":
            wh, ww = spec.window
            sizes = {"v": C_out * wh * ww}
        else:
            s = cfg.stride_t
            sizes = {"v": C_out * spec.H * spec.W, "q/k": C_out * (spec.H // s) * (spec.W // s)}
        for what, d in sizes.items():
            if d % n:
                raise ValueError(
                    f"{name}: {att} attention with C = {C_out}, patch {ph}x{pw}, "
                    f"window {spec.window[0]}x{spec.window[1]} "
                    f"at frame {spec.H}x{spec.W} has {what} token size {d}, not divisible by n_head = {n}"
                )


def check_frame(name: str, att_modes: list[str], H: int, W: int, C: int, spec: WindowSpec, cfg: CellConfig) -> None:
    """Run-time check that a frame of H x W fits the windows / patches of every cell of a block."""
    ph, pw = spec.patch
    wh, ww = spec.window
    nwh, nww = spec.num_wind
    if cfg.norm_mode == "layer" and (H, W) != (spec.H, spec.W):
        raise ValueError(
            f"{name}: norm_mode 'layer' normalises over [C, H, W] and ties this level to frames of {spec.H}x{spec.W}, "
            f"got {H}x{W}; use a batch/instance norm mode for variable image sizes"
        )
    for att in sorted(set(att_modes)):
        if att == "local" and (H % wh or W % ww):
            raise ValueError(
                f"{name}: frame {H}x{W} at this level is not divisible by the local window {wh}x{ww} "
                f"({spec.num_patch[0]}x{spec.num_patch[1]} patches of {ph}x{pw})"
            )
        if att == "global" and (H % (nwh * ph) or W % (nww * pw)):
            raise ValueError(
                f"{name}: frame {H}x{W} at this level does not split into the global grid of {nwh}x{nww} windows "
                f"of whole {ph}x{pw} patches"
            )
        if att == "vit" and (H % wh or W % ww):
            raise ValueError(f"{name}: frame {H}x{W} at this level is not divisible by the ViT window {wh}x{ww}")
        if att == "temporal":
            s = cfg.stride_t
            if H % s or W % s:
                raise ValueError(f"{name}: frame {H}x{W} at this level is not divisible by the temporal stride_t = {s}")
            hq, wq = H // s, W // s
            if (C * hq * wq) % cfg.n_head or (C * H * W) % cfg.n_head:
                raise ValueError(
                    f"{name}: temporal attention on C x H x W = {C}x{H}x{W} (q/k {C}x{hq}x{wq}) does not split "
                    f"into n_head = {cfg.n_head} whole heads"
                )
