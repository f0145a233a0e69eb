"""Compressed transfer syntaxes: lossless ones read exactly as the uncompressed file, lossy ones exactly as
pydicom's own decode of the same file; the worker + device path equals the CPU path on every one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import (  # noqa: E402
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from fm_engine.data import read_dicom  # noqa: E402
from fm_engine.data.device import PixelSource, read_stored  # noqa: E402
from fm_engine.data.synthetic import write_ct_series, write_mammogram, write_mr_cine  # noqa: E402
from tests.test_data_device import check  # noqa: E402

SIZE = (40, 32)


def shipped(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped in this pydicom wheel")
    return path


def stored_values(path) -> np.ndarray:
    st = read_stored(path)
    x = st.stored.load() if isinstance(st.stored, PixelSource) else st.stored
    return x.to(torch.int32).numpy() if x.dtype == torch.uint16 else x.numpy().astype(np.int64)


def pydicom_decode(path) -> np.ndarray:
    """pydicom's pixel_array as [T, C, H, W] int64."""
    ds = pydicom.dcmread(path)
    t, c = int(ds.get("NumberOfFrames", 1) or 1), int(ds.SamplesPerPixel)
    arr = np.asarray(ds.pixel_array).reshape(t, int(ds.Rows), int(ds.Columns), c)
    return arr.transpose(0, 3, 1, 2).astype(np.int64)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    return {
        "mg12": write_mammogram(d / "mg.dcm", size=(64, 48), view="MLO", seed=2),  # MONOCHROME1, 12 bits
        "mg16": write_mammogram(d / "mg16.dcm", size=(48, 40), view="CC", bits_stored=16, seed=3),
        "ct": write_ct_series(d / "ct", slices=1, size=(32, 32), seed=1)[0],  # signed 16 bits, rescale
        "cine": write_mr_cine(d / "cine.dcm", frames=3, size=(48, 40)),  # multi-frame
    }


def _compress(src, dst, uid, **kw):
    ds = pydicom.dcmread(src)
    ds.compress(uid, **kw)
    ds.save_as(dst, enforce_file_format=True)
    return str(dst)


def _deflate(src, dst):
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(dst, enforce_file_format=True)
    return str(dst)


def _same_as_source(src, path, device):
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID != pydicom.dcmread(src).file_meta.TransferSyntaxUID
    a, b = read_dicom(src), read_dicom(path)
    assert torch.equal(a.pixels.to(torch.int32), b.pixels.to(torch.int32))
    assert (a.scale, a.offset) == (b.scale, b.offset)
    assert np.array_equal(stored_values(path), pydicom_decode(src))
    check([path], SIZE, device)


@pytest.mark.parametrize("name", ["mg12", "mg16", "ct", "cine"])
def test_lossless_written_by_pydicom(sources, tmp_path, device, name):
    src = sources[name]
    files = {
        "rle": _compress(src, tmp_path / "rle.dcm", RLELossless),
        "deflate": _deflate(src, tmp_path / "dfl.dcm"),
        "j2k": _compress(src, tmp_path / "j2k.dcm", JPEG2000Lossless, encoding_plugin="pylibjpeg"),
    }
    pytest.importorskip("jpeg_ls")  # pyjpegls encodes JPEG-LS
    files["jpegls"] = _compress(src, tmp_path / "jls.dcm", JPEGLSLossless, encoding_plugin="pyjpegls")
    for kind, path in files.items():
        assert not isinstance(read_stored(path).stored, PixelSource), kind  # the decoder ran in the worker
        _same_as_source(src, path, device)


@pytest.mark.parametrize("name", ["mg12", "ct"])
def test_lossy_equal_pydicom_decode(sources, tmp_path, device, name):
    src = sources[name]
    files = {
        "j2k_lossy": _compress(src, tmp_path / "j2k.dcm", JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[20]),
    }
    pytest.importorskip("jpeg_ls")
    files["jpegls_near"] = _compress(
        src, tmp_path / "jls.dcm", JPEGLSNearLossless, encoding_plugin="pyjpegls", jls_error=3
    )
    for kind, path in files.items():
        dec = pydicom_decode(path)
        assert not np.array_equal(dec, pydicom_decode(src)), kind  # really lossy
        assert np.array_equal(stored_values(path), dec), kind
        check([path], SIZE, device)


def test_jpeg_files_shipped_with_pydicom(device):
    # JPEG baseline (8-bit YBR), extended (12-bit grey) and lossless (process 14, SV1): pydicom cannot encode
    # these; its wheel ships examples
    base, ext, ll = shipped("SC_rgb_jpeg_dcmtk.dcm"), shipped("JPGExtended.dcm"), shipped("SC_rgb_jpeg_gdcm.dcm")
    assert pydicom.dcmread(base).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert pydicom.dcmread(ext).file_meta.TransferSyntaxUID == JPEGExtended12Bit
    assert pydicom.dcmread(ll).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    for path in (base, ext):
        assert np.array_equal(stored_values(path), pydicom_decode(path))
        check([path], (64, 48), device)
    # lossless: the same picture as the RLE (lossless) copy of it that pydicom also ships
    rle = shipped("SC_rgb_rle.dcm")
    assert np.array_equal(stored_values(ll), stored_values(rle))
    check([ll], (64, 48), device)
