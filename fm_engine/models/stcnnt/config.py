"""Options shared by every ST-CNNT cell, block and backbone (docs/MODELS.md 2.2-2.10)."""

from __future__ import annotations

import dataclasses

CELL_TYPES = ("sequential", "parallel")
MIXER_TYPES = ("conv", "lin")
QKV_TYPES = ("conv", "lin")


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """Cell options; the defaults are the parser defaults of docs/MODELS.md 2.10.

    n_head: attention heads of every cell; cell_type: "sequential" (pre-norm) or "parallel";
    norm_mode: see :mod:`fm_engine.models.stcnnt.norms`; a_type: "conv" or "lin" Q/K/V;
    cosine_att / normalize_qk / att_with_rel_pos_bias / att_with_output_proj / att_dropout_p: attention
    options (docs/MODELS.md 2.2); stride_qk: stride of the spatial Q/K convs; stride_t: stride of the
    temporal Q/K convs; is_causal: causal temporal attention; mixer, mixer_kernel, mixer_padding,
    scale_ratio_in_mixer: the mixer (docs/MODELS.md 2.7); dropout_p: stochastic-depth probability ("row" mode);
    separable_conv: separable Conv2DExt in input_proj and conv mixers; block_dense_connection: dense cells in a block.
    """

    n_head: int = 32
    cell_type: str = "sequential"
    norm_mode: str = "instance2d"
    a_type: str = "conv"
    cosine_att: bool = False
    normalize_qk: bool = False
    att_with_rel_pos_bias: bool = True
    att_with_output_proj: bool = True
    att_dropout_p: float = 0.0
    stride_qk: int = 1
    stride_t: int = 2
    is_causal: bool = False
    mixer_type: str = "conv"
    mixer_kernel: int = 5
    mixer_padding: int = 2
    scale_ratio_in_mixer: float = 4.0
    dropout_p: float = 0.1
    separable_conv: bool = False
    block_dense_connection: bool = True

    def __post_init__(self) -> None:
        if self.cell_type not in CELL_TYPES:
            raise ValueError(f"cell_type must be one of {CELL_TYPES}, got {self.cell_type!r}")
        if self.mixer_type not in MIXER_TYPES:
            raise ValueError(f"mixer_type must be one of {MIXER_TYPES}, got {self.mixer_type!r}")
        if self.a_type not in QKV_TYPES:
            raise ValueError(f"a_type must be one of {QKV_TYPES}, got {self.a_type!r}")
        if self.n_head < 1:
            raise ValueError(f"n_head must be positive, got {self.n_head}")
        if self.scale_ratio_in_mixer <= 0:
            raise ValueError(f"scale_ratio_in_mixer must be positive, got {self.scale_ratio_in_mixer}")

    def replace(self, **changes: object) -> CellConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
