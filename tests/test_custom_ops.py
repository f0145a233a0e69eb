"""Every fm_engine custom op passes torch.library.opcheck with the arguments its public op really uses.

The calls are recorded with a TorchDispatchMode while each public op runs forward and backward on the
Triton backend on the test device (non-contiguous inputs where the op takes them), then replayed through
opcheck: schema, fake (meta) implementation against the real kernel — shapes, dtypes and strides — and
autograd wiring.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fm_engine import ops


class _Record(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fm_engine":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _clone(x: object) -> object:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _relu2_mlp(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    x = torch.randn(12, 2, 16, device=dev).transpose(0, 1)  # [2, 12, 16], non-contiguous
    w1, w2 = torch.randn(32, 16, device=dev), torch.randn(16, 32, device=dev)
    return (lambda x, a, b: ops.relu2_mlp(x, a, b, backend="triton")), [x, w1, w2]


def _relu2(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    return (lambda x: ops.relu2(x, backend="triton")), [torch.randn(5, 7, device=dev)]


def _cross_attention(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    q = torch.randn(2, 20, 4, 16, device=dev).transpose(1, 2)  # [2, 4, 20, 16], non-contiguous
    k, v = torch.randn(2, 2, 33, 16, device=dev), torch.randn(2, 2, 33, 16, device=dev)
    mask = torch.zeros(2, 33, dtype=torch.bool, device=dev)
    mask[1, 20:] = True
    return (lambda q, k, v: ops.cross_attention(q, k, v, kv_heads=2, key_padding_mask=mask, backend="triton")), [
        q,
        k,
        v,
    ]


def _patch_embed(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    img = torch.randint(0, 4096, (2, 1, 32, 24), dtype=torch.int16, device=dev)
    d = 8
    params = [torch.randn(*shape, device=dev) for shape in ((d, 1, 4, 4), (d,), (d,), (d,), (d, 2), (d,))]

    def f(*p: torch.Tensor) -> torch.Tensor:
        return ops.patch_embed(img, *p, patch=4, pool_to=(3, 2), intensity_scale=1 / 4095, backend="triton")

    return f, params


def _window_attention(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    q, k, v = (torch.randn(1, 2, 4, 8, 8, device=dev) for _ in range(3))
    return (
        lambda q, k, v: ops.window_attention(
            q, k, v, mode="local", num_patches=(2, 2), patch_size=(2, 2), n_head=2, backend="triton"
        )
    ), [q, k, v]


def _temporal_attention(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    q, k = torch.randn(2, 3, 4, 4, 4, device=dev), torch.randn(2, 3, 4, 4, 4, device=dev)
    v = torch.randn(2, 3, 4, 8, 8, device=dev)
    return (lambda q, k, v: ops.temporal_attention(q, k, v, n_head=2, causal=True, backend="triton")), [q, k, v]


CASES = {
    "relu2": _relu2,
    "relu2_mlp": _relu2_mlp,
    "cross_attention": _cross_attention,
    "patch_embed": _patch_embed,
    "window_attention": _window_attention,
    "temporal_attention": _temporal_attention,
}


def test_every_op_with_a_triton_backend_is_covered() -> None:
    with_triton = {name for name, op in ops.registered_ops().items() if "triton" in op.backends}
    assert with_triton == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name: str, device: torch.device) -> None:
    fn, inputs = CASES[name](device)
    inputs = [x.requires_grad_() if x.is_floating_point() else x for x in inputs]
    rec = _Record()
    with rec:
        out = fn(*inputs)
        out.float().square().sum().backward()
    assert rec.calls, f"{name}: no fm_engine custom op was called"
    seen = set()
    for func, args, kwargs in rec.calls:
        if func in seen:
            continue
        seen.add(func)
        args = tuple(_clone(a) for a in args)
        torch.library.opcheck(func, args, kwargs, test_utils=("test_schema", "test_faketensor"))
