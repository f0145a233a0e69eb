"""benchmarks/gpu_suite.sh --smoke: the GPU session's one command, run at tiny sizes on a CPU.

Checks the contract the GPU run relies on: every stage runs within its budget and reports, OUTDIR holds at
most 8 files (the device returns no more), summary.json has the test counts and the benchmark ratios, and
the details tarball holds the logs. On a GPU machine the real suite runs instead (this test would run the
suite inside itself).
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine benchmarks/gpu_suite.sh itself runs the suite")
def test_smoke_suite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the last stage (model steps with the torch.compile label: minutes of CPU compilation) is cut on purpose: its
    # reference rows, measured before the cut, must still reach summary.json
    env = {**os.environ, "FM_ENGINE_CACHE_DIR": str(tmp_path / "cache"), "FM_ENGINE_SUITE_CUT": "models-compile:40"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=780, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["details.tar.gz", "models.json", "models.md", "ops.json", "ops.md", "ops.png", "summary.json",
                     "summary.md"], files  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["smoke"] is True
    order = ["install", "tune", "models", "breakdown", "ops", "maxbatch", "tests", "models-compile"]
    assert [st["stage"] for st in s["stages"]] == order, s["stages"]
    stages = {st["stage"]: st["status"] for st in s["stages"]}
    assert stages.pop("models-compile").startswith("cut at its 40s budget"), s["stages"]
    if stages != dict.fromkeys(order[:-1], "ok"):
        logs = []
        with tarfile.open(out / "details.tar.gz") as tar:
            for st, status in stages.items():
                member = f"details/{st}.log"
                if status != "ok" and member in tar.getnames():
                    f = tar.extractfile(member)
                    logs.append(f"--- {member} (last 3000 characters)\n" + (f.read().decode()[-3000:] if f else ""))
        pytest.fail(f"stages not ok: {stages}\n" + "\n".join(logs), pytrace=False)
    t = s["tests"]
    assert t["passed"] > 0 and t["failed"] == 0 and t["errors"] == 0 and set(t) >= {"skipped", "failed_tests"}
    ops = {(row["op"], row["backend"]): row for row in s["ops"]}
    assert ops[("relu2_mlp", "triton")]["x_reference_fwd_bwd"] > 0  # the interpreter ran the kernels
    models = [row for row in s["models"] if row.get("status") == "ok"]
    assert {row["backend"] for row in models if "stage" not in row} == {"reference", "auto"}
    assert any(row.get("max_batch") == 8 for row in models)
    # partial results of the cut stage: its reference step, measured before the cut
    assert [row["backend"] for row in models if row.get("stage") == "models-compile"] == ["reference"], s["models"]
    # the tuning stage wrote its table into the work folder (the tarball), never into the package
    assert t["source"] == "junit XML" and t["passed"] > 0
    (bd,) = s["breakdown"].values()
    assert bd["top"] and bd["step_ms"] > 0 and "host_syncs" in bd["steady_state"]
    md = (out / "summary.md").read_text()
    assert "smoke run: no speed claims" in md and "## Breakdown" in md
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    for expected in ("details/tests.xml", "details/tests.log", "details/machine.txt", "stages.tsv",
                     "details/tests-progress.jsonl", "details/tune.log"):  # fmt: skip
        assert expected in names, names
    assert any(n.startswith("details/tables/") and n.endswith(".json") for n in names), names
    assert not (tmp_path / "cache" / "tables").exists()  # the smoke run's tables stay in its work folder


def test_summary_keeps_the_partial_results_of_a_cut_stage(tmp_path: Path) -> None:
    # a tests stage killed before pytest wrote its XML, and a benchmark stage cut after its first row
    from benchmarks.suite import summarize

    work, out = tmp_path / "work", tmp_path / "out"
    d = work / "details"
    (d / "models-compile").mkdir(parents=True)
    out.mkdir()
    (work / "stages.tsv").write_text("tests\tcut at its 90s budget\t95\nmodels-compile\tcut at its 40s budget\t50\n")
    lines = [{"test": "tests/a.py::ok", "outcome": "passed"}, {"test": "tests/a.py::bad", "outcome": "failed"},
             {"test": "tests/a.py::gpu", "outcome": "skipped"}]  # fmt: skip
    (d / "tests-progress.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"test": "tests/a.py::cu')
    env = {"device": "cpu", "torch": "x", "time": "t"}
    row = {"op": "model", "case": "m", "backend": "reference", "kind": "model", "status": "ok", "images_per_s": 3.0}
    result = {"environment": env, "quick": True, "ceilings": {}, "formulas": {}, "rows": [row]}
    (d / "models-compile" / "results.json").write_text(json.dumps(result))
    s = summarize(work, out, smoke=True)
    assert s["tests"] == {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "failed_tests": ["tests/a.py::bad"],
                          "source": "per-test progress log"}  # fmt: skip
    assert [(r["backend"], r["stage"]) for r in s["models"]] == [("reference", "models-compile")]
    assert json.loads((out / "summary.json").read_text())["tests"]["passed"] == 1
    assert [st["status"] for st in s["stages"]] == ["cut at its 90s budget", "cut at its 40s budget"]
