"""Split of the DICOM path: loader workers read stored values, the training device does the rest.

Workers (:func:`read_stored`) do only what needs the CPU: read the file, decode the pixel data (pydicom and
its JPEG plugins) and turn the header into an *intensity table*. Everything else runs batched on the
training device (:func:`device_transform`): the modality / VOI chain and the MONOCHROME1 inversion (one
table lookup per pixel), the antialiased resize and the padding to the model size.

The intensity table. For integer stored values whose stored range (BitsStored, PixelRepresentation) has at
most 65,536 values, the whole chain of :mod:`fm_engine.data.dicom` (clipping to the stored range, rescale or
Modality LUT, window / VOI LUT / sigmoid, MONOCHROME1) is a function of the stored value alone. The worker
evaluates that function once on every possible stored value with the very same code as
:func:`~fm_engine.data.dicom.read_dicom` (``display_int`` for the uint16 + affine path, ``display_float``
for the fp32 path) and caches it per header; the device looks each pixel up. The result before resizing is
therefore identical to :func:`~fm_engine.data.dicom.read_dicom`'s, bit for bit, for every VOI kind (linear,
linear-exact and sigmoid windows, VOI LUT tables, none), every rescale and Modality LUT. Tables are uint16
integers ``q`` with an affine (display = q * scale + offset) when the chain is exact in integers, else
float32 display values (scale 1, offset 0), exactly as ``read_dicom`` decides.

Images that no table can describe (float pixel data, BitsStored over 16) get the chain applied by the
worker (the ``read_dicom`` code) and travel with ``kind = KIND_FINAL``; the device only resizes them.

Collate (:func:`collate_stored`): **padding to the batch maximum, with the sizes alongside**. The stored
values of a batch travel as one tensor ``stored [B, C, H_max, W_max]`` (one pinned host-to-device copy; no
padding at all when the images share a size, the usual case within one scanner), ``sizes [B, 2]`` gives
each image's (H, W), and the tables of the batch travel concatenated (``lut [L]`` float32, with
``lut_base``, ``lut_len``, ``lut_lo`` per image; a table shared by several images is sent once).

The resize is the one of :func:`~fm_engine.data.transforms.resize_pad` (fit inside the model size with the
aspect ratio kept, antialiased bilinear in fp32, uint16 rounded back to integers, zero padding centred), run
on the device for every group of images of one size. Results equal the CPU path within one unit of the
uint16 output (the interpolation's fp32 sums may round differently on another device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fm_engine.data.dicom import (
    UINT16_LEVELS,
    DicomReadError,
    VoiChoice,
    _check_precision,
    _decode,
    _Header,
    _meta,
    _parse_header,
    _resolve_voi,
    _stored_range,
    _to_image,
    display_float,
    display_int,
    read_header,
)
from fm_engine.data.transforms import fit_size

KIND_UINT16 = 0  # table of uint16 integers q; display = q * scale + offset
KIND_FP32 = 1  # table of float32 display values
KIND_FINAL = 2  # no table: the worker applied the chain; stored holds q (uint16) or display values (float32)


@dataclasses.dataclass
class PixelSource:
    """Uncompressed pixel data not read yet: the file ``path``, the byte ``offset`` of its first value, the
    ``dtype`` (uint8 / uint16 / int16, little endian) and the ``shape`` ([T, C, H, W], or [C, H, W] for one
    frame). :func:`collate_stored` reads it straight into the batch tensor: one copy from the file."""

    path: str
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __getitem__(self, frame: int) -> PixelSource:
        if len(self.shape) != 4 or not 0 <= frame < self.shape[0]:
            raise IndexError(f"frame: expected 0 <= frame < {self.shape[0]} of a [T, C, H, W] source, got {frame}")
        per = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        return PixelSource(self.path, self.offset + frame * per, self.dtype, tuple(self.shape[1:]))

    def read_into(self, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, ``shape``, ``dtype``) from the file."""
        view = out.view(torch.int16) if out.dtype == torch.uint16 else out
        buf = view.numpy().data.cast("B")
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            got = f.readinto(buf)
        if got != len(buf):
            raise DicomReadError(self.path, f"pixel data truncated ({got} of {len(buf)} bytes)")

    def load(self) -> torch.Tensor:
        """The values as a tensor of ``shape``."""
        out = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(out)
        return out


