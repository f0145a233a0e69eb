"""Spatial patch-token attention on [B, T, C, H, W]: ST-CNNT local and global attention (docs/KERNELS.md K1).

``window_attention(q, k, v, *, mode, num_patches | num_windows, patch_size, n_head, scale=None,
cosine=False, normalize_qk=False, rel_pos_bias=None, dropout_p=0.0)`` -> o: [B, T, C, H, W].

Geometry (docs/MODELS.md 2.3, 2.4). Each frame axis is cut as ``H = nWh * nPh * ph`` (windows, patches per
window, patch pixels; W likewise), windows outermost. A token is one patch flattened in (ph, pw, C)
order with C fastest; head h is the contiguous chunk ``[h*hc, (h+1)*hc)`` of that vector.

* ``mode="local"``: ``num_patches`` (nPh, nPw) and ``patch_size`` are given; the window count follows
  H, W. The tokens of one window attend to each other (N = nPh*nPw tokens, row-major).
* ``mode="global"`` (MaxViT grid): ``num_windows`` (nWh, nWw) and ``patch_size`` are given; the patches
  per window follow H, W. The tokens at one patch position in every window attend to each other
  (N = nWh*nWw tokens, row-major over windows). Height and width use their own window counts (the
  original used the height count for the width as well; **fixed**).

q, k: [B, T, C, Hq, Wq] may be smaller than v: [B, T, C, H, W] (strided Q/K conv): they are cut into
the same window / patch grid, so their patches are ``Hq / (nWh*nPh)`` x ``Wq / (nWw*nPw)`` pixels and
their head dim ``hc_qk`` is smaller than v's ``hc_v``.

Scores per (frame, group, head), from q_i, k_j in R^hc_qk:
    plain:        scale * q_i . k_j                               (scale defaults to 1/sqrt(hc_qk))
    cosine:       scale * normalize(q_i) . normalize(k_j)          (scale defaults to 1: no temperature)
    normalize_qk: scale * z(q_i) . z(k_j), z(x) = (x - mean x) / sqrt(unbiased var x + eps),
                  eps = machine epsilon of the input dtype (needs hc_qk >= 2)
``cosine`` wins when both flags are set (the original's order). Then
    A = softmax(scores) + rel_pos_bias[h]      (bias added AFTER the softmax: kept from the original)
    o = dropout(A) @ v
``rel_pos_bias``: [n_head, N, N], the bias already gathered for every (query token, key token) pair in
the token order above (the module owns the Swin-style table and its index, see
fm_engine.nn.stcnnt_attention); same dtype as q; it receives a gradient.

Backends: reference (eager, partitions the frame into tokens), triton (the package kernels/window_attention/:
reads q, k, v and writes o in place in the [B, T, C, H, W] layout; products on tensor cores for fp16 / bf16,
exact IEEE fp32 for fp32; backward recomputes the attention matrix from q and k; groups of more than 64 tokens
run blocked kernels, with head dims up to 256, whose backward also keeps o and the rows' log-sum-exp; the bias
gradient is summed from per-program partials in a fixed order, so the backward is deterministic). Dropout on
the Triton backend regenerates its keep mask from a seed drawn from torch's CPU generator
(kernels/_attention_dropout.py), so it differs from the
reference's draw; the mask of a seed is ``dropout_keep_mask(seed, [B, T, groups, n_head, N, N], p)`` and the
reference replays a given mask through ``dropout_mask``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fm_engine.ops import _checks
from fm_engine.ops._dispatch import Op, OpCall, public, triton_available, triton_device_ok

MODES = ("local", "global")
# The score forms by name (the kernels' SCORE_DOT, SCORE_COSINE, SCORE_STANDARDIZE; see :func:`score_form`).
SCORES = ("dot", "cosine", "standardize")
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Groups of up to this many tokens keep their whole N x N score matrix in registers; larger ones run the long
# kernels (blocked, online softmax), which hold whole head rows: head dims up to MAX_TRITON_HEAD there
# (kernels/window_attention/long_groups.py).
MAX_REGISTER_TOKENS = 64
MAX_TRITON_HEAD = 256


def pair(name: str, x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or a pair of positive ints -> (h, w); ValueError naming ``name`` otherwise."""
    if isinstance(x, int) and not isinstance(x, bool):
        x = (x, x)
    if (
        not isinstance(x, (tuple, list))
        or len(x) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in x)
    ):
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints, got {x!r}")
    return int(x[0]), int(x[1])


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How a frame is cut (v's patch pixels ph, pw; q/k's phq, pwq) and the attention sizes."""

    mode: str
    nWh: int
    nWw: int
    nPh: int
    nPw: int
    ph: int
    pw: int
    phq: int
    pwq: int
    n_tokens: int  # N: tokens per attention group
    n_groups: int  # groups per frame
    hc_qk: int
    hc_v: int


def score_form(cosine: bool, normalize_qk: bool) -> str:
    """The score form of the flags, one of :data:`SCORES` (``cosine`` wins when both are set)."""
    return "cosine" if cosine else ("standardize" if normalize_qk else "dot")


def geometry(
    q: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str,
    num_patches: int | tuple[int, int] | None,
    num_windows: int | tuple[int, int] | None,
    patch_size: int | tuple[int, int],
    n_head: int,
) -> Geometry:
    """Resolve and check the window / patch grid of q [B, T, C, Hq, Wq] and v [B, T, C, H, W]."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    ph, pw = pair("patch_size", patch_size)
    C, H, W = v.shape[2], v.shape[3], v.shape[4]
    Hq, Wq = q.shape[3], q.shape[4]
    if mode == "local":
        if num_patches is None:
            raise ValueError("num_patches: required for mode='local' (patches per window, int or (h, w))")
        nPh, nPw = pair("num_patches", num_patches)
        wh, ww = nPh * ph, nPw * pw
        if H % wh or W % ww:
            raise ValueError(
                f"v: frame {H}x{W} is not divisible into windows of {nPh}x{nPw} patches of {ph}x{pw} pixels "
                f"(window {wh}x{ww})"
            )
        nWh, nWw = H // wh, W // ww
    else:
        if num_windows is None:
            raise ValueError("num_windows: required for mode='global' (windows per frame, int or (h, w))")
        nWh, nWw = pair("num_windows", num_windows)
        if H % (nWh * ph) or W % (nWw * pw):
            raise ValueError(
                f"v: frame {H}x{W} is not divisible into {nWh}x{nWw} windows of whole {ph}x{pw}-pixel patches"
            )
        nPh, nPw = H // (nWh * ph), W // (nWw * pw)
    gh, gw = nWh * nPh, nWw * nPw  # patch grid of the frame
    if Hq % gh or Wq % gw or Hq > H or Wq > W:
        raise ValueError(
            f"q: frame {Hq}x{Wq} does not split into the {gh}x{gw} patch grid of v ({H}x{W}); q and k may only "
            f"be smaller than v by a factor that divides the patch size"
        )
    phq, pwq = Hq // gh, Wq // gw
    if not isinstance(n_head, int) or isinstance(n_head, bool) or n_head < 1:
        raise ValueError(f"n_head: expected a positive int, got {n_head!r}")
    d_v, d_qk = C * ph * pw, C * phq * pwq
    if d_v % n_head or d_qk % n_head:
        raise ValueError(
            f"n_head: {n_head} heads do not divide the token sizes C*ph*pw = {C}*{ph}*{pw} = {d_v} (v) and "
            f"C*phq*pwq = {C}*{phq}*{pwq} = {d_qk} (q, k) into whole head dims"
        )
    if mode == "local":
        n_tokens, n_groups = nPh * nPw, nWh * nWw
    else:
        n_tokens, n_groups = nWh * nWw, nPh * nPw
    return Geometry(mode, nWh, nWw, nPh, nPw, ph, pw, phq, pwq, n_tokens, n_groups, d_qk // n_head, d_v // n_head)


# --- reference ---------------------------------------------------------------------------------


def to_tokens(x: torch.Tensor, g: Geometry, ph: int, pw: int) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, groups, N, ph*pw*C] (token vector in (ph, pw, C) order)."""
    B, T, C = x.shape[:3]
    x = x.reshape(B, T, C, g.nWh, g.nPh, ph, g.nWw, g.nPw, pw)
    if g.mode == "local":
        x = x.permute(0, 1, 3, 6, 4, 7, 5, 8, 2)  # B T nWh nWw | nPh nPw | ph pw C
    else:
        x = x.permute(0, 1, 4, 7, 3, 6, 5, 8, 2)  # B T nPh nPw | nWh nWw | ph pw C
    return x.reshape(B, T, g.n_groups, g.n_tokens, ph * pw * C)


def from_tokens(x: torch.Tensor, g: Geometry, C: int, ph: int, pw: int) -> torch.Tensor:
    """Inverse of :func:`to_tokens`: [B, T, groups, N, ph*pw*C] -> [B, T, C, H, W]."""
    B, T = x.shape[:2]
    if g.mode == "local":
        x = x.reshape(B, T, g.nWh, g.nWw, g.nPh, g.nPw, ph, pw, C).permute(0, 1, 8, 2, 4, 6, 3, 5, 7)
    else:
        x = x.reshape(B, T, g.nPh, g.nPw, g.nWh, g.nWw, ph, pw, C).permute(0, 1, 8, 4, 2, 6, 5, 3, 7)
    return x.reshape(B, T, C, g.nWh * g.nPh * ph, g.nWw * g.nPw * pw)


def default_scale(hc_qk: int, cosine: bool) -> float:
    return 1.0 if cosine else 1.0 / math.sqrt(hc_qk)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    cosine: bool,
    normalize_qk: bool,
    bias: torch.Tensor | None = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ST-CNNT attention core. q, k: [..., heads, N, hc_qk]; v: [..., heads, N, hc_v];
    bias: broadcastable to [..., heads, N, N] -> [..., heads, N, hc_v]. ``dropout_mask`` (bool, [..., heads,
    N, N], True = kept) replaces the random draw when given (tests replay a fast backend's mask)."""
    if cosine:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    elif normalize_qk:
        eps = torch.finfo(q.dtype).eps
        q = (q - q.mean(dim=-1, keepdim=True)) / torch.sqrt(q.var(dim=-1, keepdim=True) + eps)
        k = (k - k.mean(dim=-1, keepdim=True)) / torch.sqrt(k.var(dim=-1, keepdim=True) + eps)
    att = (q @ k.transpose(-2, -1)) * scale
    if causal:
        n = att.shape[-1]
        mask = torch.ones(n, n, dtype=torch.bool, device=att.device).triu(1)
        att = att.masked_fill(mask, float("-inf"))
    att = torch.softmax(att, dim=-1)
    if bias is not None:
        att = att + bias
    if dropout_p > 0.0 and dropout_mask is not None:
        att = att * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        att = F.dropout(att, dropout_p, training=True)
    return att @ v


