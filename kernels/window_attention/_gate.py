"""Compile-gate cases of the window-attention kernels (kernels/_aot.py compiles them for sm_80 and sm_90).

Every case is compiled with the launch's own warps and pipelining depth (``STAGES``). The bias-gradient cases are
strict (a spill fails the gate). The three attention families still register theirs with ``strict=False``: at
their heaviest flags (standardised scores, bias and dropout) the largest tiles spill on sm_90 (general and
plane kernels at 64 tokens or 32 heads per sub-block, every long-group candidate with 4 warps, and the fp32
FMA products of the general and plane kernels at 64-element tiles); the production and parser-default
configurations do not. The gate prints those as SPILL lines."""

from __future__ import annotations

from fm_engine.kernels import _aot

from ._common import MODE_GLOBAL, MODE_LOCAL, SCORE_COSINE, SCORE_DOT, SCORE_STANDARDIZE
from ._launch import (
    _INTS,
    STAGES,
    _long_constexprs,
    _plane_constexprs,
    _warps,
    bias_grad_plan,
    general_stages,
    long_configs,
    long_tile,
    plane_configs,
    plane_tile,
)
from .bias_grad import bias_grad_kernel
from .channel_plane import plane_bwd_kernel, plane_fwd_kernel
from .general import stcnnt_attn_bwd_kernel, stcnnt_attn_fwd_kernel
from .long_groups import long_bwd_dkdv_kernel, long_bwd_dq_kernel, long_fwd_kernel

_DT = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}
STRICT = False  # the attention families' cases (see the module docstring); the bias-gradient cases are strict


