"""The ``fm-engine`` command: ``info``, ``bench``, ``train``, ``convert-avit``."""

from __future__ import annotations

import argparse
import importlib
import platform
import shutil
import sys
from collections.abc import Sequence

# Modules that add subcommands: each defines register(subparsers).
_SUBCOMMAND_MODULES = ("fm_engine.train.cli", "fm_engine.tune", "fm_engine.data.cli")


def _info(_: argparse.Namespace) -> int:
    import torch

    import fm_engine
    from fm_engine.ops import registered_ops
    from fm_engine.ops._dispatch import BACKENDS

    print(f"fm_engine {fm_engine.__version__}")
    print(f"python    {platform.python_version()}")
    print(f"torch     {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton    {triton.__version__}")
    except Exception as e:
        print(f"triton    not importable ({e})")
    print(f"nvcc      {shutil.which('nvcc') or 'not found'}")
    status = fm_engine._C_status()
    print(f"CUDA ext  {'built' if status is None else status}")
    gpu = torch.cuda.is_available()
    print(f"GPU       {torch.cuda.get_device_name(0) if gpu else 'none'}")
    from fm_engine._env import interpreting

    if interpreting():
        print("TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter")
    from fm_engine import _device
    from fm_engine.ops import _evidence

    here = _device.device_class()
    print(f"\ntuning tables (automatic dispatch follows them; this device class: {here!r}):")
    found = _evidence.all_tables()
    for t in found:
        if t.problem and t.device_class is None:
            state = f"unusable: {t.problem}"
        elif t.device_class == here:
            state = "in use" if t.problem is None else f"unusable: {t.problem}"
        else:
            state = "for another device class"
        print(f"  {t.origin:<8} {t.path}  {t.device_class or '?'}: {t.entries} buckets, {state}")
    if not any(t.device_class == here and t.problem is None for t in found):
        print(f"  none for {here}: automatic dispatch runs every op's reference (`fm-engine tune` measures)")
    print("\noptional packages (pip extras in brackets):")
    for line in optional_packages():
        print("  " + line)
    print("\nop backends (implemented; 'available' = can run in this process):")
    for name, op in sorted(registered_ops().items()):
        cells = []
        for b in BACKENDS:
            if b not in op.backends:
                cells.append(f"{b}: -")
                continue
            why = op.backends[b].available()
            cells.append(f"{b}: {'available' if why is None else 'not available (' + why + ')'}")
        print(f"  {name:<20} " + "; ".join(cells))
    return 0


# (import name, distribution, pip extra, what it enables)
OPTIONAL = (
    ("pydicom", "pydicom", "train / dicom", "reading DICOM: fm_engine.data, fm-engine train (--demo included)"),
    ("pylibjpeg", "pylibjpeg", "train / dicom", "DICOM codec plugin host for the compressed transfer syntaxes"),
    ("libjpeg", "pylibjpeg-libjpeg", "train / dicom", "JPEG baseline / lossless and JPEG-LS compressed DICOM"),
    ("openjpeg", "pylibjpeg-openjpeg", "train / dicom", "JPEG 2000 compressed DICOM"),
    ("gdcm", "python-gdcm", "-", "GDCM codecs, another route to compressed DICOM"),
    ("matplotlib", "matplotlib", "train / bench", "OUT/curves.png of training runs, benchmark charts"),
    ("tensorboard", "tensorboard", "tensorboard", "fm-engine train --tensorboard"),
    ("kornia", "kornia", "vision", "fm_engine.augment (MoCo / RadDiffusion augmentation recipes)"),
    ("torchmetrics", "torchmetrics", "vision", "fm_engine.metrics (AUROC / AUPRC reports)"),
    ("sklearn", "scikit-learn", "vision", "fm_engine.models.raddiffusion.evaluate (logistic-regression linear probe)"),
)


def optional_packages() -> list[str]:
    """One line per optional package: installed version or "missing", the extra that installs it, and what
    it enables (found without importing it)."""
    import importlib.metadata
    import importlib.util

    lines = []
    for module, dist, extra, what in OPTIONAL:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        try:
            version = importlib.metadata.version(dist) if found else "missing"
        except importlib.metadata.PackageNotFoundError:
            version = "installed"
        lines.append(f"{dist:<19} {version:<9} {'[' + extra + ']':<16} {what}")
    return lines


def _bench(a: argparse.Namespace) -> int:
    if a.data:  # the data path only
        from fm_engine.data import bench as data_bench

        return data_bench.run_args(a)
    from fm_engine import benchmarks  # type: ignore[attr-defined]  # installed from benchmarks/

    return benchmarks.run_args(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fm-engine",
        description="fm_engine: compiled kernels, modules and reference models for medical-imaging foundation models.",
    )
    import fm_engine

    p.add_argument("--version", action="version", version=f"fm_engine {fm_engine.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    info = sub.add_parser("info", help="versions, CUDA extension, GPU, and the backends of every op")
    info.set_defaults(func=_info)
    from fm_engine import benchmarks  # type: ignore[attr-defined]  # installed from benchmarks/

    bench = sub.add_parser("bench", help="benchmark ops (--op) or model training steps (--model)")
    benchmarks.add_arguments(bench)
    from fm_engine.data import bench as data_bench

    data_bench.add_arguments(bench)
    bench.set_defaults(func=_bench)
    for mod in _SUBCOMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
