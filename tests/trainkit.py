"""What the training tests share: a tiny M-JEPA run on CPU (tests/test_train.py, test_train_runs.py,
test_data_prepared.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# a ViT small enough that a training step takes well under a second on a CPU
TINY = dict(dim=32, depth=1, heads=2, kv_heads=1, head_dim=16, patch=8)


def tiny_run(data: str | Path, out: str | Path, **kw: Any) -> dict[str, Any]:
    """TrainConfig fields of a 4-step run of the tiny ViT at 64x64 on CPU, fp32, the reference backend (the
    Triton interpreter, which the tests run under without a GPU, is far too slow here); ``kw`` overrides."""
    base: dict[str, Any] = dict(
        data=str(data),
        out=str(out),
        model="vit-i1-p16-d512",
        size="64x64",
        model_overrides=dict(TINY),
        predictor_depth=1,
        steps=4,
        batch_size=2,
        lr=1e-3,
        workers=0,
        device="cpu",
        amp="fp32",
        label_tag="ViewPosition",
        progress=False,
        seed=5,
        backend="reference",
    )
    base.update(kw)
    return base
