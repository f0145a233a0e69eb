"""The ahead-of-time compile gate: every Triton kernel config, compiled for sm_80 and sm_90 without a GPU.

A kernel module calls :func:`register` once per kernel (and launch mode) with the argument signatures it is
launched with (one per dtype combination) and its configs. For a kernel wrapped by
:mod:`fm_engine.kernels._autotune` the configs are the tuner's own list, so every config the autotuner
may pick is compiled here. The gate compiles each (signature x config) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and rejects a case that

* needs more shared memory than the architecture has (``metadata.shared`` vs :data:`SMEM_LIMIT`), or
* spills registers, on the pinned Triton (:data:`PINNED_TRITON`) only (every case registered strictly: the configs of kernels tuned per kernel,
  :class:`~fm_engine.kernels._autotune.Autotuned`, and the cross- and temporal-attention candidates, chosen
  per flag combination to fit; the window-attention kernels register theirs with ``strict=False`` and their
  spills are printed as ``SPILL`` lines until their lists are chosen the same way): Triton 3.6 reports ``n_spills`` / ``n_regs`` only after loading a binary onto a GPU,
  so the gate reads the same facts from the cubin with ``cuobjdump -res-usage`` (shipped with Triton):
  a stack frame or local memory (``STACK`` / ``LOCAL`` > 0) is where ptxas puts spilled registers (for
  Triton kernels the two go together: a case with an 8-byte frame showed 12 bytes of spill stores in
  ``ptxas -v``).

Spills are a property of one compiler release: the candidate lists are chosen to fit on the Triton that CI
pins and the GPU machines run (:data:`PINNED_TRITON`, ``.ci/constraints.txt``). Under any other Triton a spill
is printed as a ``SPILL`` note and fails nothing (shared memory and compile errors still fail); on a GPU the
autotuner then never picks a spilling candidate when one that does not spill runs (kernels/_autotune.py).

Two depths:

* **representatives** (default; what ``tests/test_compile_gate.py`` runs inside the README's test command):
  the first config of each kernel x signature x specialization, which catches a kernel that does not
  compile at all in about a third of the time of the sweep;
* **the full sweep** (``--all``): every config. CI runs it as its own step (``.ci/run``)::

      python3 -m fm_engine.kernels._aot --all --jobs 2          # both architectures, 2 processes

  ``--arch 90`` limits it to one architecture, ``--shard i --shards n`` to a slice, ``--list`` prints the
  cases. Compilations are cached by Triton (``~/.triton/cache``, keyed by source, options and target), so
  a rerun after a change recompiles only the kernels whose source changed.

The kernel report (the launches of the ops' benchmark cases with their runtime specialisation, compiled and
checked against its rules) is a program of its own above the ops: ``python3 -m fm_engine.benchmarks.kernel_report``.

Also here: :func:`runtime_configs`, the config list for a kernel still on ``@triton.autotune`` (every config
on a GPU, only the interpreter config under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import triton

from fm_engine._env import interpreting

# The Triton the candidate lists are chosen for: the GPU machines' and CI's pinned one (.ci/constraints.txt;
# tests/test_compile_gate.py checks that the two agree). Only here does a register spill fail the gate.
PINNED_TRITON = "3.6.0"

# Max dynamic shared memory per block (bytes): A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SMEM_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class AOTCase:
    name: str
    fn: Any  # triton.JITFunction
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    aligned: bool = False  # pointers and integer arguments carry the 16-divisibility hint
    representative: bool = True  # compiled by the test suite's quick gate (else only by --all)
    arch: int | None = None  # compiled for this architecture only (per-architecture config lists)
    strict: bool = True  # a register spill fails the gate (else it is reported)

    @property
    def id(self) -> str:
        cx = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        types = ",".join(v for v in self.signature.values() if v.startswith("*"))
        arch = f",sm_{self.arch}" if self.arch else ""
        return (
            f"{self.name}[{types}][{cx},w{self.num_warps},s{self.num_stages}{',aligned' if self.aligned else ''}{arch}]"
        )

    def attrs(self) -> dict[tuple[int, ...], list[list[Any]]]:
        if not self.aligned:
            return {}
        return {
            (i,): [["tt.divisibility", 16]]
            for i, t in enumerate(self.signature.values())
            if t.startswith("*") or t in ("i32", "i64")
        }


_CASES: list[AOTCase] = []


def _unwrap(kernel: Any) -> Any:
    while not isinstance(kernel, triton.runtime.JITFunction):
        kernel = kernel.fn  # Autotuned / Autotuner / Heuristics wrap the JITFunction
    return kernel


def config_dicts(configs: list[triton.Config]) -> list[dict[str, Any]]:
    """triton.Config objects -> dicts for :func:`register`."""
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def register(
    kernel: Any,
    *,
    signatures: list[dict[str, str]],
    configs: list[dict[str, Any]] | None = None,
    constexprs: dict[str, Any] | None = None,
    name: str | None = None,
    specializations: list[dict[str, int]] | None = None,
    generic: bool = True,
    alignments: tuple[bool, ...] = (True,),
    prune_args: dict[str, Any] | None = None,
    strict: bool | None = None,
    archs: tuple[int, ...] | None = None,
    representative: bool = True,
) -> None:
    """Register every (signature x config) combination of ``kernel`` for the compile gate.

    ``kernel``: a ``@triton.jit`` function, or an :class:`~fm_engine.kernels._autotune.Autotuned` kernel.
    ``signatures``: maps of non-constexpr argument name -> Triton type ("*bf16", "i32", "fp32", ...).
    ``configs``: maps holding constexpr values plus optional "num_warps" / "num_stages"; default: the
    autotuned kernel's GPU configs for each architecture (those its ``prune`` keeps for ``prune_args``,
    the launch arguments that decide it). ``constexprs``: constexpr values common to every config.
    ``specializations``: the integer arguments that launches pass as 1 (unit strides), one map per launch
    pattern. At run time Triton specialises such arguments to constants and marks 16-aligned pointers
    and 16-divisible integers, which enables pipelined loads (and 16-byte vectors) that need more shared
    memory than the generic kernel, and changes register use; each pattern is compiled that way
    (``alignments`` (True,)), or with the unit strides but no divisibility hints (False: odd sizes), or both.
    A map may be empty: only the alignment hints. ``generic``: also compile the unspecialised signature
    (False when the launcher guarantees the unit strides, e.g. by making operands contiguous).
    The first config of each signature x variant is the representative the quick gate compiles.
    ``strict``: whether a register spill fails the gate; default: True for autotuned kernels (their configs
    are chosen to fit), False for configs given here, whose spills are then only reported. ``archs``: compile the given ``configs`` for these architectures only (per-architecture lists);
    default every one. ``representative``: False keeps every case of this call out of the quick gate.
    Under the interpreter, kernels are not JITFunctions and nothing is recorded: the gate compiles in a
    process of its own without ``TRITON_INTERPRET``.
    """
    if interpreting():
        return
    fn = _unwrap(kernel)
    label = name or getattr(kernel, "name", None) or fn.__name__
    strict = configs is None if strict is None else strict
    if configs is not None:
        per_arch: list[tuple[int | None, list[dict[str, Any]]]] = (
            [(None, configs)] if archs is None else [(a, configs) for a in archs]
        )
    else:
        if not hasattr(kernel, "configs_for"):
            raise ValueError(f"compile gate: {fn.__name__}: give configs (the kernel is not autotuned)")
        prune = getattr(kernel, "prune", None)
        lists = {}
        for cc in ARCHS:
            tuned = kernel.configs_for(cc)
            if prune is not None and prune_args is not None:
                tuned = [c for c in tuned if prune(c, {**(constexprs or {}), **prune_args})]
            lists[cc] = config_dicts(tuned)
        same = all(v == lists[ARCHS[0]] for v in lists.values())
        per_arch = [(None, lists[ARCHS[0]])] if same else [(a, v) for a, v in lists.items()]
    for arch, cfgs in per_arch:
        for sig in signatures:
            for i, cfg in enumerate(cfgs):
                cfg = {**(constexprs or {}), **cfg}
                nw = int(cfg.pop("num_warps", 4))
                ns = int(cfg.pop("num_stages", 2))
                full_sig = {}
                for arg in fn.arg_names:
                    if arg in cfg:
                        full_sig[arg] = "constexpr"
                    elif arg in sig:
                        full_sig[arg] = sig[arg]
                    else:
                        raise ValueError(f"compile gate: {fn.__name__} argument {arg!r} has no type or constexpr value")
                rep = representative and i == 0
                if generic:
                    _CASES.append(AOTCase(label, fn, full_sig, cfg, nw, ns, False, rep, arch, strict))
                for spec in specializations or []:
                    unknown = set(spec) - set(sig)
                    if unknown:
                        raise ValueError(f"compile gate: {fn.__name__} specializes unknown arguments {sorted(unknown)}")
                    sig_s = {a: ("constexpr" if a in spec else t) for a, t in full_sig.items()}
                    for al in alignments:
                        _CASES.append(AOTCase(label, fn, sig_s, {**cfg, **spec}, nw, ns, al, rep, arch, strict))


# --- what the kernel report needs from the kernel modules (benchmarks/kernel_report.py) --------------

# SMs of the GPUs each architecture's figures are for: H100 / H200 (sm_90), A100 (sm_80).
SMS = {80: 108, 90: 132}
_TARGET_SMS: list[int] = []  # set while the kernel report records launches for a GPU it does not have


@dataclasses.dataclass(frozen=True)
class KernelNotes:
    """What the kernel report cannot read from the compiled code: whether a kernel is persistent (a
    grid-stride loop over its work, so ``programs < sms`` is by design), and the reason for an exemption
    from a report rule (keys: ``"spill"``, ``"tensor_cores"``, ``"wave"``, ``"atomic"``)."""

    persistent: bool = False
    reasons: tuple[tuple[str, str], ...] = ()


_NOTES: dict[str, KernelNotes] = {}


def note(kernel: Any, *, persistent: bool = False, **reasons: str) -> None:
    """Declare facts of ``kernel`` for the kernel report (see :class:`KernelNotes`); ``reasons`` maps a rule
    to why this kernel is exempt from it, e.g. ``note(k, wave="one program per image row by design")``.
    Recorded under the interpreter too (the report reads it in a process of its own)."""
    unknown = set(reasons) - {"spill", "tensor_cores", "wave", "atomic"}
    if unknown:
        raise ValueError(f"kernel report note: unknown rules {sorted(unknown)}")
    fn = _unwrap(kernel) if not interpreting() else getattr(kernel, "fn", kernel)
    inner = getattr(fn, "fn", fn)
    _NOTES[f"{inner.__module__}.{inner.__name__}"] = KernelNotes(persistent, tuple(sorted(reasons.items())))


def notes_of(fn: Any) -> KernelNotes:
    inner = getattr(fn, "fn", fn)
    return _NOTES.get(f"{inner.__module__}.{inner.__name__}", KernelNotes())


def sm_count(device: Any) -> int | None:
    """SMs a launcher sizes its grid for: the GPU's; while the kernel report records launches of CPU
    tensors, those of the GPU it reports on; None on a CPU otherwise (the interpreter's small grids)."""
    if _TARGET_SMS:
        return _TARGET_SMS[-1]
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return None


def runtime_configs(gpu_configs: list[triton.Config], interpreter_config: triton.Config) -> list[triton.Config]:
    if interpreting():
        return [interpreter_config]
    return gpu_configs


def all_cases() -> list[AOTCase]:
    """Import every kernel module (so each registers itself) and return all cases."""
    pkg = importlib.import_module("fm_engine.kernels")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"fm_engine.kernels.{mod.name}")
    return list(_CASES)


