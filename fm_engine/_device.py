"""Where fm_engine keeps per-machine state, and the device class that state is keyed by.

* :func:`cache_dir`: ``$FM_ENGINE_CACHE_DIR``, default ``~/.cache/fm_engine``. Tuning tables
  (``fm-engine tune``) and kernel autotuning results live below it, one file per device class.
* :func:`device_class`: the name measurements are valid for: the GPU's name and compute capability
  (``"NVIDIA H200 sm_90"``), or ``"cpu"`` / ``"cpu triton-interpreter"`` on a CPU (the interpreter's
  timings say nothing about a GPU, and the CPU's reference timings say nothing about the interpreter).
* :func:`slug`: a device class as a file name (``"nvidia-h200-sm90"``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from fm_engine._env import interpreting as _interpreting


def cache_dir() -> Path:
    """``$FM_ENGINE_CACHE_DIR`` or ``~/.cache/fm_engine`` (not created here)."""
    env = os.environ.get("FM_ENGINE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fm_engine"


def device_class(device: torch.device | str | None = None) -> str:
    """The measurement class of ``device`` (default: the current CUDA device, else the CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return f"{torch.cuda.get_device_name(index)} sm_{major}{minor}"
    if device.type == "cpu" and _interpreting():
        return "cpu triton-interpreter"
    return device.type


def slug(device_class_name: str) -> str:
    """A device class as a file name: lower case, runs of other characters as one '-'."""
    s = re.sub(r"[^a-z0-9]+", "-", device_class_name.lower()).strip("-")
    return s or "unknown"
