"""M-JEPA (docs/MODELS.md 1.5): masks, EMA, predictor input, losses, padding invariance, training steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fm_engine
from fm_engine import use_backend
from fm_engine.ssl.mjepa import MJEPA, adamw_param_groups, coarse_mask, contrastive_loss, mask_to_index

TINY = dict(dim=64, depth=1, heads=2, kv_heads=1)


@pytest.fixture(autouse=True)
def _reference_ops():
    # objective logic only; kernel parity of the backbone is tests/test_mitub_parity.py
    with use_backend("reference"):
        yield


def tiny_vit(**kw):
    return fm_engine.create_model("vit-i1-p16-d512", **{**TINY, **kw})


def images(b=4, h=128, w=64):
    return torch.randint(0, 4096, (b, 1, h, w), dtype=torch.int32).to(torch.uint16)


def test_coarse_masks_have_exact_counts_and_blocks():
    grid = (8, 12)
    ctx = coarse_mask(5, grid, 4, 0.5, name="context_coarsen")
    tgt = coarse_mask(5, grid, 2, 0.25, name="target_coarsen")
    # context: round(0.5 * 2*3 cells) = 3 cells of 4x4 tokens; target: round(0.25 * 4*6) = 6 cells of 2x2
    assert ctx.sum(1).tolist() == [48] * 5
    assert tgt.sum(1).tolist() == [24] * 5
    for m, c in ((ctx, 4), (tgt, 2)):
        blocks = m.view(5, 8 // c, c, 12 // c, c)
        assert (blocks == blocks[:, :, :1, :, :1]).all()  # every coarse cell is all kept or all dropped
    idx = mask_to_index(ctx)
    assert idx.shape == (5, 48) and (idx.diff(dim=1) > 0).all()
    assert torch.gather(ctx, 1, idx).all()
    with pytest.raises(ValueError, match="context_coarsen"):
        coarse_mask(2, (6, 8), 4, 0.5, name="context_coarsen")
    with pytest.raises(ValueError, match="mask"):
        mask_to_index(torch.tensor([[True, False], [True, True]]))


def test_masks_live_on_the_pooled_grid_for_avit():
    avit = fm_engine.create_model("vit-i1-p16-d512-a16_12", **TINY, kv_dim=32, high_res_depth=1, target_grid=(4, 8))
    obj = MJEPA(avit, predictor_depth=1)
    ctx, tgt = obj.masks(images(2, 128, 256))  # 8x16 patches pooled to 4x8
    assert ctx.shape == tgt.shape == (2, 32)
    assert ctx.sum(1).tolist() == [16, 16]  # 2 cells of 4x4 tokens
    assert tgt.sum(1).tolist() == [8, 8]  # round(0.25 * 8) = 2 cells of 2x2 tokens
    out = obj(images(2, 128, 256), intensity_scale=1 / 4095)
    assert torch.isfinite(out["loss"])


def test_volumes_use_3d_masks_and_positions():
    from fm_engine.models.mitub import ViT

    vit3d = ViT(in_channels=1, dim=32, patch=4, depth=1, heads=1, kv_heads=1, head_dim=32, spatial_dims=3)
    obj = MJEPA(vit3d, predictor_depth=1)
    assert obj.predictor_pos.in_features == 3
    out = obj(torch.rand(2, 1, 32, 16, 16))  # token grid (8, 4, 4): 2 context cells, 16 target cells
    assert out["context_mask"].sum(1).tolist() == [64, 64]  # round(0.5 * 2) = 1 cell of 4x4x4 tokens
    assert out["target_mask"].sum(1).tolist() == [32, 32]  # round(0.25 * 16) = 4 cells of 2x2x2 tokens
    out["loss"].backward()
    assert obj.encoder.stem.proj.weight.grad is not None


def test_ema_update_is_exact_and_target_stays_eval():
    obj = MJEPA(tiny_vit(), predictor_depth=1)
    assert all(not p.requires_grad for p in obj.ema_encoder.parameters())
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in obj.ema_encoder.parameters()]
    online = [p.clone() for p in obj.encoder.parameters()]
    obj.update_ema()
    for e, e0, o in zip(obj.ema_encoder.parameters(), before, online, strict=True):
        assert torch.equal(e, 0.95 * e0 + 0.05 * o)
        assert not torch.equal(e, e0)
    obj.train()
    assert obj.encoder.training and not obj.ema_encoder.training


def test_predictor_input_fixed_swap_and_padding():
    obj = MJEPA(tiny_vit(), predictor_depth=1)
    b, grid, d = 3, (4, 4), 64
    ctx_mask = coarse_mask(b, grid, 2, 0.5)
    tgt_mask = coarse_mask(b, grid, 1, 0.25)
    ctx_idx = mask_to_index(ctx_mask)
    context = torch.randn(b, ctx_idx.shape[1], d)
    x, pad, pos = obj.predictor_inputs(context, ctx_idx, tgt_mask, grid, extra_padding=2)
    union = ctx_mask | tgt_mask
    # padded to the largest union any draw can have (static: Kc + Kt, at most N), plus the extra slots
    assert x.shape[1] == min(16, ctx_idx.shape[1] + int(tgt_mask[0].sum())) + 2
    assert x.shape[1] >= int(union.sum(1).max()) + 2
    assert pad.sum(1).tolist() == (x.shape[1] - union.sum(1)).tolist()
    ppos = obj.predictor_pos(
        torch.stack(torch.meshgrid(torch.linspace(-1, 1, 4), torch.linspace(-1, 1, 4), indexing="ij"), -1).reshape(
            -1, 2
        )
    )
    for i in range(b):
        real = pos[i][~pad[i]]
        assert sorted(real.tolist()) == union[i].nonzero().flatten().tolist()
        assert (x[i][pad[i]] == 0).all()
        for slot, p in enumerate(real.tolist()):
            if tgt_mask[i, p]:  # target positions: query token + the predictor's position (fixed)
                torch.testing.assert_close(x[i, slot], obj.query_token[0, 0] + ppos[p])
            else:  # context-only positions: their context embedding
                k = (ctx_idx[i] == p).nonzero().item()
                torch.testing.assert_close(x[i, slot], context[i, k])
        # the two kinds of slots partition the union: targets and context-only positions are disjoint
        kinds_t = {p for p in real.tolist() if tgt_mask[i, p]}
        kinds_c = {p for p in real.tolist() if not tgt_mask[i, p]}
        assert not kinds_t & kinds_c and kinds_t | kinds_c == set(union[i].nonzero().flatten().tolist())


def test_loss_is_invariant_to_padding_amount():
    obj = MJEPA(tiny_vit(), predictor_depth=2).eval()
    img = images(3)
    masks = obj.masks(img)
    a = obj(img, intensity_scale=1 / 4095, masks=masks)
    b = obj(img, intensity_scale=1 / 4095, masks=masks, extra_padding=7)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    # the key-padding mask is what makes this hold: attending to the padding changes the result
    x, pad, _ = obj.predictor_inputs(
        obj.encoder(img, 1 / 4095, token_index=mask_to_index(masks[0])), mask_to_index(masks[0]), masks[1], (8, 4), 7
    )
    with_mask = obj.predictor[0](x, key_padding_mask=pad)
    without = obj.predictor[0](x)
    assert not torch.allclose(with_mask[~pad], without[~pad])


def test_losses_follow_the_formulas():
    obj = MJEPA(tiny_vit(), predictor_depth=1).eval()
    img = images(3)
    masks = obj.masks(img)
    out = obj(img, intensity_scale=1 / 4095, masks=masks)
    ctx_idx, tgt_idx = mask_to_index(masks[0]), mask_to_index(masks[1])
    with torch.no_grad():
        full = obj.ema_encoder(img, 1 / 4095)
        target = torch.stack([full[i, tgt_idx[i]] for i in range(3)])
        pred = obj.predict(obj.encoder(img, 1 / 4095, token_index=ctx_idx), ctx_idx, masks[1], (8, 4))
    jepa = sum(1 - F.cosine_similarity(pred[i].flatten(), target[i].flatten(), dim=0) for i in range(3)) / 3
    p = pred.mean(1)
    pairs = [F.relu(F.cosine_similarity(p[i], p[j], dim=0) - 0.5) for i in range(3) for j in range(3) if i != j]
    contrastive = sum(pairs) / len(pairs)
    torch.testing.assert_close(out["jepa_loss"], jepa, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["contrastive_loss"], contrastive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"].detach(), jepa + contrastive, rtol=1e-5, atol=1e-6)
    assert contrastive_loss(torch.randn(1, 8)).item() == 0.0
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # cos: pairs (0,1) and (1,0) are 1 -> relu(0.5); the other four are 0 -> relu(-0.5) = 0
    torch.testing.assert_close(contrastive_loss(v), torch.tensor(1.0 / 6.0))


def test_probe_is_stop_grad_on_ema_features():
    obj = MJEPA(tiny_vit(), predictor_depth=1, probe_classes=3)
    img = images(4)
    out = obj(img, torch.tensor([0, 1, 2, 1]), intensity_scale=1 / 4095)
    assert out["probe_logits"].shape == (4, 3) and out["probe_loss"] > 0
    out["loss"].backward()
    assert obj.probe[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in obj.ema_encoder.parameters())
    assert "probe_loss" not in obj(img, intensity_scale=1 / 4095)


def test_param_groups():
    obj = MJEPA(tiny_vit(), predictor_depth=1)
    decay, no_decay = obj.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = {id(p) for p in decay["params"]}
    named = dict(obj.named_parameters())
    for n in (
        "encoder.stem.pos.weight",
        "encoder.stem.pos.bias",
        "encoder.stem.proj.bias",
        "query_token",
        "encoder.norm.weight",
        "predictor_pos.weight",
        "encoder.blocks.0.norm1.weight",
    ):
        assert id(named[n]) not in ids, n
    for n in ("encoder.stem.proj.weight", "encoder.blocks.0.attn.q_proj.weight", "predictor.0.mlp.fc1.weight"):
        assert id(named[n]) in ids, n
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == sum(1 for p in obj.parameters() if p.requires_grad)
    assert adamw_param_groups(obj)[0]["params"] == decay["params"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_ratio"):
        MJEPA(tiny_vit(), context_ratio=0.0)
    with pytest.raises(ValueError, match="target_coarsen"):
        MJEPA(tiny_vit(), target_coarsen=0)
    with pytest.raises(ValueError, match="encoder"):
        MJEPA(torch.nn.Linear(2, 2))
    obj = MJEPA(tiny_vit(), predictor_depth=1)
    with pytest.raises(ValueError, match="context_coarsen"):
        obj(images(2, 96, 64))  # 6x4 token grid: 6 is not divisible by 4


def test_training_steps_reduce_the_loss():
    obj = MJEPA(tiny_vit(), predictor_depth=1)
    img = images(4, 64, 64)
    eval_masks = obj.masks(img, generator=torch.Generator().manual_seed(1))

    def eval_loss() -> float:
        obj.eval()
        with torch.no_grad():
            v = obj(img, intensity_scale=1 / 4095, masks=eval_masks)["loss"].item()
        obj.train()
        return v

    start = eval_loss()
    opt = torch.optim.AdamW(obj.param_groups(0.05), lr=2e-3)
    for _ in range(8):
        obj.update_ema()
        opt.zero_grad()
        obj(img, intensity_scale=1 / 4095)["loss"].backward()
        opt.step()
    end = eval_loss()
    assert end < 0.8 * start, (start, end)


def _gathered_contrastive_worker(rank: int, world: int, port: int, pooled: torch.Tensor, result) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = pooled.shape[0] // world
        local = pooled[rank * b : (rank + 1) * b].clone().requires_grad_(True)
        loss = contrastive_loss(local, 0.1)
        loss.backward()
        result[rank] = (loss.item(), local.grad.clone())
    finally:
        dist.destroy_process_group()


def test_contrastive_loss_gathers_across_ranks():
    import socket

    import torch.multiprocessing as mp

    world, b = 2, 3
    pooled = torch.randn(world * b, 8)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = mp.get_context("spawn").Manager().dict()
    mp.spawn(_gathered_contrastive_worker, args=(world, port, pooled, result), nprocs=world, join=True)
    p = F.normalize(pooled, dim=-1)
    for r in range(world):
        local = pooled[r * b : (r + 1) * b].clone().requires_grad_(True)
        pl = F.normalize(local, dim=-1)
        # rows: this rank's examples; columns: every rank's examples (others without gradient)
        others = torch.cat([p[: r * b], pl, p[(r + 1) * b :]])
        sim = pl @ others.T
        keep = torch.ones_like(sim, dtype=torch.bool)
        keep[torch.arange(b), torch.arange(b) + r * b] = False
        want = torch.relu(sim - 0.1)[keep].mean()
        want.backward()
        got_loss, got_grad = result[r]
        assert abs(got_loss - want.item()) < 1e-6
        torch.testing.assert_close(got_grad, local.grad)


# --- the context pass sees nothing outside the context cells (docs/MODELS.md 1.5 step 4) -----------------------


def _leak_objective(kind: str) -> MJEPA:
    """A tiny encoder whose every layer matters: LayerScale 1 (1e-5 would hide the decoder layers), no dropout."""
    if kind == "vit":
        enc = fm_engine.create_model("vit-i1-p16-d512", **TINY, patch=8, dropout=0.0, attn_dropout=0.0)
    else:
        enc = fm_engine.create_model(
            "vit-i1-p16-d512-a16_12", **TINY, patch=8, kv_dim=32, high_res_depth=2, target_grid=(4, 4),
            dropout=0.0, attn_dropout=0.0,
        )  # fmt: skip
        with torch.no_grad():
            for blk in enc.high_res_blocks:
                for ls in (blk.ls1, blk.ls2, blk.ls3):
                    ls.gamma.fill_(1.0)
    return MJEPA(enc, predictor_depth=1, context_coarsen=2, target_coarsen=1).eval()


def _axis_owner(g: int, n: int) -> tuple[list[range], list[range]]:
    """For each of ``g`` cells over ``n`` tokens on one axis: its adaptive-pool bin and its nearest-resize cell."""
    bins = [range(i * n // g, -(-(i + 1) * n // g)) for i in range(g)]
    owner = [r * g // n for r in range(n)]
    cells = [range(owner.index(i), len(owner) - owner[::-1].index(i)) for i in range(g)]
    return bins, cells


def _protected_pixels(context_mask: torch.Tensor, grid, token_grid, patch: int) -> torch.Tensor:
    """[B, 1, H, W] bool: pixels inside a kept cell's pooling bin or its key/value cell (written out per cell)."""
    (gh, gw), (th, tw) = grid, token_grid
    hb, hc = _axis_owner(gh, th)
    wb, wc = _axis_owner(gw, tw)
    out = torch.zeros(context_mask.shape[0], 1, th * patch, tw * patch, dtype=torch.bool)
    for b, row in enumerate(context_mask.view(-1, gh, gw)):
        for i, j in row.nonzero().tolist():
            for rows, cols in ((hb[i], wb[j]), (hc[i], wc[j])):
                out[b, 0, rows.start * patch : rows.stop * patch, cols.start * patch : cols.stop * patch] = True
    return out


