"""ST-CNNT building parts: norms, stochastic depth, block strings, window sizing."""

from __future__ import annotations

import pytest
import torch

from fm_engine.models.stcnnt.norms import NORM_MODES, STNorm, StochasticDepth
from fm_engine.models.stcnnt.windows import keep_num_window, keep_window_size, level_windows, parse_block_string


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: one intra-op thread is several times faster than two on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("mode", NORM_MODES)
def test_norm_statistics(mode: str) -> None:
    B, T, C, H, W = 2, 3, 4, 6, 5
    x = torch.randn(B, T, C, H, W, dtype=torch.float64) * 3 + 1
    norm = STNorm(mode, C, H, W).double().train()
    y = norm(x)
    assert y.shape == x.shape
    # the axes each mode normalises over have zero mean and unit (biased) variance at init
    if mode == "layer":
        z = y.reshape(B, T, -1)
    elif mode == "batch2d":
        z = y.transpose(0, 2).reshape(C, -1)
    elif mode == "instance2d":
        z = y.reshape(B, T, C, -1)
    elif mode == "batch3d":
        z = y.transpose(0, 2).reshape(C, -1)
    else:
        z = y.transpose(1, 2).reshape(B, C, -1)
    assert torch.allclose(z.mean(-1), torch.zeros((), dtype=torch.float64), atol=1e-10)
    assert torch.allclose(z.var(-1, unbiased=False), torch.ones((), dtype=torch.float64), atol=1e-3)
    if mode != "layer":  # every other mode takes any H, W
        assert norm(torch.randn(B, T, C, 8, 4, dtype=torch.float64)).shape == (B, T, C, 8, 4)


def test_layer_norm_ties_the_size() -> None:
    norm = STNorm("layer", 4, 8, 8)
    with pytest.raises(ValueError, match=r"\[C, H, W\] = \[4, 8, 8\].*\[4, 16, 8\]"):
        norm(torch.randn(1, 2, 4, 16, 8))
    with pytest.raises(ValueError, match="norm_mode must be one of"):
        STNorm("group", 4)
    with pytest.raises(ValueError, match="needs H and W"):
        STNorm("layer", 4)
    with pytest.raises(ValueError, match=r"\[B, T, C, H, W\]"):
        STNorm("batch2d", 4)(torch.randn(2, 4, 8, 8))


def test_stochastic_depth_rows() -> None:
    sd = StochasticDepth(0.5).train()
    x = torch.ones(4000, 2, 3)
    y = sd(x)
    rows = y.reshape(4000, -1)
    # each sample is either dropped whole or kept whole and scaled by 1/(1-p)
    assert bool(((rows == 0).all(1) | (rows == 2).all(1)).all())
    assert 0.4 < float((rows[:, 0] == 0).double().mean()) < 0.6
    sd.eval()
    assert torch.equal(sd(x), x)
    assert StochasticDepth().p == 0.1
    with pytest.raises(ValueError, match="p must be in"):
        StochasticDepth(1.0)


def test_block_strings() -> None:
    assert parse_block_string("L1G1T1") == [("local", True), ("global", True), ("temporal", True)]
    assert parse_block_string("T1L1G1T1L1G1")[3:] == [("temporal", True), ("local", True), ("global", True)]
    assert parse_block_string("L0L1G0G1T1") == [
        ("local", False),
        ("local", True),
        ("global", False),
        ("global", True),
        ("temporal", True),
    ]
    assert parse_block_string("V1") == [("vit", True)]
    with pytest.raises(ValueError, match="odd length 5"):
        parse_block_string("L1G1T")
    with pytest.raises(ValueError, match="position 2 is 'X'"):
        parse_block_string("L1X1")
    with pytest.raises(ValueError, match="position 3 is '2'"):
        parse_block_string("L1G2")
    with pytest.raises(ValueError, match="non-empty"):
        parse_block_string("")


def test_window_sizing_methods() -> None:
    s = keep_num_window((32, 32), (4, 4), (4, 4))
    assert (s.window, s.patch, s.num_wind) == ((8, 8), (2, 2), (4, 4))
    s = keep_num_window((16, 16), (1, 4), (1, 2))  # counts below 2 become 2
    assert (s.window, s.patch) == ((8, 4), (4, 2))
    s = keep_window_size((16, 16), (8, 8), (2, 2))
    assert (s.window, s.patch) == ((8, 8), (2, 2))
    s = keep_window_size((8, 16), (8, 8), (8, 2))  # 1 window fits along H: halve it; then 1 patch: halve it
    assert (s.window, s.patch) == ((4, 8), (2, 2))

    # production MRI: 64 px, window 8, patch 2, 2 levels (4 for the sweep)
    mixed = level_windows(64, 64, (8, 8), (2, 2), 4, "mixed")
    assert [x.window for x in mixed] == [(8, 8), (8, 8), (4, 4), (4, 4)]
    assert [x.patch for x in mixed] == [(2, 2), (2, 2), (1, 1), (1, 1)]
    knw = level_windows(64, 64, (8, 8), (2, 2), 3, "keep_num_window")
    assert [x.window for x in knw] == [(8, 8), (4, 4), (2, 2)]
    assert all(x.num_wind == (8, 8) for x in knw)
    kws = level_windows(64, 64, (16, 16), (4, 4), 3, "keep_window_size")
    assert [x.window for x in kws] == [(16, 16), (16, 16), (8, 8)]
    assert [x.patch for x in kws] == [(4, 4), (4, 4), (4, 4)]
    with pytest.raises(ValueError, match="window_sizing_method must be one of"):
        level_windows(64, 64, (8, 8), (2, 2), 2, "keep_all")
