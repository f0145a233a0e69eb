"""The embedded demo job (``fm-engine train --demo``): the two-stage MiT-UB recipe in miniature on CPU.

1. write synthetic mammograms (MONOCHROME1, 12-bit, CC / MLO views) to ``folder/data``, and half as many
   more to ``folder/probe``, held out of training: the linear probe (view position from the EMA encoder's
   pooled tokens) is scored on them at every checkpoint (``probe_acc_heldout``; ``probe_acc`` is its
   accuracy on the training batch it has just been trained on);
2. stage 1: a tiny ViT (dim 64, depth 2, patch 8) pre-trained with M-JEPA at 128x96, with the view
   position as linear-probe label;
3. ``convert-avit``: its encoder becomes a tiny AViT (target grid 8x6 = the ViT's token grid at 128x96);
4. stage 2: the AViT continues at 256x192 (32x24 high-resolution tokens pooled to 8x6).

The full-size recipe is the same with ``vit-i1-p16-d512`` at 512x384 and ``vit-i1-p16-d512-a32_24`` at
3072x2304.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fm_engine.train.config import TrainConfig

TINY = dict(dim=64, depth=2, heads=2, kv_heads=1, head_dim=32, patch=8)


def demo_configs(
    folder: str | os.PathLike[str],
    *,
    count: int = 16,
    steps: int = 20,
    size: tuple[int, int] = (128, 96),
    **flags: Any,
) -> tuple[TrainConfig, TrainConfig, Path]:
    """(stage-1 config, stage-2 config, converted AViT path); ``flags`` override both stages' fields."""
    folder = Path(folder)
    base: dict[str, Any] = dict(
        data=str(folder / "data"),
        predictor_depth=1,
        steps=steps,
        batch_size=4,
        lr=1e-3,
        workers=0,
        device="cpu",
        amp="fp32",
        checkpoint_every=max(steps // 2, 1),
        label_tag="ViewPosition",
        probe_data=str(folder / "probe"),
        modalities=["MG"],
    )
    h, w = size
    vit = {
        **base,
        "out": str(folder / "stage1_vit"),
        "model": "vit-i1-p16-d512",
        "size": f"{h}x{w}",
        "model_overrides": dict(TINY),
    }
    avit_path = folder / "avit_init.safetensors"
    grid = [h // TINY["patch"], w // TINY["patch"]]
    avit = {
        **base,
        "out": str(folder / "stage2_avit"),
        "model": "vit-i1-p16-d512-a32_24",
        "size": f"{2 * h}x{2 * w}",
        "model_overrides": dict(TINY, kv_dim=32, target_grid=grid, high_res_depth=1),
        "init": str(avit_path),
    }
    vit.update(flags)
    avit.update({k: v for k, v in flags.items() if k not in ("out", "model", "size", "init")})
    return TrainConfig(**vit).validate(), TrainConfig(**avit).validate(), avit_path


def run_demo(
    folder: str | os.PathLike[str], *, count: int = 16, steps: int = 12, size: tuple[int, int] = (128, 96), **flags: Any
) -> dict[str, Any]:
    """Run the demo in ``folder``; returns a summary (losses, probe accuracy, checkpoints)."""
    from fm_engine.data.synthetic import write_demo_dataset
    from fm_engine.train.convert import convert_checkpoint
    from fm_engine.train.mjepa import check_run_folder, check_size, train_mjepa

    stage1, stage2, avit_path = demo_configs(folder, count=count, steps=steps, size=size, **flags)
    assert stage1.data is not None and stage1.probe_data is not None, "demo_configs always sets them"
    for cfg in (stage1, stage2):  # every option problem before a file is written
        check_size(cfg)
        check_run_folder(cfg)
    big = (4 * size[0], 4 * size[1])
    write_demo_dataset(stage1.data, count=count, size=big, seed=stage1.seed, progress=stage1.progress)
    write_demo_dataset(
        stage1.probe_data, count=max(count // 2, 2), size=big, seed=stage1.seed + 7919, progress=stage1.progress
    )
    r1 = train_mjepa(stage1)
    r1.pop("trainer")
    conv = convert_checkpoint(
        Path(r1["checkpoint"]) / "encoder.safetensors",
        stage2.model,
        avit_path,
        overrides={k: v for k, v in stage2.model_overrides.items() if k not in TINY},
    )
    r2 = train_mjepa(stage2)
    r2.pop("trainer")
    return {
        "data": stage1.data,
        "stage1 (ViT) loss": round(r1["loss"], 4),
        "stage1 probe accuracy, training batch": r1.get("probe_acc"),
        "stage1 probe accuracy, held-out images": r1.get("probe_acc_heldout"),
        "stage1 checkpoint": r1["checkpoint"],
        "converted AViT": f"{avit_path} ({len(conv.copied)} tensors copied, {len(conv.new)} new)",
        "stage2 (AViT) loss": round(r2["loss"], 4),
        "stage2 probe accuracy, training batch": r2.get("probe_acc"),
        "stage2 probe accuracy, held-out images": r2.get("probe_acc_heldout"),
        "stage2 checkpoint": r2["checkpoint"],
        "metrics": f"{stage1.out}/metrics.csv, {stage2.out}/metrics.csv",
        "curves": f"{stage1.out}/curves.png, {stage2.out}/curves.png",
    }
