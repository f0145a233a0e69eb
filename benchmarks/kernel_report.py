"""The kernel report: what every Triton launch of the ops' benchmark cases compiles to on sm_90 and sm_80.

``python -m fm_engine.benchmarks.kernel_report [--arch 90] [--out DIR] [--jobs N] [--check]`` (no GPU needed).

How (:func:`record`): each op's benchmark cases (``benchmarks/<op>.py``, the real sizes, ``quick=False``) run
their fm_engine fast paths (labels ``triton`` and ``hybrid``) forward and backward on CPU tensors of the
real sizes, with the Triton launches intercepted instead of run. For each launch, Triton's own binder for
the target architecture computes the runtime specialisation a GPU launch gets (integer arguments equal to
1 become constants; 16-byte-aligned pointers and 16-divisible integers get divisibility hints, from the
real tensors' addresses), and the grid is evaluated. Launchers size their grids for the reported GPU
(:func:`fm_engine.kernels._aot.sm_count`: 132 SMs for sm_90, 108 for sm_80) and pick that architecture's
candidate lists. Every candidate config is recorded: a kernel tuned by
:class:`~fm_engine.kernels._autotune.Autotuned` launches its first config (what ``FM_ENGINE_AUTOTUNE=0`` and
CUDA-graph capture run) and every config its ``prune`` keeps; a launcher tuned by
:class:`~fm_engine.kernels._autotune.LaunchTuner` runs once per candidate. Matrix products of the vendor
(``torch.mm`` ...) are not computed and random inputs not drawn (their tensors are left empty): only the
launches' shapes, dtypes and addresses matter here.

Each distinct specialisation is then compiled (:func:`analyse`, ``--jobs`` processes, results cached on disk
by kernel source, specialisation, options, architecture and Triton version) and read:
registers and spills from the cubin (``cuobjdump -res-usage``: stack frame + local memory), shared memory
from the metadata, the MMA kind from the PTX (``wgmma.mma_async`` -> ``"wgmma"``, ``mma.sync`` -> ``"mma"``),
the contraction tile from the Triton IR (``tt.dot`` operand shapes, or a sum over a rank-3 product: a
contraction written by hand), and whether an atomic read-modify-write sits inside a loop (TTGIR).

One row per (op, case, kernel, architecture, config) with the fields of :data:`FIELDS`, written to
``DIR/kernel_report.json`` and ``DIR/kernel_report.md``. :func:`violations` applies the rules (see
:data:`RULES`); ``--check`` fails when the committed report differs from a fresh one (same Triton version)
or any op has a violation outside :data:`PENDING`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import json
import os
import pkgutil
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

FIELDS = (
    "op",
    "case",
    "kernel",
    "arch",
    "dtype",
    "config",
    "first_config",
    "role",
    "mma",
    "registers",
    "spill_bytes",
    "smem_bytes",
    "programs",
    "sms",
    "persistent",
    "atomic_in_loop",
    "reason",
)

RULES = {
    "spill": "no config spills registers (spill_bytes == 0)",
    "tensor_cores": "a bf16 / fp16 contraction with a tile of at least 16x16x16 runs on tensor cores: wgmma on "
    "sm_90 when the tile has >= 64 rows, else mma (fp32 contractions run exact IEEE dots by design)",
    "wave": "a first config launches at least one full wave at its case (programs >= sms), or is persistent",
    "atomic": "no atomic read-modify-write inside a loop",
}

# Ops whose kernels are known to break rules while their rewrite is under way: their violations are
# listed but do not fail the gate, and the gate fails once an op here has none (drop it from here then).
PENDING: dict[str, str] = {}

# Which fast-path labels of a benchmark case launch fm_engine's Triton kernels.
FAST_LABELS = ("triton", "hybrid")
# Case modules of benchmarks/ that are not single-op families.
_NOT_OPS = {"harness", "models", "breakdown", "suite", "__main__"}


# --- recording -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    op: str
    case: str
    kernel: str  # the tuned name (Autotuned / LaunchTuner) and the JIT function
    fn: Any  # triton.runtime.JITFunction
    arch: int
    signature: dict[str, str]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]  # num_warps, num_stages (+ maxnreg)
    grid: tuple[int, int, int]
    config: str
    first_config: bool
    dtype: str
    tagged: bool  # launched as a tuner's candidate

    def spec_key(self) -> str:
        """Identifies one compilation: kernel source, specialisation, options, architecture."""
        cx = sorted((str(k), repr(v)) for k, v in self.constexprs.items())
        at = sorted((str(k), repr(v)) for k, v in self.attrs.items())
        text = json.dumps([self.fn.cache_key, self.signature, cx, at, sorted(self.options.items()), self.arch])
        return hashlib.sha256(text.encode()).hexdigest()[:24]


class _Recorder:
    """Collects launches while a case runs; ``tag`` is the candidate config being recorded, if any."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.backend = make_backend(GPUTarget("cuda", arch, 32))
        self.binders: dict[int, Any] = {}
        self.launches: list[Launch] = []
        self.op = ""
        self.case = ""
        self.tag: list[tuple[str, str, bool]] = []  # (tuned name, config text, first)

    def launch(self, fn: Any, args: tuple, kwargs: dict[str, Any], grid: Any) -> None:
        from triton.runtime.jit import create_function_from_signature

        binder = self.binders.get(id(fn))
        if binder is None:
            binder = self.binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, spec, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, spec, opts)
        dims = [int(x) for x in (grid(bound) if callable(grid) else grid)] + [1, 1]
        g = (dims[0], dims[1], dims[2])
        kept = {"num_warps": options.num_warps, "num_stages": options.num_stages}
        if getattr(options, "maxnreg", None) is not None:
            kept["maxnreg"] = options.maxnreg
        if self.tag:
            name, config, first = self.tag[-1]
            kernel = f"{name}:{fn.__name__}" if name != fn.__name__ else fn.__name__
        else:
            name, first = fn.__name__, True
            names = {p.name for p in fn.params if p.is_constexpr}
            cx = {k: v for k, v in bound.items() if k in names}
            config = _config_text({k: v for k, v in cx.items() if k.startswith(("BLOCK", "SPLIT"))}, kept)
            kernel = fn.__name__
        dt = _dtype_of(signature)
        ln = Launch(self.op, self.case, kernel, fn, self.arch, signature, constexprs, attrs, kept, g, config, first, dt,
                    bool(self.tag))  # fmt: skip
        self.launches.append(ln)


