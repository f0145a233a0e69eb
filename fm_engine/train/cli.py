"""`fm-engine train` and `fm-engine convert-avit` subcommands (registered by fm_engine.cli).

Each subcommand sets ``func`` on the parsed namespace: ``args.func(args) -> int`` (exit status).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

from fm_engine.ops._dispatch import BACKENDS
from fm_engine.train.config import FIELDS, TrainConfig, coerce, make_config, parse_override

HELP = {
    "data": "folder (searched recursively) or file of DICOM images; series folders and multi-frame files "
    "give one example per slice / frame",
    "size": "model input HxW, e.g. 512x384 (ViT) or 3072x2304 (AViT), a multiple of patch x context coarsening "
    "on each side; images keep their aspect ratio and are padded with 0 (black)",
    "voi": "VOI transform: auto (the file's VOI LUT, else its first window, else none) | lut | window | none | "
    "CENTER,WIDTH",
    "window_index": "which WindowCenter/WindowWidth pair voi=window/auto uses",
    "precision": "DICOM intensity path: auto (uint16 + affine whenever exact, else fp32) | fp32",
    "modalities": "accepted Modality values (others are bad files), e.g. --modalities MG",
    "label_tag": "header keyword whose values train the linear-probe monitor (e.g. ViewPosition)",
    "probe_data": "folder of labelled DICOM images kept out of training (needs --label-tag): the linear "
    "probe's accuracy on them is measured at every checkpoint (probe_acc_heldout)",
    "on_error": "bad DICOM files: skip (left out and counted) | raise (stop with the file and the reason)",
    "workers": "DataLoader worker processes",
    "hflip": "probability of a horizontal flip",
    "vflip": "probability of a vertical flip",
    "brightness": "brightness jitter half-range (display units)",
    "contrast": "contrast jitter half-range (factor 1 +- contrast)",
    "model": "registered model name (fm_engine.list_models())",
    "model_overrides": "",
    "init": "safetensors encoder weights to start from (e.g. the output of fm-engine convert-avit)",
    "predictor_depth": "M-JEPA predictor layers",
    "context_ratio": "fraction of context cells kept",
    "context_coarsen": "context mask grid coarsening",
    "target_ratio": "fraction of target cells",
    "target_coarsen": "target mask grid coarsening",
    "ema_momentum": "EMA momentum of the target encoder",
    "margin": "contrastive loss margin",
    "steps": "optimiser steps (the one-cycle schedule spans them)",
    "batch_size": "images per process per micro-batch",
    "grad_accum": "micro-batches per optimiser step",
    "lr": "peak learning rate of the one-cycle schedule (AdamW)",
    "weight_decay": "AdamW weight decay (not on biases, norms, positions, query token)",
    "pct_start": "fraction of the steps spent warming up",
    "clip": "gradient-norm clipping threshold",
    "amp": "autocast: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; the stem always runs in fp32",
    "activation_checkpointing": "recompute transformer layers in the backward pass (torch.utils.checkpoint)",
    "strategy": "multi-process engine under torchrun: ddp | fsdp",
    "device": "auto | cpu | cuda",
    "backend": "fm_engine op backend for the run: auto (the measured fastest) or one backend for every op",
    "tune": "tune before training: auto (time the step's op calls lacking live measurements; nothing on a CPU) | "
    "always (re-time every op call of the step) | off",
    "tune_budget": "seconds the tuning before training may take at most",
    "seed": "seed of weights, data order, masks and augmentations",
    "out": "output folder (metrics.csv / metrics.jsonl, checkpoints/, config.yaml)",
    "checkpoint_every": "write a checkpoint every N steps (and at the end)",
    "keep_checkpoints": "how many checkpoints to keep",
    "log_every": "write a metrics row every N steps",
    "resume": "continue the run in --out from out/checkpoints/latest (same data order and RNG streams); an "
    "error when there is no checkpoint",
    "overwrite": "when --out already holds a run, rename that folder to OUT.replaced-YYYYmmdd-HHMMSS (nothing is "
    "deleted) and start a new run; without it (or --resume) a folder holding a run is refused",
    "stop_after": "stop after N steps of this run without writing a checkpoint (simulates a killed run)",
    "tensorboard": "also log to out/tensorboard (needs the tensorboard package)",
    "progress": "show progress bars",
}


CHOICES = {
    "precision": ("auto", "fp32"),
    "on_error": ("skip", "raise"),
    "amp": ("auto", "bf16", "fp32"),
    "strategy": ("ddp", "fsdp"),
    "device": ("auto", "cpu", "cuda"),
    "backend": ("auto", *BACKENDS),
    "tune": ("auto", "always", "off"),
}


# the "(default: ...)" text of options whose default is None (options missing here show none)
DEFAULT_TEXT = {"size": "the model's registered size", "modalities": "any", "stop_after": "never"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_train_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; defaults are SUPPRESSed so a config file's values survive. Values stay
    text here: :meth:`TrainConfig.validate` converts and checks them, as it does a config file's."""
    defaults = TrainConfig()
    for name in FIELDS:
        if name == "model_overrides":
            continue
        default = getattr(defaults, name)
        shown = DEFAULT_TEXT.get(name, default)
        help_ = HELP[name] if shown is None else f"{HELP[name]} (default: {shown})"
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_, dest=name)
        if isinstance(default, bool):
            p.add_argument(_flag(name), action=argparse.BooleanOptionalAction, **kw)
        elif name in CHOICES:
            p.add_argument(_flag(name), choices=CHOICES[name], **kw)
        elif name == "modalities":
            p.add_argument(_flag(name), nargs="+", metavar="MODALITY", **kw)
        else:
            p.add_argument(_flag(name), type=str, **kw)
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="replace a model constructor argument, e.g. --override depth=2 (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    overrides = dict(parse_override(t) for t in getattr(args, "override", []) or [])
    if overrides:
        flags["model_overrides"] = overrides
    return make_config(getattr(args, "config", None), **flags)


