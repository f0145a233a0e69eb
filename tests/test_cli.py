"""The fm-engine command: help, info, and the benchmark harness smoke run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fm_engine.testing import interpreter_unusable_reason

# The interpreter runs below are CPU-machine runs on every machine: TRITON_INTERPRET=1 and no visible GPU,
# in a subprocess of their own (this process never changes mode).
INTERPRETER_CPU = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
needs_interpreter = pytest.mark.skipif(
    interpreter_unusable_reason() is not None, reason=interpreter_unusable_reason() or ""
)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fm_engine", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def test_help_lists_commands() -> None:
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    for cmd in ("info", "bench", "train", "convert-avit"):
        assert cmd in r.stdout


def test_info() -> None:
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert "fm_engine" in r.stdout and "torch" in r.stdout and "CUDA ext" in r.stdout
    assert "relu2_mlp" in r.stdout and "reference: available" in r.stdout


@needs_interpreter
def test_bench_smoke_writes_reports(tmp_path: Path) -> None:
    # interpreter run, fast backends only (torch.compile on CPU is too slow for the suite)
    r = run_cli(
        "bench",
        "--op",
        "relu2",
        "--quick",
        "--backend",
        "triton",
        "--backend",
        "cuda",
        "--out",
        str(tmp_path),
        env=INTERPRETER_CPU,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["quick"] is True and res["environment"]["torch"]
    rows = {(row["op"], row["backend"]): row for row in res["rows"]}
    for key in (("relu2_mlp", "reference"), ("relu2_mlp", "triton"), ("relu2", "triton")):
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["fwd_ms"] > 0 and rows[key]["fwd_bwd_ms"] > 0
    assert rows[("relu2_mlp", "triton")]["speedup_fwd_bwd"]["reference"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "not speed claims" in md and "4·M·D·H" in md
    assert (tmp_path / "results.png").stat().st_size > 1000  # matplotlib is a dev dependency


def test_bench_rejects_unknown_op() -> None:
    r = run_cli("bench", "--op", "nope", "--quick")
    assert r.returncode != 0 and "unknown op or op family 'nope'" in (r.stdout + r.stderr)


def test_bench_model_training_step(tmp_path: Path) -> None:
    # harness path of `fm-engine bench --model`: reference vs automatic dispatch. With no --backend / --setting a
    # CPU run is the short smoke test bench --model NAME promises: reference and auto in the defaults setting (the
    # compile label is left out: torch.compile on a CPU takes minutes)
    r = run_cli("bench", "--model", "vit-cifar10", "--quick", "--out", str(tmp_path),
                env={"TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CPU smoke test: the compile label is left out" in r.stdout
    # shallow stacks: every kind of layer runs once, so even the big registry AViTs finish in well under a minute
    assert "CPU smoke test: vit-cifar10 with depth=1 (every kind of layer runs once" in r.stdout
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(row["case"], row["backend"]) for row in rows] == [
        ("train step B1 16x16 defaults (small)", "reference"),
        ("train step B1 16x16 defaults (small)", "auto"),
    ]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["kind"] == "model" and row["images_per_s"] > 0 and row["fwd_bwd_ms"] > 0


@pytest.mark.parametrize("model", ["vit-cifar10-adaptive", "stcnnt-mri-hrnet-production"])
def test_bench_breakdown(tmp_path: Path, model: str) -> None:
    r = run_cli("bench", "--model", model, "--quick", "--breakdown", "--profile", "--setting", "dropout 0",
                "--out", str(tmp_path), env={"TRITON_INTERPRET": "0"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads((tmp_path / f"breakdown-{model}-dropout0.json").read_text())
    assert rep["step_ms"] > 0 and rep["rows"], rep
    ops_seen = {row["op"] for row in rep["rows"]}
    expected = {"patch_embed", "cross_attention", "relu2_mlp"} if "vit" in model else {"window_attention"}
    assert expected <= ops_seen, ops_seen
    totals = [row["total_ms"] for row in rep["rows"]]
    assert totals == sorted(totals, reverse=True)  # sorted by total time
    for row in rep["rows"]:
        assert row["count"] >= 1 and row["backend"] == "reference"  # no evidence on a CPU: the reference
        assert row["backends"]["reference"]["status"] == "ok"
    assert abs(rep["unattributed_ms"] - (rep["step_ms"] - rep["ops_ms"])) < 1e-6
    assert rep["profile"]["top"] and len(rep["profile"]["top"]) <= 30
    md = (tmp_path / f"breakdown-{model}-dropout0.md").read_text()
    assert "not accounted for by any op" in md and "Top kernels" in md and "share of step" in md


def test_bench_max_batch(tmp_path: Path) -> None:
    r = run_cli("bench", "--model", "vit-cifar10", "--quick", "--max-batch", "--setting", "dropout 0",
                "--out", str(tmp_path), env={"TRITON_INTERPRET": "0"})  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert row["kind"] == "max_batch" and row["status"] == "ok" and row["max_batch"] == 8
    assert "limit 8" in row["stopped"]  # quick: a CPU search stops at 8
    assert [b for b, _ in row["probes"]] == [4, 8]


def test_bench_breakdown_needs_a_model() -> None:
    r = run_cli("bench", "--op", "relu2", "--breakdown")
    assert r.returncode != 0 and "need --model" in (r.stdout + r.stderr)


@needs_interpreter
def test_bench_selects_one_op_by_name(tmp_path: Path) -> None:
    r = run_cli("bench", "--op", "relu2_mlp", "--quick", "--backend", "triton", "--out", str(tmp_path),
                env=INTERPRETER_CPU)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert {row["op"] for row in rows} == {"relu2_mlp"}
    assert {row["backend"]: row["status"] for row in rows}["triton"] == "ok"


def test_smoke_overrides_cut_every_stack_the_model_has() -> None:
    from fm_engine.benchmarks import models  # type: ignore[import-not-found]

    assert models.smoke_overrides("vit-i1-p16-d768-a32_24") == {"depth": 1, "high_res_depth": 1}
    assert models.smoke_overrides("vit-cifar10") == {"depth": 1}
    assert models.smoke_overrides("stcnnt-mri-hrnet-production") == {}
