"""The kernel report (benchmarks/kernel_report.py, ``python -m fm_engine.benchmarks.kernel_report``): its rules on the
committed benchmarks/kernel_report.json, the readers of the compiled code, and the launch recording.

Compiling the report's launches takes minutes, so the suite checks the committed report; CI's compile-gate
step regenerates it with ``--check`` and fails when it is out of date."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fm_engine.benchmarks import kernel_report as _report

REPORT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_report.json"


def _row(**kw: object) -> dict:
    row = {
        "op": "op", "case": "c", "kernel": "k", "arch": "sm_90", "dtype": "bf16", "config": "BM=64",
        "first_config": True, "role": "contraction", "mma": "wgmma", "registers": 128, "spill_bytes": 0,
        "smem_bytes": 0, "programs": 200, "sms": 132, "persistent": False, "atomic_in_loop": False, "reason": "",
        "_max_rows": 64, "_error": "",
    }  # fmt: skip
    row.update(kw)
    return row


def _rules(row: dict) -> list[str]:
    return [v.split(":")[0] for v in _report.row_violations(row)]


def test_committed_report_has_the_fields_and_passes_its_rules() -> None:
    report = _report.load(REPORT)
    rows, facts = report["rows"], report["facts"]
    assert report["archs"] == ["sm_80", "sm_90"]
    assert rows, "the committed report has no rows"
    for row in rows:
        assert tuple(row) == _report.FIELDS, row
        assert row["arch"] in ("sm_80", "sm_90") and row["dtype"] in ("bf16", "fp16", "fp32")
        assert row["role"] in ("contraction", "elementwise", "reduction") and row["mma"] in ("wgmma", "mma", "none")
        assert row["sms"] == (132 if row["arch"] == "sm_90" else 108)
    # every op with a fast path appears, for both architectures, with its first config and its candidates
    ops = {r["op"] for r in rows}
    assert {"cross_attention", "patch_embed", "relu2", "relu2_mlp", "temporal_attention"} <= ops
    for op in ops:
        assert {r["arch"] for r in rows if r["op"] == op} == {"sm_80", "sm_90"}, op
        assert any(r["first_config"] for r in rows if r["op"] == op), op
    assert any(not r["first_config"] for r in rows), "no autotune candidate was recorded"
    assert _report.gate_failures(rows, facts) == []


def test_committed_report_shows_the_rewritten_kernels() -> None:
    """The facts the rewrites were for, read from the committed report (sm_90, first configs)."""
    rows = _report.load(REPORT)["rows"]
    ca = [r for r in rows if r["op"] == "cross_attention" and r["arch"] == "sm_90" and "dropout" not in r["case"]]
    bwd = [r for r in ca if "_bwd_" in r["kernel"]]
    assert {r["kernel"].split(":")[-1] for r in bwd} == {"_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    for r in bwd:
        assert not r["atomic_in_loop"] and r["spill_bytes"] == 0, r
        if r["first_config"]:
            assert r["programs"] >= 132, r
        if r["dtype"] == "bf16":
            assert r["mma"] == "wgmma", r
    stem = [r for r in rows if r["op"] == "patch_embed" and "_conv_kernel" in r["kernel"] and r["first_config"]]
    assert stem and all(r["spill_bytes"] == 0 and r["programs"] >= r["sms"] for r in stem)


def test_rules_catch_each_violation() -> None:
    assert _rules(_row()) == []
    assert _rules(_row(spill_bytes=16)) == ["spill"]
    assert _rules(_row(mma="none")) == ["tensor_cores"]
    assert _rules(_row(mma="mma")) == ["tensor_cores"]  # 64 rows on sm_90: wgmma
    assert _rules(_row(mma="mma", _max_rows=16)) == []
    assert _rules(_row(mma="mma", arch="sm_80", sms=108)) == []
    assert _rules(_row(mma="none", _max_rows=0)) == []  # no tile of 16x16x16 or more
    assert _rules(_row(mma="none", dtype="fp32")) == []  # exact IEEE dots by design
    assert _rules(_row(programs=64)) == ["wave"]
    assert _rules(_row(programs=64, first_config=False)) == []
    assert _rules(_row(programs=64, persistent=True)) == []
    assert _rules(_row(atomic_in_loop=True)) == ["atomic"]
    assert _rules(_row(atomic_in_loop=True, reason="atomic: one add per program")) == []
    assert _rules(_row(atomic_in_loop=True, reason="wave: other rule")) == ["atomic"]
    assert _rules(_row(_error="boom")) == ["compile"]


def test_violations_are_reported_per_op_and_pending_ops_must_still_violate(monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {k: v for k, v in _row(op="a", programs=1).items() if not k.startswith("_")}
    good = {k: v for k, v in _row(op="b").items() if not k.startswith("_")}
    facts = {_report.row_id(bad): {"tile": "64x64x16", "tile_rows": 64}}
    assert list(_report.violations([bad, good], facts)) == ["a"]
    monkeypatch.setattr(_report, "PENDING", {})
    assert len(_report.gate_failures([bad, good], facts)) == 1
    monkeypatch.setattr(_report, "PENDING", {"a": "being rewritten", "b": "being rewritten"})
    fails = _report.gate_failures([bad, good], facts)
    assert len(fails) == 1 and fails[0].startswith("b: has no violations")


TTIR = """
    %5 = tt.dot %1, %2, %3 : tensor<128x64xbf16, #a> * tensor<64x32xbf16, #b> -> tensor<128x32xf32>
    %r_22 = "tt.reduce"(%r_21) <{axis = 1 : i32}> ({
    ^bb0(%r_23: f32, %r_24: f32):
      %r_25 = arith.addf %r_23, %r_24 : f32
      tt.reduce.return %r_25 : f32
    }) : (tensor<16x32x8xf32, #blocked1>) -> tensor<16x8xf32, #ttg.slice<{dim = 1, parent = #blocked1}>>
    %m = "tt.reduce"(%x) <{axis = 1 : i32}> ({
    ^bb0(%a: f32, %b: f32):
      %c = arith.maxnumf %a, %b : f32
      tt.reduce.return %c : f32
    }) : (tensor<16x32x8xf32, #blocked1>) -> tensor<16x8xf32>
"""


def test_contraction_tiles_reads_dots_and_hand_written_sums() -> None:
    assert _report.contraction_tiles(TTIR) == [(128, 32, 64, "bf16"), (16, 8, 32, "f32")]
    assert _report.contraction_tiles("%r = arith.addf %a, %b : tensor<64xf32>") == []


def test_atomic_in_loop_and_mma_kind() -> None:
    inside = """
    %cst = arith.constant dense<true> : tensor<16x16xi1, #blocked> loc(#loc1)
    scf.for %j = %c0_i32 to %n step %c1_i32  : i32 {
      %9 = tt.atomic_rmw fadd, acq_rel, gpu, %8, %6, %cst : (tensor<16x16x!tt.ptr<f32>, #blocked>) loc(#loc16)
    } loc(#loc17)
    """
    after = """
    scf.for %j = %c0_i32 to %n step %c1_i32  : i32 {
      %7 = tt.splat %j : i32 -> tensor<16x16xi32, #blocked> {tt.divisibility = 16 : i32} loc(#loc18)
    } loc(#loc17)
    %9 = tt.atomic_rmw fadd, acq_rel, gpu, %8, %6, %cst : (tensor<16x16x!tt.ptr<f32>, #blocked>) loc(#loc16)
    """
    assert _report.atomic_in_loop(inside)
    assert not _report.atomic_in_loop(after)
    assert _report.mma_kind("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16") == "wgmma"
    assert _report.mma_kind("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") == "mma"
    assert _report.mma_kind("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_recording_gives_the_runtime_specialisation_and_gpu_grids() -> None:
    """Launches of a real benchmark case recorded for sm_90 in a process without TRITON_INTERPRET: the binder's
    divisibility hints on 16-aligned pointers, the grid for 132 SMs, every autotune candidate; nothing runs."""
    script = textwrap.dedent(
        """
        import json
        from fm_engine.benchmarks import kernel_report as _report
        launches = _report.record(90, match="relu2 49152x2048 bfloat16")
        print(json.dumps([[ln.kernel, ln.first_config, ln.grid, ln.config, ln.dtype,
                           sorted(str(k) for k in ln.attrs if ln.attrs[k])] for ln in launches]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FM_ENGINE_POISON")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    launches = json.loads(out.stdout.strip().splitlines()[-1])
    kernels = {k for k, *_ in launches}
    assert kernels == {"relu2_fwd:relu2_fwd_kernel", "relu2_bwd:relu2_bwd_kernel"}
    from fm_engine.kernels import relu2

    for name in kernels:
        mine = [ln for ln in launches if ln[0] == name]
        assert [ln[1] for ln in mine] == [True] + [False] * (len(mine) - 1)  # the first config, then candidates
        assert len(mine) == len(relu2.EW_CONFIGS), "every candidate of the elementwise kernels"
        for _, _, grid, config, dtype, hinted in mine:
            block = int(config.split("BLOCK=")[1].split()[0])
            assert grid == [-(-49152 * 2048 // block), 1, 1] and dtype == "bf16"
            assert "(0,)" in hinted  # the 16-aligned x pointer carries the divisibility hint


def test_compile_seconds_sums_each_distinct_compilation_once_per_op_and_arch() -> None:
    """The printed cost of compiling every candidate of the headline cases: a compilation launched by two
    cases counts once, architectures apart, and compilations without a timing are counted as such."""

    class L:
        def __init__(self, op: str, arch: int, key: str) -> None:
            self.op, self.arch, self.key = op, arch, key

        def spec_key(self) -> str:
            return self.key

    launches = [L("a", 90, "k1"), L("a", 90, "k1"), L("a", 90, "k2"), L("a", 80, "k3"), L("b", 90, "k4")]
    facts = {"k1": {"compile_s": 1.5}, "k2": {"compile_s": 2.0}, "k3": {"compile_s": 0.25}, "k4": {"registers": 1}}
    got = _report.compile_seconds(launches, facts)  # type: ignore[arg-type]
    assert got == {("a", 90): (2, 3.5, 0), ("a", 80): (1, 0.25, 0), ("b", 90): (1, 0.0, 1)}


def test_the_gate_points_to_the_report_command() -> None:
    from fm_engine.kernels import _aot

    for argv in (["--report"], ["--report", "--check"]):
        with pytest.raises(SystemExit, match=r"python3 -m fm_engine\.benchmarks\.kernel_report"):
            _aot.main(argv)