def run_demo(args: argparse.Namespace) -> int:
    """Two-stage recipe on synthetic mammograms: tiny ViT, convert to a tiny AViT, continue at 2x size."""
    from fm_engine.train.demo import run_demo as demo

    folder = args.demo_dir or tempfile.mkdtemp(prefix="fm_engine_demo_")
    flags = {k: coerce(k, v, str(FIELDS[k].type)) for k, v in vars(args).items() if k in FIELDS}
    if "size" in flags:  # the stage-1 (ViT) size; stage 2 runs at twice that
        from fm_engine.data.transforms import parse_size

        flags["size"] = parse_size(flags["size"])
    summary = demo(folder, **flags)
    print(f"demo finished in {folder}")
    for k, v in summary.items():
        print(f"  {k}: {v}")
    return 0


# optional packages training may need -> the pip extra that installs them
EXTRAS = {"pydicom": "train", "matplotlib": "train", "pylibjpeg": "train", "tensorboard": "tensorboard"}


def _reported(fn: Any) -> Any:
    """Bad options and bad data end with one line naming the argument or file and the reason (exit 2)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except (ValueError, KeyError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"error: {msg}", file=sys.stderr)
            return 2
        except ImportError as e:  # an optional package: name the extra that installs it
            missing = e if isinstance(e, ModuleNotFoundError) else e.__cause__
            name = (getattr(missing, "name", None) or "").split(".")[0]
            if name not in EXTRAS:
                raise
            extra = EXTRAS[name]
            msg = f"{name} is not installed: pip install -e '.[{extra}]' (or 'fm_engine[{extra}]')"
            print(f"error: {msg}", file=sys.stderr)
            return 2

    return run


@_reported
def cmd_train(args: argparse.Namespace) -> int:
    if args.demo:
        return run_demo(args)
    from fm_engine.train.mjepa import train_mjepa

    cfg = config_from_args(args)
    last = train_mjepa(cfg)
    last.pop("trainer", None)
    if "step" not in last:
        print(f"nothing to do: the run in {cfg.out} has already done its {cfg.steps} steps")
    skipped = last.pop("skipped_files", 0)
    if last:
        print("final: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()))
    print(f"skipped files: {skipped}" + (f" (file and reason of each in {cfg.out}/skipped.csv)" if skipped else ""))
    return 0


@_reported
def cmd_convert(args: argparse.Namespace) -> int:
    from fm_engine.train.convert import convert_checkpoint

    res = convert_checkpoint(
        args.checkpoint, args.model, args.out, overrides=dict(parse_override(t) for t in args.override or [])
    )
    print(f"wrote {args.out}: {len(res.copied)} tensors from the ViT, {len(res.new)} new (kv stem, decoder layers)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this module's subcommands to the `fm-engine` parser."""
    p = subparsers.add_parser(
        "train",
        help="pre-train a model (M-JEPA) on DICOM images; --demo runs a small synthetic job",
        description="Pre-train a MiT-UB ViT / AViT with M-JEPA on a folder of DICOM images. Options come from "
        "--config FILE (YAML or TOML, keys = the option names with _ instead of -) and the command line, which "
        "overrides the file. Multi-GPU: torchrun --nproc-per-node N -m fm_engine.cli train mjepa ... (DDP; "
        "--strategy fsdp for FSDP).",
    )
    p.add_argument("objective", nargs="?", default="mjepa", choices=["mjepa"], help="pre-training objective (mjepa)")
    p.add_argument("--config", help="YAML or TOML file of options (command-line flags override it)")
    p.add_argument(
        "--demo",
        action="store_true",
        help="generate synthetic mammograms in a temporary folder and run the two-stage recipe "
        "(tiny ViT, convert-avit, tiny AViT) for a few steps on CPU (about a minute)",
    )
    p.add_argument("--demo-dir", help="folder for the demo's data and runs (default: a new temporary folder)")
    add_train_options(p)
    p.set_defaults(func=cmd_train)

    c = subparsers.add_parser(
        "convert-avit",
        help="convert a ViT checkpoint into an AViT checkpoint (two-stage recipe)",
        description="Load a ViT encoder checkpoint (e.g. out/checkpoints/step_N/encoder.safetensors), copy every "
        "weight into the AViT of the same width (fm_engine.models.mitub.convert_vit_to_avit), and save it; "
        "continue with fm-engine train mjepa --model AVIT --init OUT.",
    )
    c.add_argument("--checkpoint", required=True, help="ViT encoder safetensors file")
    c.add_argument("--model", required=True, help="registered AViT name, e.g. vit-i1-p16-d512-a32_24")
    c.add_argument("--out", required=True, help="output safetensors file")
    c.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="AViT constructor argument, e.g. --override target_grid=[4,3]",
    )
    c.set_defaults(func=cmd_convert)


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m fm_engine.train.cli``), same subcommands as ``fm-engine``."""
    parser = argparse.ArgumentParser(prog="fm-engine")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
