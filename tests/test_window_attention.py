"""window_attention (docs/KERNELS.md K1): the reference against a literal per-token loop, input validation,
and (when the Triton backend is present) parity of the Triton kernels, forward and every gradient."""

from __future__ import annotations

import math

import pytest
import torch

from fm_engine.ops import _dispatch
from fm_engine.ops.window_attention import geometry, window_attention, window_attention_reference
from fm_engine.testing import assert_parity

# --- an independent, literal implementation: explicit pixel slicing per token ------------------------


def _score(qi: torch.Tensor, kj: torch.Tensor, scale: float | None, cosine: bool, normalize_qk: bool) -> torch.Tensor:
    hc = qi.shape[-1]
    if cosine:
        s = 1.0 if scale is None else scale
        return s * (qi / qi.norm().clamp_min(1e-12)) @ (kj / kj.norm().clamp_min(1e-12))
    if normalize_qk:
        eps = torch.finfo(qi.dtype).eps

        def z(x: torch.Tensor) -> torch.Tensor:
            m = x.sum() / hc
            return (x - m) / torch.sqrt(((x - m) ** 2).sum() / (hc - 1) + eps)

        qi, kj = z(qi), z(kj)
    s = 1.0 / math.sqrt(hc) if scale is None else scale
    return s * (qi @ kj)


def naive_window_attention(
    q, k, v, *, mode, nW, nP, patch, n_head, scale=None, cosine=False, normalize_qk=False, bias=None
):
    B, T, C = v.shape[:3]
    ph, pw = patch
    phq, pwq = q.shape[3] // (nW[0] * nP[0]), q.shape[4] // (nW[1] * nP[1])
    out = torch.zeros_like(v)

    def sl(wh, ww, p_h, p_w, sh, sw):
        y0, x0 = (wh * nP[0] + p_h) * sh, (ww * nP[1] + p_w) * sw
        return slice(y0, y0 + sh), slice(x0, x0 + sw)

    if mode == "local":
        groups = [
            [(wh, ww, a, b) for a in range(nP[0]) for b in range(nP[1])] for wh in range(nW[0]) for ww in range(nW[1])
        ]
    else:
        groups = [
            [(a, b, p_h, p_w) for a in range(nW[0]) for b in range(nW[1])]
            for p_h in range(nP[0])
            for p_w in range(nP[1])
        ]
    for b in range(B):
        for t in range(T):
            for toks in groups:

                def vec(x, sh, sw, tok, b=b, t=t):
                    ys, xs = sl(*tok, sh, sw)
                    return x[b, t, :, ys, xs].permute(1, 2, 0).reshape(-1)  # (ph, pw, C), C fastest

                Q = torch.stack([vec(q, phq, pwq, tk) for tk in toks])
                K = torch.stack([vec(k, phq, pwq, tk) for tk in toks])
                V = torch.stack([vec(v, ph, pw, tk) for tk in toks])
                N = len(toks)
                hq, hv = Q.shape[1] // n_head, V.shape[1] // n_head
                O = torch.zeros_like(V)
                for h in range(n_head):
                    S = torch.stack(
                        [
                            torch.stack(
                                [
                                    _score(
                                        Q[i, h * hq : (h + 1) * hq],
                                        K[j, h * hq : (h + 1) * hq],
                                        scale,
                                        cosine,
                                        normalize_qk,
                                    )
                                    for j in range(N)
                                ]
                            )
                            for i in range(N)
                        ]
                    )
                    A = torch.softmax(S, dim=-1)
                    if bias is not None:
                        A = A + bias[h]
                    O[:, h * hv : (h + 1) * hv] = A @ V[:, h * hv : (h + 1) * hv]
                for i, tk in enumerate(toks):
                    ys, xs = sl(*tk, ph, pw)
                    out[b, t, :, ys, xs] = O[i].reshape(ph, pw, C).permute(2, 0, 1)
    return out


