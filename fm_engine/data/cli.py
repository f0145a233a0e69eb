"""`fm-engine prepare` (registered by fm_engine.cli): a DICOM folder -> a prepared streaming dataset."""

from __future__ import annotations

import argparse
import sys


def cmd_prepare(args: argparse.Namespace) -> int:
    from fm_engine.data.prepared import prepare
    from fm_engine.data.transforms import parse_size

    voi: str | tuple[float, float] = args.voi
    try:
        if "," in args.voi:
            c, w = (float(x) for x in args.voi.split(","))
            voi = (c, w)
        summary = prepare(
            args.data,
            parse_size(args.size),
            args.out,
            workers=args.workers,
            voi=voi,
            window_index=args.window_index,
            precision=args.precision,
            modalities=args.modalities,
            label_tag=args.label_tag,
            part_frames=args.part_frames,
            chunk_bytes=args.chunk_bytes,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished parts are kept in {args.out}; rerun the same command to continue")
        return 130
    print(
        f"wrote {args.out}: {summary['samples']} samples in {summary['chunks']} chunks, {summary['skipped']} files "
        f"skipped (see {args.out}/skipped.csv)"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``prepare`` to the `fm-engine` parser."""
    p = subparsers.add_parser(
        "prepare",
        help="convert a DICOM folder, once, into a prepared streaming dataset at model size (LitData format)",
        description="Read every frame of every DICOM file under --data, apply the intensity chain, resize and pad "
        "to --size, and write uint16 images + intensity affine + label + source path as a LitData streaming "
        "dataset in --out (index.json + chunks; fm-engine train --data OUT reads it). Interrupted runs continue "
        "when rerun with the same options; unreadable files are listed in OUT/skipped.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", required=True, help="folder (searched recursively) of DICOM files")
    p.add_argument("--size", required=True, help="model input HxW, e.g. 3072x2304")
    p.add_argument("--out", required=True, help="output folder (new, or the folder of an interrupted run)")
    p.add_argument("--workers", type=int, default=1, help="worker processes converting parts in parallel")
    p.add_argument("--voi", default="auto", help="auto | lut | window | none | CENTER,WIDTH")
    p.add_argument("--window-index", type=int, default=0, help="which WindowCenter/WindowWidth pair")
    p.add_argument("--precision", choices=("auto", "fp32"), default="auto", help="uint16 + affine where exact")
    p.add_argument("--modalities", nargs="+", default=None, metavar="MODALITY", help="accepted Modality values")
    p.add_argument("--label-tag", default=None, help="header keyword whose values become labels (e.g. ViewPosition)")
    p.add_argument("--part-frames", type=int, default=256, help="frames per resumable part")
    p.add_argument("--chunk-bytes", default="256MB", help="target chunk (shard) file size")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
