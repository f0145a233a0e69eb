"""Refusal of ``backend=`` on composite modules and models.

A module that calls an op itself (``Attention``, ``ReLU2MLP``, the stems, the STCNNT attention modules) takes
``backend=``. A module that only builds other modules (an encoder layer, a whole model) does not: its ops follow
the innermost ``fm_engine.use_backend(name)`` context, else "auto". :func:`refuse_backend_argument` marks such a
class so that a caller still passing ``backend=`` gets one clear error instead of an unexpected-keyword one.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

T = TypeVar("T", bound=type)


def backend_argument_error(owner: str) -> TypeError:
    """The error for ``backend=`` given to ``owner`` (a class or function name)."""
    return TypeError(
        f"{owner}: backend= is not an argument here; build it without backend= and run it inside "
        "`with fm_engine.use_backend(name):` (its ops follow the innermost use_backend, else 'auto')"
    )


def refuse_backend_argument(cls: T) -> T:
    """Class decorator: ``cls(..., backend=...)`` raises :func:`backend_argument_error`; the signature is kept."""
    init = getattr(cls, "__init__")  # noqa: B009 (mypy refuses reading __init__ off the class)

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "backend" in kwargs:
            raise backend_argument_error(type(self).__name__)
        init(self, *args, **kwargs)

    setattr(cls, "__init__", __init__)  # noqa: B010 (mypy refuses assigning to a method)
    return cls