def _signature(kernel: str, dt: str) -> dict[str, str]:
    ptrs = (
        ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr")
        if kernel == "fwd"
        else ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "bias_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    )
    sig = {p: _DT[dt] for p in ptrs}
    ints = dict.fromkeys((*_INTS, "heads_per_prog", "D_QK", "D_V", "RUN_QK", "RUN_V", "seed"), "i32")
    return {**sig, **ints, "scale": "fp32", "eps": "fp32", "p_drop": "fp32"}


def register_gate(mode: int, cases: list[tuple[str, dict]]) -> None:
    """Register (dtype, constexpr config) launch cases of both kernels for ``mode``."""
    for dt, cfg in cases:
        full = {"MODE": mode, "SCORE": 0, "HAS_BIAS": False, "DROPOUT": False, "VEC_QK": 1, "VEC_V": 1, **cfg}
        full["num_warps"] = _warps(full["BLOCK_N"])
        for kernel, fn in (("fwd", stcnnt_attn_fwd_kernel), ("bwd", stcnnt_attn_bwd_kernel)):
            stages = general_stages(kernel, 4 if dt == "fp32" else 2)
            _aot.register(
                fn,
                signatures=[_signature(kernel, dt)],
                configs=[{**full, "num_stages": stages}],
                name=f"stcnnt_attn_{kernel}[mode{mode}]",
                strict=STRICT,
            )


# Production local shape (4x4 patches, hc 4 -> BLOCK 16 x 16) in the half types, the parser-default shape
# (hc 256 -> BLOCK_D 64) with standardised scores and bias in fp32, and the largest token tile (64).
# A 128-token tile compiled too (98 KiB shared memory in backward) but took 30 s per compile, so groups
# are limited to 64 tokens (the reference runs larger ones; explain() says so).
register_gate(
    MODE_LOCAL,
    [
        ("bf16", {"BLOCK_N": 16, "BLOCK_D": 16, "SCORE": SCORE_COSINE}),
        ("fp16", {"BLOCK_N": 16, "BLOCK_D": 16, "HAS_BIAS": True}),
        ("fp32", {"BLOCK_N": 16, "BLOCK_D": 64, "SCORE": SCORE_STANDARDIZE, "HAS_BIAS": True}),
        # the parser default: heads of 8 whole pixels of 16-pixel patches load as 16-byte runs
        ("bf16", {"BLOCK_N": 16, "BLOCK_D": 64, "HAS_BIAS": True, "VEC_QK": 8, "VEC_V": 8}),
        ("fp32", {"BLOCK_N": 16, "BLOCK_D": 64, "HAS_BIAS": True, "VEC_QK": 4, "VEC_V": 4}),
        (
            "bf16",
            {
                "BLOCK_N": 64,
                "BLOCK_D": 64,
                "SCORE": SCORE_STANDARDIZE,
                "HAS_BIAS": True,
                "DROPOUT": True,
                "VEC_QK": 2,
                "VEC_V": 8,
            },
        ),
    ],
)
register_gate(MODE_GLOBAL, [("bf16", {"BLOCK_N": 64, "BLOCK_D": 16, "HAS_BIAS": True})])
# Every dtype x head-dim chunk at the largest token tile (64), with the flags that add the most code
# (standardised scores, bias): shared memory and registers grow with BLOCK_N x BLOCK_D, so these bound
# every smaller launch of the same dtype and chunk. Smaller token tiles are compiled above only in the
# configurations the production and parser-default shapes use.
register_gate(
    MODE_LOCAL,
    [
        (dt, {"BLOCK_N": 64, "BLOCK_D": bd, "SCORE": SCORE_STANDARDIZE, "HAS_BIAS": True, "DROPOUT": True})
        for dt in ("fp32", "fp16", "bf16")
        for bd in (16, 32, 64)
    ],
)


# --- compile gate: channel-plane kernels ------------------------------------------------------------------


def _production_geo(mode: int) -> dict:
    """Geometry of the MRI production shape (C 32, 64 x 64, patch 2, 32 heads of 4 channels): 8 x 8 windows of
    4 x 4 patches; local attention within a window, global across the windows."""
    nP, nW = 4, 8
    n_tokens, n_groups = (nP * nP, nW * nW) if mode == MODE_LOCAL else (nW * nW, nP * nP)
    return {"T": 12, "C": 32, "Hq": 64, "Wq": 64, "H": 64, "W": 64, "N": n_tokens, "n_groups": n_groups, "nWw": nW,
            "nPh": nP, "nPw": nP, "phq": 2, "pwq": 2, "ph": 2, "pw": 2, "n_head": 32, "D_QK": 4, "D_V": 4,
            "programs": 16 * 12 * n_groups * 32}  # fmt: skip


# An odd geometry: local windows of 3 x 3 patches of 3 x 3 pixels, 2 channels, 9 heads of 2 (token columns not a
# power of two: the per-element dropout draw; pixel rows and columns split over sub-blocks).
_ODD_GEO = {"T": 1, "C": 2, "Hq": 9, "Wq": 27, "H": 9, "W": 27, "N": 9, "n_groups": 3, "nWw": 3, "nPh": 3, "nPw": 3,
            "phq": 3, "pwq": 3, "ph": 3, "pw": 3, "n_head": 9, "D_QK": 2, "D_V": 2, "programs": 27}  # fmt: skip
_PLANE_INTS = ("C", "H", "W", "nPh", "nPw", "nWh", "nWw", "ph", "pw", "n_head", "HC", "n_groups", "N", "n_gouter",
               "GBI", "n_gblocks", "n_rych", "n_rxch", "seed")  # fmt: skip


def _register_plane(kind: str, dt: str, geo: dict, mode: int, cfg: dict, flags: dict) -> None:
    t = plane_tile(geo, mode, cfg)
    if t is None:  # this candidate's budget does not take this geometry: the general kernels run it
        return
    fn = plane_fwd_kernel if kind == "fwd" else plane_bwd_kernel
    ptrs: tuple[str, ...] = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr")
    if kind == "bwd":
        ptrs = ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "bias_ptr", "dq_ptr", "dk_ptr", "dv_ptr")
    sig = {**dict.fromkeys(ptrs, _DT[dt]), **dict.fromkeys(_PLANE_INTS, "i32")}
    sig.update({"scale": "fp32", "eps": "fp32", "p_drop": "fp32"})
    _aot.register(
        fn,
        signatures=[sig],
        configs=[
            {"MODE": mode, **flags, **_plane_constexprs(t), "num_warps": t["num_warps"], "num_stages": STAGES["plane"]}
        ],
        name=f"stcnnt_plane_{kind}[mode{mode}]",
        strict=STRICT,
    )


_HEAVIEST = {"SCORE": SCORE_STANDARDIZE, "HAS_BIAS": True, "DROPOUT": True}
for _kind in ("fwd", "bwd"):
    for _mode in (MODE_LOCAL, MODE_GLOBAL):
        # every candidate at the production shape with the flags that add the most code (bf16)
        for _cfg in plane_configs(_kind, 90):
            _register_plane(_kind, "bf16", _production_geo(_mode), _mode, _cfg, _HEAVIEST)
        # the default with the production flags (cosine, no bias; with and without dropout) in every dtype
        for _dt in ("bf16", "fp16", "fp32"):
            for _drop in (False, True):
                _flags = {"SCORE": SCORE_COSINE, "HAS_BIAS": False, "DROPOUT": _drop}
                _register_plane(_kind, _dt, _production_geo(_mode), _mode, plane_configs(_kind, 90)[0], _flags)
    _register_plane(_kind, "bf16", _ODD_GEO, MODE_LOCAL, plane_configs(_kind, 90)[0], _HEAVIEST)


