"""Count Triton kernel launches, new kernel specialisations and autotuning while code runs.

A Triton kernel is compiled once per *specialisation*: its constexpr values, the dtypes of its
tensors, whether each pointer is 16-byte aligned, and whether each integer argument is 1 or a multiple
of 16. An autotuner re-times every config for each new key: ``@triton.autotune`` for each new value of
its ``key`` arguments, fm_engine's ``kernels/_autotune.py`` for each new bucket (sizes rounded to powers of
two, remembered across processes). Both
are expensive (a compilation takes about a second, an autotuning sweep tens of milliseconds per
config), so a training step that keeps meeting new shapes never reaches steady state. This module
makes that visible, also on a CPU in Triton's interpreter where nothing is compiled: while
:func:`count` is active it records each launch's specialisation key (emulating Triton's rule) and
each ``triton.autotune`` key, process-wide, so a later counting block reports only what is new.
On a GPU it also counts Triton's real compilations through ``triton.knobs.runtime.jit_cache_hook`` and
the tunings ``_autotune`` really ran (``tunings``).

    with count():                # warm-up steps: everything seen here is "known"
        step(); step()
    with count() as steady:      # one steady-state step
        step()
    assert steady.new_specializations == [] and steady.autotune_keys == []
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
from collections.abc import Iterator
from typing import Any

import torch

_SEEN_SPECIALIZATIONS: set[tuple] = set()
_SEEN_AUTOTUNE: set[tuple] = set()
_CONSTEXPR_CACHE: dict[Any, frozenset[str]] = {}


@dataclasses.dataclass
class LaunchStats:
    launches: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # kernel -> launches
    new_specializations: list[str] = dataclasses.field(default_factory=list)  # kernels a GPU would compile anew
    autotune_keys: list[str] = dataclasses.field(default_factory=list)  # autotune keys a GPU would tune anew
    compilations: int = 0  # real Triton compilations (GPU only; 0 in the interpreter)
    tunings: int = 0  # buckets _autotune timed (GPU only; the interpreter never times)

    @property
    def total_launches(self) -> int:
        return sum(self.launches.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "launches": self.total_launches,
            "launches_by_kernel": dict(self.launches.most_common()),
            "new_specializations": list(self.new_specializations),
            "autotune_keys": list(self.autotune_keys),
            "compilations": self.compilations,
            "tunings": self.tunings,
        }


def _constexprs(fn: Any) -> frozenset[str]:
    """Names of the constexpr parameters of a kernel's Python function."""
    hit = _CONSTEXPR_CACHE.get(fn)
    if hit is None:
        names = set()
        for name, p in inspect.signature(fn).parameters.items():
            ann = p.annotation
            text = ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann))
            if "constexpr" in str(text):
                names.add(name)
        hit = frozenset(names)
        _CONSTEXPR_CACHE[fn] = hit
    return hit


def _arg_key(value: Any, constexpr: bool) -> Any:
    if constexpr:
        return ("c", value if isinstance(value, (int, float, bool, str, type(None))) else repr(value))
    if isinstance(value, torch.Tensor):
        return ("t", str(value.dtype), value.data_ptr() % 16 == 0)
    if isinstance(value, bool):
        return ("b",)
    if isinstance(value, int):
        return ("i", value == 1, value % 16 == 0, -(2**31) <= value < 2**31)
    if isinstance(value, float):
        return ("f",)
    if value is None:
        return ("n",)
    return ("o", type(value).__name__)


def specialization_key(fn: Any, args: tuple, kwargs: dict) -> tuple:
    """(kernel name, per-argument key, launch options) following Triton's specialisation rules."""
    names = list(inspect.signature(fn).parameters)
    cx = _constexprs(fn)
    bound = dict(zip(names, args, strict=False))
    opts = {}
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
        else:
            opts[k] = v  # num_warps, num_stages, ...
    key = tuple((n, _arg_key(bound[n], n in cx)) for n in names if n in bound)
    return (fn.__name__, key, tuple(sorted(opts.items())))


