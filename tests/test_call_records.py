"""Each op's validator returns one frozen call record, which bucket, supports and the fast backends take.

The measurement buckets are what the tuning tables are keyed by, so their keys are pinned here byte for byte
(the keys below were computed for these calls by the code before the records existed). Window attention's
geometry is derived once per call, in validation, and reaches the kernels as the same sizes as before.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest
import torch

import fm_engine
from fm_engine import ops
from fm_engine.ops import _record
from fm_engine.ops._dispatch import OpCall

WA = importlib.import_module("fm_engine.ops.window_attention")  # the module (the package exports the function)


def _t(*shape: int, dtype: torch.dtype = torch.float32, grad: bool = False) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype).requires_grad_(grad)


def _params(grad: bool = False) -> list[torch.Tensor]:
    d = 8
    return [_t(d, 1, 4, 4, grad=grad), _t(d), _t(d), _t(d), _t(d, 2), _t(d)]


def _window(*qkv: tuple[int, ...], grad: bool = False, dtype: torch.dtype = torch.float32) -> tuple:
    return tuple(_t(*s, dtype=dtype, grad=grad and i == 0) for i, s in enumerate(qkv))


# (op, args, kwargs, the bucket key the code before the call records gave)
CASES: list[tuple[str, tuple, dict[str, Any], str]] = [
    ("relu2", (_t(5, 7),), {}, "dtype=float32,grad=0|n=64"),
    ("relu2", (_t(3, 1000, dtype=torch.bfloat16, grad=True),), {}, "dtype=bfloat16,grad=1|n=4096"),
    ("relu2_mlp", (_t(2, 12, 16), _t(32, 16), _t(16, 32)), {}, "dtype=float32,dropout=0,grad=0|M=32,D=16,H=32,O=16"),
    (
        "relu2_mlp",
        (_t(300, 16, grad=True), _t(64, 16), _t(24, 64), 0.1),
        {},
        "dtype=float32,dropout=1,grad=1|M=512,D=16,H=64,O=32",
    ),
    (
        "cross_attention",
        (_t(2, 4, 20, 16), _t(2, 2, 33, 16), _t(2, 2, 33, 16)),
        {"kv_heads": 2},
        "dtype=float32,head_dim=16,group=2,mask=0,dropout=0,grad=0|B=2,Hq=4,Nq=32,Nk=64",
    ),
    (
        "cross_attention",
        (_t(1, 8, 5, 32, grad=True), _t(1, 8, 70, 32), _t(1, 8, 70, 32)),
        {"kv_heads": 8, "scale": 0.3, "dropout_p": 0.2, "key_padding_mask": torch.zeros(1, 70, dtype=torch.bool)},
        "dtype=float32,head_dim=32,group=1,mask=1,dropout=1,grad=1|B=1,Hq=8,Nq=8,Nk=128",
    ),
    (
        "patch_embed",
        (torch.zeros(2, 1, 32, 24, dtype=torch.int16), *_params()),
        {"patch": 4},
        "image=int16,out=float32,param=float32,patch=4,channels=1,pool=0,grad=0|B=2,H=32,W=32,D=8",
    ),
    (
        "patch_embed",
        (_t(3, 1, 64, 48), *_params(True)),
        {"patch": 4, "pool_to": (3, 2), "intensity_scale": 1 / 4095, "out_dtype": torch.bfloat16},
        "image=float32,out=bfloat16,param=float32,patch=4,channels=1,pool=1,grad=1|B=4,H=64,W=64,D=8,tokens=8",
    ),
    (
        "window_attention",
        _window((1, 2, 4, 8, 8), (1, 2, 4, 8, 8), (1, 2, 4, 8, 8)),
        {"mode": "local", "num_patches": (2, 2), "patch_size": (2, 2), "n_head": 2},
        "dtype=float32,mode=local,hc_qk=8,hc_v=8,tokens=4,cosine=0,normalize_qk=0,bias=0,dropout=0,grad=0"
        "|BT=2,C=4,HW=64",
    ),
    (
        "window_attention",
        _window((2, 3, 4, 8, 8), (2, 3, 4, 8, 8), (2, 3, 4, 16, 16), grad=True),
        {
            "mode": "global",
            "num_windows": 2,
            "patch_size": 4,
            "n_head": 4,
            "cosine": True,
            "normalize_qk": True,
            "rel_pos_bias": _t(4, 4, 4),
            "dropout_p": 0.1,
        },
        "dtype=float32,mode=global,hc_qk=4,hc_v=16,tokens=4,cosine=1,normalize_qk=0,bias=1,dropout=1,grad=1"
        "|BT=8,C=4,HW=256",
    ),
    (
        "window_attention",
        _window((1, 1, 2, 16, 16), (1, 1, 2, 16, 16), (1, 1, 2, 16, 16)),
        {"num_patches": 4, "patch_size": 2, "n_head": 1, "normalize_qk": True, "scale": 0.5},
        "dtype=float32,mode=local,hc_qk=8,hc_v=8,tokens=16,cosine=0,normalize_qk=1,bias=0,dropout=0,grad=0"
        "|BT=1,C=2,HW=256",
    ),
    (
        "temporal_attention",
        (_t(2, 3, 4, 4, 4), _t(2, 3, 4, 4, 4), _t(2, 3, 4, 8, 8)),
        {"n_head": 2, "causal": True},
        "dtype=float32,causal=1,cosine=0,normalize_qk=0,dropout=0,grad=0|B=2,T=4,heads=2,D_qk=32,D_v=128",
    ),
    (
        "temporal_attention",
        (_t(1, 5, 2, 8, 8, grad=True), _t(1, 5, 2, 8, 8), _t(1, 5, 2, 8, 8)),
        {"n_head": 4, "cosine": True, "normalize_qk": True, "dropout_p": 0.3},
        "dtype=float32,causal=0,cosine=1,normalize_qk=0,dropout=1,grad=1|B=1,T=8,heads=4,D_qk=32,D_v=32",
    ),
    (
        "temporal_attention",
        _window((1, 5, 2, 8, 8), (1, 5, 2, 8, 8), (1, 5, 2, 8, 8), dtype=torch.float16),
        {"n_head": 1, "normalize_qk": True},
        "dtype=float16,causal=0,cosine=0,normalize_qk=1,dropout=0,grad=0|B=1,T=8,heads=1,D_qk=128,D_v=128",
    ),
]

# the kernels' sizes (GEO_KEYS order) the code before the call records passed for the window-attention cases
OLD_KERNEL_SIZES = [
    [2, 4, 8, 8, 8, 8, 4, 4, 2, 2, 2, 2, 2, 2, 2, 2, 8, 8, 16],
    [3, 4, 8, 8, 16, 16, 4, 4, 2, 2, 2, 2, 2, 4, 4, 4, 4, 16, 96],
    [1, 2, 16, 16, 16, 16, 16, 4, 2, 4, 4, 2, 2, 2, 2, 1, 8, 8, 4],
]


def test_every_op_is_covered() -> None:
    assert {c[0] for c in CASES} == set(ops.registered_ops())


@pytest.mark.parametrize(("name", "args", "kwargs", "key"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bucket_keys_are_unchanged(name: str, args: tuple, kwargs: dict, key: str) -> None:
    op = ops.get_op(name)
    call = op.validate(*args, **kwargs)
    assert isinstance(call, OpCall) and dataclasses.is_dataclass(call)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(call, dataclasses.fields(call)[0].name, None)
    bucket, by_args = op.bucket_of(call), op.bucket(args, kwargs)  # the by-arguments form validates first
    assert bucket is not None and by_args is not None
    assert bucket.key == key
    assert by_args.key == key
    with _record.record() as rec:  # the recorder keys the call the same way
        rec.add(op, "reference", args, kwargs, call)
        rec.add(op, "reference", args, kwargs)
    assert [(c.bucket, c.count) for c in rec.calls] == [(key, 2)]


def test_window_attention_kernel_sizes_are_unchanged() -> None:
    calls = [c for c in CASES if c[0] == "window_attention"]
    got = [WA.kernel_sizes(WA.WINDOW_ATTENTION.validate(*a, **k)) for _, a, k, _ in calls]
    assert got == OLD_KERNEL_SIZES
    assert all(len(g) == len(WA.GEO_KEYS) for g in got)


def test_window_attention_record_resolves_the_call() -> None:
    _, args, kwargs, _ = CASES[9]
    call = WA.WINDOW_ATTENTION.validate(*args, **kwargs)
    assert call.geometry == WA.geometry(
        args[0], args[2], mode="global", num_patches=None, num_windows=2, patch_size=4, n_head=4
    )
    assert (call.score, call.softmax_scale) == ("cosine", 1.0)  # cosine wins over normalize_qk; no temperature
    assert call.tensors() == (*args, kwargs["rel_pos_bias"])
    assert WA.score_form(False, True) == "standardize" and WA.score_form(False, False) == "dot"
    with pytest.raises(ValueError, match="num_windows: required"):
        WA.WINDOW_ATTENTION.validate(*args, **{**kwargs, "num_windows": None})
    with pytest.raises(TypeError):  # a missing argument is refused as the public function refuses it
        WA.WINDOW_ATTENTION.validate(*args, mode="local", num_patches=2, patch_size=2)


def test_window_attention_kernel_codes_are_the_kernels_names() -> None:
    from fm_engine.kernels import window_attention as K

    assert WA._kernel_codes("local", "dot") == (K.MODE_LOCAL, K.SCORE_DOT)
    assert WA._kernel_codes("global", "cosine") == (K.MODE_GLOBAL, K.SCORE_COSINE)
    assert WA._kernel_codes("local", "standardize")[1] == K.SCORE_STANDARDIZE
    assert set(WA.SCORES) == {"dot", "cosine", "standardize"}


@pytest.mark.parametrize("backend", ["reference", "triton", None])
def test_window_geometry_is_derived_once_per_call(backend: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    counted = []
    real = WA.geometry

    def counting(*a, **k):
        counted.append(1)
        return real(*a, **k)

    monkeypatch.setattr(WA, "geometry", counting)
    q, k, v = (torch.randn(1, 1, 2, 4, 4) for _ in range(3))
    out = ops.window_attention(q, k, v, num_patches=2, patch_size=1, n_head=2, backend=backend)
    assert out.shape == v.shape
    assert len(counted) == 1
    counted.clear()
    assert ops.explain(ops.window_attention, q, k, v, num_patches=2, patch_size=1, n_head=2).chosen is not None
    assert len(counted) == 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_window_attention_module_compiles_as_one_graph(backend: str, device: torch.device) -> None:
    """A module-level call through the op (its record built inside the trace) is one fullgraph graph."""
    from fm_engine.nn.stcnnt_attention import SpatialLocalAttention

    m = SpatialLocalAttention(2, 4, 8, 8, window_size=4, patch_size=2, n_head=2).to(device)
    x = torch.randn(1, 2, 2, 8, 8, device=device)
    graphs: list[set[str]] = []

    def keep(gm, example_inputs):
        graphs.append({str(n.target) for n in gm.graph.nodes})
        return gm.forward

    with fm_engine.use_backend(backend):
        want = m(x)
        torch._dynamo.reset()
        got = torch.compile(m, fullgraph=True, backend=keep)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(got, want)
    assert len(graphs) == 1
    assert any("stcnnt_attention_fwd" in t for t in graphs[0]) == (backend == "triton")
