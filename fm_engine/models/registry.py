"""Model registry: ``create_model(name, **overrides)`` and ``list_models()``.

A family module registers each configuration with :func:`register_model`, giving a factory and
the facts a caller needs to feed the model (input size, channels, patch) plus two small hooks used
by the training-step benchmark and the registry tests:

* ``example(model, batch_size, device, small) -> tuple`` builds a synthetic batch for ``model``
  (``small=True``: a reduced input size that runs on a CPU in seconds);
* ``loss(model, batch) -> Tensor`` runs the model's training objective on that batch;
* ``dropout_off`` (optional): the overrides that turn every dropout of the model off (the benchmark's
  "dropout 0" setting, which lets attention run on fused kernels that take no dropout).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import torch

from fm_engine.nn._backend_arg import backend_argument_error

FAMILIES = ("mitub", "stcnnt", "raddiffusion", "moco", "adam")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    factory: Callable[..., torch.nn.Module]
    input_size: tuple[int, ...]
    in_channels: int
    patch: int | None
    example: Callable[..., tuple[Any, ...]]
    loss: Callable[..., torch.Tensor]
    description: str = ""
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    dropout_off: dict[str, Any] | None = None


_MODELS: dict[str, ModelSpec] = {}
_loaded = False


def register_model(spec: ModelSpec) -> ModelSpec:
    if spec.name in _MODELS:
        raise ValueError(f"model {spec.name!r} is registered twice")
    _MODELS[spec.name] = spec
    return spec


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for fam in FAMILIES:
        importlib.import_module(f"fm_engine.models.{fam}")
    _loaded = True


def list_models(family: str | None = None) -> list[str]:
    """Names of every registered model (optionally of one family), sorted."""
    _load_families()
    return sorted(n for n, s in _MODELS.items() if family is None or s.family == family)


def get_spec(name: str) -> ModelSpec:
    _load_families()
    if name not in _MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_MODELS))}")
    return _MODELS[name]


def create_model(name: str, **overrides: Any) -> torch.nn.Module:
    """Build the registered model ``name``; keyword ``overrides`` replace config values.

    No ``backend`` override: the model's ops follow the enclosing ``with fm_engine.use_backend(name):``
    (else "auto"), so build the model without one and run it inside that context.
    """
    if "backend" in overrides:
        raise backend_argument_error(f"create_model({name!r})")
    spec = get_spec(name)
    return spec.factory(**{**spec.defaults, **overrides})
