"""fm_engine: compiled kernels, modules and reference models for medical-imaging foundation models.

Importing fm_engine needs no GPU, no nvcc and no optional package. See README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"


def _load_extension() -> tuple[object | None, str | None]:
    import importlib
    import importlib.util

    if importlib.util.find_spec("fm_engine._C") is None:
        return None, (
            "CUDA extension fm_engine._C was not built (nvcc was not found at install time, or "
            "FM_ENGINE_BUILD_CUDA=0); reinstall with nvcc on PATH to build it"
        )
    try:
        return importlib.import_module("fm_engine._C"), None
    except ImportError as e:  # built, but cannot load here (e.g. a driver or ABI mismatch)
        return None, f"CUDA extension fm_engine._C failed to load: {e}"


# The CUDA extension is optional: built only where nvcc was found at install time.
_C, _C_error = _load_extension()


def _C_status() -> str | None:
    """None when the CUDA extension is importable, else the reason it is not."""
    return _C_error


from fm_engine import nn, ops  # noqa: E402
from fm_engine.models.registry import create_model, list_models  # noqa: E402
from fm_engine.ops._dispatch import use_backend  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "nn", "ops", "use_backend"]
