"""Configuration of ``fm-engine train mjepa``: one dataclass, loadable from YAML or TOML.

Every field is also a command-line flag (``--batch-size`` for ``batch_size``); flags given on the command
line override the file. ``model_overrides`` (a mapping, or ``--override key=value`` flags) replaces
constructor arguments of the registered model, e.g. ``{depth: 2, dim: 64}`` for a tiny model.

Every value, from a YAML or TOML file or a flag, goes through one parser (:meth:`TrainConfig.validate`): it
converts to the field's type (``lr: 1e-3``, which YAML reads as a string, becomes 0.001; ``steps: 1e3``
becomes 1000), checks the range, and raises ValueError naming the option, the value and what was expected.
:func:`dump_config` writes the flat ``key: value`` file that ``--config`` reads back.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
from typing import Any

import yaml

from fm_engine.ops._dispatch import BACKENDS


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
    probe_data: str | None = None  # held-out labelled DICOM folder: probe accuracy measured at each checkpoint
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
    backend: str = "auto"  # fm_engine op backend: auto or one of fm_engine.ops.BACKENDS
    tune: str = "auto"  # tune before training: auto (buckets without live evidence) | always | off
    tune_budget: float = 180.0  # seconds of tuning at most
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
        """Convert every field to its type (in place) and check its range; ValueError names the option."""
        for name, f in FIELDS.items():
            setattr(self, name, coerce(name, getattr(self, name), str(f.type)))
        choices = {
            "precision": ("auto", "fp32"),
            "on_error": ("skip", "raise"),
            "amp": ("auto", "bf16", "fp32"),
            "strategy": ("ddp", "fsdp"),
            "device": ("auto", "cpu", "cuda"),
            "backend": ("auto", *BACKENDS),
            "tune": ("auto", "always", "off"),
        }
        for k, allowed in choices.items():
            if getattr(self, k) not in allowed:
                raise ValueError(f"{k}: expected one of {allowed}, got {getattr(self, k)!r}")
        for name, (lo, hi, lo_open, hi_open) in RANGES.items():
            v = getattr(self, name)
            if v is None:
                continue
            if (lo is not None and (v <= lo if lo_open else v < lo)) or (
                hi is not None and (v >= hi if hi_open else v > hi)
            ):
                raise ValueError(f"{_name(name)}: expected {_range_text(lo, hi, lo_open, hi_open)}, got {v!r}")
        if self.size is not None:
            from fm_engine.data.transforms import parse_size

            try:
                parse_size(self.size)
            except ValueError as e:
                raise ValueError(f"{_name('size')}: expected HxW such as 512x384, got {self.size!r}") from e
        voi = self.voi_choice()
        if isinstance(voi, tuple) and not voi[1] > 0:
            raise ValueError(f"{_name('voi')}: expected a window width > 0 in CENTER,WIDTH, got {self.voi!r}")
        if isinstance(voi, str) and voi not in ("auto", "lut", "window", "none"):
            raise ValueError(f"{_name('voi')}: expected auto, lut, window, none or CENTER,WIDTH, got {self.voi!r}")
        check_model(self.model, self.model_overrides)
        return self

    def voi_choice(self) -> str | tuple[float, float]:
        try:
            if isinstance(self.voi, list | tuple):
                c, w = self.voi
                return (float(c), float(w))
            if "," in str(self.voi):
                c, w = str(self.voi).split(",")
                return (float(c), float(w))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{_name('voi')}: expected CENTER,WIDTH (two numbers), got {self.voi!r}") from e
        return str(self.voi)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# allowed ranges: (low, high, low excluded, high excluded); None = unbounded
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "window_index": (0, None, False, False),
    "workers": (0, None, False, False),
    "hflip": (0, 1, False, False),
    "vflip": (0, 1, False, False),
    "brightness": (0, None, False, False),
    "contrast": (0, 1, False, True),
    "predictor_depth": (1, None, False, False),
    "context_ratio": (0, 1, True, False),
    "context_coarsen": (1, None, False, False),
    "target_ratio": (0, 1, True, False),
    "target_coarsen": (1, None, False, False),
    "ema_momentum": (0, 1, False, False),
    "margin": (0, None, False, False),
    "steps": (1, None, False, False),
    "batch_size": (1, None, False, False),
    "grad_accum": (1, None, False, False),
    "lr": (0, None, True, False),
    "weight_decay": (0, None, False, False),
    "pct_start": (0, 1, True, True),
    "clip": (0, None, True, False),
    "seed": (0, None, False, False),
    "checkpoint_every": (1, None, False, False),
    "keep_checkpoints": (1, None, False, False),
    "log_every": (1, None, False, False),
    "stop_after": (1, None, False, False),
    "tune_budget": (0, None, True, False),
}


def _name(field: str) -> str:
    """How errors name an option: the config key and its flag."""
    return f"{field} (--{field.replace('_', '-')})"


def _range_text(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"a value {'>' if lo_open else '>='} {lo}"
    return f"a value in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def coerce(name: str, value: Any, kind: str) -> Any:
    """``value`` (from YAML, TOML or a flag) as the field type ``kind`` (the annotation's text); ValueError
    naming the option otherwise. Numbers may be strings in any spelling (``"1e-3"``, ``"2E5"``), integers
    may be written as whole floats (``1e3``); booleans accept true/false, yes/no, on/off, 1/0."""
    optional = "None" in kind
    base = kind.replace("| None", "").strip()
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{_name(name)}: expected {_KIND_TEXT.get(base, base)}, got no value")
    bad = ValueError(f"{_name(name)}: expected {_KIND_TEXT.get(base, base)}, got {value!r}")
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str | int) and str(value).strip().lower() in _TRUE + _FALSE:
            return str(value).strip().lower() in _TRUE
        raise bad
    if base in ("int", "float"):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = float(value.strip().replace("_", "")) if base == "float" else _to_int(value)
            except ValueError:
                raise bad from None
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise bad
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise bad
            return int(value)
        return float(value)
    if base == "str":
        if name == "size" and isinstance(value, list | tuple) and len(value) == 2:
            return f"{value[0]}x{value[1]}"
        if name == "voi" and isinstance(value, list | tuple) and len(value) == 2:
            return f"{value[0]},{value[1]}"
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise bad
    if base.startswith("list"):
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str | int) for v in value):
            raise bad
        return [str(v) for v in value]
    if base.startswith("dict"):
        if not isinstance(value, dict):
            raise bad
        return {str(k): v for k, v in value.items()}
    return value


def _to_int(text: str) -> int:
    t = text.strip().replace("_", "")
    try:
        return int(t)
    except ValueError:
        f = float(t)  # "1e3" -> 1000.0 (ValueError for words)
        if not f.is_integer():
            raise ValueError(text) from None
        return int(f)


_KIND_TEXT = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "list[str]": "a list of names",
    "dict[str, Any]": "a mapping of model constructor arguments",
}


def check_model(model: str, overrides: dict[str, Any]) -> None:
    """``model`` must be a registered MiT-UB backbone and every key of ``overrides`` one of its constructor
    arguments; ValueError naming the valid ones otherwise."""
    from fm_engine.models.registry import get_spec, list_models

    try:
        spec = get_spec(model)
    except KeyError:
        known = ", ".join(list_models("mitub"))
        raise ValueError(f"{_name('model')}: expected a registered MiT-UB model ({known}), got {model!r}") from None
    if spec.family != "mitub":
        known = ", ".join(list_models("mitub"))
        raise ValueError(f"{_name('model')}: M-JEPA trains a MiT-UB ViT / AViT ({known}), got {model!r}")
    params = inspect.signature(spec.factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = sorted(n for n, p in params.items() if n != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL)
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"model_overrides (--override): {', '.join(unknown)} is not a constructor argument of {model}; "
            f"valid keys: {', '.join(valid)}"
        )


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
    overrides = coerce("model_overrides", values.pop("model_overrides", None) or {}, "dict[str, Any]")
    overrides.update(flags.pop("model_overrides", None) or {})
    values.update(flags)
    return TrainConfig(**values, model_overrides=overrides).validate()


def dump_config(cfg: TrainConfig) -> str:
    """The flat YAML text of ``cfg``: one ``key: value`` line per option, in field order (a mapping or list
    value stays on its line in flow style), which :func:`load_config_file` reads back to the same config."""
    lines = []
    for k, v in cfg.to_dict().items():
        text = yaml.safe_dump({k: v}, default_flow_style=True, width=float("inf"), sort_keys=False).strip()
        lines.append(text[1:-1])  # "{key: value}" -> "key: value"
    return "\n".join(lines) + "\n"


def parse_override(text: str) -> tuple[str, Any]:
    """ "depth=2" -> ("depth", 2); the value is parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ValueError(f"--override: expected key=value, got {text!r}")
    k, v = text.split("=", 1)
    try:
        value = yaml.safe_load(v)
    except yaml.YAMLError:
        raise ValueError(f"--override: the value of {k.strip()} is not a YAML value, got {v!r}") from None
    if isinstance(value, str):  # YAML reads "1e-3" as a string
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    return k.strip(), value
