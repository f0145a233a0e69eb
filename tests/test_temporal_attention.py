"""temporal_attention (docs/KERNELS.md K2): the reference against a literal loop, validation, and (when the
Triton backend is present) parity of the Triton kernels, forward and every gradient."""

from __future__ import annotations

import math

import pytest
import torch

from fm_engine.ops import _dispatch
from fm_engine.ops.temporal_attention import temporal_attention, temporal_attention_reference
from fm_engine.testing import assert_parity


def naive_temporal(q, k, v, *, n_head, scale=None, cosine=False, normalize_qk=False, causal=False):
    B, T = v.shape[:2]
    out = torch.zeros_like(v)
    for b in range(B):
        Q, K, V = q[b].reshape(T, -1), k[b].reshape(T, -1), v[b].reshape(T, -1)  # frame flattened (C, H, W)
        dq, dv = Q.shape[1] // n_head, V.shape[1] // n_head
        O = torch.zeros_like(V)
        for h in range(n_head):
            qh, kh, vh = Q[:, h * dq : (h + 1) * dq], K[:, h * dq : (h + 1) * dq], V[:, h * dv : (h + 1) * dv]
            if cosine:
                qh = qh / qh.norm(dim=1, keepdim=True).clamp_min(1e-12)
                kh = kh / kh.norm(dim=1, keepdim=True).clamp_min(1e-12)
                s = 1.0
            else:
                if normalize_qk:
                    eps = torch.finfo(q.dtype).eps
                    qh = (qh - qh.mean(1, keepdim=True)) / (qh.var(1, keepdim=True) + eps).sqrt()
                    kh = (kh - kh.mean(1, keepdim=True)) / (kh.var(1, keepdim=True) + eps).sqrt()
                s = 1.0 / math.sqrt(dq)
            S = (s if scale is None else scale) * qh @ kh.T
            for i in range(T):
                for j in range(T):
                    if causal and j > i:
                        S[i, j] = float("-inf")
            O[:, h * dv : (h + 1) * dv] = torch.softmax(S, dim=1) @ vh
        out[b] = O.reshape(v[b].shape)
    return out


