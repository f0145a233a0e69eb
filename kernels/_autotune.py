"""fm_engine's autotuner for Triton kernels: bucketed keys, winners kept in memory and on disk.

Why not ``triton.autotune``: its key is the exact argument values, so every new token count M re-tunes
(seconds of compilation and timing inside a training step), its results die with the process, and its
configs cannot be listed for the ahead-of-time compile gate. Here a kernel is wrapped with

* ``configs``: the GPU configs (``triton.Config``) worth trying, or a map from compute capability (80, 90)
  to such lists when the architectures want different ones (a device uses the list of the highest
  capability not above its own); the compile gate (kernels/_aot.py) compiles every one for its
  architectures and rejects any that spills registers or exceeds shared memory;
* ``interpreter_config``: the one config used under ``TRITON_INTERPRET=1`` (small tiles make the edge cases
  of CPU tests cheap to reach; the interpreter's timings say nothing about a GPU, so it never times);
* ``key``: launch arguments (by name) -> a *bucket*, a tuple of JSON values: sizes rounded up to powers
  of two (:func:`pow2`), dtypes (:func:`dtype`), mode flags. Calls in one bucket share one tuning;
* ``reset`` (optional): called with the arguments before every timed run and before the final launch,
  for kernels that accumulate into their outputs (zero them there);
* ``restore`` (optional): names of tensor arguments a kernel overwrites in place; they are saved before
  tuning and restored before every timed run and before the final launch;
* ``prune`` (optional): ``prune(config, args) -> bool``, False for configs that make no sense for these
  arguments (e.g. a row block too large for a wide row); it may only read what the bucket holds.

On a miss it times every config (``triton.testing.do_bench``, 5 ms warm-up, 25 ms of repetitions, median),
skipping configs that fail to compile or run out of resources, and configs whose compiled kernels spill
registers on the running Triton (read at their first launch, see :func:`spills`) whenever a candidate
that does not spill runs; it launches the winner, and remembers it in
memory and in ``fm_engine._device.cache_dir() / "autotune" / (slug(device class) + ".json")``, keyed by
kernel name, a hash of the kernel source (with the jit functions it calls) and the config list, and the
bucket; the file records the Triton version. A file from another Triton version, or one that does not
parse, is ignored with one warning (and replaced at the next write), never an error.

Usage (the API the attention kernels can adopt as is)::

    from fm_engine.kernels import _autotune

    @_autotune.autotune(
        name="relu2_bwd",                                   # unique: names the disk entries
        configs=[triton.Config({"BLOCK": 4096}, num_warps=8), triton.Config({"BLOCK": 2048}, num_warps=4)],
        interpreter_config=triton.Config({"BLOCK": 256}, num_warps=4),
        key=lambda a: (_autotune.pow2(a["n"]), _autotune.dtype(a["x_ptr"])),
    )
    @triton.jit
    def relu2_bwd_kernel(x_ptr, dy_ptr, dx_ptr, n, BLOCK: tl.constexpr): ...

    cfg = relu2_bwd_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, dy, dx, n)   # -> the Config used

The grid is a tuple or a function of the launch arguments merged with the config's values. The same
JIT function may be wrapped several times (e.g. one config list per dtype family) with different names.
Counters (:func:`stats`, ``tuned.stats``): ``tunings`` (buckets timed), ``memory_hits``, ``disk_hits``,
``untuned`` (a miss during CUDA-graph capture, where nothing can be timed: the first config runs and
nothing is remembered). ``FM_ENGINE_AUTOTUNE=0`` pins every kernel to its first config (no timing).
Tests drive the tuner on CPU with :meth:`Autotuned.override` (several configs plus a fake timer) and
:func:`forget` (drop in-memory winners, as a new process would).

Register spills: the compile gate (kernels/_aot.py) keeps every strict candidate spill-free on the pinned
Triton only; another Triton release may allocate registers differently. So at the first timed launch of
each candidate the tuner records the compiled kernels that the tuned JIT functions return (Triton loads a
kernel onto the GPU at its first launch and then knows its ``n_spills``) and drops a candidate whose kernels
spill, without timing it further. Only when every candidate that runs spills are those timed and the
fastest taken, with a warning. Which candidates were dropped is kept per bucket (``tuned.spilled``) and in
the disk entry (``"spilled"``). Under the interpreter nothing is compiled and nothing is dropped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import triton

from fm_engine._env import interpreting  # a module global: tests patch it here
from fm_engine._sizes import pow2  # noqa: F401  (the size part of a bucket; kernels import it from here)

Timer = Callable[[Callable[[], object]], float]
Bucket = tuple[Any, ...]

FORMAT = 1  # version of the JSON layout below
_TUNED: list[_Tuned] = []
_lock = threading.Lock()


def dtype(x: Any) -> str:
    """The dtype of a tensor argument as a short string ("bfloat16"), for a bucket."""
    return str(x.dtype).replace("torch.", "") if isinstance(x, torch.Tensor) else type(x).__name__


def arch_class(device: torch.device | None) -> int:
    """80 or 90: whose candidate lists a launch on ``device`` uses (sm_90 and newer: 90; without a GPU: 90)."""
    if device is None or device.type != "cuda":
        return 90
    return 90 if torch.cuda.get_device_capability(device)[0] >= 9 else 80


def _enabled() -> bool:
    return os.environ.get("FM_ENGINE_AUTOTUNE", "1").lower() not in ("0", "off", "false", "no")


def config_dict(c: triton.Config) -> dict[str, Any]:
    """A config as JSON: its constexpr values and launch options (defaults left out)."""
    d: dict[str, Any] = {"kwargs": dict(sorted(c.kwargs.items())), "num_warps": c.num_warps, "num_stages": c.num_stages}
    if getattr(c, "num_ctas", 1) != 1:
        d["num_ctas"] = c.num_ctas
    if getattr(c, "maxnreg", None) is not None:
        d["maxnreg"] = c.maxnreg
    return d


def _default_timer(run: Callable[[], object]) -> float:
    from triton.testing import do_bench

    # short: a bucket is tuned once per machine (the winner is kept on disk), but inside a run
    return float(do_bench(run, warmup=5, rep=25, return_mode="median"))


def _jit_source(fn: Any) -> str:
    """Source text that identifies a kernel: Triton's cache key (the source plus every jit function it
    calls) on a GPU; the Python source under the interpreter."""
    if isinstance(fn, triton.runtime.JITFunction):
        return str(fn.cache_key)
    inner = getattr(fn, "fn", fn)
    try:
        return inspect.getsource(inner)
    except (OSError, TypeError):
        return getattr(inner, "__qualname__", repr(inner))


def spills(kernel: Any) -> int | None:
    """How much a compiled kernel spills: Triton's ``n_spills`` (local memory per thread in 4-byte words, read
    from the driver when the kernel was loaded onto a GPU at its first launch); None when it is not known
    (not loaded, or not a compiled kernel: the interpreter returns none)."""
    n = getattr(kernel, "n_spills", None)
    return None if n is None else int(n)


_MISSING = object()
_record_lock = threading.RLock()


@contextlib.contextmanager
def compiled_launches(fns: Sequence[Any]) -> Iterator[list[Any]]:
    """Collect, inside the block, the compiled kernels that launches ``fn[grid](...)`` of the JIT functions
    ``fns`` return (a ``CompiledKernel`` on a GPU; the interpreter returns nothing, so nothing is collected).

    ``fn[grid](...)`` calls ``fn.run``, so each function gets an instance ``run`` that records what the real
    one returns; it is removed when the block ends. One recording at a time per process (a lock); launches of
    these functions from other threads inside the block are recorded too.
    """
    seen: list[Any] = []
    with _record_lock:
        patched: list[tuple[Any, Any]] = []
        try:
            for fn in fns:
                inner = getattr(fn, "run", None)
                if inner is None or any(fn is f for f, _ in patched):
                    continue

                def run(*args: Any, _inner: Callable[..., Any] = inner, **kwargs: Any) -> Any:
                    kernel = _inner(*args, **kwargs)
                    if kernel is not None:
                        seen.append(kernel)
                    return kernel

                patched.append((fn, fn.__dict__.get("run", _MISSING)))
                fn.run = run
            yield seen
        finally:
            for fn, own in reversed(patched):
                if own is _MISSING:
                    del fn.run
                else:
                    fn.run = own


class _Spills(Exception):
    """Raised out of a candidate's first timed launch when its compiled kernels spill registers."""

    def __init__(self, amount: int) -> None:
        super().__init__(f"spills registers (n_spills {amount})")
        self.amount = amount


