"""Summary of a ``benchmarks/gpu_suite.sh`` run: ``python3 -m benchmarks.suite summarize --work W --out O``.

Reads what the stages left in ``W/details`` (junit XML of the tests, the op / model / max-batch result
folders of ``fm-engine bench``, the breakdown reports) and writes to ``O``: ``summary.json`` (test
counts, the failed tests, every benchmark ratio against the reference and the best other label, the
fraction of the measured ceilings, stage times), ``summary.md``, ``ops.json/.md/.png`` and
``models.json/.md``. Missing pieces (a stage cut by its budget) are reported as missing, never invented.
"""

from __future__ import annotations

import argparse
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from . import harness


def test_counts(xml_path: Path) -> dict[str, Any]:
    """{passed, failed, errors, skipped, failed_tests} from a junit XML file ({} when it is missing)."""
    if not xml_path.exists():
        return {}
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    return {
        "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"],
        "failed": n["failures"],
        "errors": n["errors"],
        "skipped": n["skipped"],
        "failed_tests": failed,
    }


def progress_counts(log_path: Path) -> dict[str, Any]:
    """{passed, failed, errors, skipped, failed_tests} from the per-test progress log (benchmarks/pytest_progress.py),
    written as each test ends: what a test stage cut before pytest wrote its XML still finished ({} when absent)."""
    if not log_path.exists():
        return {}
    n = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failed = []
    for line in log_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line cut by SIGKILL
        key = {"passed": "passed", "failed": "failed", "error": "errors", "skipped": "skipped"}.get(r.get("outcome"))
        if key:
            n[key] += 1
        if key in ("failed", "errors"):
            failed.append(r["test"])
    return {**n, "failed_tests": failed}


