"""The CUDA extension fm_engine._C: its loader, and the glue between torch tensors and its raw-pointer API.

The extension is optional (built only where nvcc was found at install time). :func:`load` imports it
once per process and remembers why it could not when it cannot; :func:`status` gives that reason and
:func:`ext` the module. ``fm_engine._C`` and ``fm_engine._C_status()`` are these, re-exported.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import torch

# Must match enum DType in csrc/common.h.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

EXTENSION = "fm_engine._C"

_loaded: list[tuple[ModuleType | None, str | None]] = []  # the one load() result of this process


def load() -> tuple[ModuleType | None, str | None]:
    """(the extension module, None), or (None, why it cannot be used here); imported once per process."""
    if not _loaded:
        _loaded.append(_import())
    return _loaded[0]


def _import() -> tuple[ModuleType | None, str | None]:
    if importlib.util.find_spec(EXTENSION) is None:
        return None, (
            f"CUDA extension {EXTENSION} was not built (nvcc was not found at install time, or "
            "FM_ENGINE_BUILD_CUDA=0); reinstall with nvcc on PATH to build it"
        )
    try:
        return importlib.import_module(EXTENSION), None
    except ImportError as e:  # built, but cannot load here (e.g. a driver or ABI mismatch)
        return None, f"CUDA extension {EXTENSION} failed to load: {e}"


def status() -> str | None:
    """None when the CUDA extension is importable, else the reason it is not."""
    return load()[1]


def ext() -> ModuleType:
    """The CUDA extension module; RuntimeError with the reason when it cannot be used here."""
    module, reason = load()
    if module is None:
        raise RuntimeError(reason)
    return module


def source(stem: str) -> Path:
    """What a CUDA backend's version hashes (its registered source): ``csrc/<stem>.cu`` in a source checkout,
    else the built extension (an installed package has no csrc/)."""
    csrc = Path(__file__).resolve().parents[2] / "csrc" / f"{stem}.cu"
    if csrc.exists():
        return csrc
    spec = importlib.util.find_spec(EXTENSION)
    return Path(spec.origin) if spec and spec.origin else csrc


def ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream
