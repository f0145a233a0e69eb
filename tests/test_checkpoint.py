"""fm_engine.checkpoint: safetensors round trip, config metadata, missing / unexpected key reports."""

from __future__ import annotations

import pytest
import torch

import fm_engine
from fm_engine import use_backend
from fm_engine.checkpoint import load_checkpoint, read_metadata, save_checkpoint

TINY = dict(dim=64, depth=1, heads=2, kv_heads=1)


@pytest.fixture(autouse=True)
def _reference_ops():
    with use_backend("reference"):
        yield


def test_round_trip_rebuilds_the_registered_model(tmp_path):
    model = fm_engine.create_model(
        "vit-i1-p16-d512-a16_12", **TINY, kv_dim=32, high_res_depth=1, target_grid=(2, 3)
    ).eval()
    path = tmp_path / "avit.safetensors"
    save_checkpoint(path, model, name="vit-i1-p16-d512-a16_12", extra={"step": 7})
    meta = read_metadata(path)
    assert meta["name"] == "vit-i1-p16-d512-a16_12" and meta["extra"] == {"step": 7}
    assert meta["config"]["dim"] == 64 and meta["config"]["target_grid"] == [2, 3]
    res = load_checkpoint(path)
    assert res.missing == [] and res.unexpected == [] and res.mismatched == []
    loaded = res.model.eval()
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    img = torch.rand(1, 1, 64, 48)
    torch.testing.assert_close(loaded(img), model(img), rtol=0, atol=0)


def test_bf16_round_trip_into_given_model(tmp_path):
    model = fm_engine.create_model("vit-cifar10", **TINY).to(torch.bfloat16)
    path = tmp_path / "vit.safetensors"
    save_checkpoint(path, model)
    target = fm_engine.create_model("vit-cifar10", **TINY).to(torch.bfloat16)
    res = load_checkpoint(path, target, strict=True)
    assert res.model is target
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_missing_unexpected_and_mismatched_keys_are_reported(tmp_path):
    vit = fm_engine.create_model("vit-i1-p16-d512", **TINY)
    path = tmp_path / "vit.safetensors"
    save_checkpoint(path, vit, name="vit-i1-p16-d512")
    avit = fm_engine.create_model("vit-i1-p16-d512-a16_12", **TINY, kv_dim=32, high_res_depth=1, target_grid=(2, 3))
    with pytest.warns(UserWarning, match="missing keys"):
        res = load_checkpoint(path, avit)
    assert res.unexpected == []
    assert set(res.missing) == set(avit.state_dict()) - set(vit.state_dict())
    torch.testing.assert_close(avit.stem.proj.weight, vit.stem.proj.weight)

    deeper = fm_engine.create_model("vit-i1-p16-d512", **{**TINY, "depth": 2})
    save_checkpoint(path, deeper)
    with pytest.warns(UserWarning, match="unexpected keys"):
        res = load_checkpoint(path, vit)
    assert res.missing == [] and all(k.startswith("blocks.1.") for k in res.unexpected) and res.unexpected

    wider = fm_engine.create_model("vit-i1-p16-d512", **{**TINY, "dim": 32})
    save_checkpoint(path, wider)
    with pytest.warns(UserWarning, match="shape mismatches"):
        res = load_checkpoint(path, vit)
    assert res.mismatched and res.missing == []
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(path, vit, strict=True)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_checkpoint(tmp_path / "nope.safetensors")
    vit = fm_engine.create_model("vit-i1-p16-d512", **TINY)
    save_checkpoint(tmp_path / "x.safetensors", vit)
    with pytest.raises(ValueError, match="model"):
        load_checkpoint(tmp_path / "x.safetensors")  # no registry name stored
    with pytest.raises(ValueError, match="model"):
        save_checkpoint(tmp_path / "y.safetensors", object())
    with pytest.raises(ValueError, match="config"):
        save_checkpoint(tmp_path / "y.safetensors", vit, config={"f": object()})
