"""Process-wide switches read from the environment, for every layer of fm_engine.

This module sits below everything else in the package (the Triton kernels included): it imports
nothing from fm_engine, so any module may import it without creating an upward or circular import.

* :func:`interpreting`: whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os


def interpreting() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    Read at every call, not cached: a program may set the variable before it imports the kernels.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
