"""Configuration of ``fm-engine train mjepa``: one dataclass, loadable from YAML or TOML.

Every field is also a command-line flag (``--batch-size`` for ``batch_size``); flags given on the command
line override the file. ``model_overrides`` (a mapping, or ``--override key=value`` flags) replaces
constructor arguments of the registered model, e.g. ``{depth: 2, dim: 64}`` for a tiny model.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import yaml


@dataclasses.dataclass
class TrainConfig:
    # data
    data: str | None = None  # folder (or file) of DICOM images; required unless demo
    size: str | None = None  # model input HxW, default the model's registered size
    voi: str = "auto"  # auto | lut | window | none | "center,width"
    window_index: int = 0
    precision: str = "auto"  # DICOM path: auto (uint16 + affine when exact) | fp32
    modalities: list[str] | None = None  # accepted Modality values, None = any
    label_tag: str | None = None  # header keyword whose values train the linear-probe monitor
    on_error: str = "skip"  # bad files: skip (counted) | raise
    workers: int = 2
    hflip: float = 0.5
    vflip: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    # model and objective
    model: str = "vit-i1-p16-d512"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    init: str | None = None  # encoder weights to start from (safetensors, e.g. from convert-avit)
    predictor_depth: int = 4
    context_ratio: float = 0.5
    context_coarsen: int = 4
    target_ratio: float = 0.25
    target_coarsen: int = 2
    ema_momentum: float = 0.95
    margin: float = 0.5
    # optimisation
    steps: int = 1000
    batch_size: int = 8  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.05
    pct_start: float = 0.1
    clip: float = 5.0
    amp: str = "auto"  # bf16 | fp32 | auto (bf16 on CUDA, fp32 on CPU)
    activation_checkpointing: bool = False
    strategy: str = "ddp"  # ddp | fsdp (only with several processes under torchrun)
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # fm_engine op backend: auto | reference | triton | cuda
    seed: int = 0
    # output
    out: str = "runs/mjepa"
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    log_every: int = 1
    resume: bool = False
    overwrite: bool = False  # move a run already in `out` aside (OUT.replaced-TIMESTAMP) and start anew
    stop_after: int | None = None  # stop (without a checkpoint) after this many steps of this run
    tensorboard: bool = False
    progress: bool = True

    def validate(self) -> TrainConfig:
        choices = {
            "precision": ("auto", "fp32"),
            "on_error": ("skip", "raise"),
            "amp": ("auto", "bf16", "fp32"),
            "strategy": ("ddp", "fsdp"),
            "device": ("auto", "cpu", "cuda"),
            "backend": ("auto", "reference", "triton", "cuda"),
        }
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"{k}: expected one of {allowed}, got {getattr(self, k)!r}")
        for k in ("steps", "batch_size", "grad_accum", "checkpoint_every", "log_every", "keep_checkpoints"):
            if int(getattr(self, k)) < 1:
                raise ValueError(f"{k}: expected >= 1, got {getattr(self, k)}")
        for k in ("lr", "clip"):
            if float(getattr(self, k)) <= 0:
                raise ValueError(f"{k}: expected > 0, got {getattr(self, k)}")
        if not 0 < self.pct_start < 1:
            raise ValueError(f"pct_start: expected a value in (0, 1), got {self.pct_start}")
        if self.workers < 0:
            raise ValueError(f"workers: expected >= 0, got {self.workers}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after: expected >= 1, got {self.stop_after}")
        return self

    def voi_choice(self) -> str | tuple[float, float]:
        if isinstance(self.voi, list | tuple):
            return (float(self.voi[0]), float(self.voi[1]))
        if "," in str(self.voi):
            c, w = str(self.voi).split(",")
            return (float(c), float(w))
        return str(self.voi)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) file into a dict of TrainConfig fields.

    A top-level ``train:`` or ``mjepa:`` table is unwrapped. Unknown keys raise ValueError naming them."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"config: {path} does not exist")
    try:
        if path.endswith(".toml"):
            import tomllib

            with open(path, "rb") as f:
                raw = tomllib.load(f)
        else:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
    except Exception as e:
        raise ValueError(f"config: {path} cannot be parsed ({e})") from e
    if not isinstance(raw, dict):
        raise ValueError(f"config: {path} must hold a mapping of options")
    for key in ("train", "mjepa"):
        if set(raw) == {key} and isinstance(raw[key], dict):
            raw = raw[key]
    raw = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(raw) - set(FIELDS))
    if unknown:
        raise ValueError(f"config: {path} has unknown options {unknown}; known: {sorted(FIELDS)}")
    return raw


def make_config(file: str | None = None, **flags: Any) -> TrainConfig:
    """File values, then ``flags`` (command-line values) on top."""
    values = load_config_file(file) if file else {}
    overrides = dict(values.pop("model_overrides", None) or {})
    overrides.update(flags.pop("model_overrides", None) or {})
    values.update(flags)
    return TrainConfig(**values, model_overrides=overrides).validate()


def parse_override(text: str) -> tuple[str, Any]:
    """ "depth=2" -> ("depth", 2); the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ValueError(f"--override: expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    return k.strip(), yaml.safe_load(v)
