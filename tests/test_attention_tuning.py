"""The attention launchers choose their configs through fm_engine.kernels._autotune.LaunchTuner: on a miss every
candidate runs (timed; here a fake timer stands in for do_bench), the winner computes the result (checked against
the reference, forward and backward), and a second call of the bucket times nothing. Candidates small enough for
the interpreter (and valid on a GPU) replace each launcher's own list."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fm_engine.kernels import _autotune
from fm_engine.kernels import cross_attention as KC
from fm_engine.kernels import temporal_attention as KT
from fm_engine.kernels import window_attention as KW

from fm_engine.ops import cross_attention, temporal_attention, window_attention
from fm_engine.testing import assert_parity, reported_spills


class SecondWins:
    """Fake timer: runs the launcher once per candidate, as do_bench would, and makes the second fastest."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, run) -> float:
        run()
        self.calls += 1
        return 1.0 if self.calls == 2 else 2.0


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FM_ENGINE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FM_ENGINE_AUTOTUNE", raising=False)
    _autotune.forget()
    _autotune.reset_stats()
    yield tmp_path
    _autotune.forget()


def _check_tuned(tuned: dict, fast, reference, inputs: list, name: str) -> None:
    """``tuned``: tuner -> its two candidates. Parity of the tuned launches, then a second call tunes nothing."""
    timers = {t: SecondWins() for t in tuned}
    with contextlib.ExitStack() as stack:
        for t, cands in tuned.items():
            stack.enter_context(t.override(cands, timers[t]))
        assert_parity(fast, reference, inputs, name=name)
        for t, cands in tuned.items():
            assert timers[t].calls == 2, f"{t.name}: timed {timers[t].calls} candidates, expected 2"
            assert t.stats["tunings"] == 1, t.stats
            assert list(t._memory.values()) == [cands[1]], f"{t.name} kept {list(t._memory.values())}"
        x = [i.detach().requires_grad_() for i in inputs]
        fast(*x).sum().backward()
        for t in tuned:
            assert timers[t].calls == 2 and t.stats["tunings"] == 1, f"{t.name} tuned the same bucket again"
            assert t.stats["memory_hits"] >= 1, t.stats


def test_temporal_attention_is_tuned(device: torch.device) -> None:
    q, k, v = (torch.randn(2, 5, 4, 4, 4, device=device) for _ in range(3))
    cands = [{"BLOCK_D": 16, "num_warps": 4, "num_stages": 1}, {"BLOCK_D": 32, "num_warps": 4, "num_stages": 1}]
    kw = {"n_head": 2, "cosine": True, "causal": True}
    _check_tuned(
        {KT.FWD_TUNER: cands, KT.BWD_TUNER: cands},
        lambda q, k, v: temporal_attention(q, k, v, backend="triton", **kw),
        lambda q, k, v: temporal_attention(q, k, v, backend="reference", **kw),
        [q, k, v],
        "temporal_attention tuned",
    )


def _with_dq(c: dict[str, int]) -> dict[str, int]:
    """A backward candidate: the dK / dV kernel's tile ``c`` and the dQ kernel's (16 x 16, 4 warps)."""
    return {**c, "DQ_M": 16, "DQ_N": 16, "dq_warps": 4, "dq_stages": 1}


def test_cross_attention_is_tuned(device: torch.device) -> None:
    q = torch.randn(2, 4, 20, 16, device=device)
    k, v = (torch.randn(2, 2, 70, 16, device=device) for _ in range(2))
    mask = torch.zeros(2, 70, dtype=torch.bool, device=device)
    mask[1, 50:] = True
    cands = [
        {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
        {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    ]
    kw = {"kv_heads": 2, "key_padding_mask": mask}
    _check_tuned(
        {KC.FWD_TUNER: cands, KC.BWD_TUNER: [_with_dq(c) for c in cands]},
        lambda q, k, v: cross_attention(q, k, v, backend="triton", **kw),
        lambda q, k, v: cross_attention(q, k, v, backend="reference", **kw),
        [q, k, v],
        "cross_attention tuned",
    )


@pytest.mark.parametrize("kind", ["long", "plane"])
def test_window_attention_is_tuned(kind: str, device: torch.device) -> None:
    if kind == "long":  # 81 tokens per group: the long-group kernels
        shape, kw = (1, 1, 4, 18, 18), {"mode": "global", "num_windows": 9, "patch_size": 2, "n_head": 2}
        cands = [{"BLOCK": 16, "num_warps": 4}, {"BLOCK": 32, "num_warps": 4}]
    else:  # 4 heads of one channel's 2 x 2 patch (head dims dividing C): the channel-plane kernels
        shape, kw = (1, 2, 4, 8, 8), {"mode": "local", "num_patches": 2, "patch_size": 2, "n_head": 4}
        cands = [dict(KW.PLANE_INTERPRETER_CONFIG), {"GB": 1, "RYB": 1, "RXB": 1, "GBI": 1, "budget": 4096, "ept": 8}]
    q, k, v = (torch.randn(*shape, device=device) for _ in range(3))
    kw["cosine"] = True
    _check_tuned(
        {KW.FWD_TUNER: cands, KW.BWD_TUNER: cands},
        lambda q, k, v: window_attention(q, k, v, backend="triton", **kw),
        lambda q, k, v: window_attention(q, k, v, backend="reference", **kw),
        [q, k, v],
        f"window_attention tuned ({kind})",
    )


def test_cross_attention_backward_skips_a_spilling_candidate(device: torch.device) -> None:
    """The second backward candidate would win, but its dK / dV kernel spills (as a newer Triton may
    compile it; a stand-in for the compiled kernel reports the spill): the tuner keeps the first, times only
    that one, and the gradients still match the reference."""
    q = torch.randn(2, 4, 20, 16, device=device)
    k, v = (torch.randn(2, 2, 70, 16, device=device) for _ in range(2))
    cands = [
        _with_dq({"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}),
        _with_dq({"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}),
    ]
    timer = SecondWins()
    with (
        KC.BWD_TUNER.override(cands, timer),
        reported_spills(KC._bwd_dkdv_kernel, lambda a: 8 * (a["BLOCK_N"] == 32)),
    ):
        assert_parity(
            lambda q, k, v: cross_attention(q, k, v, kv_heads=2, backend="triton"),
            lambda q, k, v: cross_attention(q, k, v, kv_heads=2, backend="reference"),
            [q, k, v],
            name="cross_attention, a spilling backward candidate",
        )
    assert timer.calls == 1 and list(KC.BWD_TUNER._memory.values()) == [cands[0]]
    assert list(KC.BWD_TUNER.spilled.values()) == [[(cands[1], 8)]]
