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
    env = {**os.environ, "FM_ENGINE_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--smoke", str(out)], cwd=tmp_path,
                       capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["details.tar.gz", "models.json", "models.md", "ops.json", "ops.md", "ops.png", "summary.json",
                     "summary.md"], files  # fmt: skip
    s = json.loads((out / "summary.json").read_text())
    assert s["smoke"] is True
    stages = {st["stage"]: st["status"] for st in s["stages"]}
    if stages != dict.fromkeys(("install", "tests", "ops", "models", "maxbatch", "breakdown"), "ok"):
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
    assert {row["backend"] for row in models} == {"reference", "auto"}
    assert any(row.get("max_batch") == 8 for row in models)
    (bd,) = s["breakdown"].values()
    assert bd["top"] and bd["step_ms"] > 0 and "host_syncs" in bd["steady_state"]
    md = (out / "summary.md").read_text()
    assert "smoke run: no speed claims" in md and "## Breakdown" in md
    with tarfile.open(out / "details.tar.gz") as tar:
        names = tar.getnames()
    for expected in ("details/tests.xml", "details/tests.log", "details/machine.txt", "stages.tsv"):
        assert expected in names, names