def window_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "local",
    num_patches: int | tuple[int, int] | None = None,
    num_windows: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int],
    n_head: int,
    scale: float | None = None,
    cosine: bool = False,
    normalize_qk: bool = False,
    rel_pos_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The eager reference. ``dropout_mask``: [B, T, groups, n_head, N, N] bool keep mask to apply instead of a
    fresh draw (tests replay the Triton backend's mask; the public op never passes it)."""
    g = geometry(
        q, v, mode=mode, num_patches=num_patches, num_windows=num_windows, patch_size=patch_size, n_head=n_head
    )
    s = default_scale(g.hc_qk, cosine) if scale is None else scale
    return _reference(q, k, v, g, n_head, s, cosine, normalize_qk, rel_pos_bias, dropout_p, dropout_mask)


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Geometry,
    n_head: int,
    s: float,
    cosine: bool,
    normalize_qk: bool,
    rel_pos_bias: torch.Tensor | None,
    dropout_p: float,
    dropout_mask: torch.Tensor | None,
) -> torch.Tensor:
    """The reference on a resolved geometry ``g`` and scale ``s``."""
    B, T, C = v.shape[:3]

    def heads(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
        t = to_tokens(x, g, ph, pw)  # B T G N D
        return t.reshape(*t.shape[:4], n_head, -1).transpose(3, 4)  # B T G heads N hc

    o = attend(
        heads(q, g.phq, g.pwq),
        heads(k, g.phq, g.pwq),
        heads(v, g.ph, g.pw),
        scale=s,
        cosine=cosine,
        normalize_qk=normalize_qk,
        bias=rel_pos_bias,
        dropout_p=dropout_p,
        dropout_mask=dropout_mask,
    )
    o = o.transpose(3, 4).reshape(B, T, g.n_groups, g.n_tokens, -1)
    return from_tokens(o, g, C, g.ph, g.pw)


# --- validation (once, for every backend) -------------------------------------------------------


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for n, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(n, t)
        _checks.floating(n, t)
        _checks.ndim(n, t, 5, "[B, T, C, H, W]")
    _checks.same_device(q=q, k=k, v=v)
    _checks.same_dtype(q=q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"k: shape {tuple(k.shape)} must equal q's shape {tuple(q.shape)}")
    if q.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"v: leading dims [B, T, C] = {list(v.shape[:3])} must equal q's {list(q.shape[:3])}; "
            f"only H, W may differ (strided Q/K)"
        )


