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
import dataclasses
import datetime
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fm_engine import _device
from fm_engine.ops import _evidence as E
from fm_engine.ops import get_op
from fm_engine.ops._dispatch import BACKENDS, REFERENCE
from fm_engine.ops._record import Call, DryRun, autocast_context, record, replay_args


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
    calls: list[Call],
    device: torch.device,
    quick: bool,
    source: str,
    progress: bool = True,
    budget_s: float | None = None,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Time each distinct bucket of ``calls`` on every backend of its op -> {op: {bucket: entry}}.

    A grad bucket also yields the forward-only entry of the same sizes. Ctrl-C returns the buckets measured on
    every backend so far; with ``budget_s``, no new bucket starts once that many seconds are spent."""
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
    t0 = time.monotonic()
    try:
        for (op, key), call, backend in bar:
            if budget_s is not None and (op, key) not in timings and time.monotonic() - t0 > budget_s:
                # checked between buckets: a bucket once started is measured on every backend
                print(
                    f"\ntuning budget of {budget_s:g} s spent: {len(timings)} of {len(seen)} buckets measured (the "
                    "rest run as the tables say; `fm-engine tune` or a larger budget measures them)",
                    file=sys.stderr,
                )
                break
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


# Benchmark labels that share a backend's name but are peers: torch.compile of the case's whole reference function
# (benchmarks/harness.py), not the op's compile backend; their rows never become table entries.
_PEER_LABELS = ("compile", "compile-max")


def _nothing_runs_here(ops: list[str], device: torch.device) -> str:
    """Why ``fm-engine tune --op`` measured nothing on ``device``: per op, the backends that run here and those
    that need something else (a GPU, or Triton's CPU interpreter), with the reason each one gives."""
    lines = [f"nothing measured on {device.type}: the benchmark cases of {', '.join(ops)} reach the op only through"]
    lines[0] += " a hand-written backend, and none runs here (to time the compile backend against the reference"
    lines[0] += " on this machine, record a training step through the ops: `fm-engine tune --model NAME`)"
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
        if label == E.REFERENCE or label in _PEER_LABELS or label not in get_op(case.op).backends:
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
        times = {b: r for b, r in rows.items() if b in backends and b not in _PEER_LABELS}
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


# --- tune before training ------------------------------------------------------------------------------------

MODES = ("auto", "always", "off")
_said_cpu = False  # "nothing to tune on a CPU" is said once per process


@dataclasses.dataclass
class PlanRow:
    """What ``auto`` runs for one distinct (op, bucket) of a step, and what the evidence measured there."""

    op: str
    bucket: str
    calls: int  # op calls of the step that fall in this bucket
    backend: str  # what dispatch runs
    speedup: float | None  # reference time / chosen backend's time at the bucket used (None: no evidence)
    evidence: str  # "exact", "nearest" or "none"

    def as_tuple(self) -> tuple[str, str, str]:
        return (self.op, self.bucket, self.backend)


@dataclasses.dataclass
class TuneReport:
    """Result of :func:`tune_step`.

    ``measured``: buckets timed by this process (0 on ranks other than 0, and when nothing was timed);
    ``skipped``: why nothing was timed (None when it timed); ``tables``: :func:`_evidence.in_use` after tuning
    (its ``sha256`` goes into training checkpoints); ``plan``: one row per distinct (op, bucket) of the step."""

    mode: str
    device_class: str
    backend: str
    calls: list[Call]
    measured: int
    skipped: str | None
    tables: dict[str, Any]
    plan: list[PlanRow]

    def table_text(self) -> str:
        """The short table printed at the start of a training run."""
        sha = self.tables.get("sha256") or ""
        files = ", ".join(f"{t['origin']} {t['path']}" for t in self.tables.get("tables", [])) or "none"
        head = f"fm_engine backends for this step on {self.device_class} (backend {self.backend})\n"
        head += f"  tuning tables: {files}" + (f" (sha256 {sha[:12]})" if sha else "")
        if not self.plan:
            return head + "\n  (the step makes no fm_engine op calls)"
        w = max(len(r.op) for r in self.plan)
        lines = [head, f"  {'op':<{w}}  {'calls':>5}  {'runs':<10} {'vs reference':<14} bucket"]
        for r in self.plan:
            if r.speedup is None:
                ratio = "not measured" if self.backend == "auto" else "-"
            else:
                ratio = f"{r.speedup:.2f}x" + (" (nearest)" if r.evidence == "nearest" else "")
            lines.append(f"  {r.op:<{w}}  {r.calls:>5}  {r.backend:<10} {ratio:<14} {r.bucket}")
        return "\n".join(lines)


def _accepting(call: Call, device: torch.device) -> list[str]:
    """Backends that accept the recorded call (checked on fresh inputs of the same shapes)."""
    op = get_op(call.op)
    args, kwargs = replay_args(call, device)
    with autocast_context(call, device), torch.set_grad_enabled(call.grad_enabled):
        call_record = op.validate(*args, **kwargs)
        return [b for b in op.backends if op.verdict_of(b, call_record).ok]


def _live(cls: str, call: Call, accepting: list[str]) -> bool:
    """True when the call's own bucket has a measurement of the installed code of every accepting backend."""
    assert call.bucket is not None
    match = E.lookup(cls, call.op, E.Bucket.parse(call.bucket))
    if match is None or not match.exact:
        return False
    m = E.metric(E.Bucket.parse(call.bucket).grad)
    measured = match.entry["backends"]
    return all(b in measured and m in measured[b] and not E.stale(call.op, b, measured[b]) for b in accepting)


def _plan(cls: str, backend: str, calls: list[Call], accepting: dict[tuple[str, str], list[str]]) -> list[PlanRow]:
    rows: dict[tuple[str, str], PlanRow] = {}
    for c in calls:
        key = (c.op, c.bucket or "-")
        if key in rows:
            rows[key].calls += c.count
            continue
        chosen, speedup, evidence = backend if backend != "auto" else REFERENCE, None, "none"
        if c.bucket is not None:
            bucket = E.Bucket.parse(c.bucket)
            if backend == "auto":
                ok = accepting.get(key, [REFERENCE])
                order = [b for b in E.measured_order(cls, c.op, c.bucket).split(",") if b]
                chosen = next((b for b in order if b in ok), REFERENCE)
            match = E.lookup(cls, c.op, bucket)
            if match is not None:
                ref, fast = E.ranking(match, bucket.grad, c.op)
                t = ref if chosen == REFERENCE else dict(fast).get(chosen)
                if ref is not None and t:
                    speedup, evidence = ref / t, "exact" if match.exact else "nearest"
        rows[key] = PlanRow(c.op, c.bucket or "-", c.count, chosen, speedup, evidence)
    return list(rows.values())


def _share_table(cls: str) -> None:
    """Under torch.distributed: rank 0's user table (bytes, or None) goes to every rank, which writes it to its
    own user table when it differs (a shared FM_ENGINE_CACHE_DIR already holds it), so all ranks read the same."""
    import torch.distributed as dist

    path = E.table_path("user", cls)
    payload: list[Any] = [path.read_bytes() if dist.get_rank() == 0 and path.exists() else None]
    dist.broadcast_object_list(payload, src=0)
    if dist.get_rank() != 0:
        data = payload[0]
        # rank 0 has no user table: this rank's own (if any) stays; the check of the choices below catches a
        # difference it makes
        if data is not None and (not path.exists() or path.read_bytes() != data):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".json.{dist.get_rank()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
    E.reload()


def tune_step(
    step_fn: Callable[..., Any],
    *example: Any,
    mode: str = "auto",
    budget_s: float = 180.0,
    backend: str = "auto",
    device: torch.device | str | None = None,
    progress: bool = True,
    ship: bool = False,
    show: bool = True,
) -> TuneReport:
    """Measure, before training, the backends of the op calls one training step makes; print what ``auto`` runs.

    ``step_fn(*example)`` runs one training step's forward and backward (no optimizer step is needed; it runs once,
    under the op recorder of ``fm-engine tune --model``). Each distinct measurement bucket of its op calls is
    then timed on every backend that accepts it (forward, and forward + backward where gradients are needed),
    within ``budget_s`` seconds, with a progress bar, and the user table
    (``$FM_ENGINE_CACHE_DIR/tables/<device>.json``) is updated; ``ship`` also updates the package table.

    ``mode``: ``"auto"`` times only buckets without a live measurement (an exact entry of the installed code of
    every accepting backend), so a second run on the same machine starts at once; ``"always"`` re-times every
    bucket of the step; ``"off"`` times nothing. On a CPU ``"auto"`` times nothing (it says so once);
    ``"always"`` times what runs there: the reference and ``compile``, and Triton under ``TRITON_INTERPRET=1``.
    ``backend`` other than ``"auto"``: the run is pinned to it, nothing is timed.

    Under ``torch.distributed`` every rank calls this together (``step_fn`` may run collectives): rank 0 times,
    the other ranks wait and receive its user table, so every rank chooses the same backends (checked).

    ``show``: print (on rank 0) the table of what ``auto`` runs per op and bucket and its measured speed-up over
    the reference. Returns a :class:`TuneReport`.
    """
    if mode not in MODES:
        raise ValueError(f"tune mode: expected one of {MODES}, got {mode!r}")
    if not budget_s > 0:
        raise ValueError(f"tune budget_s: expected seconds > 0, got {budget_s!r}")
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend: expected one of {('auto', *BACKENDS)}, got {backend!r}")
    import torch.distributed as dist

    global _said_cpu
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    with record() as rec:
        step_fn(*example)
    calls = rec.calls
    if device is None:
        first = next((a for c in calls for a in (*c.args, *c.kwargs.values()) if hasattr(a, "device")), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    cls = _device.device_class(device)
    E.reload()  # tables may have changed on disk since this process first read them
    accepting = {(c.op, c.bucket or "-"): _accepting(c, device) for c in calls if c.bucket is not None}

    skipped: str | None = None
    if mode == "off":
        skipped = "--tune off"
    elif backend != "auto":
        skipped = f"backend {backend!r} is pinned"
    elif device.type != "cuda" and mode == "auto":
        skipped = "a CPU run (--tune always measures the reference and compile here, Triton under TRITON_INTERPRET=1)"
        if rank == 0 and not _said_cpu:
            print(f"fm_engine tuning: nothing to tune on {cls} with --tune auto: {skipped}", flush=True)
        _said_cpu = True
    todo: list[Call] = []
    if skipped is None:
        for c in calls:
            if c.bucket is None:
                continue
            if mode == "always" or not _live(cls, c, accepting[(c.op, c.bucket)]):
                todo.append(c)
        if not todo:
            skipped = "every bucket of the step has a live measurement"
    measured = 0
    if todo and rank == 0:
        if E.interpreting() and device.type == "cpu":
            from fm_engine.testing import patch_triton_interpreter

            patch_triton_interpreter()
        n = len({(c.op, c.bucket) for c in todo})
        print(f"fm_engine tuning: timing {n} buckets of this step on {cls} (budget {budget_s:g} s)", flush=True)
        quick = device.type != "cuda"
        results = measure_calls(todo, device, quick, source=f"tune_step mode={mode}", progress=progress,
                                budget_s=budget_s)  # fmt: skip
        measured = sum(len(v) for k, v in results.items())
        merge(E.table_path("user", cls), cls, results)
        print(f"fm_engine tuning: wrote {E.table_path('user', cls)} ({measured} entries)", flush=True)
        if ship:
            merge(E.table_path("package", cls), cls, results)
    if distributed:
        _share_table(cls)
    else:
        E.reload()
    plan = _plan(cls, backend, calls, accepting)
    if distributed:  # every rank must run the same kernels
        plans: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(plans, [r.as_tuple() for r in plan])
        if any(p != plans[0] for p in plans):
            raise RuntimeError(f"fm_engine tuning: ranks chose different backends: {plans}")
    report = TuneReport(mode, cls, backend, calls, measured, skipped, E.in_use(cls), plan)
    if show and rank == 0:
        print(report.table_text(), flush=True)
    return report


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
        try:
            if a.model:
                for name in a.model:
                    for setting in a.setting or ["defaults", "dropout 0"]:
                        calls += record_model_step(name, device, quick, a.batch, setting)
            cases = _cases(a.op or [], device, quick)
            for case in cases:
                calls += record_case_calls(case)
        except KeyboardInterrupt:
            print("interrupted while recording the op calls: nothing measured", file=sys.stderr)
            return 130
        if not calls and cases:
            print(_nothing_runs_here(sorted({c.op for c in cases}), device))
            return 0
        if not calls:
            raise SystemExit("nothing to tune: pass --model NAME or --op NAME")
        src = f"fm-engine tune {' '.join(sys.argv[2:])}".strip()
        measured = measure_calls(calls, device, quick, source=src, progress=not a.no_progress, budget_s=a.budget)
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
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="start no new bucket after this many seconds of timing (a bucket once started is finished)",
    )
    p.set_defaults(func=cmd_tune)
