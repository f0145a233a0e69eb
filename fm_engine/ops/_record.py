"""Record the op calls of a piece of code (a training step) so each distinct call can be replayed.

``with record() as rec: step()`` collects, for every fm_engine op call, the op, the backend the
dispatcher chose, the inputs' shapes / strides / dtypes / requires_grad, every non-tensor argument,
whether grad mode and autocast were on, its measurement bucket, and how many times the same call
happened. :func:`replay_args` rebuilds inputs for one recorded call (fresh random floating tensors with
the same shapes and strides; integer and bool tensors, such as raw images and key-padding masks,
are kept from the first call because their values can change the work done). Used by
``fm-engine bench --breakdown`` and ``fm-engine tune --model``.

Recording is off inside ``torch.compile`` tracing (a compiled step records nothing: record eagerly).
``record(dry=True)`` stops each op call right after validation (raising :class:`DryRun`), before any
backend is chosen or run: it captures the calls of code whose inputs are meta tensors.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from fm_engine.ops import _dispatch


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool

    def text(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        contig = "" if _is_contiguous(self.shape, self.stride) else " strided"
        return f"{dt}[{','.join(map(str, self.shape))}]{contig}{' grad' if self.requires_grad else ''}"


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


@dataclasses.dataclass
class Call:
    """One distinct op call: everything needed to rebuild its inputs, and how often it happened."""

    op: str
    backend: str
    args: tuple[Any, ...]  # TensorSpec for tensors, the value otherwise
    kwargs: dict[str, Any]
    grad_enabled: bool
    autocast: str | None  # autocast dtype name when autocast was on for the inputs' device
    bucket: str | None
    count: int = 0
    examples: dict[int | str, torch.Tensor] = dataclasses.field(default_factory=dict)  # kept int/bool tensors

    @property
    def needs_grad(self) -> bool:
        return self.grad_enabled and any(
            isinstance(a, TensorSpec) and a.requires_grad for a in (*self.args, *self.kwargs.values())
        )

    def signature(self) -> str:
        """Short human-readable text of the inputs (tensors first, then flags)."""
        parts = [a.text() for a in self.args if isinstance(a, TensorSpec)]
        parts += [f"{k}={v.text()}" for k, v in self.kwargs.items() if isinstance(v, TensorSpec)]
        flags = [repr(a) for a in self.args if not isinstance(a, TensorSpec)]
        flags += [f"{k}={v!r}" for k, v in self.kwargs.items() if not isinstance(v, TensorSpec) and v is not None]
        if self.autocast:
            flags.append(f"autocast={self.autocast}")
        return " ".join(parts + flags)


def _spec(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return TensorSpec(tuple(x.shape), tuple(x.stride()), x.dtype, x.device, bool(x.requires_grad))
    return x


def _key_part(x: Any) -> Any:
    if isinstance(x, (TensorSpec, int, float, bool, str, type(None), torch.dtype)):
        return x
    if isinstance(x, (tuple, list)):
        return tuple(_key_part(v) for v in x)
    return repr(x)


class DryRun(Exception):
    """Raised by an op call inside ``record(dry=True)`` once the call is recorded."""


class Recorder:
    """Distinct op calls in first-seen order (``calls``) with their counts."""

    def __init__(self, dry: bool = False) -> None:
        self._by_key: dict[Any, Call] = {}
        self.dry = dry

    @property
    def calls(self) -> list[Call]:
        return list(self._by_key.values())

    def add(
        self,
        op: _dispatch.Op,
        backend: str | None,
        args: tuple,
        kwargs: dict,
        resolved: _dispatch.OpCall | None = None,
    ) -> None:
        """Count one op call: its public arguments and, when the caller has it, its call record (else it is
        validated here) for the measurement bucket."""
        if backend is not None and self.dry:
            return  # a dry recorder saw this call before the backend was chosen
        t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        dev = t.device.type if t is not None else "cpu"
        amp = _dispatch.autocast_dtype(dev)
        autocast = str(amp).replace("torch.", "") if amp is not None else None
        sargs = tuple(_spec(a) for a in args)
        skw = {k: _spec(v) for k, v in kwargs.items()}
        grad = torch.is_grad_enabled()
        key = (op.name, backend, _key_part(sargs), _key_part(tuple(sorted(skw.items()))), grad, autocast)
        call = self._by_key.get(key)
        if call is None:
            bucket = op.bucket_of(resolved if resolved is not None else op.validate(*args, **kwargs))
            call = Call(op.name, backend or "", sargs, skw, grad, autocast, bucket.key if bucket else None)
            for i, a in (*enumerate(args), *kwargs.items()):
                if isinstance(a, torch.Tensor) and not a.is_floating_point() and not a.is_meta:
                    call.examples[i] = a.detach().clone()
            self._by_key[key] = call
        call.count += 1
        if self.dry:
            raise DryRun(op.name)

    def clear(self) -> None:
        self._by_key.clear()


@contextlib.contextmanager
def record(dry: bool = False) -> Iterator[Recorder]:
    """Record every op call inside the block (nested recorders each see every call; ``dry``: see the module
    docstring)."""
    rec = Recorder(dry)
    _dispatch._recorders.append(rec)
    try:
        yield rec
    finally:
        _dispatch._recorders.remove(rec)


def _make(spec: TensorSpec, example: torch.Tensor | None, device: torch.device | None) -> torch.Tensor:
    dev = device or spec.device
    if example is not None:
        return example.to(dev)
    # storage large enough for the recorded strides (views, expanded and transposed inputs alike)
    size = 1 + sum((n - 1) * s for n, s in zip(spec.shape, spec.stride, strict=True)) if all(spec.shape) else 0
    base = torch.randn(size, dtype=spec.dtype, device=dev)
    t = base.as_strided(spec.shape, spec.stride)
    return t.detach().requires_grad_(spec.requires_grad)


def replay_args(call: Call, device: torch.device | None = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Fresh inputs for ``call`` (see the module docstring), on ``device`` or where they were recorded."""
    args = tuple(
        _make(a, call.examples.get(i), device) if isinstance(a, TensorSpec) else a for i, a in enumerate(call.args)
    )
    kwargs = {
        k: _make(v, call.examples.get(k), device) if isinstance(v, TensorSpec) else v for k, v in call.kwargs.items()
    }
    return args, kwargs


def autocast_context(call: Call, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast state the call was recorded under."""
    if call.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, call.autocast))
