"""Prepared datasets: a DICOM folder converted once, at model size, into LitData's streaming format.

``fm-engine prepare --data DIR --size HxW --out CACHE`` (:func:`prepare`) reads every frame of every DICOM
file under DIR with the training reader (:func:`fm_engine.data.device.read_stored`), applies the intensity
table, the antialiased resize and the padding (:func:`fm_engine.data.device.device_transform`, here on the
CPU), and writes one sample per frame:

* ``image``: [C, H, W] uint16 (or float32 display values where no exact integer affine exists);
* ``scale``, ``offset``: float64, display = image * scale + offset;
* ``label``: int64 class index of ``label_tag``'s value (-1 without one); ``path``: the source file;
  ``frame``: the frame index within it.

Layout of CACHE (LitData's format: ``index.json`` lists the chunk files; readable from a local disk or object
storage by ``litdata.StreamingDataset``):

* ``index.json``: written last, once every part is done: its presence marks a complete dataset, and
  ``fm-engine train --data CACHE`` recognises a prepared dataset by it;
* ``prepared.json``: the settings (size, VOI, precision, modalities, label tag), the classes, the parts;
* ``part-NNNNN-chunk-*.bin``: the chunks (shards) of part NNNNN; ``parts/part-NNNNN.json``: its chunk list and
  skipped files, written after its chunks, so a part is either complete or redone;
* ``skipped.csv``: (file, reason) of every file left out, the format of a training run's skipped.csv.

Resumable: frames are cut into parts of ``part_frames`` frames in file order; an interrupted run (Ctrl-C)
keeps its finished parts and a rerun with the same settings does the rest. ``workers`` processes convert
parts in parallel.

Reading (:class:`PreparedDataset`) is random access by sample index; :class:`ShardSampler` gives each DDP rank
a disjoint set of chunks per epoch and restarts mid-epoch exactly (checkpoints store (epoch, position)).
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fm_engine.data.dicom import DicomReadError, VoiChoice

INDEX_FILE = "index.json"  # LitData's index of the chunk files
META_FILE = "prepared.json"
SKIPPED_FILE = "skipped.csv"
FORMAT_VERSION = 1


def is_prepared(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder holding a streaming index (a prepared dataset)."""
    return Path(path, INDEX_FILE).is_file()


def write_skipped(path: str | os.PathLike[str], rows: Sequence[tuple[str, str]]) -> None:
    """A skipped.csv: header ``file,reason`` and one row per file left out."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "reason"])
        w.writerows(rows)


def read_skipped(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return [(r[0], r[1]) for r in rows[1:] if len(r) >= 2]


# ---------------------------------------------------------------------------------------------
# writing


def _settings(size: tuple[int, int], voi: VoiChoice, window_index: int, precision: str, modalities, label_tag):
    return {
        "size": list(size),
        "voi": list(voi) if isinstance(voi, tuple | list) else voi,
        "window_index": window_index,
        "precision": precision,
        "modalities": sorted(modalities) if modalities else None,
        "label_tag": label_tag,
    }


def _convert_part(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: convert the frames of one part into chunks; returns the part's record."""
    from litdata.streaming.writer import BinaryWriter

    from fm_engine.data.device import collate_stored, device_transform, read_stored, stored_example

    torch.set_num_threads(1)
    out, part, s = Path(task["out"]), task["part"], task["settings"]
    size = tuple(s["size"])
    voi = tuple(s["voi"]) if isinstance(s["voi"], list) else s["voi"]
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=f".part-{part:05d}."))
    writer = BinaryWriter(str(tmp), chunk_bytes=task["chunk_bytes"])
    skipped: list[tuple[str, str]] = []
    bad: set[str] = set()
    cached: tuple[str, Any] | None = None
    n = 0
    for path, frame, label in task["frames"]:
        if path in bad:
            continue
        try:
            if cached is None or cached[0] != path:
                cached = (
                    path,
                    read_stored(
                        path,
                        voi=voi,
                        window_index=s["window_index"],
                        precision=s["precision"],
                        modalities=s["modalities"],
                    ),
                )
            st = cached[1]
            if frame >= st.stored.shape[0]:
                raise DicomReadError(path, f"frame {frame} missing ({st.stored.shape[0]} frames decoded)")
        except DicomReadError as e:
            bad.add(path)
            skipped.append((e.path, e.reason))
            continue
        b = device_transform(collate_stored([stored_example(st, frame)]), size, "cpu")  # type: ignore[arg-type]
        img = b["image"][0]
        arr = img.view(torch.int16).numpy().view(np.uint16) if img.dtype == torch.uint16 else img.numpy()
        writer[n] = {
            "image": np.ascontiguousarray(arr),
            "scale": float(b["scale"][0]),
            "offset": float(b["offset"][0]),
            "label": int(label),
            "path": path,
            "frame": int(frame),
        }
        n += 1
    chunks: list[dict[str, Any]] = []
    config = None
    if n:
        writer.done()
        writer.merge()
        index = json.loads((tmp / INDEX_FILE).read_text())
        config = index["config"]
        for c in index["chunks"]:
            name = f"part-{part:05d}-{c['filename']}"
            os.replace(tmp / c["filename"], out / name)
            chunks.append({**c, "filename": name})
    shutil.rmtree(tmp, ignore_errors=True)
    record = {"part": part, "samples": n, "chunks": chunks, "config": config, "skipped": skipped}
    final = out / "parts" / f"part-{part:05d}.json"
    tmpf = final.with_suffix(".json.tmp")
    tmpf.write_text(json.dumps(record))
    os.replace(tmpf, final)
    return record


def prepare(
    data: str | os.PathLike[str],
    size: tuple[int, int],
    out: str | os.PathLike[str],
    *,
    workers: int = 1,
    voi: VoiChoice = "auto",
    window_index: int = 0,
    precision: str = "auto",
    modalities: Collection[str] | None = None,
    label_tag: str | None = None,
    part_frames: int = 256,
    chunk_bytes: str = "256MB",
    progress: bool = True,
    stop_after_parts: int | None = None,
) -> dict[str, Any]:
    """Convert the DICOM files under ``data`` into a prepared dataset in ``out`` (see the module docstring).

    Rerunning with the same settings continues an interrupted run; other settings in an existing ``out``
    raise ValueError. ``stop_after_parts`` stops after converting that many parts without writing the index
    (simulates an interrupted run). Returns a summary (samples, parts, skipped, complete)."""
    from tqdm.auto import tqdm

    from fm_engine.data.dataset import DicomFrameDataset

    if workers < 1:
        raise ValueError(f"workers: expected >= 1, got {workers}")
    if part_frames < 1:
        raise ValueError(f"part_frames: expected >= 1, got {part_frames}")
    outp = Path(out)
    settings = _settings(size, voi, window_index, precision, modalities, label_tag)
    index = DicomFrameDataset(
        data,
        size,
        voi=voi,
        window_index=window_index,
        precision=precision,
        modalities=modalities,
        label_tag=label_tag,
        on_error="skip",
        progress=progress,
        stored=True,
    )
    frames = [(index.files[fi], t, index._labels[fi]) for fi, t in index.frames]
    parts = [frames[i : i + part_frames] for i in range(0, len(frames), part_frames)]
    meta = {
        "format_version": FORMAT_VERSION,
        "format": "litdata",
        "source": str(Path(data).resolve()),
        "settings": settings,
        "classes": index.classes,
        "parts": len(parts),
        "part_frames": part_frames,
        "frames": len(frames),
    }
    meta_path = outp / META_FILE
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        keys = ("format_version", "settings", "classes", "parts", "part_frames", "frames", "source")
        diff = [k for k in keys if old.get(k) != meta[k]]
        if diff:
            raise ValueError(
                f"out: {outp} holds a dataset prepared with other settings or files ({', '.join(diff)} differ); "
                "use a new folder or delete it"
            )
    elif outp.exists() and any(outp.iterdir()):
        raise ValueError(f"out: {outp} exists and is not a prepared dataset (expected a new or empty folder)")
    (outp / "parts").mkdir(parents=True, exist_ok=True)
    for stale in outp.glob(".part-*"):  # temporary folders of an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    if not meta_path.is_file():
        meta_path.write_text(json.dumps(meta, indent=1))

    done = {i for i in range(len(parts)) if (outp / "parts" / f"part-{i:05d}.json").is_file()}
    todo = [i for i in range(len(parts)) if i not in done]
    if stop_after_parts is not None:
        todo = todo[:stop_after_parts]
    tasks = [
        {"out": str(outp), "part": i, "frames": parts[i], "settings": settings, "chunk_bytes": chunk_bytes}
        for i in todo
    ]
    bar = tqdm(
        total=len(frames),
        initial=sum(len(parts[i]) for i in done),
        desc="prepare",
        unit="frame",
        disable=not progress,
    )
    try:
        if workers == 1 or len(tasks) <= 1:
            for t in tasks:
                _convert_part(t)
                bar.update(len(t["frames"]))
        else:
            import multiprocessing as mp

            # fork is safe while this process has not started CUDA (and far quicker to start than spawn)
            fork = sys.platform == "linux" and not torch.cuda.is_initialized()
            ctx = mp.get_context("fork" if fork else "spawn")
            with ctx.Pool(min(workers, len(tasks))) as pool:
                for rec in pool.imap_unordered(_convert_part, tasks):
                    bar.update(len(parts[rec["part"]]))
    finally:
        bar.close()
    complete = all((outp / "parts" / f"part-{i:05d}.json").is_file() for i in range(len(parts)))
    summary: dict[str, Any] = {"parts": len(parts), "complete": complete}
    if not complete:
        summary["parts_done"] = sum((outp / "parts" / f"part-{i:05d}.json").is_file() for i in range(len(parts)))
        return summary
    records = [json.loads((outp / "parts" / f"part-{i:05d}.json").read_text()) for i in range(len(parts))]
    chunks = [c for r in records for c in r["chunks"]]
    configs = [r["config"] for r in records if r["config"] is not None]
    if not chunks:
        raise ValueError(f"data: no readable DICOM frame under {data}")
    skipped = list(index.skipped_files) + [tuple(x) for r in records for x in r["skipped"]]
    write_skipped(outp / SKIPPED_FILE, skipped)  # type: ignore[arg-type]
    tmp = outp / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps({"chunks": chunks, "config": configs[0], "updated_at": "0"}))
    os.replace(tmp, outp / INDEX_FILE)
    summary.update(samples=sum(r["samples"] for r in records), skipped=len(skipped), chunks=len(chunks))
    return summary


# ---------------------------------------------------------------------------------------------
# reading


_TORCH_DTYPES = {np.dtype(np.uint16): torch.uint16, np.dtype(np.float32): torch.float32}


def _copy_into(dst: torch.Tensor, src: np.ndarray) -> None:
    """dst[...] = src for uint16 / float32 (one copy)."""
    view = dst.view(torch.int16).numpy() if dst.dtype == torch.uint16 else dst.numpy()
    np.copyto(view, src.view(view.dtype), casting="no")


def _numpy_view_serializer() -> Any:
    """LitData's numpy serializer, returning a view of the chunk's bytes instead of a copy (the readers here copy
    each image exactly once, into its destination, before the next read)."""
    from litdata.streaming.serializers import NumpySerializer

    class NumpyView(NumpySerializer):
        def deserialize(self, data: bytes) -> np.ndarray:
            head = np.frombuffer(data, np.uint32, count=2)
            from litdata.streaming.serializers import _NUMPY_DTYPES_MAPPING

            dtype = np.dtype(_NUMPY_DTYPES_MAPPING[int(head[0])])
            ndim = int(head[1])
            shape = tuple(int(d) for d in np.frombuffer(data, np.uint32, count=ndim, offset=8))
            return np.frombuffer(data, dtype=dtype, offset=8 + 4 * ndim).reshape(shape)

    return NumpyView()