def merged_test_counts(d: Path) -> dict[str, Any]:
    """Counts of the GPU-marked pass (tests-gpu.xml) and the rest (tests.xml); where a pass left no XML, the
    progress log's counts stand in for the whole stage."""
    xmls = [test_counts(d / name) for name in ("tests-gpu.xml", "tests.xml")]
    progress = progress_counts(d / "tests-progress.jsonl")
    found = [x for x in xmls if x]
    if not found or (progress and sum(progress[k] for k in ("passed", "failed", "errors", "skipped")) >
                     sum(x[k] for x in found for k in ("passed", "failed", "errors", "skipped"))):  # fmt: skip
        return {**progress, "source": "per-test progress log"} if progress else {}
    out: dict[str, Any] = {k: sum(x[k] for x in found) for k in ("passed", "failed", "errors", "skipped")}
    out["failed_tests"] = [t for x in found for t in x["failed_tests"]]
    out["source"] = "junit XML"
    return out


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ratio_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (case, backend): times, x reference, x best other label, fractions of the ceilings."""
    out = []
    rows = result.get("rows", [])
    for r in rows:
        row = {k: r.get(k) for k in ("op", "case", "backend", "status", "fwd_ms", "fwd_bwd_ms", "images_per_s",
                                      "peak_mem_mb", "saved_mb", "max_batch", "stopped", "stage")}  # fmt: skip
        for key in ("fwd_bwd", "fwd"):
            sp = r.get(f"speedup_{key}")
            if sp:
                row[f"x_reference_{key}"] = sp.get(harness.REFERENCE)
                others = {b: v for b, v in sp.items() if b not in (r["backend"], harness.REFERENCE)}
                if others:
                    best = min(others, key=lambda b: others[b])  # the other label with the smallest ratio = fastest
                    row[f"x_best_other_{key}"] = others[best]
                    row[f"best_other_{key}"] = best
            for frac in ("frac_copy_bw", "frac_matmul_peak"):
                if f"{key}_{frac}" in r:
                    row[f"{key}_{frac}"] = r[f"{key}_{frac}"]
        out.append({k: v for k, v in row.items() if v is not None})
    return out


def _copy_bench(src: Path, out: Path, stem: str) -> dict[str, Any] | None:
    res = _load(src / "results.json")
    if res is None:
        return None
    for ext in ("json", "md", "png"):
        if (src / f"results.{ext}").exists():
            shutil.copy(src / f"results.{ext}", out / f"{stem}.{ext}")
    return res


def summarize(work: Path, out: Path, smoke: bool) -> dict[str, Any]:
    d = work / "details"
    stages = []
    if (work / "stages.tsv").exists():
        for line in (work / "stages.tsv").read_text().splitlines():
            name, status, secs = line.split("\t")
            stages.append({"stage": name, "status": status, "seconds": int(secs)})
    summary: dict[str, Any] = {"smoke": smoke, "stages": stages, "tests": merged_test_counts(d)}
    ops = _copy_bench(d / "ops", out, "ops")
    if ops is not None:
        summary["environment"] = ops.get("environment")
        summary["ceilings"] = ops.get("ceilings")
        summary["ops"] = ratio_rows(ops)
    models = _load(d / "models" / "results.json")
    extra = []
    for name in ("models-compile", "maxbatch"):
        res = _load(d / name / "results.json")
        if res is not None:
            res["rows"] = [{**r, "stage": name} for r in res.get("rows", [])]
            extra.append(res)
    if models is not None or extra:
        merged = models or {**extra[0], "rows": []}
        merged["rows"] = list(merged.get("rows", [])) + [r for res in extra for r in res.get("rows", [])]
        summary.setdefault("environment", merged.get("environment"))
        summary["models"] = ratio_rows(merged)
        harness.write_reports(merged, out / "_models", chart_too=False)
        for ext in ("json", "md"):
            shutil.move(out / "_models" / f"results.{ext}", out / f"models.{ext}")
        shutil.rmtree(out / "_models", ignore_errors=True)
    bd = {}
    for path in sorted((d / "breakdown").glob("breakdown-*.json")):
        rep = _load(path)
        if rep is None:
            continue
        bd[f"{rep['model']} ({rep['setting']})"] = {
            "step_ms": rep["step_ms"],
            "unattributed_ms": rep["unattributed_ms"],
            "steady_state": rep["steady_state"],
            "top": [
                {k: r.get(k) for k in ("op", "backend", "count", "per_call_ms", "total_ms", "share", "inputs")}
                for r in rep["rows"][:8]
            ],
            "profile_top": (rep.get("profile") or {}).get("top", [])[:10],
        }
    if bd:
        summary["breakdown"] = bd
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "summary.md").write_text(markdown(summary))
    return summary


def _f(v: Any, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "–"


def markdown(s: dict[str, Any]) -> str:
    env = s.get("environment") or {}
    lines = [f"# fm_engine GPU suite{' (smoke run: no speed claims)' if s['smoke'] else ''}", ""]
    if env:
        lines += [
            f"{env.get('device')}; torch {env.get('torch')}; triton {env.get('triton')}; git {env.get('git')}",
            "",
        ]
    c = s.get("ceilings") or {}
    if c:
        lines += [f"Ceilings measured in this run: bf16 matmul {_f(c.get('bf16_matmul_tflops'), '.0f')} TFLOP/s, "
                  f"copy {_f(c.get('copy_gbs'), '.0f')} GB/s.", ""]  # fmt: skip
    lines += ["| stage | status | seconds |", "|---|---|---|"]
    lines += [f"| {st['stage']} | {st['status']} | {st['seconds']} |" for st in s["stages"]]
    t = s.get("tests") or {}
    lines += ["", "## Tests", ""]
    if t:
        lines.append(f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped")
        lines += [f"- FAILED {name}" for name in t["failed_tests"][:50]]
    else:
        lines.append("no test report (stage cut or not run)")
    for title, key in (("Ops (fwd+bwd)", "ops"), ("Training steps", "models")):
        rows = s.get(key)
        lines += ["", f"## {title}", ""]
        if not rows:
            lines.append("not measured (stage cut or not run)")
            continue
        lines += ["| op | case | backend | fwd+bwd ms | x reference | x best other | % copy BW | % matmul peak | "
                  "images/s | peak MB | status |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in rows:
            other = f"{_f(r.get('x_best_other_fwd_bwd'))} ({r.get('best_other_fwd_bwd', '–')})"
            cbw = r.get("fwd_bwd_frac_copy_bw")
            mmp = r.get("fwd_bwd_frac_matmul_peak")
            lines.append(
                f"| {r.get('op')} | {r.get('case')} | {r.get('backend')} | {_f(r.get('fwd_bwd_ms'), '.3f')} | "
                f"{_f(r.get('x_reference_fwd_bwd'))} | {other} | {_f(100 * cbw if cbw else None, '.1f')} | "
                f"{_f(100 * mmp if mmp else None, '.1f')} | {_f(r.get('images_per_s'), '.1f')} | "
                f"{_f(r.get('peak_mem_mb'), '.0f')} | {r.get('status')}"
                + (f", max batch {r['max_batch']} ({r.get('stopped')})" if "max_batch" in r else "")
                + " |"
            )
    for name, b in (s.get("breakdown") or {}).items():
        ss = b["steady_state"]
        launches = ss.get("launches") or {}
        lines += [
            "",
            f"## Breakdown: {name}",
            "",
            f"step {_f(b['step_ms'], '.3f')} ms, not accounted for by ops {_f(b['unattributed_ms'], '.3f')} ms; "
            f"steady state: {launches.get('launches', '–')} launches, "
            f"{len(launches.get('new_specializations', []))} new specialisations, "
            f"{launches.get('compilations', '–')} compilations, "
            f"{len(launches.get('autotune_keys', []))} autotune keys, "
            f"{ss.get('host_syncs')} host syncs, {ss.get('fp32_calls_under_autocast')} fp32 calls under autocast",
            "",
            "| op | backend | calls | total ms | share |",
            "|---|---|---|---|---|",
        ]
        for r in b["top"]:
            share = f"{100 * r['share']:.1f}%" if r.get("share") is not None else "–"
            lines.append(f"| {r['op']} | {r['backend']} | {r['count']} | {_f(r.get('total_ms'), '.3f')} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.suite")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="write summary.json / summary.md and copy the bench files")
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--smoke", type=int, default=0)
    a = p.parse_args(argv)
    summarize(a.work, a.out, bool(a.smoke))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