def compile_case(case: AOTCase, arch: int) -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=case.fn, signature=case.signature, constexprs=case.constexprs, attrs=case.attrs())
    return triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": case.num_warps, "num_stages": case.num_stages},
    )


def resource_usage(kernel: Any) -> dict[str, int]:
    """Registers, stack frame, shared and local memory of a compiled kernel, read from its cubin.

    ``{"REG": 228, "STACK": 0, "SHARED": 1024, "LOCAL": 0, ...}`` (bytes per thread for STACK / LOCAL;
    SHARED is the static part only, ``metadata.shared`` has the total)."""
    n_spills = getattr(kernel, "n_spills", None)  # set once the binary was loaded on a GPU
    if n_spills is not None:
        return {"REG": int(kernel.n_regs), "STACK": 0, "LOCAL": int(n_spills)}
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+).*?STACK:(\d+).*?SHARED:(\d+).*?LOCAL:(\d+)", out, re.S)
    if m is None:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump:\n{out}")
    return dict(zip(("REG", "STACK", "SHARED", "LOCAL"), map(int, m.groups())))


def pinned_toolchain() -> bool:
    """Whether the running Triton is :data:`PINNED_TRITON`, the one whose register spills fail the gate."""
    return triton.__version__ == PINNED_TRITON


