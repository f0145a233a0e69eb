"""LoRA (fm_engine.nn.lora) on MiT-UB backbones: wrapping, freezing, merging, the fused MLP op."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fm_engine
from fm_engine import use_backend
from fm_engine.nn.lora import LoRALinear, apply_lora, freeze_except_lora, lora_state_dict, merge_lora

TINY = dict(dim=64, depth=1, heads=2, kv_heads=1)


@pytest.fixture(autouse=True)
def _reference_ops():
    with use_backend("reference"):
        yield


def randomize_lora(model: nn.Module) -> None:
    # lora_B starts at zero; give it values so the adapters change the output
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0.0, 0.1)


def test_lora_linear_math_merge_unmerge():
    base = nn.Linear(8, 5)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(lora(x), base(x))  # B = 0: the adapter starts as a no-op
    lora.lora_B.data.normal_()
    want = x @ (base.weight + 2.0 * lora.lora_B @ lora.lora_A).T + base.bias
    torch.testing.assert_close(lora(x), want)
    torch.testing.assert_close(lora.weight, base.weight + 2.0 * lora.lora_B @ lora.lora_A)
    w0 = base.weight.detach().clone()
    lora.merge()
    lora.merge()  # idempotent
    torch.testing.assert_close(lora(x), want)
    lora.unmerge()
    torch.testing.assert_close(base.weight, w0)
    torch.testing.assert_close(lora(x), want)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), rank=0)
    with pytest.raises(ValueError, match="base"):
        LoRALinear(nn.Conv2d(2, 2, 1))


@pytest.mark.parametrize("name", ["vit-i1-p16-d512", "vit-i1-p16-d512-a16_12"])
def test_apply_freeze_train_merge(name):
    over = dict(TINY, kv_dim=32, high_res_depth=1, target_grid=(2, 3)) if "a16" in name else TINY
    model = fm_engine.create_model(name, **over).eval()
    img = torch.rand(2, 1, 64, 48)
    plain = model(img).detach()
    wrapped = apply_lora(model, rank=4, alpha=8.0)
    assert "blocks.0.attn.q_proj" in wrapped and "blocks.0.mlp.fc1" in wrapped and "stem.pos" in wrapped
    if "a16" in name:
        assert "stem.kv_pos" in wrapped and "high_res_blocks.0.cross_attn.k_proj" in wrapped
    torch.testing.assert_close(model(img), plain)  # fresh adapters change nothing

    trainable = freeze_except_lora(model)
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    randomize_lora(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(img)
    (out * torch.randn_like(out)).sum().backward()  # (mean of squares of a LayerNorm output is constant)
    # the fused MLP op reads fc.weight: LoRA gradients must still arrive there
    assert model.blocks[0].mlp.fc1.lora_A.grad.abs().sum() > 0
    assert model.blocks[0].mlp.fc2.lora_B.grad.abs().sum() > 0
    assert model.stem.pos.lora_B.grad.abs().sum() > 0
    opt.step()
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == n.endswith(("lora_A", "lora_B")), n

    unmerged = model(img).detach()
    assert not torch.allclose(unmerged, plain)
    merged = merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(merged(img), unmerged, rtol=1e-5, atol=1e-5)
    fresh = fm_engine.create_model(name, **over).eval()
    fresh.load_state_dict(merged.state_dict())  # merged model has the plain model's names
    torch.testing.assert_close(fresh(img), unmerged, rtol=1e-5, atol=1e-5)


def test_lora_mlp_gradient_matches_unfused():
    mlp = fm_engine.nn.ReLU2MLP(16, 64)
    apply_lora(mlp, targets=("mlp",), rank=2)
    randomize_lora(mlp)
    x = torch.randn(5, 16)
    mlp(x).sum().backward()
    got = mlp.fc1.lora_A.grad.clone()
    mlp.zero_grad()
    # the same MLP written with the LoRA layers called as modules
    (mlp.fc2(torch.relu(mlp.fc1(x)) ** 2)).sum().backward()
    torch.testing.assert_close(got, mlp.fc1.lora_A.grad)


def test_freeze_options_and_targets():
    model = fm_engine.create_model("vit-i1-p16-d512", **TINY)
    apply_lora(model, targets=("attn",), rank=2)
    assert isinstance(model.blocks[0].attn.v_proj, LoRALinear)
    assert not isinstance(model.blocks[0].mlp.fc1, LoRALinear)
    names = freeze_except_lora(model, unfreeze_norms=True, unfreeze_stem=True)
    assert "blocks.0.norm1.weight" in names and "norm.bias" in names
    assert "stem.proj.weight" in names and "stem.pos.weight" in names
    assert "blocks.0.attn.q_proj.base.weight" not in names
    sd = lora_state_dict(model)
    assert sd and all(k.endswith(("lora_A", "lora_B")) for k in sd)
    with pytest.raises(ValueError, match="targets"):
        apply_lora(model, targets=("conv",))
