"""Triton kernels of ST-CNNT temporal attention (fm_engine/ops/temporal_attention.py holds the semantics).

The T x T attention per (batch, head) runs on the shared ST-CNNT attention kernels of
kernels/window_attention.py with MODE 2: a program owns one (b, head), its T tokens are the frames
(token offset t*C*H*W in the contiguous [B, T, C, H, W] tensor) and its head is the contiguous slice
[h*D, (h+1)*D) of the flattened (C, H, W) frame. The long head dims (D_qk, D_v up to thousands) are
looped over in chunks of 64; the T x T scores (T <= 64) stay in registers; causal masking is a constexpr.
This module registers the temporal launch configurations for the compile gate and re-exports the
launchers.
"""

from __future__ import annotations

from fm_engine.kernels.window_attention import (
    MODE_TEMPORAL,
    SCORE_COSINE,
    SCORE_STANDARDIZE,
    backward,
    forward,
    register_gate,
)

__all__ = ["backward", "forward"]

# Production MRI shape (T 12 -> BLOCK_N 16, D in the thousands -> BLOCK_D 64) in bf16 with cosine scores,
# and T 64 causal with standardised scores in fp32.
register_gate(
    MODE_TEMPORAL,
    [
        ("bf16", {"BLOCK_N": 16, "BLOCK_D": 64, "SCORE": SCORE_COSINE}),
        ("fp32", {"BLOCK_N": 64, "BLOCK_D": 64, "SCORE": SCORE_STANDARDIZE, "CAUSAL": True, "DROPOUT": True}),
    ],
)