def check_flags(scale: float | None, cosine: bool, normalize_qk: bool, dropout_p: float, hc_qk: int) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected None or a finite float, got {scale!r}")
    if normalize_qk and not cosine and hc_qk < 2:
        raise ValueError(
            f"normalize_qk: needs a q/k head dim of at least 2 (the unbiased variance of one value is undefined), "
            f"got hc_qk = {hc_qk}"
        )
    _checks.probability("dropout_p", dropout_p)


@dataclasses.dataclass(frozen=True)
class WindowAttentionCall(OpCall):
    """A resolved :func:`window_attention` call: the arguments as the public function takes them (constructing
    the record validates them, ValueError naming the argument) and what they resolve to, derived once."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    _: dataclasses.KW_ONLY
    mode: str = "local"
    num_patches: int | tuple[int, int] | None = None
    num_windows: int | tuple[int, int] | None = None
    patch_size: int | tuple[int, int]
    n_head: int
    scale: float | None = None
    cosine: bool = False
    normalize_qk: bool = False
    rel_pos_bias: torch.Tensor | None = None
    dropout_p: float = 0.0
    # derived
    geometry: Geometry = dataclasses.field(init=False, repr=False)
    softmax_scale: float = dataclasses.field(init=False, repr=False)  # ``scale``, or its default
    score: str = dataclasses.field(init=False, repr=False)  # one of SCORES

    def __post_init__(self) -> None:
        q, k, v, n_head = self.q, self.k, self.v, self.n_head
        check_qkv(q, k, v)
        g = geometry(
            q, v, mode=self.mode, num_patches=self.num_patches, num_windows=self.num_windows,
            patch_size=self.patch_size, n_head=n_head,
        )  # fmt: skip
        check_flags(self.scale, self.cosine, self.normalize_qk, self.dropout_p, g.hc_qk)
        bias = self.rel_pos_bias
        if bias is not None:
            _checks.tensor("rel_pos_bias", bias)
            expected = (n_head, g.n_tokens, g.n_tokens)
            if tuple(bias.shape) != expected:
                raise ValueError(
                    f"rel_pos_bias: expected shape [n_head, N, N] = {list(expected)} for {g.n_tokens} tokens per "
                    f"{self.mode} group, got {list(bias.shape)}"
                )
            if bias.dtype != q.dtype:
                raise ValueError(f"rel_pos_bias: dtype {bias.dtype} must equal q's dtype {q.dtype}")
            _checks.same_device(q=q, rel_pos_bias=bias)
        object.__setattr__(self, "geometry", g)
        object.__setattr__(
            self, "softmax_scale", default_scale(g.hc_qk, self.cosine) if self.scale is None else self.scale
        )
        object.__setattr__(self, "score", score_form(self.cosine, self.normalize_qk))


def _bucket(call: WindowAttentionCall) -> tuple[dict, dict]:
    g = call.geometry
    cosine = bool(call.cosine)
    flags = {
        "dtype": call.q.dtype,
        "mode": call.mode,
        "hc_qk": g.hc_qk,
        "hc_v": g.hc_v,
        "tokens": g.n_tokens,
        "cosine": cosine,
        "normalize_qk": bool(call.normalize_qk) and not cosine,
        "bias": call.rel_pos_bias is not None,
        "dropout": float(call.dropout_p) > 0,
    }
    B, T, C, H, W = call.v.shape
    return flags, {"BT": B * T, "C": C, "HW": H * W}


def _reference_call(call: WindowAttentionCall) -> torch.Tensor:
    """The reference backend on the record (the geometry is the record's)."""
    return _reference(
        call.q, call.k, call.v, call.geometry, call.n_head, call.softmax_scale, call.cosine, call.normalize_qk,
        call.rel_pos_bias, call.dropout_p, None,
    )  # fmt: skip


WINDOW_ATTENTION = Op(
    "window_attention", window_attention_reference, WindowAttentionCall, bucket=_bucket, run_reference=_reference_call
)


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mode: str = "local",
    num_patches: int | tuple[int, int] | None = None,
    num_windows: int | tuple[int, int] | None = None,
    patch_size: int | tuple[int, int],
    n_head: int,
    scale: float | None = None,
    cosine: bool = False,
    normalize_qk: bool = False,
    rel_pos_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """ST-CNNT local / global attention (see the module docstring for the exact semantics).

    q, k: [B, T, C, Hq, Wq]; v: [B, T, C, H, W]; rel_pos_bias: [n_head, N, N] or None -> [B, T, C, H, W].
    ``patch_size``: v's patch (pixels, int or (h, w)); ``num_patches`` (local) / ``num_windows`` (global):
    int or (h, w). ``dropout_p`` is applied as given (pass 0.0 in eval).
    """
    return WINDOW_ATTENTION(
        q,
        k,
        v,
        mode=mode,
        num_patches=num_patches,
        num_windows=num_windows,
        patch_size=patch_size,
        n_head=n_head,
        scale=scale,
        cosine=cosine,
        normalize_qk=normalize_qk,
        rel_pos_bias=rel_pos_bias,
        dropout_p=dropout_p,
        backend=backend,
    )


public(WINDOW_ATTENTION, window_attention)


# --- Triton backend ----------------------------------------------------------------------------------
#
# The custom ops take the geometry as the list of sizes GEO_KEYS names (a schema holds no records) and the mode
# and score form by name; their bodies, the boundary to the kernels, turn them into the kernels' arguments (the
# sizes dict and the kernels' named codes, kernels/window_attention/_common.py).

GEO_KEYS = (
    "T",
    "C",
    "Hq",
    "Wq",
    "H",
    "W",
    "N",
    "n_groups",
    "nWw",
    "nPh",
    "nPw",
    "phq",
    "pwq",
    "ph",
    "pw",
    "n_head",
    "D_QK",
    "D_V",
    "programs",
)


def _geo_dict(geo: list[int]) -> dict[str, int]:
    return dict(zip(GEO_KEYS, geo, strict=True))


def _kernel_codes(mode: str, score: str) -> tuple[int, int]:
    """The kernels' codes of a mode and a score form (lazy: the kernels import triton)."""
    from fm_engine.kernels.window_attention import MODE_GLOBAL, MODE_LOCAL, SCORE_COSINE, SCORE_DOT, SCORE_STANDARDIZE

    modes = {"local": MODE_LOCAL, "global": MODE_GLOBAL}
    scores = {"dot": SCORE_DOT, "cosine": SCORE_COSINE, "standardize": SCORE_STANDARDIZE}
    return modes[mode], scores[score]


# The forward draws the dropout seed from torch's CPU generator (so torch.manual_seed makes it reproducible;
# no device sync) and returns it as a CPU tensor, which backward reads to regenerate the same mask.
@torch.library.custom_op("fm_engine::stcnnt_attention_fwd", mutates_args=())
def _fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    geo: list[int],
    mode: str,
    score: str,
    scale: float,
    dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import window_attention as K  # lazy: kernels import triton
    from fm_engine.kernels._attention_dropout import draw_seed

    seed = draw_seed() if dropout_p > 0 else 0
    mode_code, score_code = _kernel_codes(mode, score)
    o, lse = K.forward(
        q,
        k,
        v,
        bias,
        _geo_dict(geo),
        mode=mode_code,
        score=score_code,
        scale=scale,
        dropout_p=dropout_p,
        seed=seed,
    )
    return o, torch.tensor([seed], dtype=torch.int64), lse


@_fwd.register_fake
def _(q, k, v, bias, geo, mode, score, scale, dropout_p):
    g = _geo_dict(geo)
    n_lse = g["programs"] * g["N"] if g["N"] > MAX_REGISTER_TOKENS else 0
    return (
        torch.empty_like(v, memory_format=torch.contiguous_format),
        torch.empty(1, dtype=torch.int64),
        q.new_empty(n_lse, dtype=torch.float32),
    )


@torch.library.custom_op("fm_engine::stcnnt_attention_bwd", mutates_args=())
def _bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    geo: list[int],
    mode: str,
    score: str,
    scale: float,
    seed: torch.Tensor,
    dropout_p: float,
    o: torch.Tensor | None,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from fm_engine.kernels import window_attention as K

    mode_code, score_code = _kernel_codes(mode, score)
    dq, dk, dv, db = K.backward(
        do, q, k, v, bias, _geo_dict(geo), mode=mode_code, score=score_code, scale=scale, dropout_p=dropout_p,
        seed=int(seed.item()), o=o, lse=lse,
    )  # fmt: skip
    return dq, dk, dv, (db if db is not None else q.new_empty(0))


@_bwd.register_fake
def _(do, q, k, v, bias, geo, mode, score, scale, seed, dropout_p, o, lse):
    db = torch.empty_like(bias) if bias is not None else q.new_empty(0)
    c = torch.contiguous_format
    return (
        torch.empty_like(q, memory_format=c),
        torch.empty_like(k, memory_format=c),
        torch.empty_like(v, memory_format=c),
        db,
    )


def _setup_context(ctx, inputs, output):
    q, k, v, bias, geo, mode, score, scale, dropout_p = inputs
    o, seed, lse = output
    # groups of more than MAX_REGISTER_TOKENS run the long kernels, whose backward needs o and the log-sum-exp;
    # the others recompute everything from q, k, v and keep no extra activation
    long = _geo_dict(geo)["N"] > MAX_REGISTER_TOKENS
    ctx.save_for_backward(q, k, v, bias, seed, o if long else None, lse)
    ctx.args = (geo, mode, score, scale)
    ctx.dropout_p = dropout_p


def _backward(ctx, do, _dseed, _dlse):
    q, k, v, bias, seed, o, lse = ctx.saved_tensors
    dq, dk, dv, db = _bwd(do.contiguous(), q, k, v, bias, *ctx.args, seed, ctx.dropout_p, o, lse)
    return dq, dk, dv, (db if bias is not None else None), None, None, None, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def kernel_sizes(call: WindowAttentionCall) -> list[int]:
    """The record's geometry as the kernels' sizes, in :data:`GEO_KEYS` order."""
    g, n_head = call.geometry, call.n_head
    B, T, C, H, W = call.v.shape
    return [
        T,
        C,
        call.q.shape[3],
        call.q.shape[4],
        H,
        W,
        g.n_tokens,
        g.n_groups,
        g.nWw,
        g.nPh,
        g.nPw,
        g.phq,
        g.pwq,
        g.ph,
        g.pw,
        n_head,
        g.hc_qk,
        g.hc_v,
        B * T * g.n_groups * n_head,
    ]


def _triton_window(call: WindowAttentionCall) -> torch.Tensor:
    """Run the fused kernels on a call (autograd-aware, torch.compile-able). Non-contiguous inputs are copied
    once."""
    bias = call.rel_pos_bias
    return _fwd(
        call.q.contiguous(),
        call.k.contiguous(),
        call.v.contiguous(),
        bias.contiguous() if bias is not None else None,
        kernel_sizes(call),
        call.mode,
        call.score,
        float(call.softmax_scale),
        float(call.dropout_p),
    )[0]


def _triton_window_supports(call: WindowAttentionCall) -> str | None:
    """Why the Triton kernels cannot run this call, or None."""
    g, dropout_p = call.geometry, call.dropout_p
    tensors = [call.q, call.k, call.v] + ([call.rel_pos_bias] if call.rel_pos_bias is not None else [])
    reason = triton_device_ok(*tensors)
    if reason is not None:
        return reason
    if tensors[0].dtype not in FAST_DTYPES:
        return f"dtype {tensors[0].dtype} (the Triton kernels take float32, float16, bfloat16)"
    if (reason := _checks.dropout_capture(dropout_p, tensors[0])) is not None:
        return reason
    head_dims = (g.hc_qk, g.hc_v)
    if g.n_tokens > MAX_REGISTER_TOKENS and max(head_dims) > MAX_TRITON_HEAD:
        return (
            f"{g.n_tokens} tokens per attention group with head dims {head_dims}: groups of more than "
            f"{MAX_REGISTER_TOKENS} tokens take head dims up to {MAX_TRITON_HEAD}"
        )
    if call.v[0, 0].numel() >= 2**31:
        return "more than 2**31 elements per frame group (32-bit in-group offsets)"
    return None


# the version covers every module of the kernel package and the shared kernel modules it uses
WINDOW_ATTENTION.register(
    "triton",
    _triton_window,
    available=triton_available,
    supports=_triton_window_supports,
    sources=(
        "fm_engine.kernels.window_attention",
        *(
            f"fm_engine.kernels.window_attention.{m}"
            for m in ("_common", "_gate", "_launch", "bias_grad", "channel_plane", "general", "long_groups")
        ),
        "fm_engine.kernels._aot",
        "fm_engine.kernels._attention_dropout",
        "fm_engine.kernels._autotune",
    ),
)