@dataclasses.dataclass
class StoredImage:
    """What a loader worker produces for one file.

    stored: [T, C, H, W] stored values as decoded (uint8 / uint16 / int16 / int32), a :class:`PixelSource`
    for uncompressed files (read later, straight into the batch), or, with ``kind == KIND_FINAL``, the
    finished image (uint16 q or float32 display values).
    lut: [N] table (uint16 for KIND_UINT16, float32 for KIND_FP32) indexed by ``stored - lut_lo``
    (clamped to [0, N - 1]); None for KIND_FINAL.
    scale, offset: the affine of the table's (or the final image's) uint16 values; 1.0 / 0.0 for fp32.
    mask: bits of ``stored`` that hold the value (``2**BitsStored - 1``) when the worker left the unused high
    bits of unsigned native pixel data in place (the device clears them, as pydicom's decoder does); -1 = all.
    """

    stored: torch.Tensor | PixelSource
    lut: torch.Tensor | None
    lut_lo: int
    kind: int
    scale: float
    offset: float
    path: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    mask: int = -1

    @property
    def precision(self) -> str:
        """``"uint16"`` or ``"fp32"``: the dtype the device transform gives this image."""
        if self.kind == KIND_FINAL:
            return "uint16" if self.stored.dtype == torch.uint16 else "fp32"
        return "uint16" if self.kind == KIND_UINT16 else "fp32"


def _header_key(h: _Header, voi: tuple[str, Any], precision: str) -> str:
    """A digest of every header value the chain depends on."""
    parts: list[Any] = [h.photometric, h.bits_stored, h.signed, h.slope, h.intercept, h.voi_function, precision]
    for lut in (h.modality_lut, voi[1] if voi[0] == "lut" else None):
        parts.append(None if lut is None else (lut.first, lut.bits, lut.table.tobytes()))
    parts.append(voi[0])
    parts.append(voi[1] if voi[0] == "window" else None)
    return hashlib.sha1(repr(parts).encode()).hexdigest()


_TABLES: dict[str, tuple[torch.Tensor, int, int, float, float]] = {}
_TABLES_MAX = 256


def intensity_table(h: _Header, voi: tuple[str, Any], precision: str) -> tuple[torch.Tensor, int, int, float, float]:
    """(lut [N], lut_lo, kind, scale, offset) for integer stored values (see the module docstring).

    The table is the chain of :func:`~fm_engine.data.dicom.read_dicom` evaluated on every stored value
    ``lut_lo .. lut_lo + N - 1`` of the header's stored range; cached per header (workers keep theirs)."""
    key = _header_key(h, voi, precision)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    lo, hi = _stored_range(h)
    grid = np.arange(lo, hi + 1, dtype=np.int64)
    r = display_int(grid, h, voi) if precision == "auto" else None
    if r is not None:
        q = torch.from_numpy(r.q.astype(np.int32)).to(torch.uint16)
        out = (q, lo, KIND_UINT16, float(r.scale), float(r.offset))
    else:
        y = display_float(grid, h, voi).astype(np.float32)
        out = (torch.from_numpy(np.ascontiguousarray(y)), lo, KIND_FP32, 1.0, 0.0)
    if len(_TABLES) >= _TABLES_MAX:
        _TABLES.clear()
    _TABLES[key] = out
    return out


_NATIVE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian


