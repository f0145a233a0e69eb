"""Training-step benchmarks of registered models, measured the way users train.

One step = the registry's ``loss`` hook (forward + the model's objective) and its backward, on a
synthetic batch from the registry's ``example`` hook, under bf16 autocast on CUDA (fp32 on a CPU).
Labels: ``reference`` (every op on its eager reference), ``auto`` (automatic dispatch: what a user of
``fm_engine.nn`` gets) and ``compile`` (``torch.compile`` of the reference step). Each model runs in two
settings: its defaults, and with every dropout off (``ModelSpec.dropout_off``; fused attention kernels
take no dropout). The harness reports median step time, images/s and the peak memory of a warm step.

:func:`max_batch` finds the largest batch whose training step fits in device memory (doubling, then
bisection; each probe runs one step).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from fm_engine import use_backend
from fm_engine.models.registry import create_model, get_spec

from .harness import Case

LABELS = ("reference", "auto", "compile")
SETTINGS = ("defaults", "dropout 0")


def amp(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (how the models are trained), nothing on a CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


# Layer-stack depths a CPU smoke test cuts to one: the step still runs every kind of layer the model has.
SMOKE_DEPTHS = ("depth", "high_res_depth")


def smoke_overrides(name: str) -> dict[str, int]:
    """Depth overrides of a CPU smoke test of ``name``: each of :data:`SMOKE_DEPTHS` the model has, set to 1."""
    return {k: 1 for k in SMOKE_DEPTHS if k in (get_spec(name).defaults or {})}


def build(name: str, device: torch.device, setting: str = "defaults", **overrides: Any) -> torch.nn.Module:
    spec = get_spec(name)
    if setting == "dropout 0":
        if spec.dropout_off is None:
            raise ValueError(f"model {name!r} declares no dropout_off overrides")
        overrides = {**spec.dropout_off, **overrides}
    elif setting != "defaults":
        raise ValueError(f"setting: expected one of {SETTINGS}, got {setting!r}")
    return create_model(name, **overrides).to(device).train()


def step_fn(
    name: str, model: torch.nn.Module, batch: tuple, device: torch.device, backend: str, compile: bool = False
) -> Callable[[], Any]:
    """The loss of one training step (forward only; the caller runs backward).

    ``compile``: ``torch.compile`` the loss, with the backend choice and autocast outside the compiled
    region (dynamo guards on both), after one eager forward has built what the loss hook caches on the
    model (M-JEPA's EMA copy: a deepcopy inside the compiled region would make dynamo give up on it)."""
    spec = get_spec(name)
    loss: Callable[..., torch.Tensor] = spec.loss
    if compile:
        with torch.no_grad(), use_backend(backend), amp(device):
            spec.loss(model, batch)
        loss = torch.compile(spec.loss)

    def step(*_: Any) -> torch.Tensor:
        with use_backend(backend), amp(device):
            return loss(model, batch)

    return step


def default_batch(quick: bool) -> int:
    return 1 if quick else 4


def cases(
    name: str,
    device: torch.device,
    quick: bool,
    batch_size: int | None = None,
    settings: tuple[str, ...] = SETTINGS,
    overrides: dict[str, Any] | None = None,
) -> list[Case]:
    """One training-step case per setting. ``overrides``: model arguments on top of the setting's (the CPU smoke
    test's shallow stacks, :func:`smoke_overrides`)."""
    spec = get_spec(name)
    b = batch_size or default_batch(quick)
    out = []
    for setting in settings:
        if setting == "dropout 0" and spec.dropout_off is None:
            continue
        model = build(name, device, setting, **(overrides or {}))
        batch = spec.example(model, b, device, quick)
        ref_model = copy.deepcopy(model)  # the compiled step gets its own copy (and its own cached objective)
        params = [p for p in model.parameters() if p.requires_grad]
        ref_params = [p for p in ref_model.parameters() if p.requires_grad]
        fns = {
            "reference": step_fn(name, model, batch, device, "reference"),
            "auto": step_fn(name, model, batch, device, "auto"),
            "compile": step_fn(name, ref_model, batch, device, "reference", compile=True),
        }
        size = "x".join(map(str, batch[0].shape[2:])) if isinstance(batch[0], torch.Tensor) else ""
        out.append(
            Case(
                op=f"model:{name}",
                name=f"train step B{b} {size} {setting}{' (small)' if quick else ''}".replace("  ", " "),
                # gradients flow to the parameters of both copies; the harness clears them after every step
                setup=functools.partial(list, [*params, *ref_params]),
                fns=fns,
                kind="model",
                items=b,
            )
        )
    return out


def _fits(name: str, model: torch.nn.Module, device: torch.device, b: int, quick: bool, backend: str) -> bool:
    spec = get_spec(name)
    try:
        batch = spec.example(model, b, device, quick)
        loss = step_fn(name, model, batch, device, backend)()
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def max_batch(
    name: str,
    device: torch.device,
    quick: bool,
    backend: str = "auto",
    start: int = 4,
    limit: int = 4096,
    budget_s: float = 120.0,
    setting: str = "defaults",
) -> dict[str, Any]:
    """Largest batch (<= ``limit``) whose training step fits: doubling from ``start``, then bisection.

    Returns a report row; ``max_batch`` is the largest batch that ran, ``stopped`` says why the search
    ended (the first batch that did not fit, the limit, or the time budget)."""
    model = build(name, device, setting)
    t0 = time.perf_counter()
    lo, hi, probes = 0, None, []
    b = start
    stopped = ""
    while hi is None or hi - lo > 1:
        if time.perf_counter() - t0 > budget_s:
            stopped = f"time budget of {budget_s:.0f} s used up (the largest batch may be larger)"
            break
        ok = _fits(name, model, device, b, quick, backend)
        probes.append((b, ok))
        if ok:
            lo = b
            if hi is None and b >= limit:
                stopped = f"reached the search limit {limit}"
                break
            b = min(2 * b, limit) if hi is None else (lo + hi) // 2
        else:
            hi = b
            b = (lo + hi) // 2
            if b <= lo:
                break
    row: dict[str, Any] = {
        "op": f"model:{name}",
        "case": f"largest batch ({setting}, {backend})",
        "backend": backend,
        "kind": "max_batch",
        "max_batch": lo,
        "probes": probes,
        "stopped": stopped or (f"batch {hi} did not fit" if hi else ""),
        "status": "ok" if lo else f"error: not even batch {start} fitted",
    }
    if device.type == "cuda":
        row["device_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return row
