"""Backend dispatch shared by every op.

Each op is an :class:`Op`: a name, one argument validator (run once, before any backend is
chosen, so every backend rejects the same bad inputs with the same message), the eager
reference, and any number of fast backends.

The validator resolves the call once: it returns the op's call record, a frozen dataclass (an
:class:`OpCall`) holding the call's tensors, its flags with their defaults filled in, and whatever it
derived from them (sizes, geometry). The measurement bucket, every backend's ``supports`` and the
fast backends take that record, so nothing is derived twice. The reference and ``compile`` backends
take the public arguments as given (the reference keeps its public signature; ``compile`` keys its
cache on them). A backend declares two things as data:

* ``available()`` -> ``None`` or the reason it cannot run in this process at all
  (Triton not importable, no GPU and no interpreter, CUDA extension not built, ...);
* ``supports(call)`` -> ``None`` or the reason it cannot take this call.

Choice, first match wins: the call's ``backend=`` argument, the innermost
``fm_engine.use_backend(...)`` context, the ``FM_ENGINE_BACKEND`` environment variable, else
automatic. An explicitly chosen backend that refuses raises :class:`BackendUnsupportedError` with
its reason: nothing falls back silently.

Automatic choice follows measurements only (:mod:`fm_engine.ops._evidence`): the op maps the call to
a bucket (its ``bucket`` function: flags that change the kernel, sizes rounded to powers of two, and
whether gradients are needed); the evidence tables of this device class rank the backends measured
at that bucket (or the nearest measured one); the fastest that accepts the inputs and beats the
reference by more than 3% runs, else the reference. With no measurement the reference runs, on a
GPU as on a CPU (with ``TRITON_INTERPRET=1`` too: name ``backend="triton"`` to run the interpreter).
Automatic choice only ever picks among backends that compute the same function, and never times.

Every op also has a ``compile`` backend: its reference under ``torch.compile(dynamic=False)``, one compiled
callable per exact call signature (shapes, strides, dtypes, devices, requires_grad, non-tensor arguments,
grad mode, autocast dtype). It is measured and chosen like any other backend. Inside an outer
``torch.compile`` it never nests a compilation: the reference is traced inline into the outer graph.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fm_engine._env import interpreting  # also importable from here, as before
from fm_engine.ops import _evidence

# hybrid: vendor GEMMs with the Triton element-wise kernels; compile: the reference under torch.compile
BACKENDS = ("reference", "triton", "cuda", "hybrid", "compile")
REFERENCE = "reference"
COMPILE = "compile"
_AUTO = "auto"

# Plain module state rather than ContextVars: torch.compile (dynamo) traces reads of module globals
# and guards on them, but cannot trace ContextVar.get. The stacks are per process, not per thread.
_backend_stack: list[str] = []

_OPS: dict[str, Op] = {}

_trace_stack: list[list[tuple[str, str]]] = []

# Active call recorders (fm_engine.ops._record.record): every op call is reported to each.
_recorders: list[Any] = []


class BackendUnsupportedError(ValueError):
    """An explicitly requested backend cannot run the given inputs (the message says why)."""


def _check_backend_name(name: str, where: str) -> str:
    name = name.lower()
    if name not in BACKENDS and name != _AUTO:
        raise ValueError(f"{where}: unknown backend {name!r}; expected one of {(_AUTO, *BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block with backend ``name`` (one of :data:`BACKENDS`, or "auto")."""
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


def requested_backend(explicit: str | None = None) -> str:
    if explicit is not None:
        return _check_backend_name(explicit, "backend")
    if _backend_stack:
        return _backend_stack[-1]
    env = os.environ.get("FM_ENGINE_BACKEND")
    if env:
        return _check_backend_name(env, "FM_ENGINE_BACKEND")
    return _AUTO


@dataclasses.dataclass(frozen=True)
class OpCall:
    """Base of every op's call record: the resolved call its validator returns (see the module docstring).

    A subclass declares the op's arguments as fields, tensors in the order of the public signature, flags
    with their defaults applied, then what validation derived from them."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The call's tensors, in field order (the first one decides the device class)."""
        out = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out.append(v)
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class ArgsCall(OpCall):
    """The record of an op registered without a validator: its arguments as given."""

    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(a for a in (*self.args, *(v for _, v in self.kwargs)) if isinstance(a, torch.Tensor))


def _args_call(*args: Any, **kwargs: Any) -> ArgsCall:
    return ArgsCall(args, tuple(kwargs.items()))


def _always(call: OpCall) -> str | None:
    return None


@dataclasses.dataclass(frozen=True)
class Verdict:
    backend: str
    ok: bool
    reason: str


@dataclasses.dataclass
class Backend:
    """One implementation of an op. ``fn`` takes the call record, or, with ``public_args``, the public
    arguments as given (the reference and ``compile``)."""

    name: str
    fn: Callable[..., Any]
    available: Callable[[], str | None]
    supports: Callable[[Any], str | None]
    public_args: bool = False


