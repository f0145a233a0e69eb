"""FM-Imaging ST-CNNT models (docs/MODELS.md 2) on the [B, T, C, H, W] layout.

Cells and blocks of local / global / temporal / ViT attention (block strings such as "L1G1T1"), the
U-Net, HR-Net and "LLM" backbones, the MRI denoising and classification models, and the MRI losses.
Importing this package registers the configurations of docs/MODELS.md 2.10 (see ``configs.py``).
"""

from fm_engine.models.stcnnt import configs  # noqa: F401  (registers the models)
from fm_engine.models.stcnnt.backbones import (
    STCNNTLLM,
    AttentionGate,
    DownSample,
    STCNNTHRNet,
    STCNNTUNet,
    UpSample,
)
from fm_engine.models.stcnnt.blocks import STCNNTBlock
from fm_engine.models.stcnnt.cells import ConvMixer, LinearMixer, STCNNTCell
from fm_engine.models.stcnnt.classification import STCNNTClassifier
from fm_engine.models.stcnnt.config import CellConfig
from fm_engine.models.stcnnt.losses import MRILoss
from fm_engine.models.stcnnt.mri import PRODUCTION_CELL, STCNNTMRI, synthetic_mri_pair
from fm_engine.models.stcnnt.norms import STNorm, StochasticDepth
from fm_engine.models.stcnnt.windows import WindowSpec, level_windows, parse_block_string

__all__ = [
    "PRODUCTION_CELL",
    "STCNNTLLM",
    "STCNNTMRI",
    "AttentionGate",
    "CellConfig",
    "ConvMixer",
    "DownSample",
    "LinearMixer",
    "MRILoss",
    "STCNNTBlock",
    "STCNNTCell",
    "STCNNTClassifier",
    "STCNNTHRNet",
    "STCNNTUNet",
    "STNorm",
    "StochasticDepth",
    "UpSample",
    "WindowSpec",
    "level_windows",
    "parse_block_string",
    "synthetic_mri_pair",
]