_active: list[LaunchStats] = []


def _record_launch(fn: Any, args: tuple, kwargs: dict) -> None:
    key = specialization_key(fn, args, kwargs)
    new = key not in _SEEN_SPECIALIZATIONS
    _SEEN_SPECIALIZATIONS.add(key)
    for s in _active:
        s.launches[fn.__name__] += 1
        if new:
            s.new_specializations.append(fn.__name__)


def _record_autotune(tuner: Any, args: tuple, kwargs: dict) -> None:
    named = {**dict(zip(tuner.arg_names, args, strict=False)), **kwargs}
    key = [named[k] for k in tuner.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    _new_tuning_key((tuner.base_fn.__name__, tuple(key)))


def _new_tuning_key(full: tuple) -> None:
    if full in _SEEN_AUTOTUNE:
        return
    _SEEN_AUTOTUNE.add(full)
    for s in _active:
        s.autotune_keys.append(f"{full[0]}{full[1]}")


@contextlib.contextmanager
def count() -> Iterator[LaunchStats]:
    """Count launches, new specialisations and new autotune keys of every Triton kernel in the block."""
    import triton
    from triton.runtime import autotuner, jit

    stats = LaunchStats()
    patched: list[tuple[Any, str, Any]] = []

    def patch(cls: Any, name: str, wrapper: Any) -> None:
        patched.append((cls, name, cls.__dict__[name]))
        setattr(cls, name, wrapper)

    if not _active:
        orig_jit = jit.JITFunction.run

        def jit_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
            if not warmup:
                _record_launch(self.fn, args, kwargs)
            return orig_jit(self, *args, grid=grid, warmup=warmup, **kwargs)

        patch(jit.JITFunction, "run", jit_run)
        try:
            from triton.runtime.interpreter import InterpretedFunction
        except ImportError:  # pragma: no cover - older Triton
            InterpretedFunction = None
        if InterpretedFunction is not None:
            orig_interp = InterpretedFunction.run

            def interp_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
                if not warmup:
                    _record_launch(self.fn, args, kwargs)
                return orig_interp(self, *args, grid=grid, warmup=warmup, **kwargs)

            patch(InterpretedFunction, "run", interp_run)
        orig_tune = autotuner.Autotuner.run

        def tune_run(self: Any, *args: Any, **kwargs: Any) -> Any:
            _record_autotune(self, args, kwargs)
            return orig_tune(self, *args, **kwargs)

        patch(autotuner.Autotuner, "run", tune_run)
        from fm_engine.kernels import _autotune

        orig_ours = _autotune.Autotuned.run

        def ours_run(self: Any, grid: Any, *args: Any, **kwargs: Any) -> Any:
            _new_tuning_key((self.name, tuple(self.key(self._bind(args, kwargs)))))
            before = self.stats["tunings"]
            try:
                return orig_ours(self, grid, *args, **kwargs)
            finally:
                for s in _active:
                    s.tunings += self.stats["tunings"] - before

        patch(_autotune.Autotuned, "run", ours_run)
        knobs = getattr(triton, "knobs", None)
        prev_hook = knobs.runtime.jit_cache_hook if knobs is not None else None

        def cache_hook(*a: Any, **k: Any) -> Any:
            for s in _active:
                s.compilations += 1
            return prev_hook(*a, **k) if prev_hook is not None else False

        if knobs is not None:
            knobs.runtime.jit_cache_hook = cache_hook
    _active.append(stats)
    try:
        yield stats
    finally:
        _active.remove(stats)
        if not _active:
            for cls, name, orig in reversed(patched):
                setattr(cls, name, orig)
            knobs = getattr(triton, "knobs", None)
            if knobs is not None and patched:
                knobs.runtime.jit_cache_hook = prev_hook
