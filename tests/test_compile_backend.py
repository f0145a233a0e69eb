"""The ``compile`` backend of every op: its reference under torch.compile(dynamic=False).

One compact test per op (inductor compiles each graph in seconds on a CPU): forward output and every input
gradient of ``backend="compile"`` against ``backend="reference"`` on the same inputs. Also: one cached
compiled callable per exact call, selection through ``use_backend``, and no nested compilation inside an
outer ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fm_engine import ops
from fm_engine.ops._dispatch import BACKENDS, use_backend


def _relu2(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    return (lambda x, backend: ops.relu2(x, backend=backend)), [torch.randn(5, 7, device=dev)]


def _relu2_mlp(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    x = torch.randn(12, 2, 16, device=dev).transpose(0, 1)  # non-contiguous
    w1, w2 = torch.randn(32, 16, device=dev), torch.randn(16, 32, device=dev)
    return (lambda x, a, b, backend: ops.relu2_mlp(x, a, b, backend=backend)), [x, w1, w2]


def _cross_attention(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    q = torch.randn(2, 4, 20, 16, device=dev)
    k, v = torch.randn(2, 2, 33, 16, device=dev), torch.randn(2, 2, 33, 16, device=dev)
    mask = torch.zeros(2, 33, dtype=torch.bool, device=dev)
    mask[1, 20:] = True

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        return ops.cross_attention(q, k, v, kv_heads=2, key_padding_mask=mask, backend=backend)

    return f, [q, k, v]


def _patch_embed(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    img = torch.randint(0, 4096, (2, 1, 32, 24), dtype=torch.int16, device=dev)
    d = 8
    params = [torch.randn(*shape, device=dev) for shape in ((d, 1, 4, 4), (d,), (d,), (d,), (d, 2), (d,))]

    def f(*p: torch.Tensor, backend: str) -> torch.Tensor:
        return ops.patch_embed(img, *p, patch=4, pool_to=(3, 2), intensity_scale=1 / 4095, backend=backend)

    return (lambda *a: f(*a[:-1], backend=a[-1])), params


def _window_attention(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    q, k, v = (torch.randn(1, 2, 4, 8, 8, device=dev) for _ in range(3))

    def f(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> torch.Tensor:
        return ops.window_attention(q, k, v, mode="local", num_patches=(2, 2), patch_size=(2, 2), n_head=2,
                                    backend=backend)  # fmt: skip

    return f, [q, k, v]


def _temporal_attention(dev: torch.device) -> tuple[Callable, list[torch.Tensor]]:
    q, k = torch.randn(2, 3, 4, 4, 4, device=dev), torch.randn(2, 3, 4, 4, 4, device=dev)
    v = torch.randn(2, 3, 4, 8, 8, device=dev)
    return (lambda q, k, v, backend: ops.temporal_attention(q, k, v, n_head=2, causal=True, backend=backend)), [q, k, v]


CASES = {
    "relu2": _relu2,
    "relu2_mlp": _relu2_mlp,
    "cross_attention": _cross_attention,
    "patch_embed": _patch_embed,
    "window_attention": _window_attention,
    "temporal_attention": _temporal_attention,
}


def test_every_op_has_a_compile_backend_and_a_parity_case() -> None:
    assert "compile" in BACKENDS
    registered = ops.registered_ops()
    assert set(CASES) == set(registered)
    assert all("compile" in op.backends for op in registered.values())


def _run(fn: Callable, inputs: list[torch.Tensor], backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves, backend)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize("name", sorted(CASES))
def test_compile_matches_reference_forward_and_backward(name: str, device: torch.device) -> None:
    torch.manual_seed(0)
    fn, inputs = CASES[name](device)
    op = ops.get_op(name)
    before = len(op.compiled.cache)
    ref_out, ref_grads = _run(fn, inputs, "reference")
    with ops.trace() as calls:
        out, grads = _run(fn, inputs, "compile")
    assert (name, "compile") in calls
    assert len(op.compiled.cache) == before + 1  # one compiled callable for this exact call
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for i, (g, rg) in enumerate(zip(grads, ref_grads, strict=True)):
        assert g is not None, f"{name}: input {i} got no gradient from the compile backend"
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-4, msg=lambda m, i=i: f"{name} grad {i}: {m}")


def test_compile_cache_is_per_exact_call_and_use_backend_selects_it(device: torch.device) -> None:
    op = ops.get_op("relu2")
    x = torch.randn(3, 9, device=device)
    with torch.no_grad(), use_backend("compile"), ops.trace() as calls:
        before = len(op.compiled.cache)
        a = ops.relu2(x)
        b = ops.relu2(x + 1)  # same shapes, dtypes, flags: the same compiled callable
        assert len(op.compiled.cache) == before + 1
    assert calls == [("relu2", "compile")] * 2
    # another shape, stride, dtype, grad mode or flag is another key (its own compiled callable)
    key = op.compiled.key
    with torch.no_grad():
        k0 = key((x,), {})
        others = [key((x[:2],), {}), key((x.t(),), {}), key((x.double(),), {}), key((x,), {"flag": 1})]
    assert key((x,), {}) != k0 and all(k != k0 for k in others) and len(set(others)) == len(others)
    for got, inp in ((a, x), (b, x + 1)):
        torch.testing.assert_close(got, ops.relu2(inp, backend="reference"))
    assert ops.explain(ops.relu2, x, backend="compile").chosen == "compile"
    assert any(v.backend == "compile" and v.ok for v in ops.explain(ops.relu2, x).verdicts)


def test_compile_backend_inside_an_outer_compile_does_not_nest(device: torch.device) -> None:
    op = ops.get_op("relu2")
    op.compiled.cache.clear()

    def outer(x: torch.Tensor) -> torch.Tensor:
        return ops.relu2(x * 2, backend="compile") + 1

    x = torch.randn(4, 6, device=device)
    got = torch.compile(outer, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, ops.relu2(x * 2, backend="reference") + 1)
    assert op.compiled.cache == {}  # traced inline: no inner torch.compile was created