def _native_stored(ds: Any, h: _Header) -> tuple[np.ndarray, int] | None:
    """Uncompressed little-endian 8/16-bit grey pixel data as a view of the file's bytes (no copy, no
    pass over the pixels), [T, 1, H, W], and the mask of its stored bits; None when pydicom must decode."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in _NATIVE_SYNTAXES or h.channels != 1 or "PixelData" not in ds:
        return None
    try:
        bits = int(ds.BitsAllocated)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return None
    if bits not in (8, 16) or h.bits_stored > bits or (h.signed and h.bits_stored != bits):
        return None
    dtype = np.dtype({(8, False): "u1", (8, True): "i1", (16, False): "<u2", (16, True): "<i2"}[(bits, h.signed)])
    raw = ds.PixelData
    need = h.frames * rows * cols * dtype.itemsize
    if not isinstance(raw, bytes | bytearray) or len(raw) < need:
        return None  # let pydicom report the problem
    arr = np.frombuffer(raw, dtype=dtype, count=need // dtype.itemsize).reshape(h.frames, 1, rows, cols)
    if dtype == np.dtype("i1"):
        arr = arr.astype(np.int16)
    mask = (1 << h.bits_stored) - 1 if (not h.signed and h.bits_stored < bits) else -1
    return arr, mask


def _native_source(ds: Any, h: _Header, path: str) -> tuple[PixelSource, int] | None:
    """The pixel data of an uncompressed little-endian 8/16-bit grey file as a :class:`PixelSource` (its value
    was not read with the header), and the mask of its stored bits; None otherwise."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in _NATIVE_SYNTAXES or h.channels != 1 or "PixelData" not in ds:
        return None
    try:
        bits = int(ds.BitsAllocated)
        rows, cols = int(ds.Rows), int(ds.Columns)
        elem = ds.get_item("PixelData", keep_deferred=True)  # pydicom >= 3; older versions read the value
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
    if (
        bits not in (8, 16)
        or h.bits_stored > bits
        or (h.signed and h.bits_stored != bits)
        or (bits, h.signed) == (8, True)
    ):
        return None
    tell = getattr(elem, "value_tell", None)
    if getattr(elem, "value", b"") is not None or tell is None:
        return None  # read with the header (small) or not deferred: use the array path
    dtype = {(8, False): torch.uint8, (16, False): torch.uint16, (16, True): torch.int16}[(bits, h.signed)]
    need = h.frames * rows * cols * dtype.itemsize
    if int(elem.length) < need or os.path.getsize(path) < int(tell) + need:
        return None  # truncated: pydicom reports it
    mask = (1 << h.bits_stored) - 1 if (not h.signed and h.bits_stored < bits) else -1
    return PixelSource(path, int(tell), dtype, (h.frames, 1, rows, cols)), mask


def read_stored(
    path: str | os.PathLike[str],
    *,
    voi: VoiChoice = "auto",
    window_index: int = 0,
    precision: str = "auto",
    modalities: Collection[str] | None = None,
) -> StoredImage:
    """The worker's part of reading one DICOM file (single or multi-frame): stored values + intensity table.

    Arguments as :func:`~fm_engine.data.dicom.read_dicom`; ``device_transform`` of the result equals
    ``resize_pad(read_dicom(path, ...).pixels)`` (see the module docstring). ``seconds`` reports the time
    spent reading the file ("read") and decoding the pixel data ("decode").
    Raises DicomReadError naming the file and the reason."""
    _check_precision(precision)
    path = str(path)
    t0 = time.perf_counter()
    ds = read_header(path)  # values over 4 KiB (the pixel data) are read on access
    h = _parse_header(ds, path, modalities)
    v = _resolve_voi(h, voi, window_index, path)
    lo, hi = _stored_range(h)
    source = _native_source(ds, h, path)
    if source is not None and hi - lo + 1 <= UINT16_LEVELS:
        lut, lut_lo, kind, scale, offset = intensity_table(h, v, precision)
        out = StoredImage(source[0], lut, lut_lo, kind, scale, offset, path, _meta(ds), mask=source[1])
        out.seconds = {"read": time.perf_counter() - t0, "decode": 0.0}
        return out
    ds = read_header(path, pixels=True)
    t1 = time.perf_counter()
    native = _native_stored(ds, h)
    mask = -1
    if native is not None:
        stored, mask = native
    else:
        stored = _decode(ds, path, h)
    t2 = time.perf_counter()
    meta = _meta(ds)
    if np.issubdtype(stored.dtype, np.integer) and hi - lo + 1 <= UINT16_LEVELS:
        lut, lut_lo, kind, scale, offset = intensity_table(h, v, precision)
        if stored.dtype not in (np.uint8, np.uint16, np.int16, np.int32):
            stored = stored.astype(np.int32)
        with warnings.catch_warnings():  # a view of the file's bytes (read-only): nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            if stored.dtype == np.uint16:
                t = torch.from_numpy(stored.view(np.int16)).view(torch.uint16)
            else:
                t = torch.from_numpy(stored)
        out = StoredImage(t, lut, lut_lo, kind, scale, offset, path, meta, mask=mask)
    else:
        if mask != -1:
            stored = stored & mask
        im = _to_image(stored, h, v, precision, path, meta)
        out = StoredImage(im.pixels, None, 0, KIND_FINAL, im.scale, im.offset, path, meta)
    out.seconds = {"read": t1 - t0, "decode": t2 - t1 + (time.perf_counter() - t2)}
    return out


