"""Triton kernels of ST-CNNT local and global attention on [B, T, C, H, W] (fm_engine/ops/window_attention.py
holds the semantics and dispatch; temporal attention has its own kernels in kernels/temporal_attention.py).

Three kernel families, one file each, plus the bias gradient:

* ``channel_plane.py`` -- tiny heads of whole channels at one pixel (hc divides C; the MRI production config
  has hc = 4) with unstrided q, k: many heads per program, batched tensor-core products over [heads, tokens,
  head elements padded to 16] tiles gathered straight from the channel planes;
* ``general.py`` -- every other geometry of at most 64 tokens per group (strided q / k, heads that straddle
  pixels, heads of whole pixels such as the parser default's hc = 256): one group's N x N scores per program;
* ``long_groups.py`` -- groups of more than 64 tokens: FlashAttention-style blocks with an online softmax;
* ``bias_grad.py`` -- the relative-position bias gradient from per-program partials, summed in a fixed order.

``_common.py`` holds the addressing, products and dropout helpers; ``_launch.py`` the family choice, tiles,
autotuning candidates (LaunchTuner) and the forward / backward launchers; ``_gate.py`` the compile-gate cases.
Products run on tensor cores (mma.sync / wgmma) for fp16 / bf16 and as exact IEEE fp32 dots for fp32; every
kernel reads q, k, v and writes its outputs in place in the [B, T, C, H, W] layout.
"""

from __future__ import annotations

from . import _gate  # noqa: F401  (registers the compile-gate cases)
from ._common import MODE_GLOBAL, MODE_LOCAL, SCORE_COSINE, SCORE_DOT, SCORE_STANDARDIZE
from ._launch import (
    BWD_TUNER,
    FWD_TUNER,
    LONG_INTERPRETER_CONFIG,
    MAX_BLOCK_D,
    MAX_LONG_HEAD,
    MAX_TOKENS,
    PLANE_INTERPRETER_CONFIG,
    backward,
    bias_grad,
    bias_grad_plan,
    blocks,
    candidates,
    forward,
    heads_per_program,
    long_configs,
    long_tile,
    plane_configs,
    plane_tile,
)
from .bias_grad import bias_grad_kernel
from .channel_plane import plane_bwd_kernel, plane_fwd_kernel
from .general import stcnnt_attn_bwd_kernel, stcnnt_attn_fwd_kernel
from .long_groups import long_bwd_dkdv_kernel, long_bwd_dq_kernel, long_fwd_kernel

AOT_HELPERS = {"_scores", "_plane_scores"}  # jit helpers that take pointers (compiled inside the kernels)

__all__ = [
    "AOT_HELPERS",
    "BWD_TUNER", "FWD_TUNER", "LONG_INTERPRETER_CONFIG", "MAX_BLOCK_D", "MAX_LONG_HEAD", "MAX_TOKENS", "MODE_GLOBAL",
    "MODE_LOCAL", "PLANE_INTERPRETER_CONFIG", "SCORE_COSINE", "SCORE_DOT", "SCORE_STANDARDIZE", "backward",
    "bias_grad", "bias_grad_kernel", "bias_grad_plan", "blocks", "candidates", "forward", "heads_per_program",
    "long_bwd_dkdv_kernel", "long_bwd_dq_kernel", "long_configs", "long_fwd_kernel", "long_tile",
    "plane_bwd_kernel", "plane_configs", "plane_fwd_kernel", "plane_tile", "stcnnt_attn_bwd_kernel",
    "stcnnt_attn_fwd_kernel",
]  # fmt: skip
