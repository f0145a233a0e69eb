"""Model checkpoints in safetensors with the model's configuration in the file's metadata.

``save_checkpoint(path, model, name=..., config=...)`` writes every state_dict tensor of ``model``
plus a JSON document under the metadata key ``fm_engine`` (registry name, config, extra fields).
``load_checkpoint(path, model=None)`` loads it into ``model`` (or builds the registered model named
in the file) and reports missing and unexpected keys: they are returned and logged as a warning.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)

META_KEY = "fm_engine"
FORMAT_VERSION = 1


@dataclass
class LoadResult:
    """What :func:`load_checkpoint` did: the model, keys absent from the file (``missing``), keys in
    the file the model has no place for (``unexpected``), shape mismatches (skipped), and the metadata."""

    model: nn.Module
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def follow_umask(path: str | os.PathLike[str]) -> None:
    """Give a file or folder the mode a plain ``open`` / ``mkdir`` would have (0666 / 0777 less the umask).
    safetensors writes 0600 files and ``tempfile`` makes 0600 / 0700 ones, which colleagues sharing the disk
    could not read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.dtype):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    raise ValueError(f"config: value {x!r} of type {type(x).__name__} cannot be stored as JSON")


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write ``model.state_dict()`` to ``path`` (safetensors).

    ``name``: the registry name (lets :func:`load_checkpoint` rebuild the model); ``config``: constructor
    arguments (defaults to ``model.config`` when the model has one); ``extra``: any JSON-able fields
    (step, metrics, ...). Tensors are copied to CPU and made contiguous; shared storage is split.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if config is None:
        config = getattr(model, "config", None)
    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "class": type(model).__name__,
        "config": _jsonable(config) if config is not None else None,
        "extra": _jsonable(extra or {}),
    }
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={META_KEY: json.dumps(meta)})
    follow_umask(path)


def _unreadable(path: str | os.PathLike[str], e: Exception) -> ValueError:
    what = "is not a readable safetensors checkpoint (a wrong or truncated file"
    return ValueError(f"path: {os.fspath(path)} {what}: {e})")


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``fm_engine`` metadata of a checkpoint (empty for a foreign safetensors file); ValueError naming
    the file when it is not a readable safetensors file."""
    if not os.path.isfile(path):
        raise ValueError(f"path: {os.fspath(path)} does not exist or is not a file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        return json.loads(raw) if raw else {}
    except Exception as e:  # safetensors raises its own SafetensorError (not an OSError / ValueError)
        raise _unreadable(path, e) from None


def load_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module | None = None,
    *,
    strict: bool = False,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> LoadResult:
    """Load a checkpoint into ``model``, or into a new registered model named in the file's metadata
    (built with its stored config plus ``overrides``).

    Missing and unexpected keys (and tensors whose shape differs, which are skipped) are returned in the
    :class:`LoadResult` and logged as a warning; with ``strict=True`` any of them raises ValueError.
    Tensors are cast to the dtype of the model's tensor they replace and loaded onto ``device`` (default:
    the model's own device).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"path: {path} does not exist")
    meta = read_metadata(path)
    if model is None:
        if not meta.get("name"):
            raise ValueError(f"model: {path} names no registered model; pass the model to load into")
        from fm_engine.models.registry import create_model

        model = create_model(meta["name"], **{**(meta.get("config") or {}), **overrides})
    if device is not None:
        model.to(device)
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected, mismatched = [], []
    try:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key not in own:
                    unexpected.append(key)
                    continue
                t = f.get_tensor(key)
                if t.shape != own[key].shape:
                    mismatched.append(f"{key}: file {tuple(t.shape)} vs model {tuple(own[key].shape)}")
                    continue
                loaded[key] = t
    except Exception as e:
        raise _unreadable(path, e) from None
    missing = [k for k in own if k not in loaded and not any(m.startswith(k + ":") for m in mismatched)]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if mismatched:
        problems.append(f"shape mismatches {mismatched}")
    if problems and strict:
        raise ValueError(f"path: {path} does not match the model: " + "; ".join(problems))
    with torch.no_grad():
        for key, t in loaded.items():
            own[key].copy_(t)
    if problems:
        msg = f"checkpoint {path}: " + "; ".join(problems)
        log.warning(msg)
        warnings.warn(msg, stacklevel=2)
    return LoadResult(model, missing, unexpected, mismatched, meta)