def spill_leniency(case: AOTCase, pinned: bool | None = None) -> str | None:
    """Why a spill of ``case`` is only a note (None: it fails the gate). ``pinned``: whether the Triton is the
    pinned one (default: the running one)."""
    if not case.strict:
        return "not strict: launcher-tuned candidates"
    if not (pinned_toolchain() if pinned is None else pinned):
        return f"not strict: Triton {triton.__version__}, spills fail the gate on the pinned {PINNED_TRITON} only"
    return None


def check_case(case: AOTCase, arch: int, pinned: bool | None = None) -> tuple[str | None, str | None]:
    """(why it fails, a note) for ``case`` on ``arch``: it fails when it does not compile, exceeds shared
    memory, or spills registers (a note instead of a failure for a case registered with ``strict=False``, and
    for every case under a Triton other than the pinned one; ``pinned`` overrides that test of the running
    Triton)."""
    try:
        k = compile_case(case, arch)
        shared = int(k.metadata.shared)
        if shared > SMEM_LIMIT[arch]:
            return f"needs {shared} B shared memory > limit {SMEM_LIMIT[arch]}", None
        use = resource_usage(k)
        if use.get("LOCAL", 0) or use.get("STACK", 0):
            why = (
                f"spills registers ({use.get('REG')} registers, {use.get('LOCAL', 0)} B local memory, "
                f"{use.get('STACK', 0)} B stack per thread)"
            )
            return (why, None) if spill_leniency(case, pinned) is None else (None, why)
    except Exception as e:  # report every failing case, not just the first
        msg = str(e).strip().splitlines()
        return f"{type(e).__name__}: {msg[-1] if msg else ''}", None
    return None, None


