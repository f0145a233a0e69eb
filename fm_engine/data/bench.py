"""`fm-engine bench --data DIR|CACHE --size HxW [--workers N] [--out DIR]`: the training data path's speed.

Each of ``workers`` processes (what one DataLoader worker does) reads its share of the examples in a loop
and times its stages after one untimed batch (reader set-up, intensity tables); the files are read once
before timing, so the figures are for page-cached files. Batches are allocated in shared memory, as a
DataLoader worker allocates them (its page faults are part of the ``read`` / ``collate`` time); a worker
refills the dataset's reused buffers (prepared and DICOM alike), each handed back after its batch is collated,
as the training loop hands a batch back after its step.

* DICOM folder (``source = "dicom"``): ``read`` (open the file, parse the header, read the bytes),
  ``decode`` (pixel data -> stored values, intensity table), ``collate`` (the batch tensor);
* prepared dataset (``source = "prepared"``): ``read`` (one sample from the streaming chunks, to a tensor),
  ``collate``.

``device_transform`` is then timed in the main process on ``device`` for batches of the model size: for DICOM
the intensity table, resize and padding (:func:`fm_engine.data.device.device_transform`), for a prepared
dataset the host-to-device copy. On a CPU this is no statement about a GPU's speed.

Results: ``per_worker_img_s`` (mean over workers of images / second of that worker), ``total_img_s``
(all images / wall time of the slowest worker), ``seconds_per_image`` (stage -> wall seconds),
``per_worker_img_per_cpu_s`` (images per second of CPU time the worker process used: its speed on a core of
its own, useful on a shared machine; the load average is recorded too), written to ``OUT/data.json`` and
``OUT/data.md``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

BATCH = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The data-benchmark options of ``fm-engine bench`` (with --data it runs only the data benchmark)."""
    p.add_argument(
        "--data",
        default=None,
        help="benchmark the training data path instead: a DICOM folder or a prepared dataset (fm-engine prepare)",
    )
    p.add_argument("--size", default="3072x2304", help="with --data: model input HxW (default 3072x2304)")
    p.add_argument("--workers", type=int, default=1, help="with --data: worker processes (default 1)")
    p.add_argument(
        "--min-seconds", type=float, default=3.0, help="with --data: time each worker for at least this long"
    )


def _examples(data: str, size: tuple[int, int]) -> tuple[str, Any]:
    from fm_engine.data.prepared import PreparedDataset, is_prepared

    if is_prepared(data):
        ds = PreparedDataset(data)
        if ds.size != size:
            raise ValueError(f"size: {data} was prepared at {ds.size[0]}x{ds.size[1]}, not {size[0]}x{size[1]}")
        return "prepared", ds
    from fm_engine.data.dataset import DicomFrameDataset

    return "dicom", DicomFrameDataset(data, size, progress=False, stored=True, on_error="skip")


