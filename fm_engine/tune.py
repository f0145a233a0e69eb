"""``fm-engine tune``: measure which backend is fastest for the op calls a workload makes, on this GPU.

* ``--model NAME [--batch B]``: record the op calls of one training step of a registered model (as
  ``fm-engine bench --breakdown`` does, bf16 autocast on CUDA) and time every distinct measurement
  bucket on every backend that accepts it, forward and forward + backward.
* ``--op NAME``: the same for the benchmark cases of one op (or op family).
* ``--from-results FILE --device-class CLASS``: no timing; turn a committed benchmark ``results.json``
  (``fm-engine bench``) into table entries (how the package table was started from the first H200 run).

Results go to the user table (``$FM_ENGINE_CACHE_DIR/tables/<device>.json``, replacing entries of the same
buckets); ``--ship`` also writes the package table ``fm_engine/evidence/<device>.json`` to commit. It
prints what changed: for each bucket, the backend automatic dispatch picked before and picks now.
A progress bar shows the work; Ctrl-C stops and keeps what was measured. Automatic dispatch reads the
tables from then on (fm_engine.ops._evidence); nothing is ever timed inside a normal call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import torch

from fm_engine import _device
from fm_engine.ops import _evidence as E
from fm_engine.ops import get_op
from fm_engine.ops._record import Call, DryRun, record


def _auto_choice(ops: dict[str, Any], op: str, key: str) -> str:
    entry = ops.get(op, {}).get(key)
    if entry is None:
        return "no measurement"
    match = E.Match(key, True, entry, E.Table(Path("-"), "user", None, {}, ""))
    ref, fast = E.ranking(match, E.Bucket.parse(key).grad, op)
    if ref is None:
        return "reference"
    return next((b for b, t in fast if t < E.MARGIN * ref), "reference")


def _entry(op: str, times: dict[str, dict[str, Any]], grad: bool, source: str) -> dict[str, Any] | None:
    """A table entry from per-backend timings (only backends that ran; the reference must be among them), each
    fast backend stamped with the version of its kernels."""
    backends: dict[str, dict[str, Any]] = {}
    for b, t in times.items():
        if t.get("status") != "ok":
            continue
        m = {k: float(t[k]) for k in ("fwd_ms", "fwd_bwd_ms") if t.get(k)}
        if grad and "fwd_bwd_ms" not in m:
            continue
        backends[b] = m if grad else {"fwd_ms": m["fwd_ms"]}
        version = E.backend_version(op, b)
        if version is not None:
            backends[b]["version"] = version
    if E.REFERENCE not in backends:
        return None
    return {"backends": backends, **E.environment_stamp(), "date": datetime.date.today().isoformat(), "source": source}


def _no_grad_key(key: str) -> str:
    return key.replace(",grad=1|", ",grad=0|")


def measure_calls(
    calls: list[Call], device: torch.device, quick: bool, source: str, progress: bool = True
) -> dict[str, dict[str, dict[str, Any]]]:
    """Time each distinct bucket of ``calls`` on every backend of its op -> {op: {bucket: entry}}.

    A grad bucket also yields the forward-only entry of the same sizes. Ctrl-C returns what is done."""
    from tqdm import tqdm

    from fm_engine.benchmarks.breakdown import time_call  # type: ignore[import-not-found]

    seen: dict[tuple[str, str], Call] = {}
    for c in calls:
        if c.bucket is not None:
            seen.setdefault((c.op, c.bucket), c)
    work = [(k, c, b) for k, c in seen.items() for b in get_op(c.op).backends]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    timings: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    bar = tqdm(work, desc="tune", unit="run", disable=not progress, file=sys.stderr)
    try:
        for (op, key), call, backend in bar:
            bar.set_postfix_str(f"{op} {backend}")
            timings.setdefault((op, key), {})[backend] = time_call(call, backend, device, quick)
    except KeyboardInterrupt:
        print("\ninterrupted: keeping the buckets measured on every backend so far", file=sys.stderr)
    finally:
        bar.close()
    for (op, key), times in timings.items():
        if set(times) != set(get_op(op).backends):
            continue  # interrupted before every backend of this bucket ran: not a complete comparison
        grad = E.Bucket.parse(key).grad
        entry = _entry(op, times, grad, source)
        if entry is not None:
            out.setdefault(op, {})[key] = entry
        if grad:
            fwd_only = _entry(op, times, False, source)
            if fwd_only is not None:
                out[op].setdefault(_no_grad_key(key), fwd_only)
    return out


def record_model_step(name: str, device: torch.device, quick: bool, batch: int | None, setting: str) -> list[Call]:
    """The op calls of one training step of a registered model (reference backend, recorded shapes)."""
    from fm_engine.benchmarks import models  # type: ignore[import-not-found]
    from fm_engine.models.registry import get_spec

    spec = get_spec(name)
    model = models.build(name, device, setting)
    data = spec.example(model, batch or models.default_batch(quick), device, quick)
    with record() as rec:
        models.step_fn(name, model, data, device, "reference")().backward()
    return rec.calls


def _cases(names: list[str], device: torch.device, quick: bool) -> list[Any]:
    from fm_engine import benchmarks  # type: ignore[attr-defined]

    mods = benchmarks.op_modules()
    out = []
    for name in names:
        if name in mods:
            out += mods[name].cases(device, quick)
            continue
        picked = [c for m in mods.values() for c in m.cases(device, quick) if c.op == name]
        if not picked:
            raise SystemExit(f"--op: unknown op or op family {name!r}")
        out += picked
    return out


def _nothing_runs_here(ops: list[str], device: torch.device) -> str:
    """Why ``fm-engine tune --op`` measured nothing on ``device``: per op, the backends that run here and those
    that need something else (a GPU, or Triton's CPU interpreter), with the reason each one gives."""
    lines = [f"nothing measured on {device.type}: no fast backend of {', '.join(ops)} runs here (the reference"]
    lines[0] += " is all automatic dispatch can pick, with or without a table)"
    for op in ops:
        here: list[str] = []
        elsewhere: list[str] = []
        for name, b in sorted(get_op(op).backends.items()):
            why = b.available()
            (here if why is None else elsewhere).append(name if why is None else f"{name} ({why})")
        no = "; ".join(elsewhere) or "none"
        lines.append(f"  {op}: runs here: {', '.join(here) or 'none'}; cannot run here: {no}")
    lines.append("run `fm-engine tune --op ...` on the GPU machine that will train (or TRITON_INTERPRET=1 to check")
    lines[-1] += " the Triton path on a CPU; interpreter timings say nothing about GPU speed)"
    return "\n".join(lines)


def record_case_calls(case: Any, dry: bool = False) -> list[Call]:
    """The op calls of one benchmark case: each label that goes through the op runs once under a recorder
    (``dry``: stopped after validation, for meta tensors)."""
    inputs = case.setup()
    for label, fn in case.fns.items():
        if label == E.REFERENCE or label not in get_op(case.op).backends:
            continue
        with record(dry=dry) as rec:
            try:
                fn(*inputs)
            except DryRun:
                pass
            except Exception as e:  # this label cannot run here: try the next
                if not rec.calls:
                    print(f"  {case.op} {case.name}: {label} did not run ({e.__class__.__name__})", file=sys.stderr)
                    continue
        if rec.calls:
            return rec.calls
    return []


def from_results(results: dict[str, Any], source: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Table entries from a benchmark results.json: each case rebuilt on the meta device to find its bucket."""
    from fm_engine import benchmarks  # type: ignore[attr-defined]

    quick = bool(results.get("quick"))
    cases = {}
    for m in benchmarks.op_modules().values():
        for c in m.cases(torch.device("meta"), quick):
            cases[(c.op, c.name)] = c
    by_case: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for r in results.get("rows", []):
        if r.get("kind", "op") == "op":
            by_case.setdefault((r["op"], r["case"]), {})[r["backend"]] = r
    out: dict[str, dict[str, dict[str, Any]]] = {}
    env = results.get("environment", {})
    for key, rows in by_case.items():
        case = cases.get(key)
        if case is None:
            print(f"  {key[0]} {key[1]}: no such benchmark case now: skipped", file=sys.stderr)
            continue
        calls = record_case_calls(case, dry=True)
        if not calls or calls[0].bucket is None:
            continue
        backends = get_op(key[0]).backends
        times = {b: r for b, r in rows.items() if b in backends}
        bucket = calls[0].bucket
        grad = E.Bucket.parse(bucket).grad
        for k, g in ((bucket, grad), (_no_grad_key(bucket), False)):
            entry = _entry(key[0], times, g, source)
            if entry is not None:
                entry.update({"torch": env.get("torch"), "triton": env.get("triton"), "date": env.get("time", "")[:10]})
                out.setdefault(key[0], {})[k] = entry
    return out


def merge(path: Path, device_class: str, measured: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Add ``measured`` to the table at ``path``; return one line per bucket whose automatic choice changed."""
    data = E.load_for_update(path, device_class)
    changes = []
    for op, buckets in sorted(measured.items()):
        for key, entry in sorted(buckets.items()):
            before = _auto_choice(data["ops"], op, key)
            data["ops"].setdefault(op, {})[key] = entry
            after = _auto_choice(data["ops"], op, key)
            ref = entry["backends"][E.REFERENCE]
            metric = E.metric(E.Bucket.parse(key).grad)
            ratios = ", ".join(
                f"{b} {ref[metric] / t[metric]:.2f}x" for b, t in entry["backends"].items() if b != E.REFERENCE
            )
            mark = "" if before == after else f"  (was: {before})"
            changes.append(f"{op:<18} {key}: auto -> {after}{mark}  [{ratios or 'no fast backend ran'}]")
    E.write_table(path, data)
    E.reload()
    return changes


def cmd_tune(a: argparse.Namespace) -> int:
    if a.from_results:
        if not a.device_class:
            raise SystemExit("--from-results needs --device-class (the device the results were measured on)")
        if not E.interpreting():
            # The benchmark cases offer their Triton label (the one that calls the op, which the dry recorder
            # needs) only where Triton can run: rebuild them in a CPU interpreter process. Nothing runs there.
            import os
            import subprocess

            env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
            return subprocess.run([sys.executable, "-m", "fm_engine", *sys.argv[1:]], env=env, check=False).returncode
        res = json.loads(Path(a.from_results).read_text())
        measured = from_results(res, source=str(a.from_results))
        cls = a.device_class
    else:
        if E.interpreting():  # the interpreter's bf16 arithmetic made to match the GPU's, as in the tests
            from fm_engine.testing import patch_triton_interpreter

            patch_triton_interpreter()
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        quick = a.quick or device.type != "cuda"
        cls = _device.device_class(device)
        calls: list[Call] = []
        if a.model:
            for name in a.model:
                for setting in a.setting or ["defaults", "dropout 0"]:
                    calls += record_model_step(name, device, quick, a.batch, setting)
        cases = _cases(a.op or [], device, quick)
        for case in cases:
            calls += record_case_calls(case)
        if not calls and cases:
            print(_nothing_runs_here(sorted({c.op for c in cases}), device))
            return 0
        if not calls:
            raise SystemExit("nothing to tune: pass --model NAME or --op NAME")
        src = f"fm-engine tune {' '.join(sys.argv[2:])}".strip()
        measured = measure_calls(calls, device, quick, source=src, progress=not a.no_progress)
    print(f"device class: {cls}")
    n = sum(len(v) for v in measured.values())
    changes = merge(E.table_path("user", cls), cls, measured)
    print(f"wrote {E.table_path('user', cls)} ({n} buckets measured)")
    if a.ship:
        merge(E.table_path("package", cls), cls, measured)
        print(f"wrote {E.table_path('package', cls)} (commit it: the package table)")
    for line in changes:
        print("  " + line)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "tune",
        help="measure the fastest backend per op call on this GPU (the evidence automatic dispatch follows)",
        description=(__doc__ or "").split("\n\n")[0],
    )
    p.add_argument("--model", action="append", help="registered model whose training step to tune (repeatable)")
    p.add_argument("--op", action="append", help="op or op family whose benchmark cases to tune (repeatable)")
    p.add_argument("--batch", type=int, default=None, help="batch size for --model (default 4; 1 with --quick)")
    p.add_argument("--setting", action="append", choices=("defaults", "dropout 0"), help="--model settings")
    p.add_argument("--quick", action="store_true", help="tiny sizes (always on a CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--ship", action="store_true", help="also write the package table fm_engine/evidence/<device>.json")
    p.add_argument("--from-results", metavar="FILE", help="make entries from a benchmark results.json (no timing)")
    p.add_argument("--device-class", help="with --from-results: the device class the results were measured on")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)