def collate_prepared(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`~fm_engine.data.dataset.collate_frames` for a prepared dataset: when the images are the
    consecutive rows of one batch tensor (:meth:`PreparedDataset.__getitems__`), that tensor is used as is."""
    from fm_engine.data.dataset import collate_frames

    imgs = [b["image"] for b in batch]
    first = imgs[0]
    n = first.numel()
    same = all(
        x.dtype == first.dtype
        and x.shape == first.shape
        and x.is_contiguous()
        and x.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        and x.storage_offset() == first.storage_offset() + i * n
        for i, x in enumerate(imgs)
    )
    if (
        not same
        or first.storage_offset() != 0
        or first.untyped_storage().nbytes() != len(imgs) * n * first.element_size()
    ):
        return collate_frames(batch)
    out = {k: torch.stack([b[k] for b in batch]) for k in batch[0] if k != "image"}
    out["image"] = torch.empty(0, dtype=first.dtype).set_(
        first.untyped_storage(),
        0,
        (len(imgs), *first.shape),
        torch.empty((len(imgs), *first.shape), device="meta").stride(),
    )
    return out


class PreparedDataset(torch.utils.data.Dataset):
    """Random access to a prepared dataset (``litdata.StreamingDataset`` over its index).

    An example: ``image`` [C, H, W] uint16 / float32, ``scale`` / ``offset`` float64 scalars, ``label`` and
    ``index`` int64, ``skipped`` 0 (files that could not be read are listed in ``skipped_files``).
    ``size``: the (H, W) it was prepared at; ``chunk_sizes``: samples per chunk, in index order."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        if not is_prepared(self.root):
            raise ValueError(f"data: {root} has no {INDEX_FILE} (not a prepared dataset, or an unfinished one)")
        meta_path = self.root / META_FILE
        if not meta_path.is_file():
            raise ValueError(f"data: {root} has {INDEX_FILE} but no {META_FILE} (not written by fm-engine prepare)")
        self.meta = json.loads(meta_path.read_text())
        index = json.loads((self.root / INDEX_FILE).read_text())
        self.chunk_sizes = [int(c["chunk_size"]) for c in index["chunks"]]
        self.size = (int(self.meta["settings"]["size"][0]), int(self.meta["settings"]["size"][1]))
        self.classes: list[str] = list(self.meta["classes"])
        self.skipped_files = read_skipped(self.root / SKIPPED_FILE)
        self._ds: Any = None
        self._ends = np.cumsum(self.chunk_sizes)
        self._layout: dict[str, Any] | None = None
        self._files: dict[int, Any] = {}
        from fm_engine.data.device import BatchRing

        self.ring = BatchRing()  # the workers' reused batch buffers (see __getitems__)

    def __len__(self) -> int:
        return sum(self.chunk_sizes)

    def _reader(self) -> Any:
        if self._ds is None:
            from litdata import StreamingDataset

            self._ds = StreamingDataset(str(self.root), serializers={"numpy": _numpy_view_serializer()})
        return self._ds

    def _sample(self, index: int) -> dict[str, Any]:
        """The stored sample; its image is a view of the chunk's memory, valid until the next read."""
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        return dict(self._reader()[index])

    def raw(self, index: int) -> dict[str, Any]:
        """The stored sample (numpy image, Python scalars, path, frame)."""
        s = self._sample(index)
        s["image"] = s["image"].copy()
        return s

    def _example(self, s: dict[str, Any], index: int, image: torch.Tensor) -> dict[str, Any]:
        return {
            "image": image,
            "scale": torch.tensor(s["scale"], dtype=torch.float64),
            "offset": torch.tensor(s["offset"], dtype=torch.float64),
            "label": torch.tensor(s["label"], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
            "skipped": torch.tensor(0, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self._sample(index)
        arr = s.pop("image")
        img = torch.empty(arr.shape, dtype=_TORCH_DTYPES[arr.dtype])
        _copy_into(img, arr)
        del arr  # release the view of the chunk before the next read
        return self._example(s, index, img)

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """A batch: every image is copied once, from the chunk straight into one batch tensor; :func:`collate_prepared`
        then stacks nothing. In a DataLoader worker the batch tensor lives in shared memory, in one of the
        worker's reused buffers when one is free (``self.ring``, a :class:`~fm_engine.data.device.BatchRing`;
        fresh shared memory costs page faults worth several copies of the image). Each example carries ``ring``
        [3] int64 (worker, slot, token; -1, -1, 0 outside the ring): hand the batch back with :meth:`release`
        once it is no longer read, or the slot stays taken (a worker whose slots are all taken allocates afresh;
        nothing is overwritten)."""
        from fm_engine.data.device import NO_RING

        out: list[dict[str, Any]] = []
        batch: torch.Tensor | None = None
        ring = torch.tensor(NO_RING, dtype=torch.int64)
        for k, index in enumerate(indices):
            s = self._sample(index)
            arr = s.pop("image")
            dtype = _TORCH_DTYPES[arr.dtype]
            if batch is None:
                batch, ring = self.ring.tensor((len(indices), *arr.shape), dtype)
            if batch.dtype == dtype and tuple(batch.shape[1:]) == arr.shape:
                img = batch[k]
            else:  # mixed precisions or shapes: this example gets its own tensor
                img = torch.empty(arr.shape, dtype=dtype)
            if not self._read_image_into(index, arr, img):
                _copy_into(img, arr)
            del arr
            out.append({**self._example(s, index, img), "ring": ring})
        return out

    def release(self, batch: Any) -> None:
        """Hand a batch from :meth:`__getitems__` (collated, or its list of examples) back once nothing reads
        its images any more: its worker may refill the buffer (:meth:`fm_engine.data.device.BatchRing.release`)."""
        self.ring.release(batch)

    def _read_image_into(self, index: int, arr: np.ndarray, out: torch.Tensor) -> bool:
        """Read sample ``index``'s image bytes from its chunk file straight into ``out`` (a plain read: one
        copy from the page cache, without faulting in the chunk's memory map page by page). The position comes
        from the chunk's offset table and the item's leaf sizes (LitData's chunk layout); it is checked
        against the sample's dtype and shape, and False (nothing read) is returned when it does not match."""
        if self._layout is None:
            index_json = json.loads((self.root / INDEX_FILE).read_text())
            cfg = index_json["config"]
            ok = cfg.get("item_loader") == "PyTreeLoader" and not cfg.get("compression") and not cfg.get("encryption")
            ok = ok and cfg.get("data_format", [None])[0] == "numpy"
            self._layout = {"ok": ok, "leaves": len(cfg.get("data_format", [])), "files": index_json["chunks"]}
        if not self._layout["ok"]:
            return False
        c = int(np.searchsorted(self._ends, index, side="right"))
        j = index - (self._ends[c - 1] if c else 0)
        fh = self._files.get(c)
        if fh is None:
            fh = open(self.root / self._layout["files"][c]["filename"], "rb", buffering=0)
            self._files[c] = fh
        fd = fh.fileno()
        begin, end = np.frombuffer(os.pread(fd, 8, 4 + 4 * j), "<u4").tolist()
        n = self._layout["leaves"]
        head_len = 4 * n + 8 + 4 * arr.ndim
        head = np.frombuffer(os.pread(fd, head_len, begin), "<u4")
        start = begin + head_len
        shape = tuple(int(d) for d in head[n + 2 :])
        nbytes = arr.nbytes
        if head[n + 1] != arr.ndim or shape != arr.shape or int(head[0]) != 8 + 4 * arr.ndim + nbytes:
            return False
        if start + nbytes > end:
            return False
        view = out.view(torch.int16) if out.dtype == torch.uint16 else out
        buf = view.numpy().data.cast("B")
        got = os.preadv(fd, [buf], start)
        return bool(got == nbytes)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_ds"] = None  # each worker process opens its own reader
        state["_files"] = {}
        return state


class ShardSampler(torch.utils.data.Sampler[int]):
    """Shuffled example order in which DDP ranks read disjoint chunks (shards); restarts mid-epoch.

    Epoch e: the chunks are permuted by a generator seeded with ``seed + e`` (identical on every rank) and
    dealt, in that order, to the rank holding the fewest examples so far; each rank shuffles the examples of
    its own chunks (generator ``seed + e``, ``rank``), then cuts or wraps that list to ``ceil(n / world_size)``
    examples so that every rank runs the same number of batches. ``set_epoch(e, start)`` skips the first
    ``start`` examples of this rank's share (resume)."""

    def __init__(
        self, chunk_sizes: Sequence[int], *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        if not chunk_sizes or sum(chunk_sizes) < 1:
            raise ValueError("chunk_sizes: expected at least one non-empty chunk")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        if len(chunk_sizes) < world_size:
            raise ValueError(
                f"world_size: {world_size} processes need at least as many chunks; the dataset has "
                f"{len(chunk_sizes)} (prepare it with a smaller chunk size)"
            )
        self.chunk_sizes = [int(c) for c in chunk_sizes]
        self.starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)[:-1]]).tolist()
        self.length = sum(self.chunk_sizes)
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def per_rank(self) -> int:
        return math.ceil(self.length / self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def chunks_of(self, rank: int) -> list[int]:
        """The chunks ``rank`` reads in the current epoch."""
        n = len(self.chunk_sizes)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(n, generator=g).tolist()
        else:
            perm = list(range(n))
        load = [0] * self.world_size
        owned: list[list[int]] = [[] for _ in range(self.world_size)]
        for c in perm:
            r = min(range(self.world_size), key=lambda k: (load[k], k))
            owned[r].append(c)
            load[r] += self.chunk_sizes[c]
        return owned[rank]

    def order(self) -> list[int]:
        idx = [self.starts[c] + j for c in self.chunks_of(self.rank) for j in range(self.chunk_sizes[c])]
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed + self.epoch) * 1_000_003 + self.rank)
            idx = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        total = self.per_rank()
        return (idx * math.ceil(total / len(idx)))[:total]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start
