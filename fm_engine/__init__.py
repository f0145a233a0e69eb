"""fm_engine: compiled kernels, modules and reference models for medical-imaging foundation models.

Importing fm_engine needs no GPU, no nvcc and no optional package. See README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

_C_error: str | None = None
try:  # the CUDA extension is optional: built only where nvcc was found at install time
    from fm_engine import _C  # type: ignore[attr-defined]
except ImportError as _e:  # pragma: no cover - depends on the build
    _C = None
    _C_error = f"CUDA extension fm_engine._C not built ({_e})"


def _C_status() -> str | None:
    """None when the CUDA extension is importable, else the reason it is not."""
    return _C_error


from fm_engine import nn, ops  # noqa: E402
from fm_engine.models.registry import create_model, list_models  # noqa: E402
from fm_engine.ops._dispatch import use_backend  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "nn", "ops", "use_backend"]
