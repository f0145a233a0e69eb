"""Benchmarks of fm_engine (installed as ``fm_engine.benchmarks``; ``python -m benchmarks`` in the repo).

One case module per op family (``benchmarks/<op>.py`` defining ``cases(device, quick)``), model
training-step cases in ``benchmarks/models.py``, the runner in ``benchmarks/harness.py`` and the GPU
suite in ``benchmarks/gpu_suite.sh``.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fm_engine.models.registry import get_spec

from . import breakdown, harness, models

_NOT_CASE_MODULES = {"harness", "models", "breakdown", "suite", "pytest_progress", "kernel_report", "__main__"}


def op_modules() -> dict[str, ModuleType]:
    """Case modules by op name."""
    mods = {}
    for m in pkgutil.iter_modules(__path__):
        if m.name.startswith("_") or m.name in _NOT_CASE_MODULES:
            continue
        mods[m.name] = importlib.import_module(f"{__name__}.{m.name}")
    return mods


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--op", action="append", help="op family to benchmark (repeatable; 'all' for every one); default: all"
    )
    p.add_argument("--model", action="append", help="registered model whose training step to benchmark (repeatable)")
    p.add_argument("--batch", type=int, default=None, help="batch size of --model steps (default 4; 1 with --quick)")
    p.add_argument(
        "--setting",
        action="append",
        choices=("defaults", "dropout 0"),
        help="--model settings to run (repeatable; default: both the model's defaults and dropout 0)",
    )
    p.add_argument(
        "--max-batch", action="store_true", help="with --model: only find the largest batch whose training step fits"
    )
    p.add_argument(
        "--interleave",
        action="store_true",
        help="order cases round-robin across ops (each op's headline case first), so a --budget cut leaves no op "
        "unmeasured",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="with --model: time every op call of one training step on every backend (writes breakdown.md/.json)",
    )
    p.add_argument("--profile", action="store_true", help="with --breakdown: add the step's top 30 kernels")
    p.add_argument("--backend", action="append", help="only these backend labels (the reference always runs)")
    p.add_argument("--out", type=Path, default=None, help="output folder for results.json / .md / .png")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny cases (default on CPU): a smoke test, no speed claims")
    size.add_argument("--full", action="store_true", help="real sizes (default on a GPU)")
    p.add_argument("--list", action="store_true", help="list op families and exit")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop starting new cases after this many seconds (the rest are reported as not run)",
    )


def interleave(groups: list[list[harness.Case]]) -> list[harness.Case]:
    """Round-robin over the groups: every group's first case, then every second case, ..."""
    out: list[harness.Case] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fm-engine bench", description="Benchmark fm_engine ops and model training steps.")
    add_arguments(p)
    return run_args(p.parse_args(argv))


def run_args(a: argparse.Namespace) -> int:
    from fm_engine._env import interpreting

    if interpreting():  # Triton kernels in the CPU interpreter: make its bf16 arithmetic match the GPU's
        from fm_engine.testing import patch_triton_interpreter

        patch_triton_interpreter()
    mods = op_modules()
    if a.list:
        print("op families:", ", ".join(sorted(mods)))
        return 0
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    quick = a.quick or (not a.full and device.type != "cuda")
    cases: list[harness.Case] = []
    ops = a.op if a.op else ([] if a.model else ["all"])
    if "all" in ops:
        ops = sorted(mods)
    all_cases: list[harness.Case] | None = None
    groups: list[list[harness.Case]] = []
    for name in ops:
        if name in mods:  # an op family (case module): all its cases
            groups.append(mods[name].cases(device, quick))  # type: ignore[attr-defined]
            continue
        if all_cases is None:  # an op name such as relu2_mlp: the cases of that op in any family
            all_cases = [c for m in mods.values() for c in m.cases(device, quick)]  # type: ignore[attr-defined]
        picked = [c for c in all_cases if c.op == name]
        if not picked:
            known = sorted(set(mods) | {c.op for c in all_cases})
            raise SystemExit(f"--op: unknown op or op family {name!r}; known: {', '.join(known)}")
        groups.append(picked)
    cases += interleave(groups) if a.interleave else [c for g in groups for c in g]
    if (a.breakdown or a.profile or a.max_batch) and not a.model:
        raise SystemExit("--breakdown, --profile and --max-batch need --model NAME")
    if a.profile and not a.breakdown:
        raise SystemExit("--profile adds to --breakdown: pass both")
    settings = tuple(a.setting) if a.setting else models.SETTINGS
    if quick:
        print("quick run (smoke test): timings below are not speed claims")
    if a.breakdown:
        backend = a.backend[0] if a.backend else "auto"
        for name in a.model:
            for setting in settings:
                if setting == "dropout 0" and get_spec(name).dropout_off is None:
                    continue
                rep = breakdown.breakdown(
                    name, device, quick, batch_size=a.batch, setting=setting, backend=backend, profile=a.profile
                )
                if a.out:
                    stem = f"breakdown-{name}-{setting.replace(' ', '')}"
                    breakdown.write(rep, a.out, stem)
                    print(f"wrote {a.out}/{stem}.md, .json")
                else:
                    print(breakdown.markdown(rep))
        return 0
    if a.max_batch:
        rows: list[dict[str, Any]] = []
        result = {"environment": harness.environment(device), "quick": quick, "ceilings": {}, "formulas": {}}
        result["rows"] = rows
        backend = a.backend[0] if a.backend else "auto"
        for name in a.model:
            for setting in settings:
                row = models.max_batch(name, device, quick, backend=backend, setting=setting,
                                       limit=8 if quick else 4096, budget_s=a.budget or 120.0)  # fmt: skip
                print(f"{name} ({setting}, {backend}): largest batch that fits: {row['max_batch']} ({row['stopped']})")
                rows.append(row)
                if a.out:
                    harness.write_reports(result, a.out, chart_too=False)
        return 0
    labels = a.backend
    if a.model and not a.op and quick and device.type != "cuda":  # a CPU smoke test: seconds, not minutes
        if not a.backend:
            labels = ["reference", "auto"]
            print("CPU smoke test: the compile label is left out (torch.compile takes minutes on a CPU; "
                  "--backend compile runs it)")  # fmt: skip
        if not a.setting:
            settings = ("defaults",)
            print("CPU smoke test: the model defaults only (--setting 'dropout 0' adds the other setting)")
        smoke = True
    else:
        smoke = False
    for name in a.model or []:
        over = models.smoke_overrides(name) if smoke else {}
        if over:
            print(f"CPU smoke test: {name} with {', '.join(f'{k}={v}' for k, v in over.items())} (every kind of layer "
                  "runs once; --full times the registered size)")  # fmt: skip
        cases += models.cases(name, device, quick, batch_size=a.batch, settings=settings, overrides=over)
    harness.run(cases, device, quick, out_dir=a.out, labels=labels, budget_s=a.budget)
    if a.out:
        print(f"wrote {a.out}/results.json, results.md")
    return 0
