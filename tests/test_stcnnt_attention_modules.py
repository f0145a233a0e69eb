"""ST-CNNT attention modules and the Conv2DExt / Conv3DExt helpers: shapes, sizing rules, parameters,
input checks and backend selection. Shape tests pin ``backend="reference"`` (the Triton interpreter would
take minutes at these sizes); the op tests cover the kernels, and test_modules_reach_the_triton_kernels
shows a module reaching them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fm_engine import use_backend
from fm_engine.nn.conv import Conv2DExt, Conv3DExt
from fm_engine.nn.stcnnt_attention import (
    SpatialGlobalAttention,
    SpatialLocalAttention,
    SpatialViTAttention,
    TemporalAttention,
    relative_position_index,
)
from fm_engine.ops import _dispatch
from fm_engine.ops.temporal_attention import temporal_attention
from fm_engine.ops.window_attention import window_attention

# --- convs -----------------------------------------------------------------------------------------


def test_conv2dext_is_a_per_frame_conv_with_bias():
    m = Conv2DExt(3, 5, 3, 1, 1)
    with torch.no_grad():
        m.conv2d.bias.fill_(0.7)
    x = torch.randn(2, 4, 3, 6, 7)
    y = m(x)
    assert y.shape == (2, 4, 5, 6, 7)
    for t in range(4):
        torch.testing.assert_close(y[:, t], F.conv2d(x[:, t], m.conv2d.weight, m.conv2d.bias, 1, 1))
    assert bool((m.conv2d.bias == 0.7).all())


def test_conv2dext_stride_and_separable():
    x = torch.randn(1, 2, 4, 8, 8)
    assert Conv2DExt(4, 6, 3, 2, 1)(x).shape == (1, 2, 6, 4, 4)
    m = Conv2DExt(4, 6, 3, 1, 1, separable=True)
    assert m.depthwise.groups == 4 and m.depthwise.weight.shape == (4, 1, 3, 3)
    assert m.pointwise.weight.shape == (6, 4, 1, 1)
    y = m(x)
    want = F.conv2d(
        F.conv2d(x[:, 1], m.depthwise.weight, m.depthwise.bias, 1, 1, groups=4), m.pointwise.weight, m.pointwise.bias
    )
    torch.testing.assert_close(y[:, 1], want)
    assert Conv2DExt(4, 6, 1, 1, 0, bias=False).conv2d.bias is None


def test_conv3dext_convolves_over_time():
    m = Conv3DExt(2, 3)
    x = torch.randn(2, 5, 2, 6, 6)
    y = m(x)
    assert y.shape == (2, 5, 3, 6, 6)
    torch.testing.assert_close(y, F.conv3d(x.transpose(1, 2), m.conv3d.weight, m.conv3d.bias, 1, 1).transpose(1, 2))


def test_conv_bad_input():
    with pytest.raises(ValueError, match="x: expected a 5-D tensor"):
        Conv2DExt(3, 3)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="expected C = 3 channels"):
        Conv3DExt(3, 3)(torch.randn(1, 2, 4, 8, 8))


# --- attention modules -------------------------------------------------------------------------------


def test_relative_position_index_is_swin_style():
    idx = relative_position_index((2, 3))
    assert idx.shape == (6, 6)
    assert int(idx.max()) == (2 * 2 - 1) * (2 * 3 - 1) - 1 and int(idx.min()) == 0
    # the same offset always maps to the same entry; the diagonal is the zero offset (the centre)
    assert bool((idx.diagonal() == (2 - 1) * 5 + (3 - 1)).all())
    assert idx[0, 4] == idx[1, 5]  # offset (-1, -1) both times


@pytest.mark.parametrize("cls", [SpatialLocalAttention, SpatialGlobalAttention, SpatialViTAttention])
@pytest.mark.parametrize("a_type", ["conv", "lin"])
def test_spatial_modules_shapes_and_parameters(cls, a_type):
    s = 2 if (a_type == "conv" and cls is not SpatialViTAttention) else 1
    m = cls(3, 8, 16, 16, window_size=8, patch_size=2, n_head=4, a_type=a_type, stride_qk=s, backend="reference")
    x = torch.randn(2, 3, 3, 16, 16)
    y = m(x)
    assert y.shape == (2, 3, 8, 16, 16)
    grid = {"SpatialLocalAttention": (4, 4), "SpatialGlobalAttention": (2, 2), "SpatialViTAttention": (2, 2)}
    g = grid[cls.__name__]
    assert m.relative_position_bias_table.shape == ((2 * g[0] - 1) * (2 * g[1] - 1), 4)
    assert 0 < float(m.relative_position_bias_table.detach().std()) < 0.05
    y.sum().backward()
    assert m.relative_position_bias_table.grad is not None
    assert "relative_position_index" not in m.state_dict()


def test_local_keeps_patches_per_window_and_global_keeps_window_count():
    x = torch.randn(1, 2, 2, 32, 16)
    loc = SpatialLocalAttention(2, 4, 16, 16, window_size=8, patch_size=2, n_head=2, backend="reference")
    glo = SpatialGlobalAttention(2, 4, 16, 16, window_size=8, patch_size=2, n_head=2, backend="reference")
    assert loc.num_patch == (4, 4) and glo.num_wind == (2, 2)
    # run at a larger frame than built for: the module output equals the op with the kept sizes
    for m, kw in ((loc, {"mode": "local", "num_patches": (4, 4)}), (glo, {"mode": "global", "num_windows": (2, 2)})):
        q, k, v = m.query(x), m.key(x), m.value(x)
        want = m.output_proj(
            window_attention(
                q, k, v, patch_size=2, n_head=2, backend="reference", rel_pos_bias=m.relative_position_bias(), **kw
            )
        )
        torch.testing.assert_close(m(x), want)


def test_sizes_from_counts():
    m = SpatialLocalAttention(2, 4, 32, 16, num_wind=(4, 2), num_patch=(2, 4), n_head=2, backend="reference")
    assert m.window == (8, 8) and m.patch == (4, 2) and m.num_patch == (2, 4)
    assert m.relative_position_bias_table.shape == (3 * 7, 2)


def test_temporal_module_matches_op_and_causal():
    m = TemporalAttention(3, 4, n_head=2, is_causal=True, backend="reference")
    x = torch.randn(2, 5, 3, 8, 8)
    q, k, v = m.query(x), m.key(x), m.value(x)
    assert q.shape == (2, 5, 4, 4, 4) and v.shape == (2, 5, 4, 8, 8)
    want = m.output_proj(temporal_attention(q, k, v, n_head=2, causal=True, backend="reference"))
    torch.testing.assert_close(m(x), want)
    assert TemporalAttention(3, 4, n_head=2, a_type="lin", att_with_output_proj=False, backend="reference")(
        x
    ).shape == (2, 5, 4, 8, 8)


def test_no_bias_no_output_projection():
    m = SpatialLocalAttention(
        2,
        4,
        8,
        8,
        window_size=4,
        patch_size=2,
        n_head=2,
        att_with_relative_position_bias=False,
        att_with_output_proj=False,
        backend="reference",
    )
    assert m.relative_position_bias_table is None and m.output_proj is None
    assert m(torch.randn(1, 1, 2, 8, 8)).shape == (1, 1, 4, 8, 8)


def test_module_input_checks():
    m = SpatialLocalAttention(2, 4, 16, 16, window_size=8, patch_size=2, n_head=2, backend="reference")
    with pytest.raises(ValueError, match="x: expected a 5-D tensor"):
        m(torch.randn(2, 2, 16, 16))
    with pytest.raises(ValueError, match="expected C_in = 2 channels"):
        m(torch.randn(1, 1, 3, 16, 16))
    with pytest.raises(ValueError, match="frame 12x16 is not divisible into windows"):
        m(torch.randn(1, 1, 2, 12, 16))
    with pytest.raises(ValueError, match="n_head: 3 heads do not divide"):
        SpatialLocalAttention(2, 4, 16, 16, window_size=8, patch_size=2, n_head=3, backend="reference")
    with pytest.raises(ValueError, match="stride_qk"):
        SpatialGlobalAttention(2, 4, 16, 16, window_size=8, patch_size=1, n_head=2, stride_qk=2, backend="reference")
    with pytest.raises(ValueError, match="a_type"):
        TemporalAttention(2, 4, a_type="mlp", backend="reference")
    with pytest.raises(ValueError, match="not divisible into 2x2 windows"):
        SpatialGlobalAttention(2, 4, 16, 16, window_size=8, patch_size=2, n_head=2, backend="reference")(
            torch.randn(1, 1, 2, 14, 12)
        )
    with pytest.raises(ValueError, match="bias was built for 2x2"):
        SpatialViTAttention(2, 4, 16, 16, window_size=8, n_head=2, backend="reference")(torch.randn(1, 1, 2, 24, 16))


def test_dropout_only_in_training():
    m = SpatialLocalAttention(2, 4, 8, 8, window_size=4, patch_size=2, n_head=2, att_dropout_p=0.5, backend="reference")
    x = torch.randn(1, 2, 2, 8, 8)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    assert not torch.equal(m(x), m(x))


def test_modules_run_the_triton_kernels(device, no_tf32):
    torch.manual_seed(0)
    loc = SpatialLocalAttention(2, 4, 4, 4, window_size=4, patch_size=2, n_head=2, backend="triton").to(device)
    tem = TemporalAttention(2, 4, n_head=2, is_causal=True, backend="triton").to(device)
    x = torch.randn(1, 2, 2, 4, 4, device=device)
    with use_backend("triton"), _dispatch.trace() as calls:
        y = loc(x)
        z = tem(x)
    assert calls == [("window_attention", "triton"), ("temporal_attention", "triton")]
    loc.backend = tem.backend = "reference"
    torch.testing.assert_close(y, loc(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z, tem(x), rtol=1e-5, atol=1e-5)


def test_attention_dropout_runs_on_the_triton_kernels_in_training(device):
    loc = SpatialLocalAttention(2, 4, 4, 4, window_size=4, patch_size=2, n_head=2, att_dropout_p=0.5, backend="triton")
    tem = TemporalAttention(2, 4, n_head=2, att_dropout_p=0.5, backend="triton")
    x = torch.randn(1, 3, 2, 4, 4, device=device)
    for m in (loc.to(device), tem.to(device)):
        with _dispatch.trace() as calls:
            a, b = m.train()(x), m(x)
            c, d = m.eval()(x), m(x)
        assert {b for _, b in calls} == {"triton"}
        assert not torch.equal(a, b) and torch.equal(c, d)


def test_backend_argument_reaches_the_op():
    m = SpatialLocalAttention(2, 4, 8, 8, window_size=4, patch_size=2, n_head=2, backend="reference")
    t = TemporalAttention(2, 4, n_head=2, backend="reference")
    x = torch.randn(1, 2, 2, 8, 8)
    with _dispatch.trace() as calls:
        m(x)
        t(x)
    assert calls == [("window_attention", "reference"), ("temporal_attention", "reference")]


@pytest.mark.gpu
@pytest.mark.parametrize("cls", [SpatialLocalAttention, SpatialGlobalAttention, TemporalAttention])
def test_gpu_module_triton_matches_reference_at_production_shape(cls):
    # MRI production cell: C 32, 64 x 64, window 8, patch 2, 32 heads, cosine, no bias, bf16 autocast
    torch.manual_seed(0)
    if cls is TemporalAttention:
        m = cls(32, 32, n_head=32, cosine_att=True)
    else:
        m = cls(32, 32, 64, 64, window_size=8, patch_size=2, n_head=32, cosine_att=True,
                att_with_relative_position_bias=False)  # fmt: skip
    m = m.cuda()
    x = torch.randn(4, 12, 32, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        m.backend = "triton"
        y_fast = m(x)
        m.backend = "reference"
        y_ref = m(x)
    torch.testing.assert_close(y_fast.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
