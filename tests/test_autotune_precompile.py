"""Autotuned launches compile their candidates in parallel before timing them (Triton's AsyncCompileMode with a
thread pool). On a CPU the compiler cannot run: a stand-in kernel checks the wiring (every candidate's warmup,
with its launch options, while the asynchronous mode is active) and that nothing is submitted where it must not
be (a single candidate, the interpreter)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import triton
from fm_engine.kernels import _autotune

async_compile = pytest.importorskip("triton.runtime._async_compile")


class _StubKernel:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple, Any, dict, bool]] = []
        self.lock = threading.Lock()

    def warmup(self, *args: Any, grid: Any, **opts: Any) -> None:
        with self.lock:
            self.calls.append((args, grid, opts, async_compile.active_mode.get() is not None))
        if opts.get("num_warps") == 8:
            raise RuntimeError("does not compile")  # left to the timing loop


def _tuned(stub: _StubKernel) -> Any:
    t = object.__new__(_autotune.Autotuned)
    t.fn = stub
    t.arg_names = ["x", "n", "BLOCK"]
    return t


def test_every_candidate_is_compiled_under_async_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)
    stub = _StubKernel()
    shapes = ((64, 2, 1), (128, 4, 2), (256, 8, 3))
    cands = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in shapes]
    n = _tuned(stub)._precompile(cands, lambda m: (m["n"] // m["BLOCK"],), {"x": "X", "n": 1024})
    assert n == 2  # the third candidate failed to compile: skipped here, reported by the timing loop
    got = sorted((args, grid, opts["num_warps"], opts["num_stages"], active) for args, grid, opts, active in stub.calls)
    assert got == [(("X", 1024, 64), (16,), 2, 1, True), (("X", 1024, 128), (8,), 4, 2, True),
                   (("X", 1024, 256), (4,), 8, 3, True)]  # fmt: skip
    assert async_compile.active_mode.get() is None  # the mode ends with the launch


def test_nothing_is_precompiled_for_one_candidate_or_in_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    stub = _StubKernel()
    one = [triton.Config({"BLOCK": 64}, num_warps=2)]
    monkeypatch.setattr(_autotune, "interpreting", lambda: False)
    assert _tuned(stub)._precompile(one, (1,), {"x": "X", "n": 4}) == 0
    monkeypatch.setattr(_autotune, "interpreting", lambda: True)
    assert _tuned(stub)._precompile(one * 2, (1,), {"x": "X", "n": 4}) == 0
    assert stub.calls == []
