"""Triton kernels of ST-CNNT temporal attention (fm_engine/ops/temporal_attention.py holds the semantics).

The T x T attention per (batch, head) runs on the shared ST-CNNT attention kernels of
kernels/window_attention.py with MODE 2: a program owns one (b, head), its T tokens are the frames
(token offset t*C*H*W in the contiguous [B, T, C, H, W] tensor) and its head is the contiguous slice
[h*D, (h+1)*D) of the flattened (C, H, W) frame. The long head dims (D_qk, D_v up to thousands) are
looped over in chunks of 64; the T x T scores (T <= 128) stay in registers; causal masking is a constexpr.
This module registers the temporal launch configurations for the compile gate and re-exports the
launchers.
"""

from __future__ import annotations

from fm_engine.kernels.window_attention import (
    MODE_TEMPORAL,
    SCORE_COSINE,
    SCORE_DOT,
    SCORE_STANDARDIZE,
    backward,
    forward,
    register_gate,
)

__all__ = ["backward", "forward"]

# Production MRI shape (T 12 -> BLOCK_N 16, D in the thousands -> BLOCK_D 64) in every dtype, causal and
# not, every score form once, and T 64.
register_gate(MODE_TEMPORAL, [
    ("bf16", {"BLOCK_N": 16, "BLOCK_D": 64, "SCORE": SCORE_COSINE}),
    ("fp16", {"BLOCK_N": 16, "BLOCK_D": 64, "SCORE": SCORE_DOT, "CAUSAL": True}),
    ("fp32", {"BLOCK_N": 16, "BLOCK_D": 64, "SCORE": SCORE_STANDARDIZE}),
    ("bf16", {"BLOCK_N": 64, "BLOCK_D": 64, "SCORE": SCORE_DOT, "CAUSAL": True}),
])
