"""fm_engine::conv_ieee, the stems' reference convolution: same values and gradients as F.conv2d / F.conv3d
in IEEE fp32 (TF32 on or off), a valid custom op (opcheck), traceable by torch.compile without graph breaks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fm_engine.ops._exact import conv_ieee
from fm_engine.testing import assert_parity


def _eager(x, w, b, stride):
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, w, b, stride=stride)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_values_and_gradients(device, dims: int, bias: bool) -> None:
    p = (4,) * dims if dims == 2 else (2, 4, 4)
    x = torch.randn(2, 3, *(s * 3 for s in p), device=device)
    w = torch.randn(5, 3, *p, device=device)
    b = torch.randn(5, device=device) if bias else None
    inputs = [x, w] + ([b] if bias else [])

    def fast(x, w, *rest):
        return conv_ieee(x, w, rest[0] if rest else None, p)

    def ref(x, w, *rest):
        return _eager(x, w, rest[0] if rest else None, p)

    assert_parity(fast, ref, inputs, name=f"conv_ieee {dims}d")


def test_opcheck(device) -> None:
    x = torch.randn(2, 1, 8, 12, device=device, requires_grad=True)
    w = torch.randn(4, 1, 4, 4, device=device, requires_grad=True)
    b = torch.randn(4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fm_engine.conv_ieee, (x, w, b, [4, 4]))
    torch.library.opcheck(torch.ops.fm_engine.conv_ieee, (x.detach(), w, None, [4, 4]))


def test_compiles_fullgraph(device) -> None:
    x = torch.randn(1, 1, 8, 8, device=device)
    w = torch.randn(3, 1, 4, 4, device=device, requires_grad=True)
    f = torch.compile(lambda x, w: conv_ieee(x, w, None, (4, 4)).sum(), fullgraph=True, backend="aot_eager")
    f(x, w).backward()
    g = w.grad.clone()
    w.grad = None
    _eager(x, w, None, (4, 4)).sum().backward()
    torch.testing.assert_close(g, w.grad)


@pytest.mark.gpu
def test_exact_under_tf32() -> None:
    x = torch.randint(0, 65536, (1, 1, 64, 64), device="cuda").float()
    w = torch.randn(8, 1, 16, 16, device="cuda")
    ref = _eager(x.double(), w.double(), None, (16, 16))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):  # what a user may have switched on
        out = conv_ieee(x, w, None, (16, 16))
    err = (out.double() - ref).abs().max() / ref.abs().max()
    assert err < 1e-6, err  # TF32 (10-bit mantissa) would give ~1e-3
