"""DICOM reading: stored values -> modality -> VOI -> known output range -> MONOCHROME1 inversion.

Layout: every reader returns a :class:`DicomImage` whose ``pixels`` are ``[T, C, H, W]``:
T = frames (1 for a single image, the frames of a multi-frame file, the slices of a series sorted
along the slice normal), C = 1 for MONOCHROME1/2 and 3 for RGB (YCbCr is converted to RGB by pydicom),
H = Rows, W = Columns. The display value of a pixel is ``pixels * scale + offset`` in [0, 1]
(0 = black, 1 = white), computed by the model's full-precision stem.

The intensity chain (DICOM PS3.3 C.11 / PS3.4 N.2), for stored values s:

1. stored values are clipped to the range that BitsStored / PixelRepresentation allow;
2. modality: a Modality LUT Sequence (table) if present, else ``s * RescaleSlope + RescaleIntercept``
   (slope 1, intercept 0 when absent);
3. VOI, chosen by ``voi``: ``"auto"`` (the file's default: its VOI LUT Sequence if present, else its first
   window, else none), ``"lut"``, ``"window"`` (the ``window_index``-th WindowCenter/WindowWidth pair),
   ``(center, width)`` (an explicit window, in modality units), or ``"none"``. Windows follow
   VOILUTFunction: LINEAR (default), LINEAR_EXACT or SIGMOID;
4. scaling to [0, 1] by the *known* output range, never by the image's own min/max: a window maps
   to [0, 1] by definition; a VOI LUT by its output bit depth (``/ (2**bits - 1)``); with no VOI, the
   range of modality values that the stored bit depth (or the Modality LUT's entries) allows;
5. MONOCHROME1 is inverted once (``1 - y``) so that larger display values are always brighter.

Two precision paths (``precision="auto"`` picks the first that applies; ``"fp32"`` forces the second):

* **uint16 + affine** (exact 16-bit data, ``pixels`` uint16): used when the chain up to the output is
  an integer table lookup followed by an affine map: rescale or Modality LUT, then a LINEAR or
  LINEAR_EXACT window, a VOI LUT table (its entries are integers) or no VOI. A linear window is
  ``clip(a * v + b, 0, 1)``; the clip is applied to the integers (to the first and last stored value inside
  the window), so values inside the window are exact and values outside it differ from the DICOM formula
  by less than one stored-value step. MONOCHROME1 flips the integers (``q -> q_max - q``); the integers are
  then shifted to start at 0 and must span at most 65,536 values.
* **fp32** (``pixels`` float32 display values, ``scale = 1``, ``offset = 0``): used when the chain is
  not an affine of integers: a SIGMOID window, a window narrower than one stored-value step, a range over
  16 bits (e.g. 32-bit RT dose), float pixel data, or slices of one series with different affines.
  The chain is evaluated in float64 and rounded once to float32 (24-bit mantissa).

Not read: per-frame functional groups of enhanced multi-frame files (the top-level rescale and window
tags are used), presentation states, overlays, PALETTE COLOR images (rejected).

pydicom is imported inside the functions (the ``fm_engine[dicom]`` extra adds the JPEG plugins).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

VoiChoice = str | tuple[float, float]

UINT16_LEVELS = 65536


class DicomReadError(ValueError):
    """A DICOM file that cannot be read into an image: ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclasses.dataclass
class DicomImage:
    """An image read from DICOM.

    pixels: [T, C, H, W], uint16 (integer path) or float32 (fp32 path).
    scale, offset: the intensity affine; display value = pixels * scale + offset (1.0 / 0.0 for fp32).
    path: the file or series folder; meta: selected header values (Modality, ViewPosition, ...).
    """

    pixels: torch.Tensor
    scale: float
    offset: float
    path: str
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def precision(self) -> str:
        """``"uint16"`` or ``"fp32"``."""
        return "uint16" if self.pixels.dtype == torch.uint16 else "fp32"

    def display(self) -> torch.Tensor:
        """Display values [T, C, H, W] float32 in [0, 1] (computed in float64, rounded once)."""
        return (self.pixels.to(torch.float64) * self.scale + self.offset).to(torch.float32)


# ---------------------------------------------------------------------------------------------
# header parsing


@dataclasses.dataclass
class _Lut:
    table: np.ndarray  # int64 entries
    first: int  # first mapped input value
    bits: int  # output bits


@dataclasses.dataclass
class _Header:
    photometric: str
    channels: int
    frames: int
    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    modality_lut: _Lut | None
    voi_lut: _Lut | None
    windows: list[tuple[float, float]]
    voi_function: str