def _config_text(values: dict[str, Any], options: dict[str, Any] | None = None) -> str:
    parts = [f"{k}={v}" for k, v in sorted(values.items())]
    parts += [f"{k}={v}" for k, v in (options or {}).items()]
    return " ".join(parts)


def _dtype_of(signature: dict[str, str]) -> str:
    """The precision a launch's data comes in: bf16 or fp16 if any pointer has it, else fp32."""
    ptrs = [t for t in signature.values() if t.startswith("*")]
    for low in ("bf16", "fp16"):
        if f"*{low}" in ptrs:
            return low
    return "fp32"


def _kernel_modules() -> list[Any]:
    pkg = importlib.import_module("fm_engine.kernels")
    for m in pkgutil.walk_packages(pkg.__path__, "fm_engine.kernels."):
        if not m.name.rsplit(".", 1)[-1].startswith("_") or m.ispkg:
            importlib.import_module(m.name)
    return [m for n, m in sorted(sys.modules.items()) if n.startswith("fm_engine.kernels") and m is not None]


@contextlib.contextmanager
def _recording(rec: _Recorder) -> Iterator[None]:
    """Patch the launch path so that launches are recorded for ``rec.arch`` instead of run (see the module
    docstring). Everything is restored on exit."""
    import triton
    from fm_engine.kernels import _aot, _autotune

    from fm_engine.ops import _dispatch

    undo: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        undo.append((obj, name, obj.__dict__[name] if isinstance(obj, type) else getattr(obj, name)))
        setattr(obj, name, value)

    arch = rec.arch

    def jit_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        if not warmup:
            rec.launch(self, args, kwargs, grid)

    def tuned_run(self: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
        named = self._bind(args, kwargs)
        cands = self.configs_for(arch)
        kept = [c for c in cands[1:] if self.prune is None or self.prune(c, named)]
        for i, c in enumerate([cands[0], *kept]):
            text = _config_text(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages})
            rec.tag.append((self.name, text, i == 0))
            try:
                self._launch(c, grid, dict(named))
            finally:
                rec.tag.pop()
        return cands[0]

    def choose(self: Any, device: Any, bucket: Any, candidates: Any, run: Callable[[dict[str, Any]], object]) -> Any:
        cands = [dict(c) for c in candidates]
        for i, c in enumerate(cands):
            rec.tag.append((self.name, _config_text(c), i == 0))
            try:
                run(dict(c))
            finally:
                rec.tag.pop()
        return cands[0]  # the launcher's own launches with it repeat the first candidate's: see _dedupe

    def no_product(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def run(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("out") is not None:
                return kwargs["out"]
            shape = orig(*_meta(args), **_meta(kwargs))
            return torch.empty(shape.shape, dtype=shape.dtype)

        return run

    def no_draw(orig: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(orig)
        def run(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], torch.Tensor):  # randn_like / rand_like
                return torch.empty_like(*args, **kwargs)
            return torch.empty(*args, **kwargs)

        return run

    patch(triton.runtime.jit.JITFunction, "run", jit_run)
    for name in ("mm", "addmm", "bmm", "matmul"):  # vendor products: only their output shapes are needed
        patch(torch, name, no_product(getattr(torch, name)))
    for name in ("randn", "rand", "randn_like", "rand_like"):  # random inputs: their values do not matter here
        patch(torch, name, no_draw(getattr(torch, name)))
    patch(_autotune.Autotuned, "run", tuned_run)
    patch(_autotune.LaunchTuner, "choose", choose)
    patch(_autotune, "arch_class", lambda device: arch)
    patch(_dispatch, "interpreting", lambda: True)  # the ops take CPU tensors for the triton backend
    for m in _kernel_modules():
        if callable(getattr(m, "_interpreting", None)):
            patch(m, "_interpreting", lambda: False)  # ... and the launchers pick their GPU configs
    _aot._TARGET_SMS.append(_aot.SMS[arch])
    try:
        yield
    finally:
        _aot._TARGET_SMS.pop()
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)


def _meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to("meta")
    if isinstance(x, (list, tuple)):
        return type(x)(_meta(v) for v in x)
    if isinstance(x, dict):
        return {k: _meta(v) for k, v in x.items()}
    return x


def benchmark_cases(match: str = "") -> list[Any]:
    """The benchmark cases of every op family (real sizes), as ``benchmarks.harness.Case`` objects."""
    import benchmarks

    out = []
    for name, mod in sorted(benchmarks.op_modules().items()):
        if name in _NOT_OPS:
            continue
        for case in mod.cases(torch.device("cpu"), False):
            if match in f"{case.op} {case.name}":
                out.append(case)
    return out


def record(arch: int, match: str = "", progress: Callable[[str], None] | None = None) -> list[Launch]:
    """Launches of every case's fast paths, forward and backward, for ``arch`` (see the module docstring)."""
    from benchmarks.harness import outputs

    rec = _Recorder(arch)
    with _recording(rec):
        cases = benchmark_cases(match)  # built inside: the triton backends count as available
        for case in cases:
            labels = [lb for lb in FAST_LABELS if lb in case.fns]
            for label in labels:
                if progress is not None:
                    progress(f"sm_{arch} {case.op} {case.name} [{label}]")
                rec.op, rec.case = case.op, case.name + ("" if label == "triton" else f" [{label}]")
                torch.manual_seed(0)
                inputs = case.setup()
                start = len(rec.launches)
                outs = [t for t in outputs(case.fns[label](*inputs)) if t.requires_grad]
                rec.tag.clear()
                if case.backward and outs:
                    torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
                rec.tag.clear()
                _dedupe(rec.launches, start)
                del inputs, outs
    return rec.launches


def _dedupe(launches: list[Launch], start: int) -> None:
    """Keep one launch per (kernel, specialisation, grid, config) of a case, and drop a launcher's own
    launches that repeat its first candidate's (a LaunchTuner launcher runs every candidate for the record,
    then launches with the first for its outputs)."""
    firsts = {(ln.fn.__name__, ln.spec_key(), ln.grid) for ln in launches[start:] if ln.tagged and ln.first_config}
    seen = set()
    kept = []
    for ln in launches[start:]:
        key = (ln.kernel, ln.spec_key(), ln.grid, ln.config)
        if key in seen or (not ln.tagged and (ln.fn.__name__, ln.spec_key(), ln.grid) in firsts):
            continue
        seen.add(key)
        kept.append(ln)
    launches[start:] = kept


# --- compiling and reading the code ----------------------------------------------------------------------

_TENSOR = re.compile(r"tensor<([0-9x]+)x(bf16|f16|f32|tf32|f8E4M3FN|f8E5M2|i8|i32)")


def _shape(text: str) -> tuple[list[int], str] | None:
    m = _TENSOR.search(text)
    if m is None:
        return None
    return [int(x) for x in m.group(1).split("x")], m.group(2)


def contraction_tiles(ttir: str) -> list[tuple[int, int, int, str]]:
    """(M, N, K, operand type) of every contraction: each ``tt.dot`` (operands [M, K] x [K, N]) and each sum
    over an axis of a rank-3 tensor (a hand-written contraction: M, N the kept axes, K the summed one)."""
    tiles = []
    for m in re.finditer(r"tt\.dot %\S+, %\S+, %\S+[^:]*: (tensor<[^>]*>) \* (tensor<[^>]*>)", ttir):
        a, b = _shape(m.group(1)), _shape(m.group(2))
        if a and b and len(a[0]) >= 2 and len(b[0]) >= 2:
            tiles.append((a[0][-2], b[0][-1], a[0][-1], a[1]))
    for m in re.finditer(r'"tt\.reduce"\(%[^)]*\) <\{axis = (\d+) : i32\}>(.*?)\}\) : \((tensor<[^>]*>)\)', ttir, re.S):
        if "arith.addf" not in m.group(2):
            continue
        s = _shape(m.group(3))
        if s is None or len(s[0]) < 3:
            continue
        axis = int(m.group(1))
        kept = [n for i, n in enumerate(s[0]) if i != axis]
        tiles.append((kept[0], kept[-1], s[0][axis], s[1]))
    return tiles


def atomic_in_loop(ttgir: str) -> bool:
    """Whether an atomic read-modify-write (``tt.atomic_rmw`` / ``tt.atomic_cas``) sits inside an
    ``scf.for`` / ``scf.while`` region."""
    stack: list[bool] = []
    for line in ttgir.splitlines():
        body = line.split(" loc(", 1)[0]
        if ("tt.atomic_rmw" in body or "tt.atomic_cas" in body) and any(stack):
            return True
        loop = bool(re.search(r"\bscf\.(for|while)\b", body))
        popped = False
        for ch in body:
            if ch == "}":
                popped = stack.pop() if stack else False
            elif ch == "{":
                stack.append(loop or (popped and body.lstrip().startswith("}")))
    return False


def mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma"
    return "none"


def _compile_facts(launch: Launch) -> dict[str, Any]:
    """Compile one launch for its architecture and read the facts a row needs."""
    import triton
    from fm_engine.kernels._aot import resource_usage
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=launch.fn, signature=launch.signature, constexprs=launch.constexprs, attrs=launch.attrs)
    t0 = time.perf_counter()
    try:
        k = triton.compile(src, target=GPUTarget("cuda", launch.arch, 32), options=dict(launch.options))
    except Exception as e:  # a launch that does not compile is a row with an error
        msg = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: {msg[-1] if msg else ''}"}
    seconds = time.perf_counter() - t0  # Triton's own cache makes a repeat fast: only a cold compile is kept
    use = resource_usage(k)
    tiles = contraction_tiles(k.asm["ttir"])
    return {
        "registers": int(use.get("REG", 0)),
        "spill_bytes": int(use.get("STACK", 0)) + int(use.get("LOCAL", 0)),
        "smem_bytes": int(k.metadata.shared),
        "mma": mma_kind(k.asm["ptx"]),
        "tiles": tiles,
        "reduce": '"tt.reduce"' in k.asm["ttir"],
        "atomic_in_loop": atomic_in_loop(k.asm["ttgir"]),
        "compile_s": round(seconds, 3),
    }


