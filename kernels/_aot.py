"""Registry of Triton kernel launch configurations for the ahead-of-time compile gate.

A kernel module calls :func:`register` once per kernel with the argument signatures it is launched
with (one per dtype combination) and its configs (constexpr values plus ``num_warps`` /
``num_stages``). The gate compiles the cross product for sm_80 and sm_90 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and checks the shared memory
each compiled kernel needs against the device limit. New kernels join the gate by registering
here; the test never needs editing.

Also here: :func:`runtime_configs`, the config list that ``@triton.autotune`` should use: every
config on a GPU, only the interpreter config under ``TRITON_INTERPRET=1`` (the interpreter has no
timer worth autotuning with, and small tiles make edge cases cheap to reach in tests).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
from typing import Any

import triton

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

    @property
    def id(self) -> str:
        cx = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()))
        types = ",".join(v for v in self.signature.values() if v.startswith("*"))
        return f"{self.name}[{types}][{cx},w{self.num_warps},s{self.num_stages}{',aligned' if self.aligned else ''}]"

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
        kernel = kernel.fn  # Autotuner / Heuristics wrap the JITFunction
    return kernel


def register(
    kernel: Any,
    *,
    signatures: list[dict[str, str]],
    configs: list[dict[str, Any]],
    name: str | None = None,
    specializations: list[dict[str, int]] | None = None,
) -> None:
    """Register every (signature x config) combination of ``kernel`` for the compile gate.

    ``signatures``: maps of non-constexpr argument name -> Triton type ("*bf16", "i32", "fp32", ...).
    ``configs``: maps holding every constexpr argument plus optional "num_warps" / "num_stages".
    ``specializations``: the integer arguments that typical launches pass as 1 (unit strides), one map
    per launch pattern. At run time Triton specialises such arguments to constants and marks 16-aligned
    pointers and 16-divisible integers, which enables pipelined loads that need more shared memory
    than the generic kernel; each pattern is compiled that way too, so the shared-memory check sees
    the kernel the GPU actually runs.
    Under the interpreter, kernels are not JITFunctions and nothing is recorded: the gate compiles in a
    process of its own without ``TRITON_INTERPRET``.
    """
    if interpreting():
        return
    fn = _unwrap(kernel)
    for sig in signatures:
        for cfg in configs:
            cfg = dict(cfg)
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
            _CASES.append(AOTCase(name or fn.__name__, fn, full_sig, cfg, nw, ns))
            for spec in specializations or []:
                unknown = set(spec) - set(sig)
                if unknown:
                    raise ValueError(f"compile gate: {fn.__name__} specializes unknown arguments {sorted(unknown)}")
                sig_s = {a: ("constexpr" if a in spec else t) for a, t in full_sig.items()}
                _CASES.append(AOTCase(name or fn.__name__, fn, sig_s, {**cfg, **spec}, nw, ns, aligned=True))


def config_dicts(configs: list[triton.Config]) -> list[dict[str, Any]]:
    """triton.Config objects -> dicts for :func:`register`."""
    return [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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


def unregistered_kernels() -> list[str]:
    """Launchable JIT kernels of the kernel modules that registered no compile-gate case.

    A kernel is launchable when one of its arguments is a pointer named ``*_ptr`` (the project's
    convention); ``@triton.jit`` helpers called from kernels take values. A helper that does take
    pointers is listed in its module's ``AOT_HELPERS`` set of names.
    """
    all_cases()
    seen = {id(c.fn) for c in _CASES}
    missing = []
    pkg = importlib.import_module("fm_engine.kernels")
    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name.startswith("_"):
            continue
        m = importlib.import_module(f"fm_engine.kernels.{mod.name}")
        helpers: set[str] = getattr(m, "AOT_HELPERS", set())
        for attr, obj in vars(m).items():
            if attr in helpers or not isinstance(obj, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
                continue
            fn = _unwrap(obj)
            if fn.__module__ != m.__name__ or not any(a.endswith("_ptr") for a in fn.arg_names):
                continue
            if id(fn) not in seen:
                missing.append(f"{m.__name__}.{attr}")
    return missing


def main(argv: list[str] | None = None) -> int:
    """Compile shard ``i`` of ``n`` of every registered case for one architecture (used by the gate test)."""
    import argparse

    p = argparse.ArgumentParser(description="ahead-of-time compile gate for fm_engine's Triton kernels")
    p.add_argument("--arch", type=int, required=True, choices=ARCHS)
    p.add_argument("--shard", type=int, default=0)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--match", default=None, help="compile only the cases whose id contains this substring")
    a = p.parse_args(argv)
    if interpreting():
        raise SystemExit("the compile gate must run without TRITON_INTERPRET=1")
    cases = [c for c in all_cases() if a.match is None or a.match in c.id][a.shard :: a.shards]
    failures = []
    for case in cases:
        try:
            k = compile_case(case, a.arch)
            shared = int(k.metadata.shared)
            if shared > SMEM_LIMIT[a.arch]:
                failures.append(f"{case.id} sm_{a.arch}: needs {shared} B shared memory > limit {SMEM_LIMIT[a.arch]}")
        except Exception as e:  # report every failing case, not just the first
            msg = str(e).strip().splitlines()
            failures.append(f"{case.id} sm_{a.arch}: {type(e).__name__}: {msg[-1] if msg else ''}")
    print(f"compiled {len(cases) - len(failures)}/{len(cases)} cases for sm_{a.arch} (shard {a.shard}/{a.shards})")
    for f in failures:
        print("FAIL", f)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