def _inputs(B, T, C, H, W, s, dtype=torch.float64, device="cpu"):
    q = torch.randn(B, T, C, H // s, W // s, dtype=dtype, device=device)
    k = torch.randn(B, T, C, H // s, W // s, dtype=dtype, device=device)
    v = torch.randn(B, T, C, H, W, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize(
    "T,C,s,n_head,flags",
    [
        (1, 4, 2, 2, {}),
        (5, 4, 2, 4, {"causal": True}),
        (3, 6, 1, 3, {"cosine": True}),
        (4, 4, 2, 2, {"normalize_qk": True, "causal": True}),
        (3, 2, 1, 4, {"scale": 0.3}),  # 4 heads over 2 channels: a head is half a channel map
    ],
)
def test_reference_matches_literal_loop(T, C, s, n_head, flags):
    q, k, v = _inputs(2, T, C, 4, 6, s)
    got = temporal_attention(q, k, v, n_head=n_head, backend="reference", **flags)
    torch.testing.assert_close(got, naive_temporal(q, k, v, n_head=n_head, **flags), rtol=1e-10, atol=1e-10)


def test_causal_first_frame_sees_only_itself():
    q, k, v = _inputs(1, 4, 2, 4, 4, 2)
    o = temporal_attention(q, k, v, n_head=2, causal=True, backend="reference")
    torch.testing.assert_close(o[:, 0], v[:, 0])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (q, k[:, :2], v), "k: shape"),
        (lambda q, k, v: (q[:, :, :2], k[:, :, :2], v), "v: leading dims"),
        (lambda q, k, v: (q.half(), k, v), "share one dtype"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), "q: dtype"),
        (lambda q, k, v: (q[0], k[0], v[0]), "q: expected a 5-D tensor"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, match):
    q, k, v = change(*_inputs(2, 3, 4, 4, 4, 2))
    with pytest.raises(ValueError, match=match):
        temporal_attention(q, k, v, n_head=2)


def test_bad_arguments_raise_naming_the_argument():
    q, k, v = _inputs(1, 2, 3, 4, 4, 2)
    with pytest.raises(ValueError, match="n_head: 5 heads do not divide"):
        temporal_attention(q, k, v, n_head=5)
    with pytest.raises(ValueError, match="n_head: expected a positive int"):
        temporal_attention(q, k, v, n_head=0)
    with pytest.raises(ValueError, match="dropout_p"):
        temporal_attention(q, k, v, n_head=1, dropout_p=-0.1)
    with pytest.raises(ValueError, match="scale: expected None or a finite float"):
        temporal_attention(q, k, v, n_head=1, scale=float("nan"))


def test_reference_is_the_automatic_choice_for_float64():
    q, k, v = _inputs(1, 2, 2, 4, 4, 2)
    with _dispatch.trace() as calls:
        temporal_attention(q, k, v, n_head=2)
    assert calls == [("temporal_attention", "reference")]


# --- Triton backend: parity of the output and of every gradient ---------------------------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (B, T, C, H, W, stride, n_head, flags, dtype): T against the frame tile (1, 15, 16, 17, 64 vs 16/32/64), head
# dims against the interpreter's 16-wide chunks and 3-way splits of the head dim (D_qk 3 .. 128, D_v 12 .. 480:
# partial chunks, splits of unequal length), causal and not, every score form, a head that starts inside a
# channel map (n_head not dividing C), odd batches.
TRITON_CASES = [
    (1, 1, 4, 4, 6, 2, 2, {}, "fp32"),
    (3, 5, 4, 10, 12, 2, 2, {"causal": True}, "bf16"),
    (1, 16, 2, 4, 4, 1, 1, {"cosine": True}, "fp32"),
    (2, 17, 2, 8, 8, 2, 2, {"normalize_qk": True, "causal": True}, "fp32"),  # D_qk 16
    (1, 15, 3, 4, 4, 2, 4, {"causal": True, "cosine": True}, "fp16"),
    (1, 3, 8, 8, 8, 1, 2, {"normalize_qk": True}, "bf16"),  # D 256: four chunks
    (1, 64, 1, 2, 2, 1, 1, {"causal": True}, "fp32"),  # T 64, the largest tile
    (1, 4, 2, 6, 6, 2, 3, {"scale": 0.2}, "fp16"),  # 3 heads over 2 channels
]


def _replayed_seed(torch_seed: int) -> int:
    """The dropout seed a fast backend draws right after ``torch.manual_seed(torch_seed)``."""
    from fm_engine.kernels._attention_dropout import draw_seed

    torch.manual_seed(torch_seed)
    return draw_seed()


def _run_parity(B, T, C, H, W, s, n_head, flags, dtype, device, dropout_p=0.0):
    q, k, v = _inputs(B, T, C, H, W, s, dtype=DTYPES[dtype], device=device)
    torch_seed = int(torch.randint(0, 2**31 - 1, (1,)))

    def fast(q, k, v):
        torch.manual_seed(torch_seed)  # the kernels' dropout seed is the next draw (replayed below)
        return temporal_attention(q, k, v, n_head=n_head, dropout_p=dropout_p, backend="triton", **flags)

    def reference(q, k, v):
        mask = None
        if dropout_p > 0:  # the kernels' own keep mask, [B, n_head, T, T]
            from fm_engine.kernels._attention_dropout import dropout_keep_mask

            mask = dropout_keep_mask(_replayed_seed(torch_seed), (B, n_head, T, T), dropout_p, q.device)
        return temporal_attention_reference(q, k, v, n_head=n_head, dropout_p=dropout_p, dropout_mask=mask, **flags)

    name = f"temporal_attention[T{T} {flags} {dtype} p={dropout_p}]"
    with _dispatch.trace() as calls:
        assert_parity(fast, reference, [q, k, v], name=name)
    assert ("temporal_attention", "triton") in calls


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"T{c[1]}-D{c[2] * c[3] * c[4] // c[6]}-{c[8]}")
def test_triton_parity(case, device):
    _run_parity(*case, device=device)


