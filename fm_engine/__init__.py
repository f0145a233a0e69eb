"""fm_engine: compiled kernels, modules and reference models for medical-imaging foundation models.

Importing fm_engine needs no GPU, no nvcc and no optional package. See README.md.
"""

from __future__ import annotations

__version__ = "0.1.0"


# The CUDA extension is optional: built only where nvcc was found at install time. The ops layer loads it
# (fm_engine.ops._cuda); fm_engine._C and fm_engine._C_status() stay here for users.
from fm_engine.ops import _cuda as _cuda_loader

_C, _C_error = _cuda_loader.load()
_C_status = _cuda_loader.status

from fm_engine import nn, ops  # noqa: E402
from fm_engine.models.registry import create_model, list_models  # noqa: E402
from fm_engine.ops._dispatch import use_backend  # noqa: E402

__all__ = ["__version__", "create_model", "list_models", "nn", "ops", "use_backend"]
