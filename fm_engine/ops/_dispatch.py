"""Backend dispatch shared by every op.

Each op is an :class:`Op`: a name, one argument validator (run once, before any backend is
chosen, so every backend rejects the same bad inputs with the same message), the eager
reference, and any number of fast backends. A backend declares two things as data:

* ``available()`` -> ``None`` or the reason it cannot run in this process at all
  (Triton not importable, no GPU and no interpreter, CUDA extension not built, ...);
* ``supports(*args, **kwargs)`` -> ``None`` or the reason it cannot take these inputs.

Choice, first match wins: the call's ``backend=`` argument, the innermost
``fm_engine.use_backend(...)`` context, the ``FM_ENGINE_BACKEND`` environment variable, else
automatic. Automatic: on CUDA tensors the first backend in the op's preference order that accepts
the inputs; on CPU tensors the reference, except with ``TRITON_INTERPRET=1`` when the Triton
backend runs in Triton's interpreter. An explicitly chosen backend that refuses raises
:class:`BackendUnsupportedError` with its reason: nothing falls back silently. Automatic choice
only ever picks among backends that compute the same function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

BACKENDS = ("reference", "triton", "cuda", "hybrid")  # hybrid: vendor GEMMs with the Triton element-wise kernels
_AUTO = "auto"

# Plain module state rather than ContextVars: torch.compile (dynamo) traces reads of module globals
# and guards on them, but cannot trace ContextVar.get. The stacks are per process, not per thread.
_backend_stack: list[str] = []

_OPS: dict[str, Op] = {}

_trace_stack: list[list[tuple[str, str]]] = []


class BackendUnsupportedError(ValueError):
    """An explicitly requested backend cannot run the given inputs (the message says why)."""


def _check_backend_name(name: str, where: str) -> str:
    name = name.lower()
    if name not in BACKENDS and name != _AUTO:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {(_AUTO, *BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block with backend ``name`` ("reference", "triton", "cuda", "auto")."""
    _backend_stack.append(_check_backend_name(name, "use_backend(name)"))
    try:
        yield
    finally:
        _backend_stack.pop()


@contextlib.contextmanager
def trace() -> Iterator[list[tuple[str, str]]]:
    """Record ``(op name, backend)`` for every op call inside the block (tests use this to prove
    that a "fast" run really ran the fast kernels)."""
    calls: list[tuple[str, str]] = []
    _trace_stack.append(calls)
    try:
        yield calls
    finally:
        _trace_stack.pop()


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(explicit: str | None = None) -> str:
    if explicit is not None:
        return _check_backend_name(explicit, "backend")
    if _backend_stack:
        return _backend_stack[-1]
    env = os.environ.get("FM_ENGINE_BACKEND")
    if env:
        return _check_backend_name(env, "FM_ENGINE_BACKEND")
    return _AUTO


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


@dataclasses.dataclass(frozen=True)
class Verdict:
    backend: str
    ok: bool
    reason: str


@dataclasses.dataclass
class Backend:
    name: str
    fn: Callable[..., Any]
    available: Callable[[], str | None]
    supports: Callable[..., str | None]