@dataclasses.dataclass
class Explanation:
    op: str
    verdicts: list[Verdict]
    requested: str
    chosen: str | None
    error: str | None = None
    evidence: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.op}: requested backend {self.requested!r} -> {self.chosen or 'none'}"]
        if self.error:
            lines.append(f"  invalid input: {self.error}")
        for v in self.verdicts:
            lines.append(f"  {v.backend:<10} {'yes' if v.ok else 'no ':<4} {v.reason}")
        lines += [f"  {line}" for line in self.evidence]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


BucketFn = Callable[[Any], tuple[dict[str, Any], dict[str, int]]]


class Op:
    """One op family entry point: validation, reference, fast backends, dispatch.

    ``validate(*args, **kwargs) -> call``: checks the public arguments (ValueError naming the argument) and
    returns the call record (an :class:`OpCall`). ``bucket(call) -> (flags, sizes)``: what a measurement of
    this call is keyed by (:mod:`fm_engine.ops._evidence`); the ``grad`` flag is added here. Without it
    ``auto`` always runs the reference. ``run_reference(call)``: the reference on the record, for an op whose
    reference would otherwise derive again what validation did (the reference backend then runs it; ``compile``
    keeps compiling ``reference`` on the public arguments).
    """

    def __init__(
        self,
        name: str,
        reference: Callable[..., Any],
        validate: Callable[..., OpCall] | None = None,
        bucket: BucketFn | None = None,
        run_reference: Callable[[Any], Any] | None = None,
    ) -> None:
        if name in _OPS:
            raise ValueError(f"op {name!r} is registered twice")
        self.name = name
        self.validate: Callable[..., OpCall] = validate or _args_call
        self.bucket_fn = bucket
        ref = (
            Backend(REFERENCE, reference, lambda: None, _always, public_args=True)
            if run_reference is None
            else Backend(REFERENCE, run_reference, lambda: None, _always)
        )
        self.backends: dict[str, Backend] = {REFERENCE: ref}
        self.compiled = CompiledReference(name, reference)
        self.backends[COMPILE] = Backend(COMPILE, self.compiled, compile_available, _always, public_args=True)
        # the compiled code is the reference's (torch's version is stamped apart in a measurement)
        _evidence.declare_sources(name, COMPILE, [reference.__module__])
        _OPS[name] = self

    def register(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        available: Callable[[], str | None],
        supports: Callable[[Any], str | None],
        sources: Sequence[str | Path] = (),
    ) -> None:
        """Add backend ``name``: ``fn(call)`` runs it on the call record, ``available()`` / ``supports(call)``
        say when it cannot.

        ``sources``: the files that implement it, as paths or dotted module names (a package stands for its
        ``__init__.py``), in a fixed order; the evidence tables key its measurements by their hash, so a
        measurement of other code is ignored (:func:`fm_engine.ops._evidence.backend_version`). Without
        sources the backend has no version and its measurements are never treated as stale."""
        _check_backend_name(name, f"{self.name}.register")
        self.backends[name] = Backend(name, fn, available, supports)
        _evidence.declare_sources(self.name, name, sources)

    def verdict_of(self, name: str, call: OpCall) -> Verdict:
        """Whether backend ``name`` can run the (validated) call, and why not."""
        b = self.backends.get(name)
        if b is None:
            return Verdict(name, False, f"{self.name} has no {name} implementation")
        reason = b.available()
        if reason is None:
            reason = b.supports(call)
        if reason is None:
            return Verdict(name, True, "supported")
        return Verdict(name, False, reason)

    def verdict(self, name: str, args: tuple, kwargs: dict) -> Verdict:
        """:meth:`verdict_of` for public arguments (validated first: ValueError when they are invalid)."""
        return self.verdict_of(name, self.validate(*args, **kwargs))

    def bucket_of(self, call: OpCall) -> _evidence.Bucket | None:
        """The measurement bucket of a (validated) call, or None when the op declares none."""
        if self.bucket_fn is None:
            return None
        flags, sizes = self.bucket_fn(call)
        grad = _evidence.requires_grad(*call.tensors())
        return _evidence.make_bucket({**flags, "grad": grad}, sizes)

    def bucket(self, args: tuple, kwargs: dict) -> _evidence.Bucket | None:
        """:meth:`bucket_of` for public arguments (validated first)."""
        return self.bucket_of(self.validate(*args, **kwargs))

    def device_class(self, call: OpCall) -> str | None:
        tensors = call.tensors()
        if not tensors:
            return None
        t = tensors[0]
        return _evidence.device_class_of(t.device.type, -1 if t.device.index is None else t.device.index)

    def _auto(self, call: OpCall) -> str:
        """The measured-fastest backend that accepts the call (see the module docstring)."""
        bucket = self.bucket_of(call)
        cls = self.device_class(call)
        if bucket is None or cls is None:
            return REFERENCE
        for name in _evidence.measured_order(cls, self.name, bucket.key).split(","):
            if name in self.backends and self.verdict_of(name, call).ok:
                return name
        return REFERENCE

    def choose(self, call: OpCall, backend: str | None = None) -> str:
        req = requested_backend(backend)
        if req != _AUTO:
            v = self.verdict_of(req, call)
            if not v.ok:
                raise BackendUnsupportedError(f"{self.name}: backend {req!r} cannot run this call: {v.reason}")
            return req
        return self._auto(call)

    def __call__(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Any:
        call = self.validate(*args, **kwargs)
        if _recorders and _recorders[-1].dry:  # record the call's inputs and stop (see _record.record)
            _recorders[-1].add(self, None, args, kwargs, call)
        name = self.choose(call, backend)
        if _trace_stack:
            _trace_stack[-1].append((self.name, name))
        if _recorders and not torch.compiler.is_compiling():
            for r in _recorders:
                r.add(self, name, args, kwargs, call)
        b = self.backends[name]
        if b.public_args:
            return b.fn(*args, **kwargs)
        return b.fn(call)

    def explain(self, *args: Any, backend: str | None = None, **kwargs: Any) -> Explanation:
        req = requested_backend(backend)
        try:
            call = self.validate(*args, **kwargs)
        except ValueError as e:
            return Explanation(self.name, [], req, None, str(e))
        names = [*BACKENDS, *(n for n in self.backends if n not in BACKENDS)]
        verdicts = [self.verdict_of(n, call) for n in names]
        try:
            chosen: str | None = self.choose(call, backend)
        except BackendUnsupportedError:
            chosen = None
        evidence: list[str] = []
        bucket = self.bucket_of(call)
        cls = self.device_class(call)
        if bucket is None:
            evidence = ["evidence: this op declares no measurement bucket -> automatic dispatch runs the reference"]
        elif cls is not None:
            evidence = _evidence.describe(cls, self.name, bucket, [v.backend for v in verdicts if v.ok])
        if req != _AUTO:
            evidence.append(f"(backend {req!r} was requested explicitly: the evidence is not consulted)")
        return Explanation(self.name, verdicts, req, chosen, evidence=evidence)


def _exact_part(x: Any) -> Any:
    """Hashable text of one argument for :class:`CompiledReference`'s cache key."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_exact_part(v) for v in x))
    if isinstance(x, (int, float, bool, str, type(None), torch.dtype)):
        return (type(x).__name__, x)
    return ("repr", repr(x))


def _trampoline(*args: Any, **kwargs: Any) -> Any:
    return _target(*args, **kwargs)  # type: ignore[name-defined]  # noqa: F821  (a global of each copy)


class CompiledReference:
    """An op's reference under ``torch.compile(dynamic=False)``: one compiled callable per exact call.

    Dynamo keeps its compiled graphs per code object and stops recompiling after a few variants
    (``recompile_limit``); each cache entry therefore compiles its own copy of a small trampoline (a
    distinct code object that calls the reference), so every shape gets its own graph and none falls
    back to eager silently. Called while an outer ``torch.compile`` traces, it runs the reference
    directly: the outer compilation traces it inline (no nested compilation).
    """

    def __init__(self, op_name: str, reference: Callable[..., Any]) -> None:
        self.op_name = op_name
        self.reference = reference
        self.cache: dict[Any, Callable[..., Any]] = {}

    def key(self, args: tuple, kwargs: dict) -> Any:
        dev = next((a.device.type for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), "cpu")
        return (
            tuple(_exact_part(a) for a in args),
            tuple(sorted((k, _exact_part(v)) for k, v in kwargs.items())),
            torch.is_grad_enabled(),
            autocast_dtype(dev),
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.reference(*args, **kwargs)
        key = self.key(args, kwargs)
        fn = self.cache.get(key)
        if fn is None:
            name = f"compiled_{self.op_name}_{len(self.cache)}"
            code = _trampoline.__code__.replace(co_name=name)
            entry = types.FunctionType(code, {"_target": self.reference, "__builtins__": __builtins__}, name)
            # FM_ENGINE_COMPILE_BACKEND: another torch.compile backend (e.g. "aot_eager" in tests that exercise
            # the tuning machinery rather than inductor's code); default inductor
            fn = torch.compile(entry, dynamic=False, backend=os.environ.get("FM_ENGINE_COMPILE_BACKEND", "inductor"))
            self.cache[key] = fn
        return fn(*args, **kwargs)


def compile_available() -> str | None:
    """None when torch.compile can run here, else why not (checked without importing dynamo up front)."""
    import sys

    if torch.compiler.is_compiling():  # tracing already: the reference is traced inline
        return None
    if "torch._dynamo" in sys.modules:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return f"torch.compile is not supported on Python {sys.version.split()[0]} here"
    return None


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
    from fm_engine.ops import _cuda

    reason = _cuda.status()
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
    dt = autocast_dtype(tensors[0].device.type)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if t.is_floating_point() else t for t in tensors)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype when autocast is on for ``device_type``, else None (also for devices autocast does not
    know, such as meta)."""
    if device_type not in ("cuda", "cpu", "xpu", "mps", "hpu", "xla", "mtia"):
        return None
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def public(op: Op, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a public wrapper function as the entry point of ``op`` (for ``explain``)."""
    fn.op_name = op.name  # type: ignore[attr-defined]
    return fn
