"""MiT-UB ViT / AViT: registry, shapes and gradients, raw-integer inputs, 3-D stem, conversion, heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fm_engine
from fm_engine import use_backend
from fm_engine.models.mitub import (
    AViT,
    BackboneWithHead,
    ClassificationHead,
    TriageHead,
    ViewHead,
    ViT,
    convert_vit_to_avit,
    extract_features,
    fit_linear_probe,
)
from fm_engine.models.registry import get_spec

# the table of docs/MODELS.md 1.1: name -> (in_ch, dim, patch, depth, heads, kv_heads, head_dim, AViT part, input size)
TABLE = {
    "vit-i1-p16-d512": (1, 512, 16, 12, 8, 4, 64, None, (512, 384)),
    "vit-i1-p16-d512-a16_12": (1, 512, 16, 12, 8, 4, 64, (256, (16, 12), 4), (3072, 2304)),
    "vit-i1-p16-d512-a32_24": (1, 512, 16, 12, 8, 4, 64, (256, (32, 24), 4), (3072, 2304)),
    "vit-i1-p16-d768": (1, 768, 16, 24, 12, 6, 64, None, (512, 384)),
    "vit-i1-p16-d768-a16_12": (1, 768, 16, 24, 12, 6, 64, (256, (16, 12), 6), (3072, 2304)),
    "vit-i1-p16-d768-a32_24": (1, 768, 16, 24, 12, 6, 64, (256, (32, 24), 6), (3072, 2304)),
    "vit-cifar10": (3, 384, 4, 12, 12, 12, 32, None, (32, 32)),
    "vit-cifar10-adaptive": (3, 384, 4, 12, 12, 12, 32, (64, (4, 4), 4), (32, 32)),
}

TINY = dict(dim=64, depth=1, heads=2, kv_heads=1)
TINY_AVIT = dict(TINY, kv_dim=32, high_res_depth=1)


@pytest.fixture(autouse=True)
def _reference_ops():
    # these tests check model structure; backend parity is tests/test_mitub_parity.py
    with use_backend("reference"):
        yield


def expected_params(in_ch, dim, patch, depth, heads, kv_heads, head_dim, avit) -> int:
    """Parameter count written out from docs/MODELS.md 1.1-1.4."""
    stem = dim * in_ch * patch * patch + dim + 2 * dim + 3 * dim  # conv (+bias), LayerNorm, Linear(2, dim)
    attn = dim * heads * head_dim * 2 + 2 * dim * kv_heads * head_dim  # q, out; k, v
    mlp = 2 * dim * 4 * dim
    enc = 4 * dim + attn + mlp
    total = stem + depth * enc + 2 * dim
    if avit is not None:
        kv_dim, _, hr_depth = avit
        kv_stem = kv_dim * in_ch * patch * patch + kv_dim + 2 * kv_dim + 3 * kv_dim
        cross = dim * heads * head_dim * 2 + 2 * kv_dim * kv_heads * head_dim
        dec = 6 * dim + attn + cross + mlp + 3 * dim  # three norms, three LayerScales
        total += kv_stem + hr_depth * dec
    return total


def test_registry_names_and_specs():
    assert set(fm_engine.list_models("mitub")) == set(TABLE)
    for name, (in_ch, dim, patch, depth, heads, kv_heads, head_dim, avit, size) in TABLE.items():
        spec = get_spec(name)
        assert spec.family == "mitub"
        assert spec.input_size == size and spec.in_channels == in_ch and spec.patch == patch
        with torch.device("meta"):
            model = fm_engine.create_model(name)
        assert isinstance(model, AViT if avit else ViT)
        assert model.dim == dim  # the d768 AViTs are built at 768 (fixed)
        n = sum(p.numel() for p in model.parameters())
        assert n == expected_params(in_ch, dim, patch, depth, heads, kv_heads, head_dim, avit), name
        if avit:
            assert model.target_grid == avit[1]


def test_unknown_name_lists_known():
    with pytest.raises(KeyError, match="vit-i1-p16-d512"):
        fm_engine.create_model("vit-nope")


@pytest.mark.parametrize("name", sorted(TABLE))
def test_every_entry_small_forward_backward(name):
    avit = TABLE[name][7] is not None
    over = dict(TINY_AVIT) if avit else dict(TINY)
    if avit:
        over["target_grid"] = (4, 4)
    model = fm_engine.create_model(name, **over)
    spec = get_spec(name)
    # a reduced input that keeps the entry's channels and patch: a 4x4 token grid (AViT: 8x8 -> 4x4)
    side = spec.patch * (8 if avit else 4)
    img = torch.rand(2, spec.in_channels, side, side)
    out = model(img)
    assert out.shape == (2, 16, 64)
    (out * torch.randn_like(out)).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    # the registry hooks build a batch and a scalar M-JEPA loss (tiny width, small example size)
    batch = spec.example(model, 1, "cpu", True)
    if avit:
        model = fm_engine.create_model(name, **{**over, "target_grid": TABLE[name][7][1]})
    loss = spec.loss(model, spec.example(model, 1, "cpu", True))
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert batch[0].dtype in (torch.uint8, torch.uint16)


def test_vit_512x384_forward_reduced_depth():
    model = fm_engine.create_model("vit-i1-p16-d512", depth=1).eval()
    img = torch.randint(0, 4096, (1, 1, 512, 384), dtype=torch.int32).to(torch.uint16)
    with torch.no_grad():
        out = model(img, 1 / 4095)
    assert out.shape == (1, 32 * 24, 512) and torch.isfinite(out).all()


def test_avit_512x384_forward_reduced():
    model = fm_engine.create_model(
        "vit-i1-p16-d512-a16_12", depth=1, high_res_depth=1, dim=128, heads=2, kv_heads=1, kv_dim=64
    ).eval()
    img = torch.randint(0, 4096, (1, 1, 512, 384), dtype=torch.int32).to(torch.uint16)
    with torch.no_grad():
        out = model(img, 1 / 4095)
    assert out.shape == (1, 16 * 12, 128) and torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["vit", "avit"])
def test_raw_uint16_with_intensity_affine_equals_float(kind):
    if kind == "vit":
        model = fm_engine.create_model("vit-i1-p16-d512", **TINY).eval()
    else:
        model = fm_engine.create_model("vit-i1-p16-d512-a16_12", **TINY_AVIT, target_grid=(2, 3)).eval()
    raw = torch.randint(0, 65535, (2, 1, 64, 48), dtype=torch.int32)
    scale, offset = 1 / 65535, -0.5
    with torch.no_grad():
        a = model(raw.to(torch.uint16), scale, offset)
        b = model(raw.double().mul(scale).add(offset).float())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_variable_input_sizes_share_weights():
    model = fm_engine.create_model("vit-i1-p16-d512", **TINY).eval()
    for h, w in ((64, 48), (32, 96), (16, 16)):
        assert model(torch.rand(1, 1, h, w)).shape == (1, (h // 16) * (w // 16), 64)
    avit = fm_engine.create_model("vit-i1-p16-d512-a16_12", **TINY_AVIT, target_grid=(2, 2)).eval()
    for h, w in ((32, 32), (64, 48)):
        assert avit(torch.rand(1, 1, h, w)).shape == (1, 4, 64)
    with pytest.raises(ValueError, match="target_grid"):
        avit(torch.rand(1, 1, 16, 48))


def test_token_index_runs_encoder_on_a_subset():
    model = fm_engine.create_model("vit-i1-p16-d512", **TINY).eval()
    img = torch.rand(2, 1, 64, 48)
    idx = torch.tensor([[0, 3, 5], [1, 2, 11]])
    sub = model(img, token_index=idx)
    tokens = model.embed(img)
    direct = model.norm(model.blocks[0](torch.stack([tokens[0, idx[0]], tokens[1, idx[1]]])))
    torch.testing.assert_close(sub, direct)
    with pytest.raises(ValueError, match="token_index"):
        model(img, token_index=torch.tensor([[0, 12]]).expand(2, -1).contiguous())
    with pytest.raises(ValueError, match="token_index"):
        model(img, token_index=idx.int())


def test_bad_inputs_name_the_argument():
    model = fm_engine.create_model("vit-i1-p16-d512", **TINY)
    with pytest.raises(ValueError, match="image"):
        model(torch.rand(1, 64, 48))
    with pytest.raises(ValueError, match="image"):
        model(torch.rand(1, 1, 60, 48))
    with pytest.raises(ValueError, match="spatial_dims"):
        ViT(spatial_dims=4)
    with pytest.raises(ValueError, match="target_grid"):
        AViT(target_grid=(4,))


def test_attention_dropout_only_in_training():
    model = fm_engine.create_model("vit-i1-p16-d512", **TINY, attn_dropout=0.5, dropout=0.5)
    img = torch.rand(1, 1, 64, 48)
    model.eval()
    torch.testing.assert_close(model(img), model(img), rtol=0, atol=0)
    model.train()
    assert not torch.equal(model(img), model(img))


def test_vit3d_token_order_and_positions():
    model = ViT(in_channels=1, dim=8, patch=2, depth=0, heads=1, kv_heads=1, spatial_dims=3)
    vol = torch.rand(1, 1, 4, 6, 2)  # token grid (2, 3, 1): the w axis of length 1 sits at 0
    out = model.embed(vol)
    stem = model.stem
    assert stem.proj.bias is None and tuple(stem.pos.weight.shape) == (8, 3)
    grid = (2, 3, 1)
    n = 0
    for d in range(grid[0]):
        for h in range(grid[1]):
            for w in range(grid[2]):
                patch = vol[0, 0, 2 * d : 2 * d + 2, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2]
                feat = (stem.proj.weight[:, 0] * patch).sum(dim=(1, 2, 3))
                feat = F.layer_norm(feat, (8,), stem.norm.weight, stem.norm.bias)
                coord = torch.tensor([[-1.0, 1.0][d], [-1.0, 0.0, 1.0][h], 0.0])
                torch.testing.assert_close(out[0, n], feat + stem.pos(coord), rtol=1e-5, atol=1e-5)
                n += 1
    full = model(vol)
    assert full.shape == (1, 6, 8)


def test_convert_vit_to_avit_copies_everything_and_starts_close():
    vit = fm_engine.create_model("vit-i1-p16-d512", **{**TINY, "depth": 2}).eval()
    conv = convert_vit_to_avit(vit, "vit-i1-p16-d512-a16_12", kv_dim=32, high_res_depth=2, target_grid=(2, 3))
    avit = conv.model.eval()
    vit_sd, avit_sd = vit.state_dict(), avit.state_dict()
    assert sorted(conv.copied) == sorted(vit_sd)
    for k, v in vit_sd.items():
        assert torch.equal(avit_sd[k], v), k
    assert set(conv.new) == set(avit_sd) - set(vit_sd)
    assert all(k.startswith(("stem.kv_", "high_res_blocks.")) for k in conv.new)

    img = torch.rand(2, 1, 128, 96)  # 8x6 patches, max-pooled to 2x3
    with torch.no_grad():
        got = avit(img)
        # the ViT run on max-pooled patch features, computed explicitly
        s = vit.stem
        feat = F.adaptive_max_pool2d(F.conv2d(img, s.proj.weight, s.proj.bias, stride=16), (2, 3))
        tokens = F.layer_norm(feat.flatten(2).transpose(1, 2), (64,), s.norm.weight, s.norm.bias)
        u, v = torch.linspace(-1, 1, 2), torch.linspace(-1, 1, 3)
        coords = torch.stack(torch.meshgrid(u, v, indexing="ij"), -1).reshape(-1, 2)
        want = vit.encode(tokens + s.pos(coords))
        diff = (got - want).abs().max().item()
        # with LayerScale 1 instead of 1e-5 the decoder layers change the output by O(1)
        for blk in avit.high_res_blocks:
            for ls in (blk.ls1, blk.ls2, blk.ls3):
                ls.gamma.fill_(1.0)
        far = (avit(img) - want).abs().max().item()
    assert diff < 1e-3, diff
    assert far > 100 * diff


def test_convert_rejects_mismatched_width():
    vit = fm_engine.create_model("vit-i1-p16-d512", **TINY)
    other = fm_engine.create_model("vit-i1-p16-d512-a16_12", **{**TINY_AVIT, "dim": 32})
    with pytest.raises(ValueError, match="avit"):
        convert_vit_to_avit(vit, other)
    with pytest.raises(ValueError, match="vit"):
        convert_vit_to_avit(other, other)


def test_heads_shapes_and_losses():
    backbone = fm_engine.create_model("vit-i1-p16-d512", **TINY)
    img = torch.rand(3, 1, 64, 48)
    cls = BackboneWithHead(backbone, ClassificationHead(64, 5))
    logits = cls(img)
    assert logits.shape == (3, 5)
    loss = cls.loss(logits, torch.tensor([0, 4, 2]))
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 4, 2])))
    loss.backward()
    assert backbone.stem.proj.weight.grad is not None

    tokens = torch.randn(3, 7, 64)
    tri = TriageHead(64).eval()
    t = tri(tokens)
    assert t.shape == (3,)
    torch.testing.assert_close(t, tri.fc(tokens.mean(1)).squeeze(-1))
    y = torch.tensor([0.0, 1.0, 1.0])
    torch.testing.assert_close(tri.loss(t, y), F.binary_cross_entropy_with_logits(t, y))
    view = ViewHead(64)
    assert view(tokens).shape == (3, 2) and view.views == ("CC", "MLO")
    with pytest.raises(ValueError, match="num_classes"):
        ClassificationHead(64, 0)


def test_linear_probe_fits_frozen_features():
    backbone = fm_engine.create_model("vit-i1-p16-d512", **TINY)
    g = torch.Generator().manual_seed(0)
    # two classes of images that differ in brightness: separable by the frozen features
    imgs = torch.rand(16, 1, 32, 32, generator=g)
    labels = torch.arange(16) % 2
    imgs = imgs + labels[:, None, None, None] * 2.0
    feats = extract_features(backbone, imgs, batch_size=8)
    assert feats.shape == (16, 64) and backbone.training
    probe = fit_linear_probe(feats, labels, steps=60)
    acc = (probe(feats).argmax(1) == labels).float().mean().item()
    assert acc == 1.0
    with pytest.raises(ValueError, match="labels"):
        fit_linear_probe(feats, labels[:3])


def test_reduced_sizes_keep_grids_divisible():
    # the registry's small example sizes must give grids M-JEPA can mask (divisible by 4 and 2)
    for name in TABLE:
        spec = get_spec(name)
        with torch.device("meta"):
            model = fm_engine.create_model(name)
        for small in (True, False):
            img, _ = spec.example(model, 1, "meta", small)
            grid = model.mask_grid(img.shape[2:])
            assert all(g % 4 == 0 for g in grid), (name, grid)
            assert math.prod(grid) > 0


# --- the AViT's context keys/values (docs/MODELS.md 1.5 step 4) ------------------------------------------------


def _kv_inside_cells(token_index, grid, kv_grid) -> list[list[int]]:
    """Per example, the key/value positions whose nearest-resized cell is kept, written out token by token."""
    (gh, gw), (hk, wk) = grid, kv_grid
    out = []
    for row in token_index.tolist():
        cells = set(row)
        out.append([r * wk + c for r in range(hk) for c in range(wk) if (r * gh // hk) * gw + c * gw // wk in cells])
    return out


@pytest.mark.parametrize(
    "grid, kv_grid", [((4, 4), (8, 8)), ((4, 3), (12, 6)), ((4, 4), (9, 11)), ((3, 5), (7, 13)), ((2, 2), (2, 2))]
)
def test_context_kv_index_is_a_nearest_resize_of_the_cells(grid, kv_grid):
    from fm_engine.models.mitub.avit import context_kv_index, max_context_kv

    g = torch.Generator().manual_seed(sum(kv_grid))
    n, k = grid[0] * grid[1], max(grid[0] * grid[1] // 3, 1)
    idx = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(4)])
    index, padding = context_kv_index(idx, grid, kv_grid)
    want = _kv_inside_cells(idx, grid, kv_grid)
    multiple = kv_grid[0] % grid[0] == 0 and kv_grid[1] % grid[1] == 0
    if multiple:  # exact counts: no padding, the same K * sh * sw tokens in every example
        assert padding is None
        assert index.shape == (4, k * (kv_grid[0] // grid[0]) * (kv_grid[1] // grid[1]))
        for b in range(4):
            assert sorted(index[b].tolist()) == want[b]
    else:  # ragged counts: padded to the static bound, padding at the end
        assert padding is not None and index.shape == padding.shape == (4, max_context_kv(grid, kv_grid, k))
        assert len({len(w) for w in want}) > 1, "the draw should give ragged counts"
        for b in range(4):
            assert index[b][~padding[b]].tolist() == want[b]  # increasing order
            assert padding[b].tolist() == [False] * len(want[b]) + [True] * (index.shape[1] - len(want[b]))
        # the static bound: the tokens of the k largest cells
        sizes = sorted((len(_kv_inside_cells(torch.tensor([[c]]), grid, kv_grid)[0]) for c in range(n)), reverse=True)
        assert max_context_kv(grid, kv_grid, k) == sum(sizes[:k])


def _avit_ls1(target_grid=(4, 4)):
    model = fm_engine.create_model(
        "vit-i1-p16-d512-a16_12", **TINY_AVIT, patch=8, target_grid=target_grid, dropout=0.0, attn_dropout=0.0
    ).eval()
    with torch.no_grad():  # LayerScale 1: the decoder layers change the output by O(1)
        for blk in model.high_res_blocks:
            for ls in (blk.ls1, blk.ls2, blk.ls3):
                ls.gamma.fill_(1.0)
    return model


def test_avit_context_padding_is_never_attended():
    """9x11 key/value tokens over a 4x4 grid: each example of the padded batch equals that example run alone on
    exactly its own keys/values; attending to the (zero) padding would change it."""
    from fm_engine.models.mitub.avit import context_kv_index

    model = _avit_ls1()
    img = torch.rand(3, 1, 72, 88)
    idx = torch.tensor([[0, 1, 4, 5], [10, 11, 14, 15], [0, 5, 10, 15]])
    with torch.no_grad():
        out = model(img, token_index=idx)
        q, kv = model.embed(img)
        sub, padding = model.context_kv(kv, idx, (9, 11))
        assert padding is not None and padding.any() and len(set(padding.sum(1).tolist())) > 1
        assert torch.equal(out, model.encode(q, sub, idx, padding))  # encode attends exactly to what it is given
        index, _ = context_kv_index(idx, (4, 4), (9, 11))
        for b in range(3):
            own = index[b][~padding[b]]
            alone = model.encode(q[b : b + 1], kv[b : b + 1, own], idx[b : b + 1])
            torch.testing.assert_close(out[b : b + 1], alone, rtol=1e-5, atol=1e-5)
        attended = model.encode(q, sub, idx)  # the original: zero padding attended to
        assert not torch.allclose(attended, out, rtol=1e-3, atol=1e-3)


def test_avit_context_keys_values_on_a_multiple_grid():
    """8x8 key/value tokens over 4x4 cells: every example attends to 4 tokens per kept cell, no padding."""
    model = _avit_ls1()
    img = torch.rand(2, 1, 64, 64)
    idx = torch.tensor([[0, 6, 9], [3, 4, 15]])
    with torch.no_grad():
        q, kv = model.embed(img)
        sub, padding = model.context_kv(kv, idx, (8, 8))
        assert padding is None and sub.shape == (2, 12, 32)
        for b in range(2):
            want = _kv_inside_cells(idx[b : b + 1], (4, 4), (8, 8))[0]
            assert sorted(sub[b].tolist()) == sorted(kv[b, want].tolist())
        out = model(img, token_index=idx)
        assert torch.equal(out, model.encode(q, sub, idx))
        # every key/value a caller passes is attended to: the complete grid gives another result
        assert not torch.allclose(model.encode(q, kv, idx), out, rtol=1e-3, atol=1e-3)
    assert model(img).shape == (2, 16, 64)  # without token_index: every query, every key/value


def test_avit_context_bad_arguments():
    model = _avit_ls1()
    img = torch.rand(2, 1, 64, 64)
    q, kv = model.embed(img)
    with pytest.raises(ValueError, match="token_index: the cells of one example must be distinct"):
        model(img, token_index=torch.tensor([[0, 0, 1], [2, 3, 4]]))
    with pytest.raises(ValueError, match="kv_padding_mask"):
        model.encode(q, kv, None, torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="kv_padding_mask"):
        model.encode(q, kv, None, torch.zeros(2, 64))
    with pytest.raises(ValueError, match="kv: expected"):
        model.encode(q, kv[:1])
    with pytest.raises(ValueError, match="kv: expected"):
        model.context_kv(kv, torch.tensor([[0], [1]]), (8, 7))
    with pytest.raises(ValueError, match="token_index"):
        model.context_kv(kv, torch.tensor([[0], [16]]), (8, 8))
