"""Literal definitions of every op, written from the ops' documented semantics (module docstrings of
fm_engine/ops/*) and nothing else: no fm_engine code, no torch.nn.functional, explicit loops over tokens,
windows and heads, float64. tests/test_references.py checks each op's eager reference against these on its own,
forward and gradient; tests/test_arguments.py uses them for arguments at non-default values.

Small shapes only: the loops are Python loops.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def relu2(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) squared, element by element: +0.0 for x <= 0 (also -0.0 and -inf), NaN for NaN."""
    flat = [v * v if v > 0 else (math.nan if math.isnan(v) else 0.0) for v in x.double().flatten().tolist()]
    return torch.tensor(flat, dtype=F64).reshape(x.shape)


def relu2_grad(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """d relu2 / dx * dy = 2 x dy for x > 0, 0 for x <= 0, NaN for NaN."""
    out = []
    for v, g in zip(x.double().flatten().tolist(), dy.double().flatten().tolist(), strict=True):
        out.append(2.0 * v * g if v > 0 else (math.nan if math.isnan(v) else 0.0))
    return torch.tensor(out, dtype=F64).reshape(x.shape)


def relu2_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, keep: torch.Tensor | None = None, p: float = 0.0):
    """y[m, o] = sum_j w2[o, j] * drop(relu(h[m, j]) ** 2), h[m, j] = sum_d x[m, d] w1[j, d]; ``keep`` [M, H] bool:
    the dropout keep mask (kept values scaled by 1 / (1 - p)). x: [..., D] -> [..., O]."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    rows = []
    for m in range(x2.shape[0]):
        h = (x2[m][None, :] * w1).sum(-1)  # [H]
        a = torch.where(h > 0, h * h, torch.where(torch.isnan(h), h, torch.zeros_like(h)))
        if keep is not None:
            a = torch.where(keep.reshape(-1, w1.shape[0])[m], a / (1.0 - p), torch.zeros_like(a))
        rows.append((a[None, :] * w2).sum(-1))
    out = torch.stack(rows) if rows else x2.new_zeros(0, w2.shape[0])
    return out.reshape(*lead, w2.shape[0])


def _softmax_row(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max())
    return e / e.sum()


def cross_attention(q, k, v, *, kv_heads, scale=None, key_padding_mask=None, keep=None, p=0.0):
    """q [B, Hq, Nq, D], k / v [B, kv_heads, Nk, D]; query head h reads KV head h // (Hq / kv_heads); padding keys
    (mask True) are left out; a query with every key padded gives 0. ``keep`` [B, Hq, Nq, Nk]: dropout keep mask."""
    B, Hq, Nq, D = q.shape
    group = Hq // kv_heads
    s = 1.0 / math.sqrt(D) if scale is None else scale
    out = [[[None] * Nq for _ in range(Hq)] for _ in range(B)]
    for b in range(B):
        for h in range(Hq):
            kh = h // group
            for i in range(Nq):
                keys = [j for j in range(k.shape[2]) if key_padding_mask is None or not bool(key_padding_mask[b, j])]
                if not keys:
                    out[b][h][i] = q.new_zeros(v.shape[-1]) * q[b, h, i].sum()  # 0, connected to the graph
                    continue
                scores = torch.stack([(q[b, h, i] * k[b, kh, j]).sum() * s for j in keys])
                w = _softmax_row(scores)
                if keep is not None:
                    w = torch.stack([w[n] * keep[b, h, i, j] / (1.0 - p) for n, j in enumerate(keys)])
                out[b][h][i] = sum(w[n] * v[b, kh, j] for n, j in enumerate(keys))
    return torch.stack([torch.stack([torch.stack(out[b][h]) for h in range(Hq)]) for b in range(B)])


def _scores(qi, kj, *, scale, cosine, normalize_qk):
    """One score of the ST-CNNT forms: plain, cosine (unit vectors), or normalize_qk (z-scores, unbiased
    variance, eps = machine epsilon of the input dtype); cosine wins when both are set."""
    if cosine:
        qi = qi / torch.clamp(torch.sqrt((qi * qi).sum()), min=1e-12)
        kj = kj / torch.clamp(torch.sqrt((kj * kj).sum()), min=1e-12)
    elif normalize_qk:
        eps = torch.finfo(qi.dtype).eps
        n = qi.numel()

        def z(t):
            mu = t.sum() / n
            return (t - mu) / torch.sqrt(((t - mu) ** 2).sum() / (n - 1) + eps)

        qi, kj = z(qi), z(kj)
    return (qi * kj).sum() * scale


def _attend(qs, ks, vs, *, scale, cosine, normalize_qk, causal=False, bias=None, keep=None, p=0.0):
    """qs, ks, vs: lists of N vectors -> list of N output vectors. bias [N, N] is added after the softmax."""
    n = len(qs)
    out = []
    for i in range(n):
        js = [j for j in range(n) if not causal or j <= i]
        w = _softmax_row(torch.stack([_scores(qs[i], ks[j], scale=scale, cosine=cosine, normalize_qk=normalize_qk)
                                      for j in js]))  # fmt: skip
        row = []
        for m, j in enumerate(js):
            a = w[m] + (bias[i, j] if bias is not None else 0.0)
            if keep is not None:
                a = a * keep[i, j] / (1.0 - p)
            row.append(a * vs[j])
        out.append(sum(row))
    return out


def temporal_attention(q, k, v, *, n_head, scale=None, cosine=False, normalize_qk=False, causal=False, keep=None,
                       p=0.0):  # fmt: skip
    """q, k [B, T, C, Hq, Wq], v [B, T, C, H, W]; head h of frame t is the h-th contiguous chunk of the frame
    flattened in (C, H, W) order; T x T attention per (batch, head). keep: [B, n_head, T, T]."""
    B, T = v.shape[:2]
    dq, dv = q[0, 0].numel() // n_head, v[0, 0].numel() // n_head
    s = (1.0 if cosine else 1.0 / math.sqrt(dq)) if scale is None else scale
    frames = []
    for b in range(B):
        per_t = [[] for _ in range(T)]
        for h in range(n_head):
            qs = [q[b, t].flatten()[h * dq : (h + 1) * dq] for t in range(T)]
            ks = [k[b, t].flatten()[h * dq : (h + 1) * dq] for t in range(T)]
            vs = [v[b, t].flatten()[h * dv : (h + 1) * dv] for t in range(T)]
            o = _attend(qs, ks, vs, scale=s, cosine=cosine, normalize_qk=normalize_qk, causal=causal,
                        keep=None if keep is None else keep[b, h], p=p)  # fmt: skip
            for t in range(T):
                per_t[t].append(o[t])
        frames.append(torch.stack([torch.cat(per_t[t]).reshape(v.shape[2:]) for t in range(T)]))
    return torch.stack(frames)


def window_attention(q, k, v, *, mode="local", num_patches=None, num_windows=None, patch_size, n_head, scale=None,
                     cosine=False, normalize_qk=False, rel_pos_bias=None, keep=None, p=0.0):  # fmt: skip
    """ST-CNNT local / global attention, token by token (see fm_engine/ops/window_attention.py's docstring).

    A frame axis is cut as windows x patches per window x patch pixels (windows outermost); a token is one patch
    flattened in (row, column, channel) order, channel fastest; head h is the h-th contiguous chunk. Local: the
    patches of one window attend to each other (token = patch row-major in the window); global: the patches at
    one position in every window (token = window row-major). keep: [B, T, groups, n_head, N, N]."""

    def two(x):
        return (x, x) if isinstance(x, int) else tuple(x)

    B, T, C, H, W = v.shape
    Hq, Wq = q.shape[3:]
    ph, pw = two(patch_size)
    if mode == "local":
        nPh, nPw = two(num_patches)
        nWh, nWw = H // (nPh * ph), W // (nPw * pw)
    else:
        nWh, nWw = two(num_windows)
        nPh, nPw = H // (nWh * ph), W // (nWw * pw)
    phq, pwq = Hq // (nWh * nPh), Wq // (nWw * nPw)
    dq, dv = C * phq * pwq // n_head, C * ph * pw // n_head
    s = (1.0 if cosine else 1.0 / math.sqrt(dq)) if scale is None else scale
    if mode == "local":
        groups = [
            [(wi, wj, pi, pj) for pi in range(nPh) for pj in range(nPw)] for wi in range(nWh) for wj in range(nWw)
        ]
    else:
        groups = [
            [(wi, wj, pi, pj) for wi in range(nWh) for wj in range(nWw)] for pi in range(nPh) for pj in range(nPw)
        ]

    def token(x, b, t, where, a, c):
        wi, wj, pi, pj = where
        r0, c0 = (wi * nPh + pi) * a, (wj * nPw + pj) * c
        return torch.stack([x[b, t, ch, r0 + r, c0 + cc] for r in range(a) for cc in range(c) for ch in range(C)])

    pieces = {}
    for b in range(B):
        for t in range(T):
            for gi, g in enumerate(groups):
                qt = [token(q, b, t, w, phq, pwq) for w in g]
                kt = [token(k, b, t, w, phq, pwq) for w in g]
                vt = [token(v, b, t, w, ph, pw) for w in g]
                heads = []
                for h in range(n_head):
                    bias = None if rel_pos_bias is None else rel_pos_bias[h]
                    mask = None if keep is None else keep[b, t, gi, h]
                    qh, kh = [x[h * dq : (h + 1) * dq] for x in qt], [x[h * dq : (h + 1) * dq] for x in kt]
                    vh = [x[h * dv : (h + 1) * dv] for x in vt]
                    heads.append(
                        _attend(
                            qh, kh, vh, scale=s, cosine=cosine, normalize_qk=normalize_qk, bias=bias, keep=mask, p=p
                        )
                    )
                for n, w in enumerate(g):
                    vec = torch.cat([heads[h][n] for h in range(n_head)])
                    wi, wj, pi, pj = w
                    r0, c0 = (wi * nPh + pi) * ph, (wj * nPw + pj) * pw
                    i = 0
                    for r in range(ph):
                        for cc in range(pw):
                            for ch in range(C):
                                pieces[(b, t, ch, r0 + r, c0 + cc)] = vec[i]
                                i += 1
    return torch.stack([pieces[(b, t, ch, r, c)] for b in range(B) for t in range(T) for ch in range(C)
                        for r in range(H) for c in range(W)]).reshape(v.shape)  # fmt: skip


def patch_embed(image, weight, bias, norm_weight, norm_bias, pos_weight, pos_bias, *, patch, pool_to=None,
                intensity_scale=1.0, intensity_offset=0.0, eps=1e-5):  # fmt: skip
    """tokens [B, Ht*Wt, D] in float64: x = image * scale + offset; per patch (i, j) and feature d,
    f = bias[d] + sum_{c, r, s} weight[d, c, r, s] x[c, i p + r, j p + s]; optional adaptive max pool (bin i of n
    over L covers [floor(i L / n), ceil((i + 1) L / n))); LayerNorm over d (biased variance, eps); + position
    pos_weight[d, 0] u_i + pos_weight[d, 1] v_j + pos_bias[d], u = linspace(-1, 1, Ht) (0 for one row)."""
    B, _, H, W = image.shape
    D = weight.shape[0]
    x = image.to(F64) * intensity_scale + intensity_offset
    gh, gw = H // patch, W // patch
    feats = {}
    for b in range(B):
        for i in range(gh):
            for j in range(gw):
                px = x[b, :, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
                feats[(b, i, j)] = torch.stack([bias[d] + (weight[d] * px).sum() for d in range(D)])
    th, tw = (gh, gw) if pool_to is None else tuple(pool_to)

    def bins(n, length):
        return [range(math.floor(a * length / n), math.ceil((a + 1) * length / n)) for a in range(n)]

    def coord(a, n):
        return 0.0 if n == 1 else -1.0 + 2.0 * a / (n - 1)

    out = []
    for b in range(B):
        toks = []
        for a, rows in enumerate(bins(th, gh) if pool_to is not None else [[i] for i in range(gh)]):
            for c, cols in enumerate(bins(tw, gw) if pool_to is not None else [[j] for j in range(gw)]):
                f = torch.stack([feats[(b, i, j)] for i in rows for j in cols]).max(dim=0).values
                mu = f.sum() / D
                var = ((f - mu) ** 2).sum() / D
                y = (f - mu) / torch.sqrt(var + eps) * norm_weight + norm_bias
                toks.append(y + pos_weight[:, 0] * coord(a, th) + pos_weight[:, 1] * coord(c, tw) + pos_bias)
        out.append(torch.stack(toks))
    return torch.stack(out)