def compile_seconds(
    launches: list[Launch], facts: dict[str, dict[str, Any]]
) -> dict[tuple[str, int], tuple[int, float, int]]:
    """Per (op, architecture): (distinct compilations, their summed single-process compile seconds, how many of
    them have no timing). What a first call costs on a GPU when it tunes every candidate of the headline cases
    with a cold Triton cache (before the parallel precompile of the autotuner divides it by its threads). A
    compilation whose timing came from Triton's warm cache understates it: the facts cache keeps the first
    timing, so clear it (``~/.cache/fm_engine/kernel_report``) and Triton's to measure afresh."""
    seen: dict[tuple[str, int], set[str]] = {}
    for ln in launches:
        seen.setdefault((ln.op, ln.arch), set()).add(ln.spec_key())
    out = {}
    for key, specs in seen.items():
        timed = [facts[s]["compile_s"] for s in specs if "compile_s" in facts.get(s, {})]
        out[key] = (len(specs), float(sum(timed)), len(specs) - len(timed))
    return out


_POOL_LAUNCHES: list[Launch] = []


def _pool_job(i: int) -> dict[str, Any]:
    return _compile_facts(_POOL_LAUNCHES[i])


def _cache_path() -> Path:
    from fm_engine import _device

    return _device.cache_dir() / "kernel_report" / "facts.json"


