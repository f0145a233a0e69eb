"""Functional API: one module per op family (reference, validation, backends, dispatch).

Every function takes ``backend=None | "reference" | "triton" | "cuda"``; see
:mod:`fm_engine.ops._dispatch` for how the backend is chosen and :func:`explain` for why.
``conv_ieee`` (a convolution kept in ieee fp32) and ``grid_coords`` are helpers, not ops: no backend.
"""

from fm_engine.ops._dispatch import (
    BACKENDS,
    BackendUnsupportedError,
    explain,
    get_op,
    registered_ops,
    trace,
    use_backend,
)
from fm_engine.ops._exact import conv_ieee
from fm_engine.ops.cross_attention import cross_attention
from fm_engine.ops.patch_embed import grid_coords, patch_embed
from fm_engine.ops.relu2 import relu2, relu2_mlp
from fm_engine.ops.temporal_attention import temporal_attention
from fm_engine.ops.window_attention import window_attention

__all__ = [
    "BACKENDS",
    "BackendUnsupportedError",
    "conv_ieee",
    "cross_attention",
    "explain",
    "get_op",
    "grid_coords",
    "patch_embed",
    "registered_ops",
    "relu2",
    "relu2_mlp",
    "temporal_attention",
    "trace",
    "use_backend",
    "window_attention",
]