def unregistered_kernels() -> list[str]:
    """Launchable JIT kernels of the kernel modules that registered no compile-gate case.

    A kernel is launchable when one of its arguments is a pointer named ``*_ptr`` (the project's
    convention); ``@triton.jit`` helpers called from kernels take values. A helper that does take
    pointers is listed in its module's ``AOT_HELPERS`` set of names.
    """
    from fm_engine.kernels import _autotune

    all_cases()
    seen = {id(c.fn) for c in _CASES}
    missing = []
    pkg = importlib.import_module("fm_engine.kernels")
    kinds = (triton.runtime.JITFunction, triton.runtime.Autotuner, _autotune.Autotuned)
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        m = importlib.import_module(f"fm_engine.kernels.{mod.name}")
        helpers: set[str] = getattr(m, "AOT_HELPERS", set())
        for attr, obj in vars(m).items():
            if attr in helpers or not isinstance(obj, kinds):
                continue
            fn = _unwrap(obj)
            if fn.__module__ != m.__name__ or not any(a.endswith("_ptr") for a in fn.arg_names):
                continue
            if id(fn) not in seen:
                missing.append(f"{m.__name__}.{attr}")
    return missing


def _select(every: bool, shard: int, shards: int) -> list[AOTCase]:
    cases = [c for c in all_cases() if every or c.representative]
    return cases[shard::shards]


