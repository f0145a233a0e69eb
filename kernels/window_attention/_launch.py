"""Launchers of the window-attention kernels: family choice, tile sizes, autotuning candidates, forward and
backward (fm_engine/ops/window_attention.py holds the semantics and dispatch)."""

from __future__ import annotations

import torch
import triton
from fm_engine.kernels import _autotune

from fm_engine import _alloc

from ._common import MODE_LOCAL, pow2_at_least, run_of, run_vector
from .bias_grad import bias_grad_kernel
from .channel_plane import plane_bwd_kernel, plane_fwd_kernel
from .general import stcnnt_attn_bwd_kernel, stcnnt_attn_fwd_kernel
from .long_groups import long_bwd_dkdv_kernel, long_bwd_dq_kernel, long_fwd_kernel

MAX_BLOCK_D = 64  # head-dim chunk of the general kernels
# Software pipelining depth per kernel family, passed to every launch and registered with every compile-gate case,
# so the gate compiles what runs. ptxas's register allocation depends on it: at 3 the fp32 bias-gradient kernel
# spilled (parser-default shape), at 2 the fp32 general backward did.
STAGES = {"general": 3, "plane": 3, "long": 3, "bias_grad": 2}


def general_stages(kernel: str, element_size: int) -> int:
    """Pipelining depth of the general kernels: ``STAGES["general"]``, except the 16-bit backward, which spilled
    8 B at 3 on sm_80 (hc 256, patch 16: BLOCK_D 64, 16 tokens) and runs at 2 (the kernel report)."""
    return 2 if kernel == "bwd" and element_size == 2 else STAGES["general"]


def _interpreting() -> bool:
    from fm_engine._env import interpreting

    return interpreting()