@pytest.mark.parametrize("draw", range(2))
def test_triton_parity_random_config(draw, device):
    # a fresh configuration every run (drawn from the printed torch seed)
    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,)))]

    n_head = pick([1, 2, 3])
    s = pick([1, 2])
    C = pick([1, 2, 3])
    H, W = 2 * pick([1, 2]), 2 * pick([1, 3])
    if (C * (H // s) * (W // s)) % n_head:
        n_head = 1
    flags = pick([{}, {"cosine": True}, {"causal": True}, {"causal": True, "cosine": True}])
    if C * (H // s) * (W // s) // n_head < 2:  # cosine of 1-element heads: +-1, zero gradient
        flags.pop("cosine", None)
    _run_parity(pick([1, 2, 3]), pick([1, 2, 7, 16, 18]), C, H, W, s, n_head, flags, pick(list(DTYPES)), device)


# (B, T, C, H, W, stride, n_head, flags, dtype, dropout_p): causal rows (fewer live keys), odd T, several heads
DROPOUT_CASES = [
    (2, 5, 4, 4, 4, 2, 2, {"causal": True}, "fp32", 0.3),
    (1, 17, 2, 4, 4, 1, 2, {"cosine": True}, "bf16", 0.5),
    (3, 3, 3, 4, 4, 2, 3, {"normalize_qk": True, "causal": True}, "fp16", 0.1),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"T{c[1]}-{c[8]}-p{c[9]}")
def test_triton_dropout_parity(case, device):
    """Output and every gradient against the reference applying the kernels' own keep mask."""
    *args, dropout_p = case
    _run_parity(*args, device=device, dropout_p=dropout_p)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_standardised_scores_with_a_large_mean(dtype, device):
    """Rows whose mean is 100x their spread: the split kernels sum about a shift (the first chunk's mean), so the
    one-pass variance keeps its precision."""
    dt = DTYPES[dtype]
    q, k, v = _inputs(2, 5, 4, 8, 8, 1, dtype=dt, device=device)
    q, k = q + 100.0, k - 50.0

    def call(backend):
        return lambda q, k, v: temporal_attention(q, k, v, n_head=2, normalize_qk=True, backend=backend)

    assert_parity(call("triton"), call("reference"), [q, k, v], name=f"temporal standardised, large mean {dtype}")


def test_triton_dropout_seed_is_reproducible_and_fresh(device):
    q, k, v = _inputs(2, 6, 2, 4, 4, 2, dtype=torch.float32, device=device)
    kw = {"n_head": 2, "dropout_p": 0.5, "backend": "triton"}
    torch.manual_seed(3)
    a = temporal_attention(q, k, v, **kw)
    b = temporal_attention(q, k, v, **kw)
    torch.manual_seed(3)
    assert torch.equal(a, temporal_attention(q, k, v, **kw)) and not torch.equal(a, b)


def test_triton_backend_refusals_name_the_reason(device):
    q, k, v = _inputs(1, 3, 2, 4, 4, 2, dtype=torch.float32, device=device)
    text = str(_dispatch.explain(temporal_attention, q, k, v, n_head=2, dropout_p=0.1, backend="triton"))
    assert "triton     yes" in text, text
    with pytest.raises(_dispatch.BackendUnsupportedError, match="float64"):
        temporal_attention(q.double(), k.double(), v.double(), n_head=2, backend="triton")
    long = _inputs(1, 65, 1, 2, 2, 1, dtype=torch.float32, device=device)
    with pytest.raises(_dispatch.BackendUnsupportedError, match="65 frames > 64"):
        temporal_attention(*long, n_head=1, backend="triton")


def test_triton_under_torch_compile(device):
    q, k, v = (x.requires_grad_() for x in _inputs(2, 3, 2, 4, 4, 2, dtype=torch.float32, device=device))

    def f(q, k, v):
        return temporal_attention(q, k, v, n_head=2, causal=True, backend="triton")

    g = torch.randn(v.shape, device=device)
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want, (q, k, v), g)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    got_grads = torch.autograd.grad(got, (q, k, v), g)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_gpu_parity_production_shape(dtype, causal):
    # MRI production: B 16, T 12, C 32, 64 x 64, 32 heads, stride_t 2 (D_qk 1024, D_v 4096)
    _run_parity(16, 12, 32, 64, 64, 2, 32, {"causal": causal, "cosine": True}, dtype, torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_parity_long_sequence():
    _run_parity(2, 64, 32, 32, 32, 2, 8, {"causal": True}, "bf16", torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_parity_long_sequence_dropout_and_standardised():
    dev = torch.device("cuda")
    _run_parity(4, 64, 32, 32, 32, 2, 32, {"causal": True}, "bf16", dev, dropout_p=0.1)
    _run_parity(2, 12, 32, 64, 64, 2, 32, {"normalize_qk": True}, "fp32", dev)
