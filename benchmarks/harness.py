"""Benchmark harness: cases per op and per model, timed against eager, torch.compile and peers.

A case module (``benchmarks/<op>.py``) defines ``cases(device, quick) -> list[Case]``. A
:class:`Case` holds a ``setup()`` that builds fresh inputs, one forward callable per backend label,
the FLOP and byte counts of one forward and one backward (with their formulas as text), and a
``notes`` map for peers that are not run (why). Labels: "reference", "compile", "compile-max",
"triton", "cuda", and peer names ("liger", "sdpa-flash", ...).

For each (case, label) the harness measures the median forward time and the median forward +
backward time (backward of ``sum(out * g)`` with a fixed random g), the bytes autograd keeps for
backward ("saved MB", the activation memory), the peak memory of one warm step above the inputs,
TFLOP/s and GB/s, and their fractions of the two ceilings measured in the same run (a large bf16
matmul and a device-to-device copy). Results go to ``results.json`` and ``results.md`` (and
``results.png`` when matplotlib is importable) with device, versions and git revision.

On CPU it runs the tiny ``quick`` cases once or twice as a smoke test: numbers printed there are
not speed claims.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REFERENCE = "reference"


@dataclasses.dataclass
class Case:
    """One benchmark configuration of one op (or one model's training step).

    setup: () -> list of inputs; floating tensors with requires_grad=True get gradients in fwd+bwd.
    fns: label -> callable(*inputs) returning a tensor or tuple of tensors (forward only).
    flops / bytes: per forward ("fwd") and per backward ("bwd"); 0 when not meaningful.
    """

    op: str
    name: str
    setup: Callable[[], list[Any]]
    fns: dict[str, Callable[..., Any]]
    flops: dict[str, float] = dataclasses.field(default_factory=dict)
    bytes: dict[str, float] = dataclasses.field(default_factory=dict)
    flop_formula: str = ""
    byte_formula: str = ""
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    backward: bool = True
    kind: str = "op"  # "op" or "model" (a model case's fwd+bwd is one training step)
    items: int = 0  # images per call, for a model case's images/s


def compiled(fn: Callable[..., Any], mode: str | None = None) -> Callable[..., Any]:
    """torch.compile of ``fn`` (built lazily so a failure is reported per case, not at import)."""
    holder: dict[str, Callable[..., Any]] = {}

    def run(*args: Any) -> Any:
        if "f" not in holder:
            holder["f"] = torch.compile(fn, mode=mode)
        return holder["f"](*args)

    return run


def standard_labels(
    reference: Callable[..., Any], quick: bool, max_autotune: bool = False
) -> dict[str, Callable[..., Any]]:
    """reference + torch.compile of it; + max-autotune when asked (a target names it) and not quick.

    max-autotune compiles take minutes per shape, so only cases whose target is stated against it
    request it, to keep the GPU suite within its time limit.
    """
    fns = {REFERENCE: reference, "compile": compiled(reference)}
    if max_autotune and not quick:
        fns["compile-max"] = compiled(reference, "max-autotune")
    return fns


# --- timing -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> float:
    """Median milliseconds of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def outputs(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for t in x if isinstance(t, torch.Tensor)]


def _matmul_tflops(device: torch.device, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / time_ms(lambda: a @ b, device, 0, 0) / 1e9


def _copy_gbs(device: torch.device, numel: int = 2**28) -> float:
    src = torch.empty(numel, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    return 2 * numel * 4 / time_ms(lambda: dst.copy_(src), device, 0, 0) / 1e6


def measure_ceilings(device: torch.device, quick: bool) -> dict[str, float]:
    """Measured bf16 matmul TFLOP/s and device copy GB/s (reads + writes) on this device."""
    if device.type != "cuda" or quick:
        return {}
    out = {"bf16_matmul_tflops": _matmul_tflops(device), "copy_gbs": _copy_gbs(device)}
    torch.cuda.empty_cache()
    return out


def _saved_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs (activation memory)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def run_case(case: Case, label: str, device: torch.device, quick: bool) -> dict[str, Any]:
    fn = case.fns[label]
    row: dict[str, Any] = {"op": case.op, "case": case.name, "backend": label, "kind": case.kind}
    # a quick run is a smoke test (never a speed claim): on a CPU one timed call, no warm-up
    reps, warmup = ((1, 0) if device.type == "cpu" else (2, 1)) if quick else (20, 3)
    try:
        inputs = case.setup()
        grads_of = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

        def fwd() -> Any:
            with torch.no_grad():
                return fn(*inputs)

        row["fwd_ms"] = time_ms(fwd, device, reps, warmup)
        if case.backward and grads_of:
            outs = outputs(fn(*inputs))
            gs = [torch.randn_like(o) for o in outs if o.requires_grad]
            del outs

            def fwd_bwd() -> None:
                o = [t for t in outputs(fn(*inputs)) if t.requires_grad]
                torch.autograd.backward(o, gs)
                for x in grads_of:
                    x.grad = None

            row["fwd_bwd_ms"] = time_ms(fwd_bwd, device, reps, warmup)
            if case.kind == "op":
                row["saved_mb"] = _saved_bytes(lambda: fn(*inputs)) / 2**20
            if device.type == "cuda":
                # Peak of one warm step, measured after timing: the timer's L2-flush buffer and any
                # compilation in the first calls must not count.
                _sync(device)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                fwd_bwd()
                _sync(device)
                row["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        row["status"] = "ok"
    except Exception as e:  # a failing backend is reported, never silently dropped
        row["status"] = f"error: {e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        row["traceback"] = traceback.format_exc(limit=4)
    return row


def _derive(row: dict[str, Any], case: Case, ceilings: dict[str, float]) -> None:
    if case.items and row.get("fwd_bwd_ms"):
        row["images_per_s"] = case.items / (row["fwd_bwd_ms"] / 1e3)
    f_fwd, f_bwd = case.flops.get("fwd", 0.0), case.flops.get("bwd", 0.0)
    b_fwd, b_bwd = case.bytes.get("fwd", 0.0), case.bytes.get("bwd", 0.0)
    for key, fl, by in (("fwd", f_fwd, b_fwd), ("fwd_bwd", f_fwd + f_bwd, b_fwd + b_bwd)):
        ms = row.get(f"{key}_ms")
        if not ms:
            continue
        if fl:
            row[f"{key}_tflops"] = fl / ms / 1e9
            if "bf16_matmul_tflops" in ceilings:
                row[f"{key}_frac_matmul_peak"] = row[f"{key}_tflops"] / ceilings["bf16_matmul_tflops"]
        if by:
            row[f"{key}_gbs"] = by / ms / 1e6
            if "copy_gbs" in ceilings:
                row[f"{key}_frac_copy_bw"] = row[f"{key}_gbs"] / ceilings["copy_gbs"]


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    try:
        env["git"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or None
        )
    except OSError:
        env["git"] = None
    return env


def run(
    cases: Sequence[Case],
    device: torch.device,
    quick: bool,
    out_dir: Path | None = None,
    labels: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Run every case; with ``budget_s``, cases not started within that many seconds are reported as
    not run (so a run under a wall-clock limit still ends with complete, honest reports)."""
    t_start = time.perf_counter()
    ceilings = measure_ceilings(device, quick)
    if ceilings:
        log(f"ceilings: bf16 matmul {ceilings['bf16_matmul_tflops']:.0f} TFLOP/s, copy {ceilings['copy_gbs']:.0f} GB/s")
    rows: list[dict[str, Any]] = []
    result = {
        "environment": environment(device),
        "quick": quick,
        "ceilings": ceilings,
        "formulas": {f"{c.op}/{c.name}": {"flops": c.flop_formula, "bytes": c.byte_formula} for c in cases},
        "rows": rows,
    }
    for case in cases:
        if budget_s is not None and time.perf_counter() - t_start > budget_s:
            for label in case.fns:
                rows.append({"op": case.op, "case": case.name, "backend": label, "kind": case.kind,
                             "status": f"not run: time budget of {budget_s:.0f} s used up"})  # fmt: skip
            log(f"{case.op:<18} {case.name:<40} not run: time budget used up")
            continue
        for label in case.fns:
            if labels and label not in labels and label != REFERENCE:
                continue
            row = run_case(case, label, device, quick)
            _derive(row, case, ceilings)
            rows.append(row)
            log(_row_text(row))
            if out_dir is not None:  # after every label, so a run stopped by a time limit keeps what it measured
                _ratios(rows)
                write_reports(result, out_dir, chart_too=False)
        for label, why in case.notes.items():
            rows.append(
                {"op": case.op, "case": case.name, "backend": label, "kind": case.kind, "status": f"not run: {why}"}
            )
            log(f"{case.op:<18} {case.name:<40} {label:<16} not run: {why}")
        _ratios(rows)
        if out_dir is not None:  # after every case, so a run stopped by a time limit keeps what it measured
            write_reports(result, out_dir, chart_too=False)
    if out_dir is not None:
        write_reports(result, out_dir)
    return result


def _ratios(rows: list[dict[str, Any]]) -> None:
    """speedup of each backend over every other backend of the same case (ratio > 1: this one faster)."""
    by_case: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            by_case.setdefault((r["op"], r["case"]), []).append(r)
    for group in by_case.values():
        for r in group:
            for key in ("fwd_ms", "fwd_bwd_ms"):
                if key not in r:
                    continue
                r[f"speedup_{key[:-3]}"] = {o["backend"]: o[key] / r[key] for o in group if o.get(key)}


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return format(v, spec) if isinstance(v, float) else str(v)


def _row_text(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r['op']:<18} {r['case']:<40} {r['backend']:<16} {r.get('status')}"
    return (
        f"{r['op']:<18} {r['case']:<40} {r['backend']:<16} fwd {_fmt(r.get('fwd_ms'))} ms  "
        f"fwd+bwd {_fmt(r.get('fwd_bwd_ms'))} ms"
    )


def markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        "# fm_engine benchmark",
        "",
        f"device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; CUDA {env.get('cuda')}; "
        f"git {env.get('git')}; {env['time']}",
        "",
    ]
    if result["quick"]:
        lines += ["**Smoke run (quick cases): these numbers are not speed claims.**", ""]
    c = result["ceilings"]
    if c:
        lines += [
            f"Measured ceilings: bf16 matmul {c['bf16_matmul_tflops']:.0f} TFLOP/s; "
            f"device copy {c['copy_gbs']:.0f} GB/s (reads + writes).",
            "",
        ]
    lines += [
        "| op | case | backend | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd GB/s | % matmul peak (f+b) "
        "| % copy BW (f+b) "
        "| peak MB | saved MB | images/s (step) | x reference (f+b) | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        sp = r.get("speedup_fwd_bwd") or r.get("speedup_fwd") or {}
        lines.append(
            f"| {r['op']} | {r['case']} | {r['backend']} | {_fmt(r.get('fwd_ms'))} | {_fmt(r.get('fwd_bwd_ms'))} | "
            f"{_fmt(r.get('fwd_tflops'), '.1f')} | {_fmt(r.get('fwd_bwd_gbs'), '.0f')} | "
            f"{_fmt(100 * r['fwd_bwd_frac_matmul_peak'] if 'fwd_bwd_frac_matmul_peak' in r else None, '.1f')} | "
            f"{_fmt(100 * r['fwd_bwd_frac_copy_bw'] if 'fwd_bwd_frac_copy_bw' in r else None, '.1f')} | "
            f"{_fmt(r.get('peak_mem_mb'), '.0f')} | {_fmt(r.get('saved_mb'), '.1f')} | "
            f"{_fmt(r.get('images_per_s'), '.1f')} | "
            f"{_fmt(sp.get(REFERENCE), '.2f')} | {r.get('status')} |"
        )
    lines += ["", "## Formulas", ""]
    for key, f in result["formulas"].items():
        lines.append(f"- `{key}`: FLOP = {f['flops'] or '–'}; bytes = {f['bytes'] or '–'}")
    return "\n".join(lines) + "\n"


def write_reports(result: dict[str, Any], out_dir: Path, chart_too: bool = True) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(result))
    if not chart_too:
        return
    try:
        chart(result, out_dir / "results.png")
    except ImportError:
        print("matplotlib not importable: no chart written", file=sys.stderr)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
    labels = list(dict.fromkeys(r["backend"] for r in rows))
    if not cases:
        return
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    width = 0.8 / max(1, len(labels))
    for j, lab in enumerate(labels):
        ys = []
        for op, cs in cases:
            r = next((x for x in rows if x["op"] == op and x["case"] == cs and x["backend"] == lab), None)
            sp = (r or {}).get("speedup_fwd_bwd") or (r or {}).get("speedup_fwd") or {}
            ys.append(sp.get(REFERENCE, 0.0))
        ax.bar([i + j * width for i in range(len(cases))], ys, width, label=lab)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{o}\n{c}" for o, c in cases], fontsize=6, rotation=30, ha="right")
    ax.set_ylabel("speedup over eager reference (fwd+bwd)")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.legend(fontsize=6)
    title = "fm_engine (smoke run, not a speed claim)" if result["quick"] else result["environment"]["device"]
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