def _spill_checked(run: Callable[[], object], kernels: Sequence[Any]) -> Callable[[], object]:
    """``run`` whose first call records the compiled kernels of ``kernels`` it launches and raises
    :class:`_Spills` when one of them spills (later calls just run)."""
    first = True

    def checked() -> object:
        nonlocal first
        if not first:
            return run()
        first = False
        with compiled_launches(kernels) as seen:
            out = run()
        amount = max((spills(k) or 0 for k in seen), default=0)
        if amount > 0:
            raise _Spills(amount)
        return out

    return checked


# --- the disk table ---------------------------------------------------------------------------------


class _DiskTable:
    """One JSON file per device class: {"format", "triton", "entries": {entry key: {"config", "ms", ...}}}."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Any] = {}
        self._stamp: tuple[float, int] | None = None
        self._warned = False

    def _warn(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"fm_engine autotune cache {self.path}: {why}; ignored", RuntimeWarning, stacklevel=4)

    def _read(self) -> dict[str, Any]:
        """Valid entries of the file as it is now ({} when absent, stale or corrupt)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn(f"cannot be read ({e})")
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            self._warn("is not valid JSON")
            return {}
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict) or data.get("format") != FORMAT:
            self._warn("has an unknown layout")
            return {}
        if data.get("triton") != triton.__version__:
            self._warn(f"was written by Triton {data.get('triton')} (this is {triton.__version__})")
            return {}
        return data["entries"]

    def lookup(self, entry: str) -> dict[str, Any] | None:
        try:
            st = self.path.stat()
            stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
        except OSError:
            stamp = None
        if stamp != self._stamp:  # another process may have tuned since we last looked
            self._stamp = stamp
            self.entries = self._read() if stamp is not None else {}
        found = self.entries.get(entry)
        return found if isinstance(found, dict) else None

    def store(self, entry: str, value: dict[str, Any]) -> None:
        """Merge one entry into the file (re-read first, atomic replace; a failure only warns)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            entries = self._read()
            entries[entry] = value
            data = {"format": FORMAT, "triton": triton.__version__, "entries": entries}
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.entries = entries
            st = self.path.stat()
            self._stamp = (st.st_mtime, st.st_size)
        except OSError as e:
            self._warn(f"cannot be written ({e})")


_TABLES: dict[Path, _DiskTable] = {}


def table_path(device_class: str) -> Path:
    from fm_engine import _device

    return _device.cache_dir() / "autotune" / f"{_device.slug(device_class)}.json"


def _table(device_class: str) -> _DiskTable:
    path = table_path(device_class)
    t = _TABLES.get(path)
    if t is None:
        t = _TABLES[path] = _DiskTable(path)
    return t


# --- the tuner --------------------------------------------------------------------------------------


class _Tuned:
    """Winners of one tuned thing (a kernel or a launcher), in memory and in the device's disk table."""

    name: str

    def __init__(self, name: str) -> None:
        if any(t.name == name for t in _TUNED):
            raise ValueError(f"autotune {name}: the name is taken (it keys the disk cache)")
        self.name = name
        self.stats = {"tunings": 0, "memory_hits": 0, "disk_hits": 0, "untuned": 0}
        self.timings: dict[tuple[str, Bucket], list[tuple[dict[str, Any], float]]] = {}
        # candidates dropped because their compiled kernels spill: (config, Triton's n_spills) per bucket
        self.spilled: dict[tuple[str, Bucket], list[tuple[dict[str, Any], int]]] = {}
        self._last_spilled: list[tuple[dict[str, Any], int]] = []
        self._memory: dict[tuple[str, str, Bucket], Any] = {}
        _TUNED.append(self)

    def _select(
        self,
        dev: str,
        chash: str,
        bucket: Bucket,
        cands: Sequence[Any],
        encode: Callable[[Any], dict[str, Any]],
        capturing: bool,
        tune: Callable[[], tuple[Any, list[tuple[dict[str, Any], float]]]],
    ) -> Any:
        """The bucket's winner among ``cands``: from memory, else the disk table, else ``tune()`` (stored in
        both). During CUDA-graph capture a miss takes the first candidate and remembers nothing."""
        mem_key = (dev, chash, bucket)
        with _lock:
            config = self._memory.get(mem_key)
        if config is not None:
            self.stats["memory_hits"] += 1
            return config
        entry = f"{self.name}|{chash}|{json.dumps(list(bucket))}"
        table = _table(dev)
        stored = table.lookup(entry)
        if stored is not None:
            config = next((c for c in cands if encode(c) == stored.get("config")), None)
        if config is not None:
            self.stats["disk_hits"] += 1
        else:
            if capturing:  # nothing can be timed inside a CUDA graph: run the first config, remember nothing
                self.stats["untuned"] += 1
                return cands[0]
            self._last_spilled = []
            config, results = tune()
            self.stats["tunings"] += 1
            self.timings[(dev, bucket)] = results
            value: dict[str, Any] = {
                "config": encode(config),
                "ms": min(ms for _, ms in results),
                "timed": results,
                "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            if self._last_spilled:
                self.spilled[(dev, bucket)] = self._last_spilled
                value["spilled"] = self._last_spilled
            table.store(entry, value)
        with _lock:
            self._memory[mem_key] = config
        return config

    def _time_each(
        self,
        cands: Sequence[Any],
        encode: Callable[[Any], dict[str, Any]],
        timer: Timer,
        run: Callable[[Any], None],
        kernels: Sequence[Any] = (),
    ) -> tuple[Any, list[tuple[dict[str, Any], float]]]:
        """Time ``run(c)`` for every candidate; the fastest and every (config, ms). Candidates that fail (do
        not compile, or run out of resources on this GPU) are skipped; none running is an error. A candidate
        whose first launch compiles a kernel of ``kernels`` that spills registers is dropped untimed; only
        when every candidate that runs spills are they timed (and the fastest taken, with a warning)."""
        results: list[tuple[dict[str, Any], float]] = []
        best: tuple[float, Any] | None = None
        errors = []
        spilling: list[tuple[Any, int]] = []
        for c in cands:
            try:
                ms = float(timer(_spill_checked(functools.partial(run, c), kernels)))
            except _Spills as s:
                spilling.append((c, s.amount))
                continue
            except Exception as e:
                errors.append(f"{encode(c)}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
                continue
            results.append((encode(c), ms))
            if best is None or ms < best[0]:
                best = (ms, c)
        self._last_spilled = [(encode(c), n) for c, n in spilling]
        if best is None and spilling:  # nothing spill-free runs: the fastest spilling candidate after all
            for c, _ in spilling:
                try:
                    ms = float(timer(functools.partial(run, c)))
                except Exception as e:
                    errors.append(f"{encode(c)}: {type(e).__name__}: {str(e).strip().splitlines()[-1:]}")
                    continue
                results.append((encode(c), ms))
                if best is None or ms < best[0]:
                    best = (ms, c)
            if best is not None:
                warnings.warn(
                    f"autotune {self.name}: every candidate that runs spills registers on Triton "
                    f"{triton.__version__}; using the fastest, {encode(best[1])}",
                    RuntimeWarning,
                    stacklevel=4,
                )
        if best is None:
            raise RuntimeError(f"autotune {self.name}: no config ran:\n" + "\n".join(errors))
        return best[1], results

    def forget(self) -> None:
        """Drop the winners kept in memory (the disk table stays): the next call behaves as in a new process."""
        with _lock:
            self._memory.clear()


class Autotuned(_Tuned):
    """A Triton kernel plus its configs, bucket key and remembered winners (see the module docstring)."""

    def __init__(
        self,
        fn: Any,
        *,
        name: str,
        configs: Sequence[triton.Config] | Mapping[int, Sequence[triton.Config]],
        interpreter_config: triton.Config,
        key: Callable[[dict[str, Any]], Bucket],
        reset: Callable[[dict[str, Any]], None] | None = None,
        restore: Sequence[str] = (),
        prune: Callable[[triton.Config, dict[str, Any]], bool] | None = None,
    ) -> None:
        lists = {int(k): list(v) for k, v in configs.items()} if isinstance(configs, Mapping) else {0: list(configs)}
        if not lists or not all(lists.values()):
            raise ValueError(f"autotune {name}: no configs")
        super().__init__(name)
        self.fn = fn  # the JITFunction (InterpretedFunction under the interpreter); _aot unwraps .fn
        self._lists = dict(sorted(lists.items()))
        self.interpreter_config = interpreter_config
        self.key = key
        self.reset = reset
        self.restore = tuple(restore)
        self.prune = prune
        self.arg_names: list[str] = list(getattr(fn, "arg_names", inspect.signature(getattr(fn, "fn", fn)).parameters))
        self._hashes: dict[int, str] = {}
        self._arch: dict[Any, int] = {}
        self._override: tuple[list[triton.Config], Timer | None, str] | None = None
        self._device_class: dict[Any, str] = {}

    # -- what is tried ------------------------------------------------------------------------------

    def configs_for(self, arch: int) -> list[triton.Config]:
        """The GPU configs for compute capability ``arch`` (80 for sm_80, 90 for sm_90, ...)."""
        keys = [k for k in self._lists if k <= arch] or [min(self._lists)]
        return self._lists[max(keys)]

    @property
    def configs(self) -> list[triton.Config]:
        """The GPU configs of this machine's first GPU (of the newest architecture listed without one)."""
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return self.configs_for(10 * major + minor)
        return self._lists[max(self._lists)]

    def _arch_of(self, named: dict[str, Any]) -> int:
        dev = next((v.device for v in named.values() if isinstance(v, torch.Tensor) and v.is_cuda), None)
        if dev is None:
            return max(self._lists)
        arch = self._arch.get(dev)
        if arch is None:
            major, minor = torch.cuda.get_device_capability(dev)
            arch = self._arch[dev] = 10 * major + minor
        return arch

    def candidates(self, named: dict[str, Any]) -> tuple[list[triton.Config], str]:
        """Configs a launch chooses from now and their hash: an override, else the interpreter config or
        the GPU configs of the arguments' device."""
        if self._override is not None:
            return self._override[0], self._override[2]
        if interpreting():
            return [self.interpreter_config], ""
        cands = self.configs_for(self._arch_of(named))
        h = self._hashes.get(id(cands))
        if h is None:
            h = self._hashes[id(cands)] = self.source_hash(cands)
        return cands, h

    @contextlib.contextmanager
    def override(self, configs: Sequence[triton.Config], timer: Timer | None = None) -> Iterator[Autotuned]:
        """Tune over ``configs`` (with ``timer(run) -> ms`` instead of do_bench) inside the block: lets CPU
        tests drive the tuner through the interpreter, and pins a config when given one."""
        prev = self._override
        self._override = (list(configs), timer, self.source_hash(configs))
        try:
            yield self
        finally:
            self._override = prev

    def source_hash(self, configs: Sequence[triton.Config]) -> str:
        """Hash of the kernel source (with the jit functions it calls) and a config list: disk entries
        written for another version of either are never used."""
        text = _jit_source(self.fn) + "\n" + json.dumps([config_dict(c) for c in configs], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    # -- launching ------------------------------------------------------------------------------------

    def __getitem__(self, grid: Any) -> Callable[..., triton.Config]:
        return lambda *args, **kwargs: self.run(grid, *args, **kwargs)

    def _bind(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        named = dict(zip(self.arg_names, args))
        named.update(kwargs)
        return named

    def _launch(self, config: triton.Config, grid: Any, named: dict[str, Any]) -> None:
        merged = {**named, **config.kwargs}
        g = grid(merged) if callable(grid) else grid
        try:
            args = [merged[n] for n in self.arg_names]
        except KeyError as e:
            raise TypeError(f"{self.name}: missing launch argument {e.args[0]!r}") from None
        opts: dict[str, Any] = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if getattr(config, "maxnreg", None) is not None:
            opts["maxnreg"] = config.maxnreg
        self.fn[g](*args, **opts)

    def _device_of(self, named: dict[str, Any]) -> str:
        from fm_engine import _device

        dev = next((v.device for v in named.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
        cls = self._device_class.get(dev)
        if cls is None or dev.type == "cpu":  # "cpu" vs "cpu triton-interpreter" follows the environment
            cls = self._device_class[dev] = _device.device_class(dev)
        return cls

    def run(self, grid: Any, *args: Any, **kwargs: Any) -> triton.Config:
        """Launch on ``grid`` with the bucket's best config (tuning it first on a miss); returns that config."""
        named = self._bind(args, kwargs)
        cands, chash = self.candidates(named)
        if len(cands) == 1 or not _enabled():
            self._launch(cands[0], grid, named)
            return cands[0]
        capturing = (
            any(isinstance(v, torch.Tensor) and v.is_cuda for v in named.values())
            and torch.cuda.is_current_stream_capturing()
        )

        def tune() -> tuple[triton.Config, list[tuple[dict[str, Any], float]]]:
            kept = [c for c in cands if self.prune is None or self.prune(c, named)]
            return self._tune(kept or cands, grid, named)

        config = self._select(
            self._device_of(named), chash, tuple(self.key(named)), cands, config_dict, capturing, tune
        )
        self._launch(config, grid, named)
        return config

    def _precompile(self, cands: Sequence[triton.Config], grid: Any, named: dict[str, Any]) -> int:
        """Compile every candidate of one launch in parallel before timing them one by one, so a first-call tuning
        costs less wall time. Uses Triton's asynchronous compile mode (``AsyncCompileMode`` with a thread pool:
        each candidate's ``warmup`` compiles without launching); where Triton has none, under the interpreter, or
        for a single candidate, nothing happens and the timing loop compiles each candidate in turn. A candidate
        that fails to compile is left to the timing loop, which skips it with its reason. Returns the number of
        candidates submitted."""
        if len(cands) < 2 or interpreting() or not hasattr(self.fn, "warmup"):
            return 0
        try:
            from triton.runtime._async_compile import AsyncCompileMode
        except ImportError:  # a Triton without asynchronous compilation
            return 0
        from concurrent.futures import ThreadPoolExecutor

        submitted = 0
        with ThreadPoolExecutor(max_workers=min(len(cands), os.cpu_count() or 1, 16)) as pool:
            with AsyncCompileMode(pool, ignore_errors=True):
                for c in cands:
                    merged = {**named, **c.kwargs}
                    opts: dict[str, Any] = {"num_warps": c.num_warps, "num_stages": c.num_stages}
                    if getattr(c, "maxnreg", None) is not None:
                        opts["maxnreg"] = c.maxnreg
                    try:
                        self.fn.warmup(
                            *[merged[n] for n in self.arg_names], grid=grid(merged) if callable(grid) else grid, **opts
                        )
                        submitted += 1
                    except Exception:  # reported by the timing loop, which compiles it again and skips it
                        continue
        return submitted

    def _prepare(self, named: dict[str, Any], saved: dict[str, torch.Tensor] | None) -> None:
        if saved:
            for n, t in saved.items():
                named[n].copy_(t)
        if self.reset is not None:
            self.reset(named)

    def _tune(
        self, cands: list[triton.Config], grid: Any, named: dict[str, Any]
    ) -> tuple[triton.Config, list[tuple[dict[str, Any], float]]]:
        timer = (self._override[1] if self._override is not None else None) or _default_timer
        saved = {n: named[n].clone() for n in self.restore}

        def once(c: triton.Config) -> None:
            self._prepare(named, saved)
            self._launch(c, grid, named)

        self._precompile(cands, grid, named)
        best = self._time_each(cands, config_dict, timer, once, [self.fn])
        self._prepare(named, saved)  # the timed runs changed the outputs (and any in-place inputs)
        return best


class LaunchTuner(_Tuned):
    """Tunes a *launcher*: Python code that issues one or more kernel launches whose configuration also
    decides the buffers and grids it allocates (key splits, partial results), so no single kernel can be
    tuned alone. The attention kernels use it.

    ``kernels``: the JIT functions the launcher may launch (their sources key the disk entries, with the
    candidate list). A launcher calls :meth:`choose` with its bucket, the candidates for this call (config
    maps, the first the default; each architecture's list as the compile gate registers it) and
    ``run(config)``, which launches everything with that config into fresh outputs: on a miss every
    candidate is timed that way (the outputs dropped), and the launcher then runs with the winner. Memory,
    disk table, CUDA-graph capture, ``FM_ENGINE_AUTOTUNE=0`` and the counters behave as for
    :class:`Autotuned`. Under the interpreter launchers pass their one interpreter config; :meth:`override`
    lets tests drive the tuning there.
    """

    def __init__(self, name: str, kernels: Sequence[Any]) -> None:
        super().__init__(name)
        self.kernels = list(kernels)
        self._source: str | None = None
        self._hashes: dict[str, str] = {}
        self._override: tuple[list[dict[str, Any]], Timer | None] | None = None

    def source_hash(self, candidates: Sequence[Mapping[str, Any]]) -> str:
        if self._source is None:
            self._source = "\n".join(_jit_source(k) for k in self.kernels)
        text = json.dumps([dict(sorted(c.items())) for c in candidates], sort_keys=True)
        h = self._hashes.get(text)
        if h is None:
            h = self._hashes[text] = hashlib.sha256((self._source + "\n" + text).encode()).hexdigest()[:20]
        return h

    @contextlib.contextmanager
    def override(self, candidates: Sequence[Mapping[str, Any]], timer: Timer | None = None) -> Iterator[LaunchTuner]:
        """Choose among ``candidates`` (timed with ``timer(run) -> ms``) inside the block, on any device and
        under the interpreter: CPU tests drive the tuning of real launchers this way."""
        prev = self._override
        self._override = ([dict(c) for c in candidates], timer)
        try:
            yield self
        finally:
            self._override = prev

    def choose(
        self,
        device: torch.device,
        bucket: Bucket,
        candidates: Sequence[Mapping[str, Any]],
        run: Callable[[dict[str, Any]], object],
    ) -> dict[str, Any]:
        """The config to launch with: the bucket's remembered winner, else the fastest of ``candidates`` by
        ``run`` (see the class docstring); the first candidate when there is one, or tuning is off."""
        timer: Timer | None = None
        if self._override is not None:
            cands, timer = self._override
        else:
            cands = [dict(c) for c in candidates]
        if not cands:
            raise ValueError(f"autotune {self.name}: no candidates")
        if len(cands) == 1 or not _enabled():
            return cands[0]
        from fm_engine import _device

        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()

        def once(c: dict[str, Any]) -> None:
            run(dict(c))  # fresh outputs, dropped

        def tune() -> tuple[dict[str, Any], list[tuple[dict[str, Any], float]]]:
            return self._time_each(cands, dict, timer or _default_timer, once, self.kernels)

        chosen = self._select(
            _device.device_class(device), self.source_hash(cands), tuple(bucket), cands, dict, capturing, tune
        )
        return dict(chosen)


def autotune(
    *,
    name: str,
    configs: Sequence[triton.Config] | Mapping[int, Sequence[triton.Config]],
    interpreter_config: triton.Config,
    key: Callable[[dict[str, Any]], Bucket],
    reset: Callable[[dict[str, Any]], None] | None = None,
    restore: Sequence[str] = (),
    prune: Callable[[triton.Config, dict[str, Any]], bool] | None = None,
) -> Callable[[Any], Autotuned]:
    """Decorator over a ``@triton.jit`` function: see the module docstring."""

    def wrap(fn: Any) -> Autotuned:
        return Autotuned(
            fn,
            name=name,
            configs=configs,
            interpreter_config=interpreter_config,
            key=key,
            reset=reset,
            restore=restore,
            prune=prune,
        )

    return wrap


def tuned_kernels() -> list[Autotuned]:
    return [t for t in _TUNED if isinstance(t, Autotuned)]


def stats() -> dict[str, int]:
    """Counters summed over every tuned kernel of this process."""
    out = {"tunings": 0, "memory_hits": 0, "disk_hits": 0, "untuned": 0}
    for t in _TUNED:
        for k, v in t.stats.items():
            out[k] += v
    return out


def reset_stats() -> None:
    for t in _TUNED:
        for k in t.stats:
            t.stats[k] = 0


def forget() -> None:
    """Drop every in-memory winner and the cached disk tables (as a fresh process would start)."""
    for t in _TUNED:
        t.forget()
    _TABLES.clear()
