"""ViT -> AViT checkpoint conversion (``fm-engine convert-avit``), the hinge of the two-stage recipe:
pre-train a ViT at 512x384, convert, continue the AViT at 3072x2304."""

from __future__ import annotations

import os
from typing import Any


def convert_checkpoint(
    checkpoint: str | os.PathLike[str],
    avit: str,
    out: str | os.PathLike[str],
    *,
    overrides: dict[str, Any] | None = None,
) -> Any:
    """Load the ViT encoder saved in ``checkpoint`` (a file written by :func:`fm_engine.checkpoint.save_checkpoint`,
    e.g. a training run's ``encoder.safetensors``), convert it with
    :func:`fm_engine.models.mitub.convert_vit_to_avit` into the registered AViT ``avit`` (+ ``overrides``) and
    save the AViT to ``out`` (written to a temporary name, then renamed). Returns the conversion record
    (``model``, ``copied``, ``new``)."""
    from fm_engine.checkpoint import load_checkpoint, save_checkpoint
    from fm_engine.models.mitub import ViT, convert_vit_to_avit
    from fm_engine.models.registry import get_spec

    get_spec(avit)  # KeyError listing the known models
    res = load_checkpoint(checkpoint, strict=True)
    vit = res.model
    if not isinstance(vit, ViT):
        raise ValueError(f"checkpoint: {checkpoint} holds a {type(vit).__name__}, expected a MiT-UB ViT")
    conv = convert_vit_to_avit(vit, avit, **(overrides or {}))
    out = os.fspath(out)
    tmp = f"{out}.tmp-{os.getpid()}"
    save_checkpoint(tmp, conv.model, name=avit, extra={"converted_from": os.fspath(checkpoint)})
    os.replace(tmp, out)
    return conv
