"""The generic layer pieces live in fm_engine.nn, the objectives import nothing from models, and the trainer
reads its FSDP / checkpointing units from the model.

* the names moved to fm_engine.nn are the same objects under their old import paths, with the same
  parameter names;
* fm_engine/ssl/*.py import nothing from fm_engine.models, fm_engine/data/*.py nothing from nn, ssl or
  models, and the MiT-UB layers no private ops module (read with ``ast``); importing fm_engine.ssl.mjepa in a
  fresh process loads no models module beyond the two that ``import fm_engine`` loads itself (the package
  __init__ imports models.registry for ``create_model``);
* the layers a training run shards with FSDP and recomputes under activation checkpointing are the ones the
  trainer picked by class before (encoder and decoder layers) for the registry's ViT and AViT.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import cast

import pytest
import torch

import fm_engine.models.mitub as mitub
import fm_engine.models.mitub.layers as mitub_layers
import fm_engine.models.mitub.vit as mitub_vit
import fm_engine.nn as fnn
import fm_engine.nn.tokens as nn_tokens
import fm_engine.nn.transformer as nn_transformer
from fm_engine import ops
from fm_engine.models.registry import create_model
from fm_engine.ssl.mjepa import MJEPA
from fm_engine.train.mjepa import declared_units, unit_modules

PKG = Path(fnn.__file__).resolve().parents[1]  # the fm_engine package folder


def test_moved_names_are_the_same_objects() -> None:
    assert mitub_layers.EncoderLayer is nn_transformer.EncoderLayer is fnn.EncoderLayer is mitub.EncoderLayer
    assert mitub_layers.LayerScale is nn_transformer.LayerScale is fnn.LayerScale is mitub.LayerScale
    assert mitub_layers.grid_positions is nn_tokens.grid_positions is fnn.grid_positions
    assert mitub_vit.gather_tokens is nn_tokens.gather_tokens is fnn.gather_tokens
    from fm_engine.ops._exact import conv_ieee
    from fm_engine.ops.patch_embed import grid_coords

    assert ops.conv_ieee is conv_ieee and ops.grid_coords is grid_coords


# parameter names of the encoder layer as the models have always saved them
_KEYS = [
    "norm1.weight",
    "norm1.bias",
    "attn.q_proj.weight",
    "attn.k_proj.weight",
    "attn.v_proj.weight",
    "attn.out_proj.weight",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc2.weight",
]


@pytest.mark.parametrize("layer_scale", [None, 1e-5])
def test_encoder_layer_state_dict_is_unchanged(layer_scale: float | None) -> None:
    keys = _KEYS + (["ls1.gamma", "ls2.gamma"] if layer_scale is not None else [])
    old = mitub_layers.EncoderLayer(32, 4, 2, 8, layer_scale=layer_scale)
    new = fnn.EncoderLayer(32, 4, 2, 8, layer_scale=layer_scale)
    assert list(old.state_dict()) == list(new.state_dict()) == keys
    new.load_state_dict(old.state_dict(), strict=True)
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(new.eval()(x), old.eval()(x), rtol=0, atol=0)


def _imports(path: Path) -> set[str]:
    """Absolute module names ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), anywhere in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against the file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _offending(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in sorted((PKG / folder).glob("*.py")):
        hits = sorted(n for n in _imports(path) if any(n == f or n.startswith(f + ".") for f in forbidden))
        if hits:
            bad[path.name] = hits
    return bad


def test_ssl_imports_nothing_from_models() -> None:
    assert _offending("ssl", ("fm_engine.models",)) == {}


def test_data_imports_no_nn_ssl_or_models() -> None:
    assert _offending("data", ("fm_engine.nn", "fm_engine.ssl", "fm_engine.models")) == {}


def test_mitub_layers_import_no_private_ops_module() -> None:
    private = sorted(n for n in _imports(PKG / "models" / "mitub" / "layers.py") if n.startswith("fm_engine.ops._"))
    assert private == []


def test_importing_mjepa_loads_no_models_module() -> None:
    code = (
        "import sys\n"
        "import fm_engine\n"
        "before = set(sys.modules)\n"
        "import fm_engine.ssl.mjepa\n"
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('fm_engine.models')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


TINY = dict(dim=32, depth=2, heads=2, kv_heads=1, head_dim=16, patch=8)
MODELS = {"vit-i1-p16-d512": {}, "vit-i1-p16-d512-a16_12": dict(kv_dim=16, high_res_depth=2)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_training_units_are_the_layers_picked_before(name: str) -> None:
    objective = MJEPA(create_model(name, **TINY, **MODELS[name]), predictor_depth=2)
    enc = objective.encoder
    # FSDP: every encoder / decoder layer of the objective (online, EMA, predictor)
    before = [m for m in objective.modules() if isinstance(m, mitub_layers.EncoderLayer | mitub_layers.DecoderLayer)]
    fsdp = unit_modules([objective], declared_units(objective, "fsdp_units"))
    assert len(fsdp) == len(before) and all(a is b for a, b in zip(fsdp, before, strict=True))
    # activation checkpointing: the online encoder's layers and the predictor's
    before = [*cast(torch.nn.ModuleList, enc.blocks), *getattr(enc, "high_res_blocks", []), *objective.predictor]
    ckpt = unit_modules([enc, objective.predictor], declared_units(objective, "checkpoint_units"))
    assert len(ckpt) == len(before) and all(a is b for a, b in zip(ckpt, before, strict=True))
    classes = {mitub_layers.EncoderLayer} | ({mitub_layers.DecoderLayer} if hasattr(enc, "high_res_blocks") else set())
    assert {type(m) for m in fsdp} == {type(m) for m in ckpt} == classes
    assert set(declared_units(enc, "fsdp_units")) == set(declared_units(enc, "checkpoint_units")) == classes
    assert set(objective.fsdp_units) == set(objective.checkpoint_units) == classes


def test_undeclared_units_name_the_attribute() -> None:
    with pytest.raises(ValueError, match="fsdp_units: Linear declares no tuple of module classes"):
        declared_units(torch.nn.Linear(2, 2), "fsdp_units")