# --- compile gate: long-group kernels -----------------------------------------------------------------------

_LONG_INTS = (*_INTS, "D_QK", "D_V", "RUN_QK", "RUN_V", "n_blocks", "seed")
_LONG_PTRS = {
    "fwd": (long_fwd_kernel, ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "bias_ptr"), ("lse_ptr",)),
    "dq": (long_bwd_dq_kernel, ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "do_ptr", "bias_ptr", "dq_ptr"),
           ("lse_ptr", "delta_ptr")),
    "dkdv": (long_bwd_dkdv_kernel, ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "bias_ptr", "dk_ptr", "dv_ptr"),
             ("lse_ptr", "delta_ptr")),
}  # fmt: skip


def _register_long(dt: str, mode: int, d_qk: int, d_v: int, cfg: dict, flags: dict) -> None:
    t = long_tile({"D_QK": d_qk, "D_V": d_v, "N": 256, "programs": 1}, cfg)
    for kind, (fn, ptrs, f32_ptrs) in _LONG_PTRS.items():
        sig = {**dict.fromkeys(ptrs, _DT[dt]), **dict.fromkeys(f32_ptrs, "*fp32"), **dict.fromkeys(_LONG_INTS, "i32")}
        sig.update({"scale": "fp32", "eps": "fp32", "p_drop": "fp32"})
        _aot.register(
            fn,
            signatures=[sig],
            configs=[
                {
                    "MODE": mode,
                    **flags,
                    **_long_constexprs(t),
                    "num_warps": t["num_warps"],
                    "num_stages": STAGES["long"],
                }
            ],
            name=f"stcnnt_long_{kind}[mode{mode}]",
            strict=STRICT,
        )


# Every candidate of each head-dim class (rows padded to 16 .. 256) with the heaviest flags in bf16; the
# defaults of the head dims 4 (production) and 256 (parser default) with the production flags in every dtype.
for _d in (16, 128, 256):
    for _cfg in long_configs(_d, 90):
        _register_long("bf16", MODE_GLOBAL, _d, _d, _cfg, _HEAVIEST)
for _cfg in long_configs(64, 90):
    _register_long("bf16", MODE_GLOBAL, 8, 32, _cfg, _HEAVIEST)  # strided q / k: hc_qk 8, hc_v 32
for _dt in ("bf16", "fp16", "fp32"):
    for _d in (4, 256):
        _flags = {"SCORE": SCORE_COSINE if _d == 4 else SCORE_DOT, "HAS_BIAS": _d == 256, "DROPOUT": False}
        for _mode in (MODE_LOCAL, MODE_GLOBAL):
            _register_long(_dt, _mode, _d, _d, long_configs(max(16, _d), 90)[0], _flags)


# --- compile gate: bias gradient ----------------------------------------------------------------------------

_BIAS_INTS = ("C", "H", "W", "N", "n_groups", "nWw", "nPh", "nPw", "ph", "pw", "n_head", "D_V", "RUN_V", "n_items",
              "per_chunk", "n_tb", "seed")  # fmt: skip


def _register_bias_grad(dt: str, mode: int, n: int, d_v: int, dropout: bool) -> None:
    geo = {"N": n, "n_head": 32, "programs": 32 * 64, "D_V": d_v, "C": 32, "pw": 16}
    t = bias_grad_plan(geo, 4 if dt == "fp32" else 2)
    sig = {"v_ptr": _DT[dt], "do_ptr": _DT[dt], "part_ptr": "*fp32", **dict.fromkeys(_BIAS_INTS, "i32")}
    sig["p_drop"] = "fp32"
    _aot.register(
        bias_grad_kernel,
        signatures=[sig],
        configs=[
            {
                "MODE": mode,
                "DROPOUT": dropout,
                **{k: t[k] for k in ("BLOCK", "BLOCK_D", "VEC", "num_warps")},
                "num_stages": STAGES["bias_grad"],
            }
        ],
        name=f"stcnnt_bias_grad[mode{mode}]",
        strict=True,
    )


# every tile size (16 / 32 / 64 tokens) x head-dim chunk (16 / 64) with dropout, in every dtype; the parser
# default (16 tokens, hc 256) and a long group (256 tokens, 64-token tiles) without
for _dt in ("bf16", "fp16", "fp32"):
    for _n in (16, 32, 64):
        for _d in (4, 256):
            _register_bias_grad(_dt, MODE_LOCAL, _n, _d, True)
    _register_bias_grad(_dt, MODE_LOCAL, 16, 256, False)
    _register_bias_grad(_dt, MODE_GLOBAL, 256, 8, False)