def _lut_from_item(item: Any, path: str, what: str) -> _Lut:
    try:
        desc = [int(v) for v in item.LUTDescriptor]
        raw = item.LUTData
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise DicomReadError(path, f"{what} item has no valid LUTDescriptor/LUTData ({e})") from e
    n = desc[0] or 65536
    first, bits = desc[1], desc[2]
    if isinstance(raw, bytes | bytearray):
        dt = np.uint8 if (bits <= 8 and len(raw) == n) else np.dtype("<u2")
        table = np.frombuffer(bytes(raw), dtype=dt).astype(np.int64)
    else:
        table = np.asarray(raw if isinstance(raw, Sequence) else [raw], dtype=np.int64)
    if table.size < n:
        raise DicomReadError(path, f"{what} has {table.size} entries, its descriptor says {n}")
    return _Lut(table[:n], first, bits)


def _floats(value: Any) -> list[float]:
    if value is None:
        return []
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        return [float(value)]
    return [float(v) for v in value]


def _parse_header(ds: Any, path: str, modalities: Collection[str] | None) -> _Header:
    if modalities is not None:
        modality = str(ds.get("Modality", ""))
        if modality not in modalities:
            raise DicomReadError(path, f"modality {modality!r} is not one of the accepted {sorted(modalities)}")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DicomReadError(path, f"no pixel data (not an image: SOP class {ds.get('SOPClassUID', 'unknown')})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if photometric in ("MONOCHROME1", "MONOCHROME2") and samples == 1:
        channels = 1
    elif samples == 3 and (photometric == "RGB" or photometric.startswith("YBR")):
        channels = 3
    else:
        raise DicomReadError(
            path,
            f"photometric interpretation {photometric!r} with {samples} samples per pixel is not supported "
            "(expected MONOCHROME1, MONOCHROME2, RGB or YBR_*)",
        )
    try:
        bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        centers = _floats(ds.get("WindowCenter"))
        widths = _floats(ds.get("WindowWidth"))
    except (TypeError, ValueError) as e:
        raise DicomReadError(path, f"invalid image pixel module value ({e})") from e
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    mlut = None
    if channels == 1 and "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        mlut = _lut_from_item(ds.ModalityLUTSequence[0], path, "Modality LUT Sequence")
    vlut = None
    if channels == 1 and "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        vlut = _lut_from_item(ds.VOILUTSequence[0], path, "VOI LUT Sequence")
    windows = list(zip(centers, widths, strict=False)) if channels == 1 else []
    func = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise DicomReadError(path, f"VOILUTFunction {func!r} is not LINEAR, LINEAR_EXACT or SIGMOID")
    return _Header(photometric, channels, frames, bits_stored, signed, slope, intercept, mlut, vlut, windows, func)


def _resolve_voi(h: _Header, voi: VoiChoice, window_index: int, path: str) -> tuple[str, Any]:
    """-> ("none", None) | ("lut", _Lut) | ("window", (center, width))."""
    if isinstance(voi, tuple | list):
        if len(voi) != 2 or float(voi[1]) <= 0:
            raise ValueError(f"voi: an explicit window is (center, width) with width > 0, got {voi!r}")
        return "window", (float(voi[0]), float(voi[1]))
    if h.channels != 1 or voi == "none":
        return "none", None
    if voi == "auto":
        if h.voi_lut is not None:
            return "lut", h.voi_lut
        return ("window", h.windows[window_index]) if len(h.windows) > window_index else ("none", None)
    if voi == "lut":
        if h.voi_lut is None:
            raise DicomReadError(path, "voi='lut' but the file has no VOI LUT Sequence")
        return "lut", h.voi_lut
    if voi == "window":
        if len(h.windows) <= window_index:
            raise DicomReadError(
                path,
                f"voi='window' but the file has {len(h.windows)} WindowCenter/Width pairs "
                f"(window_index={window_index})",
            )
        return "window", h.windows[window_index]
    raise ValueError(f"voi: expected 'auto', 'lut', 'window', 'none' or (center, width), got {voi!r}")


def _stored_range(h: _Header) -> tuple[int, int]:
    if h.signed:
        return -(1 << (h.bits_stored - 1)), (1 << (h.bits_stored - 1)) - 1
    return 0, (1 << h.bits_stored) - 1


# ---------------------------------------------------------------------------------------------
# the intensity chain: float64 reference and the integer + affine path


def _window_affine(center: float, width: float, func: str) -> tuple[float, float] | None:
    """(A, B) with y = clip(A * v + B, 0, 1) for a linear window, None when not linear."""
    if func == "LINEAR":
        if width <= 1:
            return None
        return 1.0 / (width - 1), 0.5 - (center - 0.5) / (width - 1)
    if func == "LINEAR_EXACT":
        return 1.0 / width, 0.5 - center / width
    return None


def _modality_float(s: np.ndarray, h: _Header) -> tuple[np.ndarray, float, float]:
    """Modality values (float64) and their known range."""
    lo, hi = _stored_range(h)
    s = np.clip(s, lo, hi)
    if h.modality_lut is not None:
        lut = h.modality_lut
        v = lut.table[np.clip(s.astype(np.int64) - lut.first, 0, lut.table.size - 1)].astype(np.float64)
        return v, float(lut.table.min()), float(lut.table.max())
    v = s.astype(np.float64) * h.slope + h.intercept
    a, b = lo * h.slope + h.intercept, hi * h.slope + h.intercept
    return v, min(a, b), max(a, b)


def display_float(stored: np.ndarray, h: _Header, voi: tuple[str, Any]) -> np.ndarray:
    """The chain in float64, literally as DICOM PS3.3 C.11.2.1.2 writes it. stored: any shape -> same shape."""
    v, vlo, vhi = _modality_float(stored, h)
    kind, arg = voi
    if kind == "lut":
        lut: _Lut = arg
        idx = np.clip(np.rint(v).astype(np.int64) - lut.first, 0, lut.table.size - 1)
        y = lut.table[idx] / float((1 << lut.bits) - 1)
    elif kind == "window":
        c, w = arg
        if h.voi_function == "SIGMOID":
            y = 1.0 / (1.0 + np.exp(-4.0 * (v - c) / w))
        elif h.voi_function == "LINEAR_EXACT":
            y = np.where(v <= c - w / 2, 0.0, np.where(v > c + w / 2, 1.0, (v - c) / w + 0.5))
        elif w <= 1:  # LINEAR with width 1 is a threshold
            y = (v > c - 0.5).astype(np.float64)
        else:
            lo_edge, hi_edge = c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2
            y = np.where(v <= lo_edge, 0.0, np.where(v > hi_edge, 1.0, (v - (c - 0.5)) / (w - 1) + 0.5))
    else:
        y = (v - vlo) / (vhi - vlo) if vhi > vlo else np.zeros_like(v)
    if h.photometric == "MONOCHROME1":
        y = 1.0 - y
    return y


@dataclasses.dataclass
class _IntAffine:
    """Integers q in [lo, hi] with display value q * scale + offset."""

    q: np.ndarray
    lo: int
    hi: int
    scale: float
    offset: float

    def flip(self) -> _IntAffine:
        """q -> lo + hi - q with the same display values."""
        return _IntAffine(
            self.lo + self.hi - self.q, self.lo, self.hi, -self.scale, self.offset + (self.lo + self.hi) * self.scale
        )

    def shift(self) -> _IntAffine:
        """q -> q - lo (starts at 0), same display values."""
        return _IntAffine(self.q - self.lo, 0, self.hi - self.lo, self.scale, self.offset + self.lo * self.scale)


def display_int(stored: np.ndarray, h: _Header, voi: tuple[str, Any]) -> _IntAffine | None:
    """The chain as integers + affine (see the module docstring), or None when it is not one."""
    if not np.issubdtype(stored.dtype, np.integer):
        return None
    lo, hi = _stored_range(h)
    s = np.clip(stored.astype(np.int64), lo, hi)
    if h.modality_lut is not None:  # integer table: m = LUT[s], value = m
        lut = h.modality_lut
        m = lut.table[np.clip(s - lut.first, 0, lut.table.size - 1)]
        r = _IntAffine(m, int(lut.table.min()), int(lut.table.max()), 1.0, 0.0)
    else:
        r = _IntAffine(s, lo, hi, h.slope, h.intercept)
    kind, arg = voi
    if kind == "lut":
        vlut: _Lut = arg
        if r.scale != round(r.scale) or r.offset != round(r.offset):
            return None  # non-integer modality values index the table only after rounding: use the reference
        idx = np.clip(r.q * int(r.scale) + int(r.offset) - vlut.first, 0, vlut.table.size - 1)
        r = _IntAffine(vlut.table[idx], 0, (1 << vlut.bits) - 1, 1.0 / ((1 << vlut.bits) - 1), 0.0)
    elif kind == "window":
        ab = _window_affine(arg[0], arg[1], h.voi_function)
        if ab is None or r.scale == 0:
            return None
        alpha, beta = r.scale * ab[0], r.offset * ab[0] + ab[1]
        e0, e1 = sorted(((0.0 - beta) / alpha, (1.0 - beta) / alpha))
        qlo, qhi = max(math.ceil(e0 - 1e-9 * abs(e0)), r.lo), min(math.floor(e1 + 1e-9 * abs(e1)), r.hi)
        if qhi <= qlo:
            return None  # window narrower than one stored-value step
        r = _IntAffine(np.clip(r.q, qlo, qhi), qlo, qhi, alpha, beta)
    else:
        v0, v1 = sorted((r.lo * r.scale + r.offset, r.hi * r.scale + r.offset))
        if v1 <= v0:
            return None
        r = _IntAffine(r.q, r.lo, r.hi, r.scale / (v1 - v0), (r.offset - v0) / (v1 - v0))
    if h.photometric == "MONOCHROME1":  # 1 - y
        r = _IntAffine(r.q, r.lo, r.hi, -r.scale, 1.0 - r.offset)
    if r.scale < 0:  # flip the integers so that larger q is always brighter
        r = r.flip()
    r = r.shift()
    if r.hi >= UINT16_LEVELS:
        return None
    return r


# ---------------------------------------------------------------------------------------------
# readers


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("reading DICOM needs pydicom: pip install 'fm_engine[dicom]'") from e
    return pydicom


def read_header(path: str | os.PathLike[str], *, pixels: bool = False) -> Any:
    """The pydicom Dataset; values over 4 KiB (the pixel data) are read on access unless ``pixels``.
    DicomReadError when the file is missing or not DICOM."""
    pydicom = _pydicom()
    path = str(path)
    if not os.path.isfile(path):
        raise DicomReadError(path, "no such file")
    try:
        return pydicom.dcmread(path, defer_size=None if pixels else 4096)
    except Exception as e:  # pydicom raises InvalidDicomError, EOFError, struct errors, ...
        raise DicomReadError(path, f"not a readable DICOM file ({type(e).__name__}: {e})") from e


_META_KEYS = (
    "Modality",
    "ViewPosition",
    "ImageLaterality",
    "PhotometricInterpretation",
    "SeriesInstanceUID",
    "InstanceNumber",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)


def _meta(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in _META_KEYS:
        v = ds.get(k)
        if v is not None and v != "":
            if k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
                out[k] = [float(x) for x in v]
            else:
                out[k] = int(v) if k == "InstanceNumber" else str(v)
    return out


def _decode(ds: Any, path: str, h: _Header) -> np.ndarray:
    """Stored values [T, C, H, W] (pydicom's pixel array, YCbCr converted to RGB)."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except Exception as e:  # missing plugin, truncated data, bad header: pydicom raises many types
        msg = str(e).splitlines()
        detail = " ".join(x.strip() for x in msg[:3])
        if isinstance(e, NotImplementedError | RuntimeError) or "plugin" in detail.lower() or "decod" in detail.lower():
            name = getattr(ts, "name", str(ts))
            raise DicomReadError(
                path,
                f"cannot decode transfer syntax {name} ({ts}): {detail} "
                "(install the plugins: pip install 'fm_engine[dicom]')",
            ) from e
        raise DicomReadError(path, f"pixel data cannot be read ({type(e).__name__}: {detail})") from e
    arr = np.asarray(arr)
    rows, cols = int(ds.Rows), int(ds.Columns)
    try:
        arr = arr.reshape(h.frames, rows, cols, h.channels)
    except ValueError as e:
        raise DicomReadError(
            path, f"pixel array {arr.shape} does not match {h.frames} frames of {rows}x{cols}x{h.channels}"
        ) from e
    return np.ascontiguousarray(arr.transpose(0, 3, 1, 2))


def _to_image(
    stored: np.ndarray, h: _Header, voi: tuple[str, Any], precision: str, path: str, meta: dict[str, Any]
) -> DicomImage:
    r = display_int(stored, h, voi) if precision == "auto" else None
    if r is not None:
        pix = torch.from_numpy(r.q.astype(np.int32)).to(torch.uint16)
        return DicomImage(pix, float(r.scale), float(r.offset), path, meta)
    y = display_float(stored, h, voi).astype(np.float32)
    return DicomImage(torch.from_numpy(np.ascontiguousarray(y)), 1.0, 0.0, path, meta)


def _check_precision(precision: str) -> None:
    if precision not in ("auto", "fp32"):
        raise ValueError(f"precision: expected 'auto' or 'fp32', got {precision!r}")


def read_dicom(
    path: str | os.PathLike[str],
    *,
    voi: VoiChoice = "auto",
    window_index: int = 0,
    precision: str = "auto",
    modalities: Collection[str] | None = None,
) -> DicomImage:
    """Read one DICOM file (single or multi-frame) or a series folder into ``pixels [T, C, H, W]``.

    voi: "auto" | "lut" | "window" | "none" | (center, width); precision: "auto" | "fp32";
    modalities: accepted Modality values (None = any). See the module docstring for the chain.
    Raises DicomReadError (a ValueError) naming the file and the reason.
    """
    _check_precision(precision)
    if os.path.isdir(path):
        return read_series(path, voi=voi, window_index=window_index, precision=precision, modalities=modalities)
    path = str(path)
    ds = read_header(path, pixels=True)
    h = _parse_header(ds, path, modalities)
    v = _resolve_voi(h, voi, window_index, path)
    stored = _decode(ds, path, h)
    return _to_image(stored, h, v, precision, path, _meta(ds))


def _slice_key(ds: Any) -> tuple[float, ...] | None:
    try:
        o = np.asarray([float(x) for x in ds.ImageOrientationPatient], dtype=np.float64)
        p = np.asarray([float(x) for x in ds.ImagePositionPatient], dtype=np.float64)
    except (AttributeError, TypeError, ValueError):
        return None
    if o.size != 6 or p.size != 3:
        return None
    return (float(np.dot(p, np.cross(o[:3], o[3:]))),)


def sort_series(paths: Sequence[str], headers: Sequence[Any]) -> list[int]:
    """Order of the slices: by ImagePositionPatient projected on the slice normal (the cross product of
    ImageOrientationPatient's row and column directions), else by InstanceNumber, else by file name."""
    keys = [_slice_key(h) for h in headers]
    if all(k is not None for k in keys):
        return sorted(range(len(paths)), key=lambda i: (keys[i], paths[i]))
    nums = [h.get("InstanceNumber") for h in headers]
    if all(n is not None for n in nums):
        return sorted(range(len(paths)), key=lambda i: (int(nums[i]), paths[i]))
    return sorted(range(len(paths)), key=lambda i: paths[i])


def read_series(
    folder: str | os.PathLike[str],
    *,
    voi: VoiChoice = "auto",
    window_index: int = 0,
    precision: str = "auto",
    modalities: Collection[str] | None = None,
    series_uid: str | None = None,
) -> DicomImage:
    """Read a folder of single-frame slices into ``pixels [T, C, H, W]`` (T = slices, sorted by
    :func:`sort_series`). Files of other series are rejected unless ``series_uid`` picks one.
    When all slices share the intensity affine the result stays uint16, else it is fp32."""
    _check_precision(precision)
    folder = str(folder)
    files = sorted(str(p) for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DicomReadError(folder, "series folder has no files")
    headers = [read_header(f) for f in files]
    uids = sorted({str(h.get("SeriesInstanceUID", "")) for h in headers})
    if series_uid is not None:
        keep = [i for i, h in enumerate(headers) if str(h.get("SeriesInstanceUID", "")) == series_uid]
        if not keep:
            raise DicomReadError(folder, f"no file of series {series_uid!r} (found {uids})")
        files, headers = [files[i] for i in keep], [headers[i] for i in keep]
    elif len(uids) > 1:
        raise DicomReadError(folder, f"folder holds {len(uids)} series {uids}; pass series_uid to pick one")
    order = sort_series(files, headers)
    images = [
        read_dicom(files[i], voi=voi, window_index=window_index, precision=precision, modalities=modalities)
        for i in order
    ]
    shapes = {tuple(im.pixels.shape[1:]) for im in images}
    if len(shapes) > 1:
        raise DicomReadError(folder, f"slices have different sizes {sorted(shapes)}")
    meta = dict(images[0].meta)
    meta["files"] = [files[i] for i in order]
    if all(im.precision == "uint16" and (im.scale, im.offset) == (images[0].scale, images[0].offset) for im in images):
        return DicomImage(torch.cat([im.pixels for im in images]), images[0].scale, images[0].offset, folder, meta)
    return DicomImage(torch.cat([im.display() for im in images]), 1.0, 0.0, folder, meta)