def _inputs(B, T, C, H, W, s, dtype=torch.float64, device="cpu"):
    q = torch.randn(B, T, C, H // s, W // s, dtype=dtype, device=device)
    k = torch.randn(B, T, C, H // s, W // s, dtype=dtype, device=device)
    v = torch.randn(B, T, C, H, W, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize(
    "mode,grid,patch,n_head,s,flags",
    [
        ("local", (2, 3), (2, 1), 2, 1, {}),
        ("local", (2, 2), (2, 2), 3, 2, {"cosine": True}),
        ("global", (3, 2), (1, 2), 3, 1, {"normalize_qk": True}),
        ("global", (2, 3), (2, 2), 3, 2, {}),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_literal_loops(mode, grid, patch, n_head, s, flags, with_bias):
    C = 3
    if mode == "local":
        nP = grid
        H, W = 2 * grid[0] * patch[0], 1 * grid[1] * patch[1]
        nW = (H // (nP[0] * patch[0]), W // (nP[1] * patch[1]))
        kw = {"num_patches": nP}
    else:
        nW = grid
        H, W = grid[0] * 2 * patch[0], grid[1] * 1 * patch[1]
        nP = (H // (nW[0] * patch[0]), W // (nW[1] * patch[1]))
        kw = {"num_windows": nW}
    q, k, v = _inputs(2, 2, C, H, W, s)
    N = nP[0] * nP[1] if mode == "local" else nW[0] * nW[1]
    bias = torch.randn(n_head, N, N, dtype=torch.float64) * 0.1 if with_bias else None
    got = window_attention(
        q, k, v, mode=mode, patch_size=patch, n_head=n_head, rel_pos_bias=bias, backend="reference", **kw, **flags
    )
    want = naive_window_attention(q, k, v, mode=mode, nW=nW, nP=nP, patch=patch, n_head=n_head, bias=bias, **flags)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_global_uses_separate_height_and_width_window_counts():
    # 2 windows down, 4 across: the original used the height count for both axes
    q, k, v = _inputs(1, 1, 2, 8, 16, 1)
    got = window_attention(q, k, v, mode="global", num_windows=(2, 4), patch_size=2, n_head=2, backend="reference")
    want = naive_window_attention(q, k, v, mode="global", nW=(2, 4), nP=(2, 2), patch=(2, 2), n_head=2)
    torch.testing.assert_close(got, want)


def test_bias_is_added_after_softmax_and_gets_a_gradient():
    q, k, v = _inputs(1, 1, 2, 4, 4, 1)
    v = torch.ones_like(v)
    bias = torch.full((1, 4, 4), 0.25, dtype=torch.float64, requires_grad=True)
    o = window_attention(
        q, k, v, mode="local", num_patches=2, patch_size=2, n_head=1, rel_pos_bias=bias, backend="reference"
    )
    # rows of softmax sum to 1, plus 4 * 0.25 from the bias: every output is 2 when v == 1
    torch.testing.assert_close(o, torch.full_like(o, 2.0))
    o.sum().backward()
    assert bias.grad is not None and bool((bias.grad != 0).all())


# --- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda q, k, v: (q, k, v[..., :7]), "not divisible into windows"),
        (lambda q, k, v: (q, k[:, :, :, :2], v), "k: shape"),
        (lambda q, k, v: (q[:, :, :1], k[:, :, :1], v), "v: leading dims"),
        (lambda q, k, v: (q.float(), k, v), "same dtype|share one dtype"),
        (lambda q, k, v: (q.int(), k.int(), v.int()), "q: dtype"),
        (lambda q, k, v: (q[0], k[0], v[0]), "q: expected a 5-D tensor"),
        (lambda q, k, v: (q[..., :3, :3], k[..., :3, :3], v), "q: frame 3x3"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(change, match):
    q, k, v = change(*_inputs(2, 2, 4, 8, 8, 1))
    with pytest.raises(ValueError, match=match):
        window_attention(q, k, v, mode="local", num_patches=2, patch_size=2, n_head=2)


def test_bad_arguments_raise_naming_the_argument():
    q, k, v = _inputs(1, 2, 3, 8, 8, 1)
    base = {"mode": "local", "num_patches": 2, "patch_size": 2}
    with pytest.raises(ValueError, match="n_head: 5 heads do not divide"):
        window_attention(q, k, v, n_head=5, **base)
    with pytest.raises(ValueError, match="mode: expected one of"):
        window_attention(q, k, v, n_head=2, mode="diag", num_patches=2, patch_size=2)
    with pytest.raises(ValueError, match="num_windows: required"):
        window_attention(q, k, v, n_head=2, mode="global", patch_size=2)
    with pytest.raises(ValueError, match="not divisible into 3x3 windows"):
        window_attention(q, k, v, n_head=2, mode="global", num_windows=3, patch_size=2)
    with pytest.raises(ValueError, match="rel_pos_bias: expected shape"):
        window_attention(q, k, v, n_head=2, rel_pos_bias=torch.zeros(2, 3, 3, dtype=q.dtype), **base)
    with pytest.raises(ValueError, match="rel_pos_bias: dtype"):
        window_attention(q, k, v, n_head=2, rel_pos_bias=torch.zeros(2, 4, 4), **base)
    with pytest.raises(ValueError, match="dropout_p"):
        window_attention(q, k, v, n_head=2, dropout_p=1.5, **base)
    with pytest.raises(ValueError, match="normalize_qk: needs a q/k head dim of at least 2"):
        window_attention(q, k, v, n_head=12, normalize_qk=True, **base)
    with pytest.raises(ValueError, match="patch_size: expected a positive int"):
        window_attention(q, k, v, n_head=2, mode="local", num_patches=2, patch_size=0)


def test_dropout_runs_and_changes_the_output():
    q, k, v = _inputs(1, 1, 2, 8, 8, 1, dtype=torch.float32)
    kw = {"mode": "local", "num_patches": 2, "patch_size": 2, "n_head": 2}
    a = window_attention(q, k, v, **kw, backend="reference")
    b = window_attention(q, k, v, **kw, dropout_p=0.5, backend="reference")
    assert a.shape == b.shape and not torch.equal(a, b)


def test_float64_matches_float32_reference():
    q, k, v = _inputs(2, 1, 4, 8, 8, 2)
    kw = {"mode": "global", "num_windows": 2, "patch_size": 2, "n_head": 2}
    a = window_attention(q, k, v, **kw, backend="reference")
    b = window_attention(q.float(), k.float(), v.float(), **kw, backend="reference")
    torch.testing.assert_close(a.float(), b, rtol=1e-5, atol=1e-5)


def test_reference_is_the_automatic_choice_for_float64():
    q, k, v = _inputs(1, 1, 2, 4, 4, 1)
    with _dispatch.trace() as calls:
        window_attention(q, k, v, mode="local", num_patches=2, patch_size=2, n_head=1)
    assert calls == [("window_attention", "reference")]


# --- Triton backend: parity of the output and of every gradient (q, k, v, bias) ----------------------

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (B, T, C, H, W, mode, grid, patch, n_head, stride_qk, flags, bias, dtype): edge sizes of the token tile
# (N = 1, 15, 16, 17, 64 against BLOCK_N 16/32/64) and of the head-dim chunk (hc 1 .. 65 against
# BLOCK_D 16/64), q/k strided, T = 1 and T > 1, odd batches, every score form, bias on and off.
TRITON_CASES = [
    (1, 1, 4, 4, 4, "local", (4, 4), 1, 1, 1, {}, True, "fp32"),  # N 16, hc 4
    (3, 1, 2, 1, 17, "local", (1, 17), 1, 2, 1, {}, False, "bf16"),  # N 17, hc 1, odd batch
    (1, 2, 2, 6, 10, "local", (3, 5), 2, 2, 2, {}, True, "fp16"),  # N 15, hc_qk 1 vs hc_v 4
    (1, 1, 2, 4, 4, "global", (1, 1), 2, 1, 1, {"normalize_qk": True}, False, "fp32"),  # N 1, hc 8
    (1, 1, 65, 2, 2, "global", (2, 2), 1, 1, 1, {"cosine": True}, True, "bf16"),  # hc 65: two chunks
    (1, 3, 3, 2, 6, "global", (2, 3), (1, 2), 2, 1, {"cosine": True}, False, "fp32"),  # T 3, hc 3
    (1, 1, 2, 8, 8, "local", (8, 8), 1, 2, 1, {}, True, "fp32"),  # N 64
    (1, 1, 2, 4, 8, "local", (2, 2), (2, 4), 1, 2, {"normalize_qk": True}, True, "bf16"),  # hc_qk 4, hc_v 16
    (1, 1, 1, 4, 16, "global", (4, 16), 1, 1, 1, {}, False, "fp16"),  # N 64 (the largest tile)
    (1, 2, 16, 4, 4, "global", (2, 2), 2, 2, 2, {"cosine": True}, True, "fp16"),  # hc_qk 8, hc_v 32
    # channel-plane kernels (heads of whole channels, unstrided): 3 x 3 patches of 3 x 3 pixels (token columns
    # and pixel rows / columns not powers of two, split over sub-blocks), 3 windows in blocks of 2
    (1, 1, 2, 6, 27, "local", (2, 3), (3, 3), 9, 1, {"cosine": True}, True, "fp32"),
    (2, 1, 4, 6, 12, "global", (3, 2), (1, 2), 4, 1, {"normalize_qk": True}, True, "bf16"),  # 3 window rows
    # 64 tokens: one head per sub-block, 2-D products (wgmma on sm_90) instead of batched ones
    (1, 2, 2, 16, 16, "global", (8, 8), 2, 4, 1, {"cosine": True}, True, "bf16"),
    # heads of whole pixels (hc 8 = 4 pixels x 2 channels): pixel-fastest element order, heads split over programs
    (1, 2, 2, 4, 8, "local", (2, 2), (2, 4), 2, 1, {}, True, "fp16"),
    # long groups (N > 64: blocked kernels, online softmax; 16-token blocks in the interpreter)
    (1, 1, 2, 5, 13, "global", (5, 13), 1, 1, 1, {"cosine": True}, True, "fp32"),  # N 65, hc 2
    (1, 1, 4, 8, 10, "local", (8, 10), 1, 1, 1, {"normalize_qk": True}, False, "bf16"),  # N 80, hc 4
    (1, 1, 8, 18, 16, "global", (9, 8), 2, 1, 2, {}, True, "fp16"),  # N 72, strided q/k: hc_qk 8, hc_v 32
]


def _replayed_seed(torch_seed: int) -> int:
    """The dropout seed a fast backend draws right after ``torch.manual_seed(torch_seed)``."""
    from fm_engine.kernels._attention_dropout import draw_seed

    torch.manual_seed(torch_seed)
    return draw_seed()


def _run_parity(B, T, C, H, W, mode, grid, patch, n_head, s, flags, bias, dtype, device, scale=None, dropout_p=0.0):
    dt = DTYPES[dtype]
    kw = {"num_patches": grid} if mode == "local" else {"num_windows": grid}
    q, k, v = _inputs(B, T, C, H, W, s, dtype=dt, device=device)
    n = grid[0] * grid[1]  # tokens per group: patches of a window (local) or windows (global)
    inputs = [q, k, v]
    if bias:
        inputs.append(0.1 * torch.randn(n_head, n, n, dtype=dt, device=device))
    common = {"mode": mode, "patch_size": patch, "n_head": n_head, "scale": scale, **kw, **flags}
    torch_seed = int(torch.randint(0, 2**31 - 1, (1,)))

    def fast(q, k, v, *b):
        torch.manual_seed(torch_seed)  # the kernels' dropout seed is the next draw (replayed below)
        return window_attention(
            q, k, v, rel_pos_bias=b[0] if b else None, dropout_p=dropout_p, backend="triton", **common
        )

    def reference(q, k, v, *b):
        mask = None
        if dropout_p > 0:  # the kernels' own keep mask, [B, T, groups, n_head, N, N]
            from fm_engine.kernels._attention_dropout import dropout_keep_mask

            g = geometry(
                q, v, mode=mode, num_patches=kw.get("num_patches"), num_windows=kw.get("num_windows"),
                patch_size=patch, n_head=n_head,
            )  # fmt: skip
            shape = (B, T, g.n_groups, n_head, g.n_tokens, g.n_tokens)
            mask = dropout_keep_mask(_replayed_seed(torch_seed), shape, dropout_p, q.device)
        return window_attention_reference(
            q, k, v, rel_pos_bias=b[0] if b else None, dropout_p=dropout_p, dropout_mask=mask, **common
        )

    name = f"window_attention[{mode} {flags} {dtype} p={dropout_p}]"
    with _dispatch.trace() as calls:
        assert_parity(fast, reference, inputs, name=name)
    assert ("window_attention", "triton") in calls


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: f"{c[5]}-N{c[6][0] * c[6][1]}-C{c[2]}-{c[12]}")
def test_triton_parity(case, device):
    _run_parity(*case, device=device)


@pytest.mark.parametrize("draw", range(3))
def test_triton_parity_random_config(draw, device):
    # a fresh configuration every run (drawn from the printed torch seed)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))

    def pick(xs):
        return xs[int(torch.randint(len(xs), (1,), generator=g))]

    mode = pick(["local", "global"])
    grid = (pick([1, 2, 3]), pick([1, 2, 5]))
    patch = (pick([1, 2]), 2)
    s = pick([1, 2]) if patch[0] == 2 else 1
    n_head = pick([1, 2])
    C = n_head * pick([1, 2, 3])
    # cosine of 1-element heads is +-1 with a zero gradient: the parity rule has no scale to measure against
    hc_qk = C * (patch[0] // s) * (patch[1] // s) // n_head
    flags = pick([{}, {"cosine": True}]) if hc_qk >= 2 else {}
    # the other factor of the frame: windows (local) or patches per window (global)
    H, W = grid[0] * patch[0] * pick([1, 2]), grid[1] * patch[1] * pick([1, 2])
    _run_parity(
        pick([1, 3]),
        pick([1, 2]),
        C,
        H,
        W,
        mode,
        grid,
        patch,
        n_head,
        s,
        flags,
        pick([False, True]),
        pick(list(DTYPES)),
        device,
        scale=pick([None, 0.7]),
    )


# (B, T, C, H, W, mode, grid, patch, n_head, stride_qk, flags, bias, dtype, dropout_p): dropout on softmax + bias,
# every score form, partial tiles (N 15, 17), several groups and heads so the counters of different rows differ.
DROPOUT_CASES = [
    (2, 2, 4, 8, 8, "local", (2, 2), 2, 2, 1, {"cosine": True}, True, "fp32", 0.3),
    (1, 2, 2, 6, 10, "local", (3, 5), 2, 2, 2, {}, True, "bf16", 0.5),  # N 15, strided q/k
    (1, 1, 2, 2, 17, "global", (1, 17), 1, 1, 1, {"normalize_qk": True}, False, "fp16", 0.2),  # N 17
    (2, 1, 4, 4, 8, "global", (2, 2), (1, 2), 4, 1, {}, True, "bf16", 0.1),
    (1, 1, 2, 6, 27, "local", (2, 3), (3, 3), 9, 1, {}, True, "fp32", 0.3),  # plane kernels, per-key draws
    (1, 1, 2, 5, 13, "global", (5, 13), 1, 1, 1, {"cosine": True}, True, "bf16", 0.2),  # long groups, N 65
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: f"{c[5]}-N{c[6][0] * c[6][1]}-{c[12]}-p{c[13]}")
def test_triton_dropout_parity(case, device):
    """Output and every gradient against the reference applying the kernels' own keep mask."""
    *args, dropout_p = case
    _run_parity(*args, device=device, dropout_p=dropout_p)


def test_plane_tiles_take_tensor_core_shapes():
    # every plane tile is at least 16 tokens x 16 head elements (tl.dot's smallest), and a 64-token group runs one
    # head per sub-block (2-D products) while 16-token groups batch many heads
    from fm_engine.kernels import window_attention as K

    def geo(mode, nP, nW, C=32, n_head=32, p=2):
        side = nP * nW * p
        n, groups = (nP * nP, nW * nW) if mode == K.MODE_LOCAL else (nW * nW, nP * nP)
        hc = C * p * p // n_head
        return {"T": 1, "C": C, "Hq": side, "Wq": side, "H": side, "W": side, "N": n, "n_groups": groups,
                "nWw": nW, "nPh": nP, "nPw": nP, "phq": p, "pwq": p, "ph": p, "pw": p, "n_head": n_head,
                "D_QK": hc, "D_V": hc, "programs": groups * n_head}  # fmt: skip

    for kind in ("fwd", "bwd"):
        for i, cfg in enumerate(K.plane_configs(kind, 90)):
            local = K.plane_tile(geo(K.MODE_LOCAL, 4, 8), K.MODE_LOCAL, cfg)
            glob = K.plane_tile(geo(K.MODE_GLOBAL, 4, 8), K.MODE_GLOBAL, cfg)
            tiny = K.plane_tile(geo(K.MODE_LOCAL, 2, 2, C=2, n_head=8), K.MODE_LOCAL, cfg)
            if i == 0:  # the default takes every one of them (the others may leave one to the default)
                assert None not in (local, glob, tiny)
            for t in (local, glob, tiny):
                if t is not None:
                    assert t["T1P"] * t["TXP"] >= 16 and t["DP"] >= 16, t
                    assert 4 <= t["num_warps"] <= 8, t
            if glob is not None:
                assert glob["T1P"] * glob["TXP"] == 64 and glob["GBP"] * glob["RYP"] * glob["RXP"] == 1, glob
            assert local["GBP"] * local["RYP"] * local["RXP"] > 1, local


def test_bias_gradient_partials_over_chunks(monkeypatch, device):
    # few programs: each sums several (frame, group) pairs, the last chunk a partial one; the bias gradient still
    # matches the reference, and the backward is bitwise reproducible (fixed-order sums, no atomics)
    from fm_engine.kernels.window_attention import _launch

    geo = {"N": 4, "n_head": 2, "programs": 2 * 2 * 4 * 2, "D_V": 4, "C": 4, "pw": 2}
    monkeypatch.setattr(_launch, "BIAS_GRAD_PROGRAMS", 5)
    plan = _launch.bias_grad_plan(geo)
    assert plan["chunks"] == 3 and plan["per_chunk"] == 6, plan  # 16 pairs in chunks of 6, 6, 4
    _run_parity(2, 2, 4, 8, 8, "local", (2, 2), 2, 2, 1, {}, True, "fp32", device)
    _run_parity(2, 2, 4, 8, 8, "local", (2, 2), 2, 2, 1, {"cosine": True}, True, "bf16", device, dropout_p=0.3)
    q, k, v = (x.requires_grad_() for x in _inputs(2, 2, 4, 8, 8, 1, dtype=torch.bfloat16, device=device))
    bias = (0.1 * torch.randn(2, 4, 4, device=device, dtype=torch.bfloat16)).requires_grad_()
    g = torch.randn(v.shape, device=device, dtype=torch.bfloat16)
    kw = {"mode": "local", "num_patches": 2, "patch_size": 2, "n_head": 2, "dropout_p": 0.3, "backend": "triton"}
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        o = window_attention(q, k, v, rel_pos_bias=bias, **kw)
        runs.append((o, *torch.autograd.grad(o, (q, k, v, bias), g)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_every_window_kernel_is_in_the_compile_gate():
    # the gate's own check looks at the kernel modules' top level; this package keeps its kernels in submodules
    import os
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, triton; from fm_engine.kernels import _aot;"
        "import fm_engine.kernels.window_attention as P;"
        "seen = {id(c.fn) for c in _aot.all_cases()};"
        "mods = [importlib.import_module(f'{P.__name__}.{m.name}') for m in pkgutil.iter_modules(P.__path__)];"
        "fns = {id(o): f'{m.__name__}.{a}' for m in mods for a, o in vars(m).items()"
        " if isinstance(o, triton.runtime.JITFunction) and o.__module__ == m.__name__"
        " and any(n.endswith('_ptr') for n in o.arg_names) and a not in getattr(P, 'AOT_HELPERS', set())};"
        "print(len(fns)); print('\\n'.join(sorted(v for k, v in fns.items() if k not in seen)))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert int(lines[0]) >= 8, lines  # 2 general, 3 long-group, 2 channel-plane, 1 bias-gradient kernels
    assert lines[1:] == [], f"window-attention kernels missing from the compile gate: {lines[1:]}"


def test_triton_dropout_seed_is_reproducible_and_fresh(device):
    q, k, v = _inputs(1, 2, 4, 8, 8, 1, dtype=torch.float32, device=device)
    kw = {"mode": "local", "num_patches": 2, "patch_size": 2, "n_head": 2, "dropout_p": 0.5, "backend": "triton"}
    torch.manual_seed(7)
    a = window_attention(q, k, v, **kw)
    b = window_attention(q, k, v, **kw)  # the next seed: another mask
    torch.manual_seed(7)
    c = window_attention(q, k, v, **kw)
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_triton_backend_refusals_name_the_reason(device):
    q, k, v = _inputs(1, 1, 2, 4, 4, 1, dtype=torch.float32, device=device)
    kw = {"mode": "local", "num_patches": 2, "patch_size": 2, "n_head": 2}
    # dropout runs on the kernels now: explain() accepts it on the Triton backend
    text = str(_dispatch.explain(window_attention, q, k, v, dropout_p=0.2, backend="triton", **kw))
    assert "triton     yes" in text, text
    with _dispatch.trace() as calls:
        window_attention(q, k, v, dropout_p=0.2, backend="triton", **kw)
    assert calls == [("window_attention", "triton")]
    with pytest.raises(_dispatch.BackendUnsupportedError, match="float64"):
        window_attention(q.double(), k.double(), v.double(), backend="triton", **kw)
    # groups of more than 64 tokens run the long kernels, with head dims up to 256
    big = _inputs(1, 1, 300, 5, 13, 1, dtype=torch.float32, device=device)  # 65 tokens, hc 300
    with pytest.raises(_dispatch.BackendUnsupportedError, match="65 tokens per attention group with head dims"):
        window_attention(*big, mode="global", num_windows=(5, 13), patch_size=1, n_head=1, backend="triton")


def test_triton_reads_non_contiguous_inputs(device):
    q, k, v = _inputs(1, 2, 2, 4, 4, 1, dtype=torch.float32, device=device)
    qt = q.transpose(3, 4).contiguous().transpose(3, 4)  # same values, other strides
    kw = {"mode": "global", "num_windows": 2, "patch_size": 1, "n_head": 1}
    torch.testing.assert_close(
        window_attention(qt, k, v, backend="triton", **kw), window_attention(q, k, v, backend="reference", **kw)
    )


def test_triton_under_torch_compile(device):
    q, k, v = (x.requires_grad_() for x in _inputs(1, 2, 2, 4, 4, 1, dtype=torch.float32, device=device))
    bias = (0.1 * torch.randn(2, 4, 4, device=device)).requires_grad_()

    def f(q, k, v, b):
        return window_attention(
            q, k, v, mode="local", num_patches=2, patch_size=2, n_head=2, rel_pos_bias=b, cosine=True, backend="triton"
        )

    g = torch.randn(v.shape, device=device)
    want = f(q, k, v, bias)
    want_grads = torch.autograd.grad(want, (q, k, v, bias), g)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, bias)
    got_grads = torch.autograd.grad(got, (q, k, v, bias), g)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


# --- GPU: parity at the benchmark shapes ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["local", "global"])
def test_gpu_parity_production_shape(mode, dtype):
    # MRI production: B 16, T 12, C 32, 64 x 64, window 8, patch 2, 32 heads (hc 4), cosine, no bias
    grid = (4, 4) if mode == "local" else (8, 8)
    _run_parity(16, 12, 32, 64, 64, mode, grid, 2, 32, 1, {"cosine": True}, False, dtype, torch.device("cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["local", "global"])
def test_gpu_parity_parser_default_shape(mode):
    # window 64 / patch 16, 32 heads (hc 256), relative-position bias on, Q/K stride 2
    grid = (4, 4) if mode == "local" else (2, 2)
    _run_parity(2, 4, 32, 128, 128, mode, grid, 16, 32, 2, {}, True, "bf16", torch.device("cuda"))


@pytest.mark.gpu
def test_gpu_parity_long_groups_and_dropout():
    # global attention over 16 x 16 windows (N 256: the blocked kernels), and the production local shape with
    # attention dropout (the channel-plane kernels)
    dev = torch.device("cuda")
    _run_parity(2, 2, 32, 128, 128, "global", (16, 16), 2, 32, 1, {"cosine": True}, True, "bf16", dev)
    _run_parity(4, 3, 32, 64, 64, "local", (4, 4), 2, 32, 1, {"cosine": True}, False, "bf16", dev, dropout_p=0.1)