def _sms(device: torch.device | None) -> int:
    if device is None or device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def blocks(n_tokens: int, d_max: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) of the general kernels: tl.dot needs every tile dim >= 16."""
    block_n = max(16, triton.next_power_of_2(n_tokens))
    block_d = max(16, min(MAX_BLOCK_D, triton.next_power_of_2(d_max)))
    return block_n, block_d


def _warps(block_n: int) -> int:
    return 4 if block_n <= 32 else 8


def heads_per_program(geo: dict, mode: int, device: torch.device | None = None) -> int:
    """Heads one program of the general kernels walks: all of a group's heads when they interleave in memory (a
    head's elements are channels of shared pixels); heads of whole pixels are contiguous runs of their own, so
    they are split over programs until the grid holds about 8 programs per SM."""
    hpp = geo["n_head"]
    if run_of(geo["D_QK"], geo["C"]) and run_of(geo["D_V"], geo["C"]):
        groups = geo["programs"] // geo["n_head"]
        while hpp % 2 == 0 and groups * (geo["n_head"] // hpp) < 8 * _sms(device):
            hpp //= 2
    return hpp


_INTS = ("C", "Hq", "Wq", "H", "W", "N", "n_groups", "nWw", "nPh", "nPw", "phq", "pwq", "ph", "pw", "n_head")


def vectors(geo: dict, elem_bytes: int, block_d: int) -> dict[str, int]:
    """VEC_QK / VEC_V of the general kernels (aligned runs of pixels a head's elements load in)."""
    return {
        "VEC_QK": run_vector(geo["D_QK"], geo["C"], geo["pwq"], elem_bytes, block_d),
        "VEC_V": run_vector(geo["D_V"], geo["C"], geo["pw"], elem_bytes, block_d),
    }


def _launch_args(geo: dict, mode: int, hpp: int) -> list:
    """The general kernels' integer arguments, in order."""
    return [
        *(geo[k] for k in _INTS),
        hpp,
        geo["D_QK"],
        geo["D_V"],
        run_of(geo["D_QK"], geo["C"]),
        run_of(geo["D_V"], geo["C"]),
    ]


# Channel-plane kernels: one function per kernel with the candidate configs (the first is the default; the
# backward's differ between sm_80 and sm_90) and the interpreter's. GB groups, RYB pixel rows and RXB pixel columns of the patch
# form a sub-block of heads, shrunk (GB first, then RYB, RXB) until its [heads, NP, max(NP, DP)] tiles hold at
# most ``budget`` elements; GBI group blocks per program; warps = tile elements / (32 * ept), 4..8 (at 16 warps a
# thread gets at most 128 registers: the 64-token backward spilled there). A sub-block of one head runs 2-D
# products (wgmma on sm_90 at 64 tokens), several heads batched 3-D ones (mma.sync). Register counts from
# sm_90 cubins at the production shape (hc 4, bf16, cosine): local (16 tokens) forward 108..198, backward
# 120..214; global (64 tokens) forward 128..223, backward 200 (255 with standardised scores, bias and dropout).
# benchmarks/kernel_report.md lists every candidate's registers and spills at the benchmark cases, all dtypes.
PLANE_INTERPRETER_CONFIG = {"GB": 2, "RYB": 1, "RXB": 2, "GBI": 2, "budget": 4096, "ept": 16}


def plane_configs(kind: str, arch: int) -> list[dict[str, int]]:
    # Candidates that spilled at the production shapes (fp32, cosine, hc 4; the kernel report) are gone: forward
    # GB 4 / budget 8192 / ept 16 (56 B on sm_90), backward budget 4096 / ept 4 and budget 8192 / ept 8 (16 to
    # 128 B on sm_80 and sm_90): several heads of a backward sub-block hold at most 2048 elements.
    if kind == "fwd":
        return [
            {"GB": 2, "RYB": 1, "RXB": 8, "GBI": 4, "budget": 4096, "ept": 8},
            {"GB": 8, "RYB": 2, "RXB": 8, "GBI": 1, "budget": 16384, "ept": 16},
            {"GB": 2, "RYB": 2, "RXB": 8, "GBI": 2, "budget": 4096, "ept": 8},
        ]
    # sm_80 keeps the backward's sub-block at 2048 elements: one 64-token head (4096) spilled 56 B there in fp32,
    # so the global groups run the general kernels on sm_80 and the plane kernels on sm_90.
    budget = 4096 if arch >= 90 else 2048
    return [
        {"GB": 1, "RYB": 1, "RXB": 8, "GBI": 4, "budget": budget, "ept": 4},
        {"GB": 1, "RYB": 1, "RXB": 8, "GBI": 2, "budget": budget, "ept": 4},
        {"GB": 2, "RYB": 1, "RXB": 8, "GBI": 2, "budget": 2048, "ept": 4},
    ]


def plane_tile(geo: dict, mode: int, cfg: dict[str, int]) -> dict[str, int] | None:
    """The plane kernels' tile constexprs and grid sizes for this geometry and config, or None when the
    kernels do not apply (heads not whole channel groups, strided q/k, or a score tile over budget)."""
    if geo["phq"] != geo["ph"] or geo["pwq"] != geo["pw"]:
        return None
    hc, C = geo["D_V"], geo["C"]
    if geo["D_QK"] != hc or C % hc:
        return None
    np2 = triton.next_power_of_2
    nWh = geo["H"] // (geo["nPh"] * geo["ph"])
    if mode == MODE_LOCAL:
        t1p, txp, n_gx, n_band, exact = np2(geo["nPh"]), np2(geo["nPw"]), geo["nWw"], nWh, np2(geo["nPw"]) == geo["nPw"]
    else:
        t1p, txp, n_gx, n_band, exact = np2(nWh), np2(geo["nWw"]), geo["nPw"], geo["nPh"], np2(geo["nWw"]) == geo["nWw"]
    t1p = max(t1p, 16 // min(txp, 16))  # tl.dot tiles: at least 16 tokens (padded rows are masked)
    dp = pow2_at_least(hc)
    gb, ryb, rxb = min(cfg["GB"], np2(n_gx)), min(cfg["RYB"], np2(geo["ph"])), min(cfg["RXB"], np2(geo["pw"]))
    npad = t1p * txp
    if npad >= 64:  # one head per sub-block: 2-D products (wgmma on sm_90); batched ones spilled here
        gb = ryb = rxb = 1
    per_head = npad * max(npad, dp)  # the larger of a score tile [NP, NP] and a head tile [NP, DP]
    while gb * ryb * rxb * per_head > cfg["budget"] and gb * ryb * rxb > 1:
        if gb > 1:
            gb //= 2
        elif ryb > 1:
            ryb //= 2
        else:
            rxb //= 2
    if gb * ryb * rxb * per_head > cfg["budget"]:
        return None
    n_gblocks = triton.cdiv(n_gx, gb)
    gbi = min(cfg["GBI"], n_gblocks)
    n_gouter = triton.cdiv(n_gblocks, gbi)
    b_t = geo["programs"] // (geo["n_groups"] * geo["n_head"])
    return {
        "T1P": t1p,
        "TXP": txp,
        "GBP": gb,
        "RYP": ryb,
        "RXP": rxb,
        "DP": dp,
        "TX_EXACT": exact,
        "nWh": nWh,
        "n_gouter": n_gouter,
        "GBI": gbi,
        "n_gblocks": n_gblocks,
        "n_rych": triton.cdiv(geo["ph"], ryb),
        "n_rxch": triton.cdiv(geo["pw"], rxb),
        "programs": n_gouter * (C // hc) * n_band * b_t,
        "num_warps": max(4, min(8, triton.next_power_of_2(gb * ryb * rxb * per_head // (32 * cfg["ept"])))),
    }


# Long-group kernels (N > MAX_TOKENS): whole head rows as tiles, so blocks shrink as heads grow; the interpreter
# runs 16-token blocks so that partial blocks and several of them are cheap to reach in tests.
MAX_TOKENS = 64  # the general kernels' N x N register tile
MAX_LONG_HEAD = 256


def long_configs(d_max: int, arch: int) -> list[dict[str, int]]:
    """Candidates (BLOCK_M queries = BLOCK_N keys, warps) for head rows padded to d_max; the first is the
    default. Tiles of whole head rows of q, k, v, dO and two [BLOCK, d_max] fp32 accumulators stay in registers:
    in the gate's sm_90 cubins (bf16, standardised scores, bias, dropout) 4 warps spilled 80..800 bytes per
    thread at every size, 8 warps at most a few dozen (none at d_max 16 or in the forward and dq kernels at 256)."""
    if d_max <= 64:
        return [{"BLOCK": 64, "num_warps": 8}, {"BLOCK": 32, "num_warps": 4}, {"BLOCK": 64, "num_warps": 4}]
    if d_max <= 128:
        return [{"BLOCK": 32, "num_warps": 8}, {"BLOCK": 16, "num_warps": 4}, {"BLOCK": 32, "num_warps": 4}]
    return [{"BLOCK": 16, "num_warps": 8}, {"BLOCK": 16, "num_warps": 4}]


def long_tile(geo: dict, cfg: dict[str, int]) -> dict[str, int]:
    dqp = max(16, triton.next_power_of_2(geo["D_QK"]))
    dvp = max(16, triton.next_power_of_2(geo["D_V"]))
    n_blocks = triton.cdiv(geo["N"], cfg["BLOCK"])
    return {
        "BLOCK_M": cfg["BLOCK"], "BLOCK_N": cfg["BLOCK"], "DQP": dqp, "DVP": dvp, "n_blocks": n_blocks,
        "programs": geo["programs"] * n_blocks, "num_warps": cfg["num_warps"],
    }  # fmt: skip


LONG_INTERPRETER_CONFIG = {"BLOCK": 16, "num_warps": 4}


def candidates(geo: dict, mode: int, kind: str, device: torch.device | None) -> list[dict[str, int]]:
    """The configs a ``kind`` ("fwd" / "bwd") launch chooses from, the first the default: the long kernels'
    (groups over MAX_TOKENS), else the plane kernels' that take this geometry (none when the default does not:
    then the general kernels run, with the one config their tile sizes decide)."""
    if geo["N"] > MAX_TOKENS:
        if _interpreting():
            return [dict(LONG_INTERPRETER_CONFIG)]
        d_max = max(16, triton.next_power_of_2(max(geo["D_QK"], geo["D_V"])))
        return long_configs(d_max, _autotune.arch_class(device))
    cands = [dict(PLANE_INTERPRETER_CONFIG)] if _interpreting() else plane_configs(kind, _autotune.arch_class(device))
    if plane_tile(geo, mode, cands[0]) is None:
        return []
    out, seen = [], []
    for c in cands:  # distinct tiles only (a geometry may shrink two configs to the same one)
        t = plane_tile(geo, mode, c)
        if t is not None and t not in seen:
            out.append(c)
            seen.append(t)
    return out


_GEO_BUCKET = ("N", "C", "D_QK", "D_V", "ph", "pw", "phq", "pwq", "nPh", "nPw", "nWw", "n_head")


def _bucket(q: torch.Tensor, geo: dict, mode: int, flags: dict) -> tuple:
    """Launches in one bucket share one tuning: dtype, mode and flags, the window geometry, and the power of two
    of the program count (batch x frames x groups x heads)."""
    return (_autotune.dtype(q), mode, *(flags[f] for f in ("SCORE", "HAS_BIAS", "DROPOUT")),
            *(geo[g] for g in _GEO_BUCKET), _autotune.pow2(geo["programs"]))  # fmt: skip


def _long_constexprs(t: dict) -> dict:
    return {k: t[k] for k in ("BLOCK_M", "BLOCK_N", "DQP", "DVP")}


def _long_args(geo: dict, t: dict) -> list:
    """The long kernels' integer arguments, in order."""
    return [*(geo[k] for k in _INTS), geo["D_QK"], geo["D_V"], run_of(geo["D_QK"], geo["C"]),
            run_of(geo["D_V"], geo["C"]), t["n_blocks"]]  # fmt: skip


def _plane_args(geo: dict, t: dict) -> list:
    return [
        geo["C"], geo["H"], geo["W"], geo["nPh"], geo["nPw"], t["nWh"], geo["nWw"], geo["ph"], geo["pw"],
        geo["n_head"], geo["D_V"], geo["n_groups"], geo["N"], t["n_gouter"], t["GBI"], t["n_gblocks"], t["n_rych"],
        t["n_rxch"],
    ]  # fmt: skip


def _plane_constexprs(t: dict) -> dict:
    return {k: t[k] for k in ("TX_EXACT", "T1P", "TXP", "GBP", "RYP", "RXP", "DP")}


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    geo: dict,
    *,
    mode: int,
    score: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k: [B, T, C, Hq, Wq]; v: [B, T, C, H, W] (contiguous); geo: sizes (fm_engine.ops.window_attention.GEO_KEYS).
    ``dropout_p`` > 0 drops attention weights with the keep mask of ``seed`` (kernels/_attention_dropout.py).
    Returns o and, for groups of more than MAX_TOKENS tokens, the rows' log-sum-exp [B*T*groups*n_head*N] fp32
    that the backward needs (else an empty tensor). ``config``: one of :func:`candidates` (default: the bucket's
    tuned one; ``{}`` where there are none)."""
    o = _alloc.empty_like(v)
    lse = q.new_empty(0, dtype=torch.float32)
    if geo["programs"] == 0 or v.numel() == 0:
        return o, lse
    eps = float(torch.finfo(q.dtype).eps)
    flags = {"MODE": mode, "SCORE": score, "HAS_BIAS": bias is not None, "DROPOUT": dropout_p > 0}
    if config is None:
        cands = candidates(geo, mode, "fwd", q.device)
        config = {}
        if cands:
            config = FWD_TUNER.choose(
                q.device,
                _bucket(q, geo, mode, flags),
                cands,
                lambda c: forward(
                    q, k, v, bias, geo, mode=mode, score=score, scale=scale, dropout_p=dropout_p, seed=seed, config=c
                ),
            )
    if geo["N"] > MAX_TOKENS:  # the long kernels in both directions (the backward needs the lse)
        t = long_tile(geo, config)
        lse = _alloc.empty(geo["programs"] * geo["N"], dtype=torch.float32, device=q.device)
        long_fwd_kernel[(t["programs"],)](
            q, k, v, o, bias if bias is not None else q, lse, *_long_args(geo, t), float(scale), eps, seed,
            float(dropout_p), **flags, **_long_constexprs(t), num_warps=t["num_warps"], num_stages=STAGES["long"],
        )  # fmt: skip
        return o, lse
    plane = plane_tile(geo, mode, config) if config else None
    if plane is not None:
        t = plane
        plane_fwd_kernel[(t["programs"],)](
            q, k, v, o, bias if bias is not None else q, *_plane_args(geo, t), float(scale), eps, seed,
            float(dropout_p), **flags, **_plane_constexprs(t), num_warps=t["num_warps"], num_stages=STAGES["plane"],
        )  # fmt: skip
        return o, lse
    hpp = heads_per_program(geo, mode, q.device)
    block_n, block_d = blocks(geo["N"], max(geo["D_QK"], geo["D_V"]))
    stcnnt_attn_fwd_kernel[(geo["programs"] // hpp,)](
        q, k, v, o, bias if bias is not None else q, *_launch_args(geo, mode, hpp), float(scale), eps, seed,
        float(dropout_p), **flags, BLOCK_N=block_n, BLOCK_D=block_d, **vectors(geo, q.element_size(), block_d),
        num_warps=_warps(block_n), num_stages=general_stages("fwd", q.element_size()),
    )  # fmt: skip
    return o, lse


def backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    geo: dict,
    *,
    mode: int,
    score: int,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    o: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv, dbias or None) for the upstream gradient do: [B, T, C, H, W] (contiguous). Groups of
    more than MAX_TOKENS tokens also need the forward's output o and log-sum-exp. ``config`` as for
    :func:`forward` (tuned on its own)."""
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    dbias32 = None
    if bias is not None:
        dbias32 = torch.zeros(bias.shape, dtype=torch.float32, device=q.device)
        if geo["programs"] and v.numel():
            dbias32 = bias_grad(do, v, geo, mode=mode, dropout_p=dropout_p, seed=seed)
    if geo["programs"] and v.numel():
        eps = float(torch.finfo(q.dtype).eps)
        flags = {"MODE": mode, "SCORE": score, "HAS_BIAS": bias is not None, "DROPOUT": dropout_p > 0}
        if config is None:
            cands = candidates(geo, mode, "bwd", q.device)
            config = {}
            if cands:
                config = BWD_TUNER.choose(
                    q.device,
                    _bucket(q, geo, mode, flags),
                    cands,
                    lambda c: backward(
                        do, q, k, v, bias, geo, mode=mode, score=score, scale=scale, dropout_p=dropout_p, seed=seed,
                        o=o, lse=lse, config=c,
                    ),
                )  # fmt: skip
        ptrs = (q, k, v, do, bias if bias is not None else q, dq, dk, dv)
        t = None if geo["N"] > MAX_TOKENS or not config else plane_tile(geo, mode, config)
        if geo["N"] > MAX_TOKENS:
            assert o is not None and lse is not None and lse.numel(), "long groups need the forward's o and lse"
            t = long_tile(geo, config)
            delta = _alloc.empty(lse.numel(), dtype=torch.float32, device=q.device)
            args = (*_long_args(geo, t), float(scale), eps, seed, float(dropout_p))
            long_bwd_dq_kernel[(t["programs"],)](
                q, k, v, o, do, ptrs[4], lse, delta, dq, *args, **flags, **_long_constexprs(t),
                num_warps=t["num_warps"], num_stages=STAGES["long"],
            )  # fmt: skip
            long_bwd_dkdv_kernel[(t["programs"],)](
                q, k, v, do, ptrs[4], lse, delta, dk, dv, *args, **flags, **_long_constexprs(t),
                num_warps=t["num_warps"], num_stages=STAGES["long"],
            )  # fmt: skip
        elif t is not None:
            plane_bwd_kernel[(t["programs"],)](
                *ptrs, *_plane_args(geo, t), float(scale), eps, seed, float(dropout_p), **flags,
                **_plane_constexprs(t), num_warps=t["num_warps"], num_stages=STAGES["plane"],
            )  # fmt: skip
        else:
            hpp = heads_per_program(geo, mode, q.device)
            block_n, block_d = blocks(geo["N"], max(geo["D_QK"], geo["D_V"]))
            stcnnt_attn_bwd_kernel[(geo["programs"] // hpp,)](
                *ptrs, *_launch_args(geo, mode, hpp), float(scale), eps, seed, float(dropout_p), **flags,
                BLOCK_N=block_n, BLOCK_D=block_d, **vectors(geo, q.element_size(), block_d),
                num_warps=_warps(block_n), num_stages=general_stages("bwd", q.element_size()),
            )  # fmt: skip
    dbias = dbias32.to(bias.dtype) if dbias32 is not None and bias is not None else None
    return dq, dk, dv, dbias


# Bias gradient (bias_grad.py): programs = heads x tiles x chunks of (frame, group) pairs, aiming at about four
# programs per SM of a 132-SM part; the chunking depends on the shapes only (not on the device), so the fixed
# order of the sum, and its bits, are the same everywhere.
BIAS_GRAD_PROGRAMS = 4 * 132


def bias_grad_plan(geo: dict, elem_bytes: int = 2) -> dict[str, int]:
    """Tiles and chunks of the bias-gradient kernel for this geometry."""
    n, n_head = geo["N"], geo["n_head"]
    block = min(64, pow2_at_least(n))
    n_tb = triton.cdiv(n, block)
    n_items = geo["programs"] // n_head  # (frame, group) pairs
    tiles = n_head * n_tb * n_tb
    per_chunk = triton.cdiv(n_items, max(1, min(n_items, triton.cdiv(BIAS_GRAD_PROGRAMS, tiles))))
    chunks = triton.cdiv(n_items, per_chunk)
    block_d = min(MAX_BLOCK_D, pow2_at_least(geo["D_V"]))
    if elem_bytes == 4:  # exact fp32 products replicate operands across threads: 32- and 64-token tiles spilled
        block_d = min(block_d, max(16, 1024 // block))
    vec = run_vector(geo["D_V"], geo["C"], geo["pw"], elem_bytes, block_d)
    return {"BLOCK": block, "BLOCK_D": block_d, "VEC": vec, "n_tb": n_tb,
            "n_items": n_items, "per_chunk": per_chunk, "chunks": chunks, "programs": tiles * chunks,
            "num_warps": 4 if block <= 32 else 8}  # fmt: skip


def bias_grad(do: torch.Tensor, v: torch.Tensor, geo: dict, *, mode: int, dropout_p: float, seed: int) -> torch.Tensor:
    """The relative-position bias gradient [n_head, N, N] fp32 for the upstream gradient do and v (both
    [B, T, C, H, W], contiguous): per-program partials [chunks, n_head, N, N], summed over the chunks."""
    t = bias_grad_plan(geo, v.element_size())
    part = _alloc.empty(t["chunks"], geo["n_head"], geo["N"], geo["N"], dtype=torch.float32, device=v.device)
    bias_grad_kernel[(t["programs"],)](
        v, do, part, geo["C"], geo["H"], geo["W"], geo["N"], geo["n_groups"], geo["nWw"], geo["nPh"], geo["nPw"],
        geo["ph"], geo["pw"], geo["n_head"], geo["D_V"], run_of(geo["D_V"], geo["C"]), t["n_items"], t["per_chunk"],
        t["n_tb"], seed, float(dropout_p), MODE=mode, DROPOUT=dropout_p > 0, BLOCK=t["BLOCK"], BLOCK_D=t["BLOCK_D"],
        VEC=t["VEC"], num_warps=t["num_warps"], num_stages=STAGES["bias_grad"],
    )  # fmt: skip
    return part.sum(0)


_KERNELS = {
    "fwd": [stcnnt_attn_fwd_kernel, long_fwd_kernel, plane_fwd_kernel],
    "bwd": [stcnnt_attn_bwd_kernel, long_bwd_dq_kernel, long_bwd_dkdv_kernel, plane_bwd_kernel, bias_grad_kernel],
}
FWD_TUNER = _autotune.LaunchTuner("window_attention_fwd", _KERNELS["fwd"])
BWD_TUNER = _autotune.LaunchTuner("window_attention_bwd", _KERNELS["bwd"])
