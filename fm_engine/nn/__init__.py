"""nn.Module wrappers over fm_engine.ops; state_dict names match the reference models.

Each module that calls an op itself (``Attention``, ``ReLU2`` / ``ReLU2MLP``, the stems, the STCNNT attention
modules) takes ``backend=None`` or a backend name, passed to its ops; None follows the innermost
``fm_engine.use_backend(name)`` context, else "auto". A module that only builds other modules
(``EncoderLayer``) takes no ``backend=``: run it inside ``use_backend`` to choose the backend.
``tokens`` holds the token-grid helpers (``grid_positions``, ``gather_tokens``).
"""

from fm_engine.nn.attention import Attention
from fm_engine.nn.conv import Conv2DExt, Conv3DExt
from fm_engine.nn.lora import LoRALinear, apply_lora, freeze_except_lora, lora_state_dict, merge_lora
from fm_engine.nn.mlp import ReLU2, ReLU2MLP
from fm_engine.nn.stcnnt_attention import (
    SpatialGlobalAttention,
    SpatialLocalAttention,
    SpatialViTAttention,
    TemporalAttention,
)
from fm_engine.nn.stems import AdaptiveStem2d, PatchEmbed2d
from fm_engine.nn.tokens import gather_tokens, grid_positions
from fm_engine.nn.transformer import EncoderLayer, LayerScale

__all__ = [
    "AdaptiveStem2d",
    "Attention",
    "Conv2DExt",
    "Conv3DExt",
    "EncoderLayer",
    "LayerScale",
    "LoRALinear",
    "PatchEmbed2d",
    "ReLU2",
    "ReLU2MLP",
    "SpatialGlobalAttention",
    "SpatialLocalAttention",
    "SpatialViTAttention",
    "TemporalAttention",
    "apply_lora",
    "freeze_except_lora",
    "gather_tokens",
    "grid_positions",
    "lora_state_dict",
    "merge_lora",
]