# ---------------------------------------------------------------------------------------------
# collate


def _common_dtype(dtypes: Collection[torch.dtype]) -> torch.dtype:
    if any(d.is_floating_point for d in dtypes):
        return torch.float32
    if all(d in (torch.uint8, torch.uint16) for d in dtypes):
        return torch.uint16 if torch.uint16 in dtypes else torch.uint8
    return torch.int32


# the worker index of a process that stands in for a DataLoader worker without being one (the data benchmark's
# workers), so that its batches are allocated as a worker's are
_STANDIN_WORKER: int | None = None


def _worker_index() -> int | None:
    """This DataLoader worker's index (None in the main process)."""
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else _STANDIN_WORKER


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker it lives in shared memory, so that sending the batch to the
    training process copies nothing (what torch's default collate does). Fresh shared memory costs its page
    faults at the first write (on a 2-core VM about 4x a copy of the image into memory written before): see
    :class:`BatchRing` for buffers that are reused."""
    if _worker_index() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)  # type: ignore[attr-defined]
    return _on(storage, shape, dtype)


def _on(storage: torch.UntypedStorage, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape, torch.empty(shape, device="meta").stride())


NO_RING = (-1, -1, 0)  # the ring record of a batch outside any ring


class BatchRing:
    """Batch buffers that DataLoader workers reuse instead of allocating fresh shared memory for every batch.

    Each worker keeps ``slots`` buffers (enough for the batches it has in flight at prefetch_factor 2, the one
    the training step holds and one being pinned). :meth:`tensor` hands out a free one, marked with a token;
    the batch carries its ring record ``[3]`` int64 (worker, slot, token) and the consumer hands it back with
    :meth:`release` once nothing reads it (after the step, or after its pinned copy). A buffer whose batch was
    not handed back is never overwritten: a worker with no free slot allocates afresh. In the main process
    (no workers) nothing is reused. The slot states live in shared memory, created where the ring is built
    (the main process) and seen by every worker; each worker process allocates its own buffers."""

    def __init__(self, slots: int = 4, workers: int = 64) -> None:
        if slots < 1 or workers < 1:
            raise ValueError(f"slots, workers: expected at least 1 each, got {slots}, {workers}")
        # state[w, k]: 0 (free) or the token of the batch in worker w's slot k
        self.state = torch.zeros(workers, slots, dtype=torch.int64).share_memory_()
        self._counts = torch.zeros(2, dtype=torch.int64).share_memory_()  # [refilled, fresh]
        self._buffers: list[torch.UntypedStorage | None] = [None] * slots
        self._seq = 0

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_buffers"] = [None] * len(self._buffers)  # each worker process allocates its own
        return state

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(empty batch tensor of ``shape`` / ``dtype``, its ring record [3] int64): a free slot of this
        worker (its buffer reallocated when too small), else fresh memory (:func:`_batch_tensor`)."""
        w = _worker_index()
        if w is not None and w < self.state.shape[0]:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            row = self.state[w]
            for k in range(row.shape[0]):
                if int(row[k]) != 0:
                    continue
                buf = self._buffers[k]
                if buf is None or buf.nbytes() < nbytes:
                    buf = torch.UntypedStorage._new_shared(nbytes)  # type: ignore[attr-defined]
                    self._buffers[k] = buf
                    self._counts[1] += 1
                else:
                    self._counts[0] += 1
                self._seq += 1
                token = (os.getpid() << 24) | (self._seq & 0xFFFFFF) or 1
                row[k] = token
                return _on(buf, shape, dtype), torch.tensor([w, k, token], dtype=torch.int64)
        if w is not None:
            self._counts[1] += 1
        return _batch_tensor(shape, dtype), torch.tensor(NO_RING, dtype=torch.int64)

    def release(self, batch: Any) -> None:
        """Hand back the buffer of ``batch`` (a collated batch, a list of examples or a ring record): its
        worker may refill it. Outside the ring, or released before: nothing happens."""
        if isinstance(batch, list):
            batch = batch[0] if batch else {}
        ring = batch.get("ring") if isinstance(batch, dict) else batch
        if ring is None:
            return
        w, k, token = (int(v) for v in (ring[0] if ring.dim() == 2 else ring))
        if 0 <= w < self.state.shape[0] and 0 <= k < self.state.shape[1] and int(self.state[w, k]) == token:
            self.state[w, k] = 0  # only this batch's own token is cleared, never a later batch's in the slot

    @property
    def counts(self) -> tuple[int, int]:
        """(batches written into a reused buffer, batches that needed fresh memory), over every worker."""
        return int(self._counts[0]), int(self._counts[1])


def collate_stored(batch: Sequence[dict[str, Any]], ring: BatchRing | None = None) -> dict[str, Any]:
    """Examples of ``DicomFrameDataset(..., stored=True)`` -> one batch (pad to the batch maximum + sizes).

    Each example holds ``stored [C, H, W]``, ``lut`` (tensor or None), ``lut_lo``, ``kind``, ``scale``,
    ``offset`` and the usual ``label`` / ``index`` / ``skipped``. The batch holds:
    stored [B, C, H_max, W_max] (uint8 / uint16 / int32 / float32: the common dtype, zero padded),
    sizes [B, 2] int64, lut [L] float32 (the distinct tables concatenated), lut_base / lut_len / lut_lo /
    kind [B] int64, scale / offset [B] float64, and every other key stacked. With ``ring`` (the dataset's
    :class:`BatchRing`) ``stored`` is one of its reused buffers and the batch carries ``ring`` [3] int64:
    hand it back with ``ring.release(batch)`` (the dataset's ``release``) once it is no longer read."""
    if not batch:
        raise ValueError("batch: expected at least one example")
    imgs: list[Any] = [b["stored"] for b in batch]
    chans = {int(x.shape[0]) for x in imgs}
    if len(chans) > 1:
        raise ValueError(f"batch: examples have different channel counts {sorted(chans)}")
    dtype = _common_dtype({x.dtype for x in imgs})
    hs, ws = [int(x.shape[-2]) for x in imgs], [int(x.shape[-1]) for x in imgs]
    hm, wm = max(hs), max(ws)
    shape = (len(imgs), chans.pop(), hm, wm)
    stored, record = ring.tensor(shape, dtype) if ring is not None else (_batch_tensor(shape, dtype), None)
    if all(x.dtype == dtype and tuple(x.shape[-2:]) == (hm, wm) for x in imgs):
        for i, x in enumerate(imgs):
            if isinstance(x, PixelSource):
                x.read_into(stored[i])
            else:
                stored[i].copy_(x)
    else:
        stored.zero_()
        for i, x in enumerate(imgs):
            if isinstance(x, PixelSource):
                x = x.load()
            if x.dtype == dtype:
                stored[i, :, : x.shape[-2], : x.shape[-1]] = x
            else:  # int16 / uint16 -> int32, anything -> float32 (exact: at most 16-bit integers)
                src = x.to(torch.int32) if x.dtype == torch.uint16 else x
                stored[i, :, : x.shape[-2], : x.shape[-1]] = src.to(dtype)
    tables: dict[int, tuple[int, int]] = {}
    parts: list[torch.Tensor] = []
    base, length = [], []
    total = 0
    for b in batch:
        lut = b["lut"]
        if lut is None:
            base.append(0)
            length.append(0)
            continue
        key = id(lut)
        if key not in tables:
            tables[key] = (total, int(lut.numel()))
            parts.append(lut.to(torch.int32).to(torch.float32) if lut.dtype == torch.uint16 else lut.float())
            total += int(lut.numel())
        base.append(tables[key][0])
        length.append(tables[key][1])
    out: dict[str, Any] = {
        "stored": stored,
        "sizes": torch.tensor([[h, w] for h, w in zip(hs, ws)], dtype=torch.int64),
        "lut": torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float32),
        "lut_base": torch.tensor(base, dtype=torch.int64),
        "lut_len": torch.tensor(length, dtype=torch.int64),
    }
    skip = {"stored", "lut", "path"}
    for k in batch[0]:
        if k not in skip:
            out[k] = torch.stack([torch.as_tensor(b[k]) for b in batch])
    if "path" in batch[0]:
        out["path"] = [b["path"] for b in batch]
    if record is not None:
        out["ring"] = record
    return out


