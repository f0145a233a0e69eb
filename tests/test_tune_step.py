"""Tuning before training (fm_engine.tune.tune_step): record one step, time its buckets, write the user table,
and dispatch follows it in the same process; under torch.distributed rank 0 times and every rank chooses the
same backends. The tests time in Triton's interpreter (TRITON_INTERPRET=1) on a CPU."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

from fm_engine import ops
from fm_engine._device import device_class
from fm_engine.ops import _evidence as E
from fm_engine.testing import interpreter_unusable_reason
from fm_engine.tune import _accepting, _live, tune_step

needs_interpreter = pytest.mark.skipif(
    not E.interpreting() or torch.cuda.is_available() or interpreter_unusable_reason() is not None,
    reason="times the Triton interpreter on a CPU",
)


# These tests check the tuning machinery; inductor's compile backend is checked in test_compile_backend.py. Its
# compilations cost seconds each on a CPU: here the compile backend uses torch.compile's aot_eager backend.
FAST_COMPILE = {"FM_ENGINE_COMPILE_BACKEND": "aot_eager"}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FM_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    for k, v in FAST_COMPILE.items():
        monkeypatch.setenv(k, v)
    E.reload()
    yield tmp_path / "cache"
    E.reload()


def _mlp_step(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    ops.relu2_mlp(x, w1, w2).square().sum().backward()


def _mlp_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 8, 16), torch.randn(32, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="tune mode: expected one of"):
        tune_step(_mlp_step, *_mlp_inputs(), mode="sometimes")
    with pytest.raises(ValueError, match="budget_s"):
        tune_step(_mlp_step, *_mlp_inputs(), budget_s=0)
    with pytest.raises(ValueError, match="backend: expected one of"):
        tune_step(_mlp_step, *_mlp_inputs(), backend="fastest")


def test_auto_and_off_time_nothing_on_a_cpu(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for mode in ("auto", "off", "auto"):
        report = tune_step(_mlp_step, *_mlp_inputs(), mode=mode, progress=False)
        assert report.measured == 0 and report.skipped
    out = capsys.readouterr().out
    assert out.count("nothing to tune on") <= 1  # said once per process (an earlier test may have said it)
    assert out.count("fm_engine backends for this step") == 3  # the table is printed on every run
    assert not (cache / "tables").exists()


@needs_interpreter
def test_always_writes_the_table_and_auto_follows_it(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    inputs = _mlp_inputs()
    report = tune_step(_mlp_step, *inputs, mode="always", progress=False)
    cls = device_class(torch.device("cpu"))
    table = json.loads(E.table_path("user", cls).read_text())
    (call,) = report.calls
    entry = table["ops"]["relu2_mlp"][call.bucket]["backends"]
    # every backend that runs here was timed, fwd+bwd: reference, compile, and the interpreted Triton kernels
    assert {"reference", "compile", "triton", "hybrid"} <= set(entry) and all("fwd_bwd_ms" in t for t in entry.values())
    assert report.measured >= 1 and report.tables["sha256"]
    ms = {b: t["fwd_bwd_ms"] for b, t in entry.items()}
    fast = [b for b in ms if b != "reference" and ms[b] < E.MARGIN * ms["reference"]]
    expected = min(fast, key=ms.__getitem__) if fast else "reference"
    (row,) = report.plan
    assert row.backend == expected and row.speedup == pytest.approx(ms["reference"] / ms[expected])
    with ops.trace() as calls:  # the next step of the same process runs what the table says
        _mlp_step(*inputs)
    assert calls == [("relu2_mlp", expected)]
    out = capsys.readouterr().out
    assert f"relu2_mlp      1  {expected}" in out and f"{ms['reference'] / ms[expected]:.2f}x" in out
    assert _live(cls, call, _accepting(call, torch.device("cpu")))  # a second `auto` run would time nothing


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, port: int, folder: str) -> None:
    import torch.distributed as dist

    os.environ["FM_ENGINE_CACHE_DIR"] = os.path.join(folder, f"cache{rank}")  # no shared storage
    os.environ.update(FAST_COMPILE)
    E.reload()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different data per rank, as in training
        x = torch.randn(6, 9, requires_grad=True)
        report = tune_step(lambda t: ops.relu2(t).sum().backward(), x, mode="always", progress=False)
        with ops.trace() as calls:
            ops.relu2(x).sum().backward()
        cls = device_class(torch.device("cpu"))
        result = {
            "measured": report.measured,
            "plan": [r.as_tuple() for r in report.plan],
            "ran": calls,
            "table": E.table_path("user", cls).read_text(),
        }
        Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@needs_interpreter
def test_two_processes_rank0_times_and_both_choose_the_same(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["measured"] >= 1 and r1["measured"] == 0  # only rank 0 timed
    assert r1["table"] == r0["table"]  # rank 1 received rank 0's table into its own cache folder
    assert r0["plan"] == r1["plan"] and r0["ran"] == r1["ran"]
    (plan,) = r0["plan"]
    assert r0["ran"] == [["relu2", plan[2]]]
