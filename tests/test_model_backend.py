"""The backend of a model is chosen by ``fm_engine.use_backend``, not by a constructor argument.

A model (and a composite layer) is built without ``backend=``: every op inside it runs on the backend of the
enclosing ``use_backend`` block (``ops.trace`` shows which ran). Passing ``backend=`` to a model constructor or to
``create_model`` raises one clear error pointing at ``use_backend``; the ``fm_engine.nn`` modules that call an op
themselves keep their ``backend=`` argument, and it wins over the block.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch

import fm_engine
from fm_engine.models.mitub import AViT
from fm_engine.models.mitub import ViT as MiTUBViT
from fm_engine.models.mitub.layers import DecoderLayer
from fm_engine.models.moco.convstem import ConvStemViT, PostLNLayer
from fm_engine.models.raddiffusion.model import (
    CrossSelfDecoder,
    CrossSelfLayer,
    MAEDecoder,
    RadDiffusionClassifier,
    RadDiffusionDiffMAE,
    RadDiffusionEncoder,
    RadDiffusionMAE,
)
from fm_engine.models.registry import create_model
from fm_engine.models.stcnnt import STCNNTMRI
from fm_engine.models.stcnnt.classification import STCNNTClassifier
from fm_engine.models.vit import ViT, ViTBlock
from fm_engine.nn import Attention, EncoderLayer
from fm_engine.ops import _dispatch

TINY = dict(in_channels=1, dim=32, patch=4, depth=1, heads=2, kv_heads=1, head_dim=16, dropout=0.0, attn_dropout=0.0)


def _ops_of(model: torch.nn.Module, image: torch.Tensor, backend: str) -> set[tuple[str, str]]:
    with torch.no_grad(), fm_engine.use_backend(backend), _dispatch.trace() as calls:
        model(image, 1 / 255)
    return set(calls)


def test_model_ops_follow_the_enclosing_use_backend(device: torch.device) -> None:
    torch.manual_seed(0)
    model = MiTUBViT(**TINY).to(device).eval()  # type: ignore[arg-type]
    # no backend was stored anywhere inside the model: every op module defers to the context
    assert [m.backend for m in model.modules() if hasattr(m, "backend")] == [None] * 3
    image = (torch.rand(1, 1, 8, 8, device=device) * 255).to(torch.uint8)
    expected = {"patch_embed", "cross_attention", "relu2_mlp"}
    assert _ops_of(model, image, "reference") == {(op, "reference") for op in expected}
    assert _ops_of(model, image, "triton") == {(op, "triton") for op in expected}
    assert _ops_of(model, image, "reference") == {(op, "reference") for op in expected}  # the block ended


def test_single_module_backend_argument_wins_over_the_block(device: torch.device) -> None:
    attn = Attention(16, 2, head_dim=8, backend="reference").to(device)
    with torch.no_grad(), fm_engine.use_backend("triton"), _dispatch.trace() as calls:
        attn(torch.randn(1, 3, 16, device=device))
    assert calls == [("cross_attention", "reference")]


MODEL_CONSTRUCTORS: dict[str, Callable[..., Any]] = {
    "mitub.ViT": MiTUBViT,
    "mitub.AViT": AViT,
    "mitub.DecoderLayer": DecoderLayer,
    "nn.EncoderLayer": EncoderLayer,
    "vit.ViT": ViT,
    "vit.ViTBlock": ViTBlock,
    "moco.ConvStemViT": ConvStemViT,
    "moco.PostLNLayer": PostLNLayer,
    "raddiffusion.RadDiffusionEncoder": RadDiffusionEncoder,
    "raddiffusion.MAEDecoder": MAEDecoder,
    "raddiffusion.CrossSelfLayer": CrossSelfLayer,
    "raddiffusion.CrossSelfDecoder": CrossSelfDecoder,
    "raddiffusion.RadDiffusionMAE": RadDiffusionMAE,
    "raddiffusion.RadDiffusionDiffMAE": RadDiffusionDiffMAE,
    "raddiffusion.RadDiffusionClassifier": RadDiffusionClassifier,
    "stcnnt.STCNNTMRI": STCNNTMRI,
    "stcnnt.STCNNTClassifier": STCNNTClassifier,
}


@pytest.mark.parametrize("name", sorted(MODEL_CONSTRUCTORS))
def test_model_constructor_refuses_backend(name: str) -> None:
    with pytest.raises(TypeError, match=r"backend= is not an argument here.*with fm_engine\.use_backend\(name\):"):
        MODEL_CONSTRUCTORS[name](backend="reference")


def test_model_constructor_without_backend_still_builds() -> None:
    # the refusal wraps __init__ but keeps its signature and its own argument checks
    assert "backend" not in inspect.signature(MiTUBViT).parameters
    assert "depth" in inspect.signature(MiTUBViT).parameters
    with pytest.raises(ValueError, match="depth"):
        MiTUBViT(depth=-1)
    assert isinstance(RadDiffusionEncoder(image_size=32, patch=16, dim=32, depth=1, heads=2, mlp_dim=64), ViT)


@pytest.mark.parametrize("name", ["vit-cifar10", "stcnnt-mri-hrnet-production", "moco-vit-s16", "raddiffusion-xs-mae"])
def test_create_model_refuses_backend(name: str) -> None:
    with pytest.raises(TypeError, match=rf"create_model\('{name}'\): backend= .*use_backend"):
        create_model(name, backend="triton")
