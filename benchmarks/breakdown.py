"""Where a training step's time goes: ``fm-engine bench --model NAME --breakdown [--profile]``.

1. Build the model as :mod:`benchmarks.models` does (bf16 autocast on CUDA) and run warm-up steps on
   automatic dispatch (or ``--backend``'s choice), counting Triton launches, new kernel specialisations
   and autotuning (:mod:`fm_engine.kernels._launches`) and host synchronisations.
2. Record every op call of one steady step (:mod:`fm_engine.ops._record`): op, backend chosen, shapes,
   dtypes, flags, count.
3. Time the whole step, then each distinct call alone on every backend that accepts it, forward and
   forward + backward, with fresh inputs of the recorded shapes under the recorded autocast state.
4. Report a table sorted by the total time of the chosen backend (count x per-call time), each row's
   share of the step, the step time no op accounts for, and the "steady state" counters: launches,
   new specialisations / compilations and autotune keys after warm-up, host synchronisations, and
   op calls that ran in fp32 although autocast was on.
``--profile`` adds the step's top 30 kernels from torch.profiler (self device time on CUDA, self CPU
time on a CPU).

On a CPU this runs tiny sizes in the interpreter (with ``TRITON_INTERPRET=1``) as a smoke test: the
numbers are not speed claims, but the counters are meaningful (they count what a GPU would compile).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fm_engine.ops import get_op
from fm_engine.ops._record import Call, autocast_context, record, replay_args

from . import harness, models


@dataclasses.dataclass
class SyncCount:
    count: int = 0
    where: str = ""


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts reads of tensor values on the host (item, bool, int, tolist, nonzero, ...) of tensors on
    ``device``: each is a synchronisation on a GPU. On CUDA the count comes from
    ``torch.cuda.set_sync_debug_mode`` instead (every synchronising CUDA call, wherever it happens)."""

    NAMES = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"})

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and isinstance(args[0], torch.Tensor) and args[0].device == self.device:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def host_syncs(device: torch.device) -> Iterator[SyncCount]:
    out = SyncCount()
    if device.type == "cuda":
        prev = torch.cuda.get_sync_debug_mode()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield out
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        out.count = len(msgs)
        out.where = "torch.cuda sync debug mode"
    else:
        mode = _HostReads(device)
        with mode:
            yield out
        out.count = mode.count
        out.where = "host reads of tensor values (each would synchronise on a GPU)"


def _launch_counter() -> Any:
    try:
        from fm_engine.kernels import _launches
    except ImportError:  # triton missing: nothing launches
        return contextlib.nullcontext(None)
    return _launches.count()


def time_call(call: Call, backend: str, device: torch.device, quick: bool) -> dict[str, Any]:
    """Median fwd (no grad) and fwd+bwd ms of one recorded call on one backend."""
    op = get_op(call.op)
    reps, warmup = (2, 1) if quick else (20, 3)
    args, kwargs = replay_args(call, device)
    out: dict[str, Any] = {}
    with autocast_context(call, device):
        verdict = op.verdict(backend, args, kwargs)
        if not verdict.ok:
            return {"status": f"not run: {verdict.reason}"}

        def fwd() -> Any:
            with torch.no_grad():
                return op(*args, backend=backend, **kwargs)

        try:
            out["fwd_ms"] = harness.time_ms(fwd, device, reps, warmup)
            leaves = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
            if call.needs_grad and leaves:
                outs = [o for o in harness.outputs(op(*args, backend=backend, **kwargs)) if o.requires_grad]
                grads = [torch.randn_like(o) for o in outs]
                del outs

                def fwd_bwd() -> None:
                    o = [t for t in harness.outputs(op(*args, backend=backend, **kwargs)) if t.requires_grad]
                    torch.autograd.backward(o, grads)
                    for leaf in leaves:
                        leaf.grad = None

                out["fwd_bwd_ms"] = harness.time_ms(fwd_bwd, device, reps, warmup)
            out["status"] = "ok"
        except Exception as e:  # reported per backend, never hidden
            out["status"] = f"error: {e.__class__.__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return out