def _context_outputs(obj: MJEPA, img: torch.Tensor, masks) -> torch.Tensor:
    """The online encoder's output in M-JEPA's context pass (captured with a hook on the encoder)."""
    seen: list[torch.Tensor] = []
    hook = obj.encoder.register_forward_hook(lambda _m, _a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            obj(img, intensity_scale=1 / 65535, masks=masks)
    finally:
        hook.remove()
    assert len(seen) == 1  # the EMA encoder is a separate module: only the context pass runs this one
    return seen[0]


@pytest.mark.parametrize(
    "kind, size",
    [("vit", (64, 48)), ("avit", (64, 64)), ("avit", (72, 88))],
    ids=["vit", "avit-multiple", "avit-padded"],
)
def test_context_pass_does_not_see_outside_the_context_cells(kind, size):
    """Pixels outside the kept context cells change a lot; the context encoder's output stays bit-for-bit.

    ``avit-multiple``: 8x8 key/value tokens over a 4x4 target grid (exact counts); ``avit-padded``: 9x11 over
    4x4, where examples keep different numbers of key/value tokens (padding + key-padding mask) and the
    adaptive-pool bins of neighbouring cells overlap, so the pixels of the kept cells' bins stay too."""
    torch.manual_seed(0)
    obj = _leak_objective(kind)
    enc = obj.encoder
    img = torch.randint(0, 65536, (3, 1, *size), dtype=torch.int32)
    masks = obj.masks(img, generator=torch.Generator().manual_seed(0))
    grid = enc.mask_grid(size)
    token_grid = (size[0] // 8, size[1] // 8)
    keep = _protected_pixels(masks[0], grid, token_grid, 8)
    assert 0 < keep.float().mean() < 0.75
    other = torch.where(keep, img, (img + 30000) % 65536)  # every pixel outside changes by a large amount
    ctx_index = mask_to_index(masks[0])
    if kind == "avit" and size == (72, 88):  # the padding path is what this case is about
        from fm_engine.models.mitub.avit import context_kv_index, kv_cells

        index, padding = context_kv_index(ctx_index, grid, token_grid)
        assert padding is not None and len(set((~padding).sum(1).tolist())) > 1
        # some padding slot points at a key/value token outside its example's context: only the padding
        # (zero-filled and masked) keeps it out
        outside = ~torch.gather(masks[0], 1, kv_cells(grid, token_grid)[index])
        assert (outside & padding).any()

    a = _context_outputs(obj, img.to(torch.uint16), masks)
    b = _context_outputs(obj, other.to(torch.uint16), masks)
    assert torch.equal(a, b)
    with torch.no_grad():  # the perturbation is visible to an encoder that looks at the whole image
        full_a = enc(img.to(torch.uint16), 1 / 65535)
        full_b = enc(other.to(torch.uint16), 1 / 65535)
        assert (full_a - full_b).norm() > 0.05 * full_a.norm()
        if kind == "avit":  # and to the context queries through complete keys/values (the original leak)
            q, kv = enc.embed(other.to(torch.uint16), 1 / 65535)
            leaky = enc.encode(q, kv, ctx_index)
            assert (leaky - b).norm() > 0.01 * b.norm()