def _warm(source: str, ds: Any) -> None:
    """Read every file once so that the timed passes find it in the page cache."""
    paths = ds.files if source == "dicom" else sorted(str(p) for p in Path(ds.root).glob("*.bin"))
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def _worker(args: tuple[str, tuple[int, int], list[int], float, Any]) -> dict[str, Any]:
    """One worker: loop over ``indices`` (in batches) until ``min_seconds`` have passed; stage times."""
    data, size, indices, min_seconds, q = args
    torch.set_num_threads(1)
    source, ds = _examples(data, size)
    from fm_engine.data import device
    from fm_engine.data.device import collate_stored, read_stored, stored_example
    from fm_engine.data.prepared import collate_prepared

    device._STANDIN_WORKER = 0  # batches in the dataset's reused shared buffers, as a DataLoader worker's

    stages = {"read": 0.0, "decode": 0.0, "collate": 0.0} if source == "dicom" else {"read": 0.0, "collate": 0.0}
    # one untimed batch first: opening the reader and building the intensity tables happen once per worker
    first = indices[:BATCH]
    if source == "dicom":
        ds.release(
            collate_stored(
                [stored_example(read_stored(ds.files[ds.frames[i][0]]), ds.frames[i][1]) for i in first], ds.ring
            )
        )
    else:
        ds.release(collate_prepared(ds.__getitems__(first)))
    n = 0
    t_start = time.perf_counter()
    c_start = time.process_time()
    while True:
        for k in range(0, len(indices), BATCH):
            items = []
            if source == "dicom":
                for i in indices[k : k + BATCH]:
                    fi, t = ds.frames[i]
                    st = read_stored(ds.files[fi])
                    t0 = time.perf_counter()
                    items.append(stored_example(st, t))
                    stages["read"] += st.seconds["read"]
                    stages["decode"] += st.seconds["decode"] + time.perf_counter() - t0
            else:  # what the DataLoader does: one __getitems__ per batch
                t0 = time.perf_counter()
                items = ds.__getitems__(indices[k : k + BATCH])
                stages["read"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            batch = collate_stored(items, ds.ring) if source == "dicom" else collate_prepared(items)
            stages["collate"] += time.perf_counter() - t0
            ds.release(batch)  # as the training step hands its batch back (once the batch is on the device)
            n += len(items)
        wall = time.perf_counter() - t_start
        if wall >= min_seconds:
            break
    out = {"images": n, "wall": wall, "cpu": time.process_time() - c_start, "stages": stages}
    if q is not None:
        q.put(out)
    return out


def _device_seconds(source: str, ds: Any, size: tuple[int, int], device: torch.device, reps: int = 3) -> float:
    from fm_engine.data.device import collate_stored, device_transform
    from fm_engine.data.prepared import collate_prepared

    n = min(BATCH, len(ds))
    batch = (collate_stored if source == "dicom" else collate_prepared)([ds[i] for i in range(n)])
    if device.type == "cuda":
        batch = {k: (v.pin_memory() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}

    def once() -> None:
        if source == "dicom":
            device_transform(batch, size, device)
        else:
            batch["image"].to(device, non_blocking=True)

    once()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / (reps * n)


def run(
    data: str,
    size: tuple[int, int],
    *,
    workers: int = 1,
    out: str | os.PathLike[str] | None = None,
    device: str | None = None,
    min_seconds: float = 3.0,
) -> dict[str, Any]:
    """Run the data benchmark (see the module docstring); returns the result written to data.json."""
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    source, ds = _examples(data, size)
    n = len(ds)
    _warm(source, ds)
    shares = [list(range(w, n, workers)) for w in range(workers)]
    if any(not s for s in shares):
        raise ValueError(f"workers: {workers} workers need at least {workers} examples, {data} has {n}")
    load_before = os.getloadavg()[0]
    if workers == 1:
        results = [_worker((data, size, shares[0], min_seconds, None))]
    else:
        ctx = mp.get_context("fork" if sys.platform == "linux" and not torch.cuda.is_initialized() else "spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_worker, args=((data, size, s, min_seconds, q),)) for s in shares]  # type: ignore[attr-defined]
        for p in procs:
            p.start()
        results = [q.get() for _ in procs]
        for p in procs:
            p.join()
    load_after = os.getloadavg()[0]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    images = sum(r["images"] for r in results)
    per_worker = sum(r["images"] / r["wall"] for r in results) / len(results)
    total = images / max(r["wall"] for r in results)
    per_worker_cpu = sum(r["images"] / r["cpu"] for r in results) / len(results)
    spi = {k: sum(r["stages"][k] for r in results) / images for k in results[0]["stages"]}
    spi["device_transform"] = _device_seconds(source, ds, size, dev)
    first = ds[0]
    shape = tuple((first["stored"] if "stored" in first else first["image"]).shape)
    result: dict[str, Any] = {
        "source": source,
        "data": str(data),
        "size": list(size),
        "workers": workers,
        "per_worker_img_s": per_worker,
        "total_img_s": total,
        "per_worker_img_per_cpu_s": per_worker_cpu,
        "seconds_per_image": spi,
        "images_timed": images,
        "skipped_files": len(ds.skipped_files),
        "example_shape": list(shape),
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [load_before, load_after],
    }
    print(markdown(result))
    if out is not None:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "data.json").write_text(json.dumps(result, indent=1) + "\n")
        (o / "data.md").write_text(markdown(result))
        print(f"wrote {o / 'data.json'}, {o / 'data.md'}")
    return result


def markdown(r: dict[str, Any]) -> str:
    """The result as a markdown report."""
    h, w = r["size"]
    lines = [
        f"# Data path: {r['source']} at {h}x{w}",
        "",
        f"- data: `{r['data']}` (first example stored as {'x'.join(map(str, r['example_shape']))}; "
        f"{r['skipped_files']} unreadable files left out)",
        f"- workers: {r['workers']}; CPUs: {r['cpu_count']}; load average before / after: "
        f"{r['load_average'][0]:.2f} / {r['load_average'][1]:.2f}",
        f"- images/s per worker: **{r['per_worker_img_s']:.1f}**; in total: **{r['total_img_s']:.1f}**; "
        f"images per CPU-second of a worker: {r['per_worker_img_per_cpu_s']:.1f} (what a worker does on an "
        "unshared core)",
        "",
        "| stage | ms per image | where |",
        "|---|---|---|",
    ]
    for k, v in r["seconds_per_image"].items():
        where = f"device ({r['device']})" if k == "device_transform" else "worker"
        lines.append(f"| {k} | {v * 1e3:.2f} | {where} |")
    lines.append("")
    return "\n".join(lines)


def run_args(a: argparse.Namespace) -> int:
    """``fm-engine bench --data ...``."""
    from fm_engine.data.transforms import parse_size

    try:
        run(
            a.data,
            parse_size(a.size),
            workers=a.workers,
            out=a.out,
            device=a.device,
            min_seconds=a.min_seconds,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