# ---------------------------------------------------------------------------------------------
# the device part


def device_transform(batch: dict[str, Any], size: tuple[int, int], device: torch.device | str) -> dict[str, Any]:
    """Intensity tables, resize and padding on ``device`` for a batch of :func:`collate_stored`.

    Returns the batch with ``image [B, C, H_out, W_out]`` (uint16 when every image is on the uint16 path,
    else float32 display values for all, as :func:`~fm_engine.data.dataset.collate_frames` does), ``scale``
    and ``offset`` [B] float64 on ``device``; the other entries are moved to ``device`` as they are."""
    device = torch.device(device)
    x = batch["stored"].to(device, non_blocking=True)
    b = x.shape[0]
    kind = batch["kind"].to(device)
    sizes = batch["sizes"].tolist()
    lut = batch["lut"].to(device, non_blocking=True)
    view = (b, 1, 1, 1)
    if x.dtype == torch.float32:
        xi = x.to(torch.int32)  # only table images use the index; their values are integers
    else:
        xi = x.to(torch.int32) if x.dtype != torch.int32 else x
    idx = (xi & batch["mask"].to(device, torch.int32).view(view)) - batch["lut_lo"].to(device).view(view)
    idx = torch.minimum(idx.clamp_(min=0), (batch["lut_len"].to(device) - 1).clamp(min=0).view(view))
    idx = idx + batch["lut_base"].to(device).view(view)
    vals = torch.where((kind == KIND_FINAL).view(view), x.to(torch.float32), lut[idx])
    uint_path = [bool(u) for u in batch["uint16"].tolist()]  # each example's precision (StoredImage.precision)
    c = x.shape[1]
    out = torch.zeros(b, c, *size, dtype=torch.float32, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault((h, w), []).append(i)
    for (h, w), members in groups.items():
        nh, nw = fit_size(h, w, size)
        sel = torch.tensor(members, device=device)
        g = vals.index_select(0, sel)[:, :, :h, :w]
        if (nh, nw) != (h, w):
            g = F.interpolate(
                g.reshape(-1, 1, h, w), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
            )
            g = g.reshape(len(members), c, nh, nw)
        top, left = (size[0] - nh) // 2, (size[1] - nw) // 2
        out[members, :, top : top + nh, left : left + nw] = g
    scale = batch["scale"].to(device, torch.float64)
    offset = batch["offset"].to(device, torch.float64)
    is_u = torch.tensor(uint_path, device=device).view(view)
    rounded = out.round().clamp_(0, 65535)
    out = torch.where(is_u, rounded, out)
    result = {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    for k in ("stored", "lut", "lut_base", "lut_len", "lut_lo", "mask", "sizes"):
        result.pop(k, None)
    if all(uint_path):
        result["image"] = out.to(torch.int32).to(torch.uint16)
    elif any(uint_path):  # mixed: every image becomes display values (computed in float64, rounded once)
        disp = (out.to(torch.float64) * scale.view(view) + offset.view(view)).to(torch.float32)
        result["image"] = torch.where(is_u, disp, out)
        scale = torch.where(is_u.view(-1), torch.ones_like(scale), scale)
        offset = torch.where(is_u.view(-1), torch.zeros_like(offset), offset)
    else:
        result["image"] = out
    result["scale"], result["offset"] = scale, offset
    return result


def stored_example(im: StoredImage, frame: int) -> dict[str, Any]:
    """One frame of a :class:`StoredImage` as a dataset example (the keys :func:`collate_stored` reads)."""
    return {
        "stored": im.stored[frame],
        "lut": im.lut,
        "lut_lo": torch.tensor(im.lut_lo, dtype=torch.int64),
        "mask": torch.tensor(im.mask, dtype=torch.int64),
        "kind": torch.tensor(im.kind, dtype=torch.int64),
        "uint16": torch.tensor(im.precision == "uint16"),
        "scale": torch.tensor(im.scale, dtype=torch.float64),
        "offset": torch.tensor(im.offset, dtype=torch.float64),
    }