def analyse(
    launches: list[Launch], jobs: int = 1, progress: Callable[[str], None] | None = None
) -> dict[str, dict[str, Any]]:
    """Facts of every distinct compilation among ``launches`` by spec key (``jobs`` processes, disk cache)."""
    import triton

    path = _cache_path()
    try:
        cached = json.loads(path.read_text())
        cache = cached["facts"] if cached.get("triton") == triton.__version__ else {}
    except (OSError, ValueError, KeyError, TypeError):
        cache = {}
    todo: dict[str, Launch] = {}
    for ln in launches:
        key = ln.spec_key()
        if key not in cache and key not in todo:
            todo[key] = ln
    keys = list(todo)
    if progress is not None:
        progress(f"{len({ln.spec_key() for ln in launches})} distinct compilations, {len(keys)} not cached")
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if keys:
        _POOL_LAUNCHES[:] = [todo[k] for k in keys]
        if jobs > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                for i, r in enumerate(pool.imap(_pool_job, range(len(keys)))):
                    results.append(r)
                    if progress is not None and (i + 1) % 10 == 0:
                        progress(f"compiled {i + 1}/{len(keys)} ({time.perf_counter() - t0:.0f} s)")
        else:
            for i in range(len(keys)):
                results.append(_pool_job(i))
                if progress is not None and (i + 1) % 10 == 0:
                    progress(f"compiled {i + 1}/{len(keys)} ({time.perf_counter() - t0:.0f} s)")
        _POOL_LAUNCHES.clear()
        cache.update(zip(keys, results))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"triton": triton.__version__, "facts": cache}))
            os.replace(tmp, path)
        except OSError:
            pass
    return cache


