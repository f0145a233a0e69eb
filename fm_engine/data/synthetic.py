"""Synthetic DICOM files for tests and the demo job (pydicom is imported inside the functions).

* :func:`write_mammogram`: a mammogram-like MG image, MONOCHROME1 uint16 (BitsStored 12 by default),
  3072x2304 by default, with RescaleSlope/Intercept and two WindowCenter/WindowWidth pairs; CC or MLO view
  (MLO adds a pectoral muscle in the upper chest-wall corner), so ViewPosition is a label for the probe.
* :func:`write_ct_series`: a CT series folder, signed int16 with RescaleIntercept, one file per slice;
  file names and InstanceNumber run *against* the slice position, so only the geometric sort is right.
  Stored pixel (0, 0) of slice k (in position order) is ``1000 + k``.
* :func:`write_mr_cine`: a multi-frame MR cine (2D+T), uint16 MONOCHROME2 with a window; stored pixel (0, 0)
  of frame t is ``100 + t``.
* :func:`write_demo_dataset`: a folder of mammograms with alternating views.

Every generator is deterministic in its ``seed``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.2"  # Digital Mammography X-Ray Image Storage - For Presentation
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
MR_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.4"


def _uid(*parts: Any) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _dataset(modality: str, sop_class: str, uid_parts: tuple[Any, ...], series_uid: str) -> Any:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = _uid("sop", *uid_parts)
    ds.StudyInstanceUID = _uid("study", series_uid)
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = "SYNTHETIC"
    ds.PatientName = "Synthetic^Phantom"
    ds.SamplesPerPixel = 1
    return ds


def _set_pixels(ds: Any, stored: np.ndarray, bits_stored: int, signed: bool, photometric: str) -> None:
    """stored: [H, W] or [T, H, W] integers."""
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(stored.shape[-2]), int(stored.shape[-1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    arr = stored.astype("<i2" if signed else "<u2")
    if stored.ndim == 3:
        ds.NumberOfFrames = int(stored.shape[0])
    ds.PixelData = arr.tobytes()


def _smooth_noise(shape: tuple[int, int], cells: tuple[int, int], gen: torch.Generator) -> np.ndarray:
    """Smooth random field in [0, 1] of ``shape``, made of ``cells`` random values upsampled bicubically."""
    z = torch.rand((1, 1, *cells), generator=gen, dtype=torch.float32)
    up = F.interpolate(z, size=shape, mode="bicubic", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min() + 1e-12)
    return up.numpy().astype(np.float64)


def mammogram_brightness(size: tuple[int, int], view: str, seed: int) -> np.ndarray:
    """Display brightness [H, W] in [0, 1] (1 = white) of a synthetic breast: a half ellipse against the
    chest wall (column 0) with smooth fibroglandular texture, dark air around it, and for MLO a bright
    pectoral triangle in the upper chest-wall corner."""
    h, w = size
    gen = torch.Generator().manual_seed(seed)
    r = torch.rand(4, generator=gen).numpy()
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    cy, ay, ax = 0.5 + 0.08 * (r[0] - 0.5), 0.38 + 0.08 * r[1], 0.62 + 0.2 * r[2]
    d = ((yy - cy) / ay) ** 2 + (xx / ax) ** 2
    breast = np.clip((1.0 - d) * 12.0, 0.0, 1.0)  # soft skin edge
    tissue = _smooth_noise((h, w), (max(h // 64, 4), max(w // 64, 4)), gen)
    fine = _smooth_noise((h, w), (max(h // 8, 8), max(w // 8, 8)), gen)
    img = 0.03 + breast * (0.30 + 0.35 * tissue + 0.06 * fine)
    if view == "MLO":
        pect = np.clip((0.55 - (yy / 0.55 + xx / (0.25 + 0.1 * r[3]))) * 20.0, 0.0, 1.0)
        img = np.maximum(img, 0.78 * pect)
    elif view != "CC":
        raise ValueError(f"view: expected 'CC' or 'MLO', got {view!r}")
    return np.clip(img, 0.0, 1.0)


def write_mammogram(
    path: str | os.PathLike[str],
    *,
    size: tuple[int, int] = (3072, 2304),
    view: str = "CC",
    laterality: str = "L",
    bits_stored: int = 12,
    seed: int = 0,
    series_uid: str | None = None,
) -> str:
    """Write one synthetic mammogram (MONOCHROME1, rescale 1/0, windows (c, w) and (c, w/2)).

    The stored values are chosen so that the file's first window shows :func:`mammogram_brightness`
    (plus quantum noise). Returns the path."""
    h, w = size
    if h < 8 or w < 8:
        raise ValueError(f"size: at least 8x8, got {size}")
    levels = 1 << bits_stored
    center, width = levels / 2, levels * 0.8
    bright = mammogram_brightness(size, view, seed)
    if laterality == "R":
        bright = bright[:, ::-1]
    elif laterality != "L":
        raise ValueError(f"laterality: expected 'L' or 'R', got {laterality!r}")
    rng = np.random.default_rng(seed)
    # MONOCHROME1: the first window's display value is 1 - window(v); solve window(v) = 1 - bright
    v = (center - 0.5) + ((1.0 - bright) - 0.5) * (width - 1)
    v = v + rng.normal(0.0, levels * 0.002, size=v.shape)
    stored = np.clip(np.rint(v), 0, levels - 1)
    series_uid = series_uid or _uid("mg-series", seed)
    ds = _dataset("MG", MG_SOP_CLASS, ("mg", seed, view, laterality), series_uid)
    ds.ViewPosition = view
    ds.ImageLaterality = laterality
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.RescaleType = "US"
    ds.WindowCenter = [f"{center:g}", f"{center:g}"]
    ds.WindowWidth = [f"{width:g}", f"{width / 2:g}"]
    ds.PixelSpacing = ["0.07", "0.07"]
    _set_pixels(ds, stored, bits_stored, signed=False, photometric="MONOCHROME1")
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def write_ct_series(
    folder: str | os.PathLike[str], *, slices: int = 8, size: tuple[int, int] = (64, 64), seed: int = 0
) -> list[str]:
    """Write a CT series (one file per slice; HU = stored - 1024, window 40/400). Returns the paths in
    slice-position order. File names and InstanceNumber are in the reverse order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    series_uid = _uid("ct-series", seed)
    paths = []
    for k in range(slices):
        z = -40.0 + 2.5 * k
        body = (yy / 0.8) ** 2 + (xx / 0.9) ** 2 < 1.0
        radius = 0.2 + 0.3 * k / max(slices - 1, 1)
        organ = yy**2 + xx**2 < radius**2
        hu: np.ndarray = np.full(size, -1000.0)
        hu[body] = 40.0
        hu[organ] = 120.0
        hu = hu + rng.normal(0, 10, size)
        stored = np.rint(hu + 1024.0)
        stored[0, 0] = 1000 + k
        ds = _dataset("CT", CT_SOP_CLASS, ("ct", seed, k), series_uid)
        ds.InstanceNumber = slices - k
        ds.ImagePositionPatient = ["-100", "-100", f"{z:g}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.SliceThickness = "2.5"
        ds.PixelSpacing = ["0.8", "0.8"]
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "-1024"
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        _set_pixels(ds, stored, 16, signed=True, photometric="MONOCHROME2")
        p = folder / f"slice_{slices - 1 - k:03d}.dcm"
        ds.save_as(str(p), enforce_file_format=True)
        paths.append(str(p))
    return paths


def write_mr_cine(
    path: str | os.PathLike[str], *, frames: int = 12, size: tuple[int, int] = (64, 64), seed: int = 0
) -> str:
    """Write a multi-frame MR cine (a disk whose radius beats over the frames), uint16, BitsStored 12,
    MONOCHROME2, window 1000/2000. Returns the path."""
    h, w = size
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    stack = np.empty((frames, h, w))
    for t in range(frames):
        radius = 0.35 + 0.15 * np.sin(2 * np.pi * t / frames)
        img = np.where(yy**2 + xx**2 < radius**2, 1600.0, 300.0) + rng.normal(0, 20, size)
        img[0, 0] = 100 + t
        stack[t] = img
    stack = np.clip(np.rint(stack), 0, 4095)
    ds = _dataset("MR", MR_SOP_CLASS, ("mr", seed), _uid("mr-series", seed))
    ds.WindowCenter = "1000"
    ds.WindowWidth = "2000"
    ds.FrameTime = "40"
    _set_pixels(ds, stack, 12, signed=False, photometric="MONOCHROME2")
    ds.save_as(str(path), enforce_file_format=True)
    return str(path)


def write_demo_dataset(
    folder: str | os.PathLike[str],
    *,
    count: int = 16,
    size: tuple[int, int] = (3072, 2304),
    seed: int = 0,
    progress: bool = True,
) -> list[str]:
    """Write ``count`` mammograms (views alternate CC / MLO, laterality alternates every two) to ``folder``."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in tqdm(range(count), desc="synthetic DICOM", unit="file", disable=count < 8 or not progress, leave=False):
        view = "CC" if i % 2 == 0 else "MLO"
        lat = "L" if (i // 2) % 2 == 0 else "R"
        paths.append(
            write_mammogram(folder / f"mg_{i:05d}.dcm", size=size, view=view, laterality=lat, seed=seed * 100003 + i)
        )
    return paths