def _run_jobs(argv: list[str], jobs: int) -> int:
    """Run this gate in ``jobs`` processes over disjoint shards and merge their reports."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fm_engine.kernels._aot", *argv, f"--shard={i}", f"--shards={jobs}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(jobs)
    ]
    rc = 0
    for p in procs:
        out, _ = p.communicate()
        sys.stdout.write(out)
        rc = rc or p.returncode
    return rc


def main(argv: list[str] | None = None) -> int:
    """Compile shard ``i`` of ``n`` of the registered cases for the chosen architectures; exit 1 on a failure."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python3 -m fm_engine.kernels._aot",
        description="ahead-of-time compile gate for fm_engine's Triton kernels",
    )
    p.add_argument("--arch", type=int, action="append", choices=ARCHS, help="repeatable; default: every arch")
    p.add_argument("--all", action="store_true", help="every config (default: one representative per signature)")
    p.add_argument("--jobs", type=int, default=1, help="processes (each takes a shard of the cases)")
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--match", default="", help="only cases whose id contains this text")
    p.add_argument("--list", action="store_true", help="print the cases instead of compiling them")
    # the kernel report moved to its own command; these options only say where
    for flag in ("--report", "--check"):
        p.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.report or a.check or a.out is not None:
        raise SystemExit(
            "--report, --check, --out: the kernel report is its own command: "
            "python3 -m fm_engine.benchmarks.kernel_report [--check] [--jobs N] [--out DIR]"
        )
    if interpreting():
        raise SystemExit("the compile gate must run without TRITON_INTERPRET=1")
    archs = a.arch or list(ARCHS)
    if a.jobs > 1:
        fwd = [f"--arch={x}" for x in archs] + (["--all"] if a.all else []) + (["--list"] if a.list else [])
        fwd += [f"--match={a.match}"] if a.match else []
        return _run_jobs(fwd, a.jobs)
    cases = [c for c in _select(a.all, a.shard, a.shards) if a.match in c.id]
    if a.list:
        for c in cases:
            print(c.id)
        return 0
    if not pinned_toolchain():
        print(f"Triton {triton.__version__} is not the pinned {PINNED_TRITON}: spills are notes, not failures")
    t0 = time.perf_counter()
    failures = []
    notes = 0
    n = 0
    for arch in archs:
        for case in cases:
            if case.arch not in (None, arch):
                continue
            n += 1
            why, note = check_case(case, arch)
            if why:
                failures.append(f"{case.id} sm_{arch}: {why}")
                print("FAIL", failures[-1], flush=True)
            if note:
                notes += 1
                print(f"SPILL ({spill_leniency(case)}) {case.id} sm_{arch}: {note}", flush=True)
    depth = "every config" if a.all else "representative configs"
    spilled = f", {notes} cases spill (notes, not failures)" if notes else ""
    print(
        f"compiled {n - len(failures)}/{n} cases ({depth}{spilled}) for "
        f"{', '.join(f'sm_{x}' for x in archs)} (shard {a.shard}/{a.shards}) in {time.perf_counter() - t0:.0f} s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    # run the copy kernel modules register into, not this __main__ one
    from fm_engine.kernels import _aot

    raise SystemExit(_aot.main())