def _fp32_under_autocast(call: Call) -> bool:
    from fm_engine.ops._record import TensorSpec

    floats = [a for a in (*call.args, *call.kwargs.values()) if isinstance(a, TensorSpec) and a.dtype.is_floating_point]
    return call.autocast is not None and any(a.dtype == torch.float32 for a in floats)


def breakdown(
    name: str,
    device: torch.device,
    quick: bool,
    *,
    batch_size: int | None = None,
    setting: str = "defaults",
    backend: str = "auto",
    profile: bool = False,
    warmup_steps: int = 2,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the breakdown (see the module docstring) and return its report."""
    from fm_engine.models.registry import get_spec

    spec = get_spec(name)
    b = batch_size or models.default_batch(quick)
    model = models.build(name, device, setting)
    batch = spec.example(model, b, device, quick)
    loss_fn = models.step_fn(name, model, batch, device, backend)

    def step() -> None:
        loss_fn().backward()
        model.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    with _launch_counter() as warm_launches:
        for _ in range(warmup_steps):
            step()
    harness._sync(device)
    warmup_s = time.perf_counter() - t0
    with _launch_counter() as steady_launches, host_syncs(device) as syncs, record() as rec:
        step()
    harness._sync(device)
    reps, wu = (2, 0) if quick else (10, 1)
    step_ms = harness.time_ms(step, device, reps, wu)
    log(f"{name} B{b} {setting} on {backend}: step {step_ms:.3f} ms, {len(rec.calls)} distinct op calls")

    rows: list[dict[str, Any]] = []
    for call in rec.calls:
        # not `compile`: two torch.compile compilations per distinct call would dwarf the step (tuning measures it)
        backends = [n for n in get_op(call.op).backends if n != "compile" or call.backend == "compile"]
        times = {bk: time_call(call, bk, device, quick) for bk in backends}
        key = "fwd_bwd_ms" if call.needs_grad else "fwd_ms"
        chosen = times.get(call.backend, {})
        per_call = chosen.get(key)
        total = per_call * call.count if per_call is not None else None
        rows.append(
            {
                "op": call.op,
                "backend": call.backend,
                "count": call.count,
                "inputs": call.signature(),
                "bucket": call.bucket,
                "needs_grad": call.needs_grad,
                "fp32_under_autocast": _fp32_under_autocast(call),
                "per_call_ms": per_call,
                "total_ms": total,
                "share": total / step_ms if total is not None and step_ms else None,
                "backends": times,
            }
        )
        log(f"  {call.op:<18} {call.backend:<10} x{call.count:<3} {_ms(total)} ms  {call.signature()[:90]}")
    rows.sort(key=lambda r: -(r["total_ms"] or 0.0))
    accounted = sum(r["total_ms"] or 0.0 for r in rows)
    report: dict[str, Any] = {
        "environment": harness.environment(device),
        "model": name,
        "batch": b,
        "setting": setting,
        "backend": backend,
        "amp": "bf16" if device.type == "cuda" else None,
        "quick": quick,
        "warmup_steps": warmup_steps,
        "warmup_s": warmup_s,
        "step_ms": step_ms,
        "ops_ms": accounted,
        "unattributed_ms": step_ms - accounted,
        "rows": rows,
        "steady_state": {
            "launches": steady_launches.as_dict() if steady_launches is not None else None,
            "warmup_launches": warm_launches.total_launches if warm_launches is not None else None,
            "host_syncs": syncs.count,
            "host_syncs_counted_as": syncs.where,
            "fp32_calls_under_autocast": sum(r["count"] for r in rows if r["fp32_under_autocast"]),
        },
    }
    if profile:
        report["profile"] = profile_step(step, device)
    return report


def profile_step(step: Callable[[], None], device: torch.device, top: int = 30) -> dict[str, Any]:
    """The step's top kernels by self device time (CUDA) or self CPU time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()  # warm
    harness._sync(device)
    with profile(activities=acts) as prof:
        step()
        harness._sync(device)
    events = prof.key_averages()
    cuda = device.type == "cuda"

    def self_time(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if cuda else e.self_cpu_time_total)

    ranked = sorted(events, key=self_time, reverse=True)[:top]
    kernels = [
        {"name": e.key[:160], "self_ms": self_time(e) / 1e3, "calls": int(e.count)} for e in ranked if self_time(e) > 0
    ]
    total = sum(self_time(e) for e in events) / 1e3
    launches = sum(int(e.count) for e in events if cuda and getattr(e, "device_type", None) is not None
                   and "CUDA" in str(e.device_type))  # fmt: skip
    return {"by": "self device time" if cuda else "self CPU time", "total_ms": total, "top": kernels,
            "device_kernel_launches": launches if cuda else None}  # fmt: skip


def _ms(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def markdown(rep: dict[str, Any]) -> str:
    env = rep["environment"]
    ss = rep["steady_state"]
    lines = [
        f"# Step breakdown: {rep['model']} B{rep['batch']} ({rep['setting']}, {rep['backend']})",
        "",
        f"device: {env['device']}; torch {env['torch']}; triton {env.get('triton')}; git {env.get('git')}; "
        f"autocast {rep['amp'] or 'off'}",
        "",
    ]
    if rep["quick"]:
        lines += ["**Smoke run (tiny sizes): timings are not speed claims.**", ""]
    lines += [
        f"Step: {_ms(rep['step_ms'])} ms; op calls account for {_ms(rep['ops_ms'])} ms; "
        f"**not accounted for by any op: {_ms(rep['unattributed_ms'])} ms** (plain PyTorch between fm_engine ops: "
        f"projections, norms, losses; launch gaps). Warm-up ({rep['warmup_steps']} steps): {rep['warmup_s']:.2f} s.",
        "",
        "Steady state (one step after warm-up): "
        f"{(ss['launches'] or {}).get('launches', '–')} Triton launches, "
        f"{len((ss['launches'] or {}).get('new_specializations', []))} new kernel specialisations, "
        f"{(ss['launches'] or {}).get('compilations', '–')} compilations, "
        f"{len((ss['launches'] or {}).get('autotune_keys', []))} new autotune keys, "
        f"{ss['host_syncs']} host synchronisations ({ss['host_syncs_counted_as']}), "
        f"{ss['fp32_calls_under_autocast']} op calls in fp32 under autocast.",
        "",
        "| # | op | backend | calls | per call ms | total ms | share of step | other backends (per call ms) | inputs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rep["rows"], 1):
        key = "fwd_bwd_ms" if r["needs_grad"] else "fwd_ms"
        others = ", ".join(
            f"{b} {_ms(t.get(key))}" if t.get("status") == "ok" else f"{b}: {t.get('status', '')[:60]}"
            for b, t in r["backends"].items()
            if b != r["backend"]
        )
        share = f"{100 * r['share']:.1f}%" if r["share"] is not None else "–"
        lines.append(
            f"| {i} | {r['op']} | {r['backend']} | {r['count']} | {_ms(r['per_call_ms'])} | {_ms(r['total_ms'])} | "
            f"{share} | {others} | {r['inputs']} |"
        )
    prof = rep.get("profile")
    if prof:
        lines += ["", f"## Top kernels ({prof['by']}, total {_ms(prof['total_ms'])} ms)", ""]
        lines += ["| kernel | self ms | calls |", "|---|---|---|"]
        lines += [f"| `{k['name'][:100]}` | {_ms(k['self_ms'])} | {k['calls']} |" for k in prof["top"]]
    return "\n".join(lines) + "\n"


def write(rep: dict[str, Any], out_dir: Path, stem: str = "breakdown") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.json").write_text(json.dumps(rep, indent=1, default=str))
    (out_dir / f"{stem}.md").write_text(markdown(rep))