# --- rows, rules, files ----------------------------------------------------------------------------------


def _role(facts: dict[str, Any]) -> str:
    if facts.get("tiles"):
        return "contraction"
    return "reduction" if facts.get("reduce") else "elementwise"


def rows_of(launches: list[Launch], facts: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (op, case, kernel, arch, config); a kernel launched several times in one case with the same
    config (other shapes) gets ``#2``, ``#3`` ... in the order of its launches."""
    from fm_engine.kernels import _aot

    rows = []
    seen: dict[tuple, int] = {}
    for ln in launches:
        f = facts[ln.spec_key()]
        notes = _aot.notes_of(ln.fn)
        key = (ln.op, ln.case, ln.kernel, ln.arch, ln.config)
        seen[key] = seen.get(key, 0) + 1
        kernel = ln.kernel if seen[key] == 1 else f"{ln.kernel} #{seen[key]}"
        tiles = f.get("tiles") or []
        rows.append(
            {
                "op": ln.op,
                "case": ln.case,
                "kernel": kernel,
                "arch": f"sm_{ln.arch}",
                "dtype": ln.dtype,
                "config": ln.config,
                "first_config": ln.first_config,
                "role": _role(f),
                "mma": f.get("mma", "none"),
                "registers": f.get("registers", 0),
                "spill_bytes": f.get("spill_bytes", 0),
                "smem_bytes": f.get("smem_bytes", 0),
                "programs": ln.grid[0] * ln.grid[1] * ln.grid[2],
                "sms": _aot.SMS[ln.arch],
                "persistent": notes.persistent,
                "atomic_in_loop": bool(f.get("atomic_in_loop", False)),
                "reason": "; ".join(f"{k}: {v}" for k, v in notes.reasons),
                # not report fields: what the rules need, dropped before writing
                "_tile": max(tiles, key=lambda t: t[0] * t[1] * t[2]) if tiles else None,
                "_max_rows": max((t[0] for t in tiles if min(t[:3]) >= 16), default=0),
                "_error": f.get("error", ""),
            }
        )
    return rows


def _exempt(row: dict[str, Any], rule: str) -> bool:
    return any(part.startswith(f"{rule}: ") for part in row["reason"].split("; "))


def row_violations(row: dict[str, Any]) -> list[str]:
    """The rules ``row`` breaks (names of :data:`RULES`, with the evidence), exemptions applied."""
    out = []
    if row.get("_error"):
        return [f"compile: {row['_error']}"]
    if row["spill_bytes"] > 0 and not _exempt(row, "spill"):
        out.append(f"spill: {row['spill_bytes']} B")
    if row["role"] == "contraction" and row["dtype"] in ("bf16", "fp16") and not _exempt(row, "tensor_cores"):
        rows16 = row.get("_max_rows", 0)
        if rows16:
            want = "wgmma" if row["arch"] == "sm_90" and rows16 >= 64 else "mma"
            ok = row["mma"] == "wgmma" if want == "wgmma" else row["mma"] in ("mma", "wgmma")
            if not ok:
                out.append(f"tensor_cores: {row['mma']} for a tile with {rows16} rows (want {want})")
    if row["first_config"] and row["programs"] < row["sms"] and not row["persistent"] and not _exempt(row, "wave"):
        out.append(f"wave: {row['programs']} programs < {row['sms']} SMs")
    if row["atomic_in_loop"] and not _exempt(row, "atomic"):
        out.append("atomic: atomic read-modify-write in a loop")
    return out


def violations(rows: list[dict[str, Any]], facts: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Violations per op of written ``rows`` with their ``facts`` (:func:`public_rows`):
    ``{op: ["op | case | kernel | arch | config: rule: evidence", ...]}``; ops without any are left out."""
    out: dict[str, list[str]] = {}
    for row in rows:
        f = facts.get(row_id(row), {})
        full = {**row, "_max_rows": int(f.get("tile_rows", 0)), "_error": f.get("error", "")}
        for v in row_violations(full):
            out.setdefault(row["op"], []).append(f"{row_id(row)}: {v}")
    return out


def row_id(row: dict[str, Any]) -> str:
    return f"{row['op']} | {row['case']} | {row['kernel']} | {row['arch']} | {row['config']}"


def public_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(rows as written: exactly the report fields, sorted; the facts the rules read besides them, by
    :func:`row_id`: ``tile`` ("MxNxK" of the largest contraction), ``tile_rows`` (rows of the largest
    contraction whose tile is at least 16x16x16), ``error`` (a launch that does not compile))."""
    out = []
    extra: dict[str, dict[str, Any]] = {}
    for r in rows:
        row = {k: r[k] for k in FIELDS}
        t = r.get("_tile")
        facts = {"tile": f"{t[0]}x{t[1]}x{t[2]}" if t else "", "tile_rows": r.get("_max_rows", 0)}
        if r.get("_error"):
            facts["error"] = r["_error"]
        if facts["tile"] or facts.get("error"):
            extra[row_id(row)] = facts
        out.append(row)
    out.sort(key=lambda r: (r["op"], r["case"], r["arch"], r["kernel"], not r["first_config"], r["config"]))
    return out, dict(sorted(extra.items()))


def to_markdown(rows: list[dict[str, Any]], facts: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report as Markdown: the rules, violations per op, then every row by op."""
    viol = violations(rows, facts)
    lines = [
        "# Kernel report",
        "",
        f"Generated by `python -m fm_engine.benchmarks.kernel_report` (Triton {meta['triton']}; no GPU: every launch "
        "of the ops' benchmark cases, first config and every autotune candidate, compiled for "
        f"{', '.join(meta['archs'])}). See benchmarks/kernel_report.py for how each column is read.",
        "",
        "## Rules",
        "",
        *[f"- `{k}`: {v}" for k, v in RULES.items()],
        "",
        "## Violations per op",
        "",
    ]
    ops = sorted({r["op"] for r in rows})
    for op in ops:
        vs = viol.get(op, [])
        pend = f" (pending: {PENDING[op]})" if op in PENDING else ""
        lines.append(f"- **{op}**: {len(vs)}{pend}")
    lines.append("")
    for op in ops:
        if viol.get(op):
            lines += [f"### {op}", "", *[f"- {v}" for v in viol[op]], ""]
    lines += ["## Rows", ""]
    cols = [
        "case", "kernel", "arch", "dtype", "config", "first", "role", "tile", "mma", "regs", "spill B", "smem B",
        "programs", "sms", "persistent", "atomic in loop", "reason",
    ]  # fmt: skip
    for op in ops:
        lines += [f"### {op}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            if r["op"] != op:
                continue
            vals = [
                r["case"], r["kernel"], r["arch"], r["dtype"], r["config"], "yes" if r["first_config"] else "",
                r["role"], facts.get(row_id(r), {}).get("tile", ""), r["mma"], r["registers"], r["spill_bytes"],
                r["smem_bytes"],
                r["programs"], r["sms"], "yes" if r["persistent"] else "", "yes" if r["atomic_in_loop"] else "",
                r["reason"],
            ]  # fmt: skip
            lines.append("| " + " | ".join(str(v).replace("|", "/") for v in vals) + " |")
        lines.append("")
    return "\n".join(lines)


def gate_failures(rows: list[dict[str, Any]], facts: dict[str, dict[str, Any]]) -> list[str]:
    """What fails the gate: a violation of an op not in :data:`PENDING`, or a pending op without one."""
    viol = violations(rows, facts)
    out = [v for op, vs in sorted(viol.items()) if op not in PENDING for v in vs]
    ops = {r["op"] for r in rows}
    for op in sorted(PENDING):
        if op in ops and not viol.get(op):
            out.append(f"{op}: has no violations any more; remove it from benchmarks/kernel_report.py PENDING")
    return out


def generate(
    archs: list[int],
    jobs: int = 1,
    match: str = "",
    progress: Callable[[str], None] | None = None,
    timings: dict[tuple[str, int], tuple[int, float, int]] | None = None,
) -> dict[str, Any]:
    """A fresh report: ``{"triton", "archs", "rows", "facts"}`` (see :func:`public_rows`). ``timings``, when
    given, receives :func:`compile_seconds` (kept out of the report, which must not change from run to run)."""
    import triton

    launches: list[Launch] = []
    for arch in archs:
        launches += record(arch, match, progress)
    found = analyse(launches, jobs, progress)
    if timings is not None:
        timings.update(compile_seconds(launches, found))
    rows, facts = public_rows(rows_of(launches, found))
    return {"triton": triton.__version__, "archs": [f"sm_{a}" for a in archs], "rows": rows, "facts": facts}


def write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel_report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "kernel_report.md").write_text(to_markdown(report["rows"], report["facts"], report) + "\n")


def load(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or not isinstance(data.get("facts"), dict):
        raise ValueError("not a kernel report (expected an object with 'rows' and 'facts')")
    return data


def main(argv: list[str] | None = None) -> int:
    """``python -m fm_engine.benchmarks.kernel_report``: write the report (or, with ``--check``, compare it with
    the committed one) and apply its rules; exit 1 on a failure (see the module docstring)."""
    import argparse

    from fm_engine._env import interpreting

    p = argparse.ArgumentParser(
        prog="python3 -m fm_engine.benchmarks.kernel_report",
        description="the kernel report of the ops' benchmark cases: compiled for sm_80 / sm_90 without a GPU, "
        "with its rules (tensor cores, spills, waves, atomics)",
    )
    p.add_argument("--arch", type=int, action="append", choices=(80, 90), help="repeatable; default: both")
    p.add_argument("--jobs", type=int, default=1, help="processes")
    p.add_argument("--match", default="", help="only cases whose label contains this text")
    p.add_argument("--out", default="benchmarks", help="folder of kernel_report.json / .md")
    p.add_argument("--check", action="store_true", help="fail when the report in --out is out of date (no write)")
    a = p.parse_args(argv)
    if interpreting():
        raise SystemExit("the kernel report must run without TRITON_INTERPRET=1")
    out = Path(a.out)
    archs = a.arch or [80, 90]
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:5.0f} s] {msg}", file=sys.stderr, flush=True)

    timings: dict[tuple[str, int], tuple[int, float, int]] = {}
    report = generate(sorted(archs), a.jobs, a.match, progress, timings)
    rows, facts = report["rows"], report["facts"]
    print("compiling every candidate of the headline cases (a first call that tunes them all, cold Triton cache):")
    for (op, arch), (n, sec, untimed) in sorted(timings.items()):
        extra = f" ({untimed} compiled before timings were kept)" if untimed else ""
        print(f"  {op} sm_{arch}: {n} compilations, {sec:.0f} s single-process{extra}")
    fails = gate_failures(rows, facts)
    viol = violations(rows, facts)
    for op in sorted({r["op"] for r in rows}):
        tag = " (pending)" if op in PENDING else ""
        print(f"{op}: {len(viol.get(op, []))} violations{tag}")
    if a.check:
        path = out / "kernel_report.json"
        try:
            old = load(path)
        except (OSError, ValueError) as e:
            print(f"FAIL the committed report {path} cannot be read: {e}")
            return 1
        if old.get("triton") != report["triton"]:
            print(f"note: {path} was made with Triton {old.get('triton')}, this is {report['triton']}: "
                  "the rules are checked on a fresh report, the committed one is not compared")  # fmt: skip
        elif old != report:
            changed = sum(1 for r in rows if r not in old["rows"]) + sum(1 for r in old["rows"] if r not in rows)
            print(f"FAIL {path} is out of date ({changed} rows differ): rerun "
                  "`python -m fm_engine.benchmarks.kernel_report` and commit it")  # fmt: skip
            return 1
    else:
        write(report, out)
        print(f"wrote {out / 'kernel_report.json'} and {out / 'kernel_report.md'} ({len(rows)} rows)")
    for f in fails:
        print("FAIL", f)
    print(f"kernel report: {len(rows)} rows in {time.perf_counter() - t0:.0f} s")
    return 1 if fails else 0


if __name__ == "__main__":
    raise SystemExit(main())
