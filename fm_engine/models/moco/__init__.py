"""MoCo chest X-ray models: ResNet-50 / ViT-B/16 / ViT-S/16 / ConvStem ViT MoCo v2, patch-scoring heads
(registered in fm_engine.models.registry on import)."""

from fm_engine.models.moco.convstem import ConvStemViT
from fm_engine.models.moco.models import moco_convstem_vit, moco_resnet50, moco_vit, patchscore_vit_s16, topk_vit_s16
from fm_engine.models.moco.patch_scoring import PatchScorer, PatchScoringClassifier, TopKPatchContrastive, score_map

__all__ = [
    "ConvStemViT",
    "PatchScorer",
    "PatchScoringClassifier",
    "TopKPatchContrastive",
    "moco_convstem_vit",
    "moco_resnet50",
    "moco_vit",
    "patchscore_vit_s16",
    "score_map",
    "topk_vit_s16",
]
