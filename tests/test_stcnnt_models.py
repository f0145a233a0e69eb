"""ST-CNNT cells, blocks, backbones and task models: shapes at every level, input checks, variable
sizes, registry entries and a few optimisation steps (reference backend; parity is in test_stcnnt_parity.py)."""

from __future__ import annotations

import pytest
import torch

from fm_engine import create_model, use_backend
from fm_engine.models.registry import get_spec, list_models
from fm_engine.models.stcnnt import (
    PRODUCTION_CELL,
    STCNNTLLM,
    STCNNTMRI,
    CellConfig,
    MRILoss,
    STCNNTBlock,
    STCNNTCell,
    STCNNTClassifier,
    STCNNTHRNet,
    STCNNTUNet,
    level_windows,
    synthetic_mri_pair,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: one intra-op thread is several times faster than two on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = CellConfig(
    n_head=2, norm_mode="batch2d", mixer_kernel=3, mixer_padding=1, scale_ratio_in_mixer=1.0, dropout_p=0.0
)


@pytest.fixture(autouse=True)
def _reference_backend():
    # shape and behaviour tests run the eager reference ops (fast on CPU)
    with use_backend("reference"):
        yield


@pytest.mark.parametrize("att_mode", ["local", "global", "temporal", "vit"])
@pytest.mark.parametrize("cell_type,mixer_type,C_in", [("sequential", "conv", 3), ("parallel", "lin", 4)])
def test_cells(att_mode: str, cell_type: str, mixer_type: str, C_in: int) -> None:
    spec = level_windows(16, 16, (8, 8), (2, 2), 1)[0]
    cfg = TINY.replace(cell_type=cell_type, mixer_type=mixer_type)
    cell = STCNNTCell(C_in, 4, att_mode, True, spec, cfg)
    assert isinstance(cell.input_proj, torch.nn.Identity) == (C_in == 4)
    assert cell(torch.randn(2, 3, C_in, 16, 16)).shape == (2, 3, 4, 16, 16)
    no_mixer = STCNNTCell(C_in, 4, att_mode, False, spec, cfg)
    assert no_mixer.mixer is None and no_mixer(torch.randn(1, 2, C_in, 16, 16)).shape == (1, 2, 4, 16, 16)


def test_linear_mixer_keeps_the_residual() -> None:
    """The linear mixer's output is added to the cell's running value (the original dropped it; fixed)."""
    spec = level_windows(16, 16, (8, 8), (2, 2), 1)[0]
    cell = STCNNTCell(4, 4, "local", True, spec, TINY.replace(mixer_type="lin")).eval()
    x = torch.randn(1, 2, 4, 16, 16)
    y_attn = x + cell.attn(cell.n1(x))
    expected = y_attn + cell.mixer(cell.n2(y_attn))
    assert torch.allclose(cell(x), expected, atol=1e-6)
    # parallel: one norm shared by both branches
    pcell = STCNNTCell(4, 4, "local", True, spec, TINY.replace(cell_type="parallel")).eval()
    h = pcell.n1(x)
    assert torch.allclose(pcell(x), x + pcell.attn(h) + pcell.mixer(h), atol=1e-6)


def test_block_dense_connection() -> None:
    spec = level_windows(16, 16, (8, 8), (2, 2), 1)[0]
    block = STCNNTBlock("L0L1G0G1T1", 3, 4, spec, TINY).eval()
    assert [(c.att_mode, c.with_mixer, c.C_in) for c in block.cells] == [
        ("local", False, 3),
        ("local", True, 4),
        ("global", False, 4),
        ("global", True, 4),
        ("temporal", True, 4),
    ]
    x = torch.randn(1, 2, 3, 16, 16)
    outs = []
    for i, cell in enumerate(block.cells):
        outs.append(cell(x if i == 0 else sum(outs)))
    assert torch.allclose(block(x), outs[-1], atol=1e-6)
    plain = STCNNTBlock("L1G1", 3, 4, spec, TINY.replace(block_dense_connection=False)).eval()
    assert torch.allclose(plain(x), plain.cells[1](plain.cells[0](x)), atol=1e-6)


@pytest.mark.parametrize("T,norm_mode", [(1, "batch2d"), (3, "instance2d"), (3, "batch3d"), (2, "instance3d")])
def test_hrnet_levels_2d_2dt_3d(T: int, norm_mode: str) -> None:
    """2-D (T = 1), 2D+T and 3-D (T = slices, 3-D norms) inputs through a 2-level HR-Net."""
    C = 4
    net = STCNNTHRNet(2, C, 2, "T1L1G1", H=16, W=16, window=8, patch=2, cfg=TINY.replace(norm_mode=norm_mode))
    y, levels = net(torch.randn(2, T, 2, 16, 16))
    assert y.shape == (2, T, C * 3, 16, 16)
    assert [tuple(t.shape) for t in levels] == [(2, T, C << lev, 16 >> lev, 16 >> lev) for lev in range(2)]


@pytest.mark.parametrize("num_levels", [2, 4, 5])
def test_hrnet_every_level_count(num_levels: int) -> None:
    """2 to 5 levels build and run (5 levels crashed in the original; fixed)."""
    C, H = 2, 32
    net = STCNNTHRNet(1, C, num_levels, "T1L1", H=H, W=H, window=8, patch=2, cfg=TINY).eval()
    ins, outs = {}, {}

    def record(name: str):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            ins[name], outs[name] = inputs[0], output

        return hook

    for name, block in net.blocks.items():
        block.register_forward_hook(record(name))
    y, levels = net(torch.randn(1, 2, 1, H, H))
    assert y.shape == (1, 2, C * (2**num_levels - 1), H, H)
    assert [tuple(t.shape) for t in levels] == [(1, 2, C << lev, H >> lev, H >> lev) for lev in range(num_levels)]
    # stage wiring: B_{l,s} takes every earlier level-l output plus the previous stage's finer levels, downsampled
    for s in range(1, num_levels):
        for lev in range(s + 1):
            terms = [outs[f"B{lev}{j}"] for j in range(lev, s)]
            terms += [net.stage_down[f"s{s}_{k}_{lev}"](outs[f"B{k}{s - 1}"]) for k in range(lev) if k < s]
            assert torch.allclose(ins[f"B{lev}{s}"], sum(terms), atol=1e-5), (lev, s)
    with pytest.raises(ValueError, match=r"num_levels must be in 2\.\.5"):
        STCNNTHRNet(1, C, 6, "T1L1", H=H, W=H, cfg=TINY)


def test_unet_shapes_at_every_level() -> None:
    C = 4
    net = STCNNTUNet(3, C, 2, ["L1G1", "T1L1", "G1T1"], H=32, W=32, window=8, patch=2, cfg=TINY)
    seen = {}
    for name, mod in [
        *((f"enc{i}", m) for i, m in enumerate(net.enc)),
        ("bridge", net.bridge),
        *((f"dec{i}", m) for i, m in enumerate(net.dec)),
    ]:
        mod.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
    for T in (1, 3):
        y = net(torch.randn(2, T, 3, 32, 32))
        assert y.shape == (2, T, C, 32, 32)
        assert seen == {
            "enc0": (2, T, C, 32, 32),
            "enc1": (2, T, 2 * C, 16, 16),
            "bridge": (2, T, 2 * C, 8, 8),
            "dec1": (2, T, C, 16, 16),
            "dec0": (2, T, C, 32, 32),
        }
    gate_off = STCNNTUNet(3, C, 1, "L1", H=16, W=16, window=8, patch=2, cfg=TINY, use_attention_gate=False)
    assert gate_off(torch.randn(1, 1, 3, 16, 16)).shape == (1, 1, C, 16, 16)


def test_llm_dense_skips() -> None:
    C = 2
    net = STCNNTLLM(3, C, 5, "L1T1", H=16, W=16, window=8, patch=2, cfg=TINY)
    assert net.widths == [C, C, 2 * C, 4 * C, 8 * C]
    assert [b.C_in for b in net.stages] == [3, C, 2 * C, 4 * C, 8 * C]
    assert net(torch.randn(1, 2, 3, 16, 16)).shape == (1, 2, 8 * C, 16, 16)
    plain = STCNNTLLM(3, C, 3, "L1", H=16, W=16, window=8, patch=2, cfg=TINY, dense_skips=False)
    assert [b.C_in for b in plain.stages] == [3, C, C]
    assert plain(torch.randn(1, 1, 3, 16, 16)).shape == (1, 1, 2 * C, 16, 16)


def test_variable_frame_size() -> None:
    """Batch / instance norms take other frame sizes (local windows keep their size, global their count);
    the layer norm over [C, H, W] ties the model to its build size."""
    net = STCNNTHRNet(1, 4, 2, "T1L1G1", H=32, W=32, window=8, patch=2, cfg=TINY)
    y, _ = net(torch.randn(1, 2, 1, 64, 32))
    assert y.shape == (1, 2, 12, 64, 32)
    layer = STCNNTHRNet(1, 4, 2, "L1", H=32, W=32, window=8, patch=2, cfg=TINY.replace(norm_mode="layer"))
    assert layer(torch.randn(1, 2, 1, 32, 32))[0].shape == (1, 2, 12, 32, 32)
    with pytest.raises(ValueError, match=r"level 0 \(B00\): norm_mode 'layer' .* frames of 32x32, got 64x64"):
        layer(torch.randn(1, 2, 1, 64, 64))


def test_input_checks_name_level_and_sizes() -> None:
    net = STCNNTHRNet(1, 4, 2, "T1L1G1", H=32, W=32, window=8, patch=2, cfg=TINY)
    with pytest.raises(ValueError, match=r"\(rank 5\), got rank 4"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="C = 1 input channels at dim 2, got 2"):
        net(torch.randn(1, 1, 2, 32, 32))
    # 40 = 5 local windows of 8 at level 0, but level 1 has 20 px: not a multiple of its 8 px window
    with pytest.raises(ValueError, match=r"level 1 \(B1\d\): frame 20x20 .* local window 8x8"):
        net(torch.randn(1, 1, 1, 40, 40))
    with pytest.raises(
        ValueError, match=r"level 0 \(B00\): frame 36x36 .* global grid of 4x4 windows of whole 2x2 patches"
    ):
        net(torch.randn(1, 1, 1, 36, 36))
    with pytest.raises(ValueError, match="divisible by 2 to reach level 1"):
        net(torch.randn(1, 1, 1, 33, 32))
    # heads: C = 3 with 2x2 patches gives 12-value tokens, not divisible by 8 heads
    with pytest.raises(
        ValueError,
        match=r"level 0 \(B00\): local attention with C = 3, patch 2x2.* token size 12, not divisible by n_head = 8",
    ):
        STCNNTHRNet(1, 3, 2, "L1", H=32, W=32, window=8, patch=2, cfg=TINY.replace(n_head=8))
    with pytest.raises(ValueError, match="odd length"):
        STCNNTHRNet(1, 4, 2, "L1G", H=32, W=32, cfg=TINY)


def test_mri_model_and_registry() -> None:
    assert {"stcnnt-mri-hrnet-production", "stcnnt-hrnet-parser-default", "stcnnt-hrnet-classification"} <= set(
        list_models("stcnnt")
    )
    prod = create_model("stcnnt-mri-hrnet-production")
    assert isinstance(prod, STCNNTMRI)
    cfg = prod.backbone.cfg
    assert (cfg.cell_type, cfg.norm_mode, cfg.cosine_att, cfg.att_with_rel_pos_bias, cfg.n_head) == (
        "parallel",
        "batch2d",
        True,
        False,
        32,
    )
    assert [b.block_str for b in prod.backbone.out_blocks] == ["T1L1G1", "T1L1G1T1L1G1"]
    assert prod.post.C_in == 3 * 32 and prod.post.C_out == 2
    prod.backbone.check_size(32, 32)  # built for 64 px, it also takes the 32 px production inputs
    with pytest.raises(ValueError, match=r"level 0 \(B00\): frame 24x24 .* global grid of 8x8 windows"):
        prod.backbone.check_size(24, 24)
    # the benchmark hooks, on the production entry narrowed by overrides to run quickly
    spec = get_spec("stcnnt-mri-hrnet-production")
    narrow = create_model("stcnnt-mri-hrnet-production", C=4, cfg=PRODUCTION_CELL.replace(n_head=2))
    batch = spec.example(narrow, 1, "cpu", True)
    assert batch[0].shape == (1, 2, 3, 16, 16) and batch[1].shape == (1, 2, 2, 16, 16)
    loss = spec.loss(narrow, batch)
    loss.backward()
    assert torch.isfinite(loss) and narrow.pre.conv2d.weight.grad is not None
    pd = create_model("stcnnt-hrnet-parser-default")
    assert (pd.backbone.cfg.cell_type, pd.backbone.cfg.norm_mode, pd.backbone.specs[0].window) == (
        "sequential",
        "instance2d",
        (64, 64),
    )

    # the residual y[:, :, :C] += pre: with a zero backbone the output is post(cat(pre, 0))
    tiny = STCNNTMRI(C=4, num_levels=2, block_str="L1", H=16, W=16, window=8, patch=2, cfg=TINY)
    x, y = synthetic_mri_pair(2, 2, 16, 16)
    assert x.shape == (2, 2, 3, 16, 16) and y.shape == (2, 2, 2, 16, 16)
    assert tiny(x).shape == (2, 2, 2, 16, 16)
    with torch.no_grad():
        for m in tiny.backbone.out_blocks:
            for p in m.parameters():
                p.zero_()
        tiny.backbone.out_up.apply(lambda m: [p.data.zero_() for p in m.parameters(recurse=False)])
    with torch.no_grad():
        pre = tiny.pre(x)
        ys, _ = tiny.backbone(pre)
        manual = tiny.post(torch.cat((ys[:, :, :4] + pre, ys[:, :, 4:]), 2))
        assert torch.allclose(tiny(x), manual, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[real, imag, g-factor\]"):
        tiny(torch.randn(1, 1, 2, 16, 16))


def test_classifier() -> None:
    spec = get_spec("stcnnt-hrnet-classification")
    model = STCNNTClassifier(
        C_in=3, num_classes=5, C=4, num_levels=2, block_str="L1T1", H=32, W=32, cfg=TINY, feature_dim=16
    )
    assert model(torch.randn(2, 1, 3, 32, 32)).shape == (2, 5)
    x, labels = spec.example(model, 2, "cpu", True)
    loss = spec.loss(model, (x, labels))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


def test_optimisation_reduces_mri_loss() -> None:
    torch.manual_seed(0)
    model = STCNNTMRI(
        C=4,
        num_levels=2,
        block_str="T1L1",
        H=16,
        W=16,
        window=8,
        patch=2,
        cfg=PRODUCTION_CELL.replace(n_head=2, dropout_p=0.0),
    )
    loss_fn = MRILoss(losses=("mse", "l1", "ssim", "perpendicular"))
    gen = torch.Generator().manual_seed(1)
    x, y = synthetic_mri_pair(1, 2, 16, 16, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