@dataclasses.dataclass
class Explanation:
    op: str
    verdicts: list[Verdict]
    requested: str
    chosen: str | None
    error: str | None = None

    def __str__(self) -> str:
        lines = [f"{self.op}: requested backend {self.requested!r} -> {self.chosen or 'none'}"]
        if self.error:
            lines.append(f"  invalid input: {self.error}")
        for v in self.verdicts:
            lines.append(f"  {v.backend:<10} {'yes' if v.ok else 'no ':<4} {v.reason}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


class Op:
    """One op family entry point: validation, reference, fast backends, dispatch."""

    def __init__(
        self,
        name: str,
        reference: Callable[..., Any],
        validate: Callable[..., None] | None = None,
        preference: tuple[str, ...] = ("cuda", "triton"),
    ) -> None:
        if name in _OPS:
            raise ValueError(f"op {name!r} is registered twice")
        self.name = name
        self.validate = validate or (lambda *a, **k: None)
        self.preference = preference
        self.backends: dict[str, Backend] = {
            "reference": Backend("reference", reference, lambda: None, lambda *a, **k: None)
        }
        _OPS[name] = self

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        available: Callable[[], str | None],
        supports: Callable[..., str | None],
    ) -> None:
        _check_backend_name(name, f"{self.name}.register")
        self.backends[name] = Backend(name, fn, available, supports)

    def verdict(self, name: str, args: tuple, kwargs: dict) -> Verdict:
        b = self.backends.get(name)
        if b is None:
            return Verdict(name, False, f"{self.name} has no {name} implementation")
        reason = b.available()
        if reason is None:
            reason = b.supports(*args, **kwargs)
        if reason is None:
            return Verdict(name, True, "supported")
        return Verdict(name, False, reason)

    def _auto_order(self, args: tuple, kwargs: dict) -> tuple[str, ...]:
        t = _first_tensor(args, kwargs)
        if t is not None and t.device.type == "cuda":
            return (*self.preference, "reference")
        if interpreting():
            return ("triton", "reference")
        return ("reference",)

    def choose(self, args: tuple, kwargs: dict, backend: str | None = None) -> str:
        req = requested_backend(backend)
        if req != _AUTO:
            v = self.verdict(req, args, kwargs)
            if not v.ok:
                raise BackendUnsupportedError(f"{self.name}: backend {req!r} cannot run this call: {v.reason}")
            return req
        for name in self._auto_order(args, kwargs):
            if self.verdict(name, args, kwargs).ok:
                return name
        return "reference"

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        self.validate(*args, **kwargs)
        name = self.choose(args, kwargs, backend)
        if _trace_stack:
            _trace_stack[-1].append((self.name, name))
        return self.backends[name].fn(*args, **kwargs)

    def explain(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Explanation:
        req = requested_backend(backend)
        try:
            self.validate(*args, **kwargs)
        except ValueError as e:
            return Explanation(self.name, [], req, None, str(e))
        verdicts = [self.verdict(n, args, kwargs) for n in BACKENDS]
        try:
            chosen: str | None = self.choose(args, kwargs, backend)
        except BackendUnsupportedError:
            chosen = None
        return Explanation(self.name, verdicts, req, chosen)


def get_op(name: str) -> Op:
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {sorted(_OPS)}") from None


def registered_ops() -> dict[str, Op]:
    return dict(_OPS)


def explain(op: str | Callable[..., Any], *args: Any, backend: str | None = None, **kwargs: Any) -> Explanation:
    """Every backend's verdict for these inputs, and the one that would run.

    ``op`` is an op name (``"relu2_mlp"``) or its public function (``fm_engine.ops.relu2_mlp``).
    """
    name = op if isinstance(op, str) else getattr(op, "op_name", None)
    if name is None:
        raise ValueError(f"explain(op): expected an op name or an fm_engine.ops function, got {op!r}")
    return get_op(name).explain(*args, backend=backend, **kwargs)


# --- availability checks shared by the fast backends -----------------------------------------


def triton_available() -> str | None:
    """None when Triton kernels can run here (a CUDA GPU, or the interpreter), else why not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"triton is not importable ({e.__class__.__name__}: {e})"
    if interpreting() or torch.cuda.is_available():
        return None
    return "no CUDA GPU and TRITON_INTERPRET is not 1"


def triton_device_ok(*tensors: torch.Tensor) -> str | None:
    """Triton runs CUDA tensors, or CPU tensors in the interpreter."""
    for t in tensors:
        if t.device.type == "cuda":
            continue
        if t.device.type == "cpu" and interpreting():
            continue
        return f"tensor on {t.device} (Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1)"
    return None


def cuda_ext_available() -> str | None:
    from fm_engine import _C_status

    reason = _C_status()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA GPU"
    return None


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast floating inputs to the autocast dtype when autocast is on for their device.

    Custom ops get no autocast rule of their own, so an op that autocast would run in low precision
    (a matrix product, like ``F.linear``) casts its inputs here, before validation, exactly as eager
    autocast would: bf16 activations meet bf16 weights instead of fp32 master weights.
    """
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) if t.is_floating_point() else t for t in tensors)


def public(op: Op, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a public wrapper function as the entry point of ``op`` (for ``explain``)."""
    fn.op_name = op.name  # type: ignore[attr-defined]
    return fn
