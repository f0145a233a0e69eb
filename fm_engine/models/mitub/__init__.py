"""MiT-UB models (docs/MODELS.md 1): ViT, Adaptive ViT, heads, ViT -> AViT conversion.

Importing this package registers the configurations of docs/MODELS.md 1.1 (see ``configs.py``).
"""

from fm_engine.models.mitub import configs  # noqa: F401  (registers the models)
from fm_engine.models.mitub.avit import AViT, Conversion, convert_vit_to_avit
from fm_engine.models.mitub.heads import (
    BackboneWithHead,
    ClassificationHead,
    TriageHead,
    ViewHead,
    extract_features,
    fit_linear_probe,
)
from fm_engine.models.mitub.layers import DecoderLayer, EncoderLayer, LayerScale, PatchEmbed3d
from fm_engine.models.mitub.vit import ViT

__all__ = [
    "AViT",
    "BackboneWithHead",
    "ClassificationHead",
    "Conversion",
    "DecoderLayer",
    "EncoderLayer",
    "LayerScale",
    "PatchEmbed3d",
    "TriageHead",
    "ViT",
    "ViewHead",
    "convert_vit_to_avit",
    "extract_features",
    "fit_linear_probe",
]
