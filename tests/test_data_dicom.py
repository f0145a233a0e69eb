"""DICOM intensity chain, layouts and error cases, on pydicom's shipped test files and synthetic files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from fm_engine.data import DicomFrameDataset, DicomReadError, read_dicom  # noqa: E402
from fm_engine.data.dicom import _parse_header, _resolve_voi, display_float, display_int  # noqa: E402
from fm_engine.data.synthetic import (  # noqa: E402
    mammogram_brightness,
    write_ct_series,
    write_mammogram,
    write_mr_cine,
)


def shipped(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped in this pydicom wheel")
    return path


def test_ct_rescale_uses_known_range_not_image_minmax():
    # CT_small: int16 stored values, RescaleSlope 1 / Intercept -1024, no window -> scaled by the range
    # that BitsStored 16 signed allows after rescale, not by the image's own min / max
    path = shipped("CT_small.dcm")
    ds = pydicom.dcmread(path)
    stored = ds.pixel_array.astype(np.float64)
    hu = stored * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    lo, hi = -32768 * 1.0 + float(ds.RescaleIntercept), 32767.0 + float(ds.RescaleIntercept)
    expected = (hu - lo) / (hi - lo)
    im = read_dicom(path)
    assert im.pixels.shape == (1, 1, int(ds.Rows), int(ds.Columns))
    assert im.precision == "uint16"
    np.testing.assert_allclose(im.display()[0, 0].double().numpy(), expected, rtol=0, atol=1e-6)
    # an explicit soft-tissue window in HU
    c, w = 40.0, 400.0
    win = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    imw = read_dicom(path, voi=(c, w))
    inside = (win > 0) & (win < 1)
    np.testing.assert_allclose(imw.display()[0, 0].double().numpy()[inside], win[inside], atol=1e-6)
    assert np.abs(imw.display()[0, 0].double().numpy() - win).max() <= imw.scale + 1e-6


def test_mr_window_from_file_and_fp32_path_agree():
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    v = ds.pixel_array.astype(np.float64)
    expected = np.where(
        v <= c - 0.5 - (w - 1) / 2, 0, np.where(v > c - 0.5 + (w - 1) / 2, 1, (v - (c - 0.5)) / (w - 1) + 0.5)
    )
    im = read_dicom(path)
    ref = read_dicom(path, precision="fp32")
    assert im.precision == "uint16" and ref.precision == "fp32"
    assert (im.scale, im.offset) != (1.0, 0.0)
    np.testing.assert_allclose(ref.pixels[0, 0].double().numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(im.display().numpy(), ref.pixels.numpy(), atol=im.scale + 1e-6)
    # no VOI: the 16-bit signed range
    none = read_dicom(path, voi="none").display()[0, 0].double().numpy()
    np.testing.assert_allclose(none, (v + 32768) / 65535, atol=1e-6)


def test_monochrome1_inverted_once(tmp_path):
    # no MONOCHROME1 file ships with pydicom: relabel MR_small and compare with its MONOCHROME2 reading
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    ds.PhotometricInterpretation = "MONOCHROME1"
    p1 = tmp_path / "mono1.dcm"
    ds.save_as(p1)
    m2, m1 = read_dicom(path), read_dicom(p1)
    np.testing.assert_allclose(m1.display().numpy(), 1.0 - m2.display().numpy(), atol=1e-6)
    assert m1.scale > 0  # integers were flipped: larger stored value -> darker, larger q -> brighter
    np.testing.assert_allclose(
        read_dicom(p1, precision="fp32").pixels.numpy(), 1.0 - m2.display().numpy(), atol=m2.scale + 1e-6
    )


def test_synthetic_mammogram_keeps_16_bit_steps(tmp_path):
    path = write_mammogram(tmp_path / "mg.dcm", size=(96, 64), view="MLO", bits_stored=14, seed=3)
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.Modality == "MG"
    im = read_dicom(path, voi="none")
    assert im.pixels.dtype == torch.uint16 and im.pixels.shape == (1, 1, 96, 64)
    stored = ds.pixel_array.astype(np.int64)
    # two stored values that differ by 1 give different stem inputs (no 8-bit quantisation)
    a, b = np.unravel_index(np.argmin(stored), stored.shape), np.unravel_index(np.argmax(stored), stored.shape)
    arr = np.array(stored)
    arr[0, 0], arr[0, 1] = 5000, 5001
    ds.PixelData = arr.astype("<u2").tobytes()
    p2 = tmp_path / "mg2.dcm"
    ds.save_as(p2)
    im2 = read_dicom(p2, voi="none")
    q = im2.pixels[0, 0]
    assert int(q[0, 0]) - int(q[0, 1]) == 1  # MONOCHROME1: one stored step darker is one integer brighter
    d = im2.display()[0, 0]
    assert float(d[0, 0] - d[0, 1]) == pytest.approx(1 / (2**14 - 1), rel=1e-4)
    assert len(torch.unique(im.pixels)) == len(np.unique(stored))
    assert im.display()[0, 0][a].item() > im.display()[0, 0][b].item()
    # with the file's window, the display matches the designed brightness up to the added noise
    shown = read_dicom(path).display()[0, 0].double().numpy()
    design = mammogram_brightness((96, 64), "MLO", 3)
    assert np.abs(shown - design).mean() < 0.01
    w1 = float(pydicom.dcmread(path).WindowWidth[1])
    assert read_dicom(path, voi="window", window_index=1).scale == pytest.approx(1 / (w1 - 1), rel=1e-12)


def test_ct_series_sorted_along_normal(tmp_path):
    paths = write_ct_series(tmp_path / "ct", slices=5, size=(32, 32), seed=1)
    im = read_dicom(tmp_path / "ct")
    assert im.pixels.shape == (5, 1, 32, 32) and im.precision == "uint16"
    assert im.meta["files"] == paths  # file names and InstanceNumber run the other way
    first = im.pixels[:, 0, 0, 0].to(torch.int64)
    assert torch.equal(first - first[0], torch.arange(5))  # stored 1000 + k, in the window
    hu = np.array([1000 + k - 1024 for k in range(5)], dtype=np.float64)
    expected = (hu - 39.5) / 399 + 0.5
    np.testing.assert_allclose(im.display()[:, 0, 0, 0].double().numpy(), expected, atol=1e-6)


def test_series_without_geometry_falls_back_to_instance_number(tmp_path):
    paths = write_ct_series(tmp_path / "ct", slices=3, size=(16, 16))
    for p in paths:
        ds = pydicom.dcmread(p)
        del ds.ImagePositionPatient
        ds.save_as(p)
    im = read_dicom(tmp_path / "ct")
    assert im.meta["files"] == paths[::-1]  # InstanceNumber = slices - k


def test_mr_cine_is_t_c_h_w(tmp_path):
    path = write_mr_cine(tmp_path / "cine.dcm", frames=6, size=(24, 20))
    im = read_dicom(path)
    assert im.pixels.shape == (6, 1, 24, 20)
    t = im.pixels[:, 0, 0, 0].to(torch.int64)
    assert torch.equal(t - t[0], torch.arange(6))


def _header(path):
    ds = pydicom.dcmread(path)
    return ds, _parse_header(ds, str(path), None)


def test_voi_lut_table_and_sigmoid(tmp_path):
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    table = (np.sqrt(np.arange(4096) / 4095.0) * 4095).astype(np.uint16)  # a nonlinear table
    item.LUTData = table.astype("<u2").tobytes()
    ds.VOILUTSequence = Sequence([item])
    p = tmp_path / "lut.dcm"
    ds.save_as(p)
    im = read_dicom(p)  # auto picks the table
    v = np.clip(ds.pixel_array.astype(np.int64), 0, 4095)
    np.testing.assert_allclose(im.display()[0, 0].double().numpy(), table[v] / 4095.0, atol=1e-6)
    assert im.precision == "uint16"  # table outputs are integers
    del ds.VOILUTSequence
    ds.VOILUTFunction = "SIGMOID"
    p2 = tmp_path / "sig.dcm"
    ds.save_as(p2)
    sig = read_dicom(p2)
    assert sig.precision == "fp32"  # nonlinear and not a table: no affine of integers exists
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = 1 / (1 + np.exp(-4 * (ds.pixel_array.astype(np.float64) - c) / w))
    np.testing.assert_allclose(sig.pixels[0, 0].double().numpy(), expected, atol=1e-6)


def test_int_path_matches_reference_on_random_headers():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(20):
        bits = int(rng.integers(8, 17))
        signed = bool(rng.integers(0, 2))
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        stored = rng.integers(lo, hi + 1, size=(1, 1, 7, 5))
        ds = pydicom.Dataset()
        ds.PixelData = b"\0"
        ds.PhotometricInterpretation = str(rng.choice(["MONOCHROME1", "MONOCHROME2"]))
        ds.SamplesPerPixel, ds.BitsStored, ds.PixelRepresentation = 1, bits, int(signed)
        ds.RescaleSlope = str(float(rng.choice([1.0, 0.5, 2.0, -1.0])))
        ds.RescaleIntercept = str(int(rng.integers(-1024, 1024)))
        ds.WindowCenter = f"{rng.uniform(lo, hi):.6g}"
        ds.WindowWidth = f"{rng.uniform(10, hi - lo):.6g}"
        ds.VOILUTFunction = str(rng.choice(["LINEAR", "LINEAR_EXACT"]))
        h = _parse_header(ds, "random", None)
        for voi in ("auto", "none"):
            v = _resolve_voi(h, voi, 0, "random")
            ref = display_float(stored, h, v)
            r = display_int(stored, h, v)
            if r is None:
                continue
            got = r.q * r.scale + r.offset
            assert r.q.min() >= 0 and r.hi < 65536 and r.scale > 0
            step = abs(r.scale)
            assert np.abs(got - ref).max() <= step + 1e-9
            inside = (ref > step) & (ref < 1 - step)
            np.testing.assert_allclose(got[inside], ref[inside], atol=1e-9)
            checked += 1
    assert checked >= 30  # the integer path applied to (nearly) every random header


@pytest.mark.parametrize(
    "name,reason",
    [
        ("MR_truncated.dcm", "pixel data cannot be read"),
        ("rtplan.dcm", "no pixel data"),
        ("no_meta.dcm", "not a readable DICOM file"),
        ("examples_palette.dcm", "PALETTE COLOR"),
    ],
)
def test_bad_shipped_files_name_file_and_reason(name, reason):
    path = shipped(name)
    with pytest.raises(DicomReadError) as e:
        read_dicom(path)
    assert isinstance(e.value, ValueError)
    assert e.value.path == path and reason in str(e.value) and path in str(e.value)


def test_unsupported_transfer_syntax_and_wrong_modality(tmp_path):
    path = shipped("MR_small.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder exists
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
    p = tmp_path / "mpeg.dcm"
    ds.save_as(p, enforce_file_format=True)
    with pytest.raises(DicomReadError, match="cannot decode transfer syntax"):
        read_dicom(p)
    with pytest.raises(DicomReadError, match="modality 'MR' is not one of"):
        read_dicom(path, modalities=["MG"])
    # JPEG Extended 12-bit needs the libjpeg plugin; without it the error names the transfer syntax
    jpeg = shipped("JPEG-lossy.dcm")
    try:
        pydicom.dcmread(jpeg).pixel_array
        decodable = True
    except Exception:
        decodable = False
    if decodable:
        assert read_dicom(jpeg).pixels.shape[-2:] == (1024, 256)
    else:
        with pytest.raises(DicomReadError, match="JPEG Extended"):
            read_dicom(jpeg)


def test_dataset_skips_and_counts_bad_files(tmp_path):
    write_mammogram(tmp_path / "a.dcm", size=(64, 48), view="CC", seed=1)
    write_mammogram(tmp_path / "b.dcm", size=(64, 48), view="MLO", seed=2)
    write_mr_cine(tmp_path / "cine.dcm", frames=3, size=(16, 16))
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    ds.PixelData = ds.PixelData[:100]  # header fine, pixels truncated: found only when read
    ds.save_as(tmp_path / "trunc.dcm")
    data = DicomFrameDataset(tmp_path, (32, 24), progress=False)
    assert len(data.skipped_files) == 1 and data.skipped_files[0][0].endswith("junk.dcm")
    assert len(data) == 2 + 3 + 1
    items = [data[i] for i in range(len(data))]
    assert sum(int(it["skipped"]) for it in items) == 1
    assert all(it["image"].shape == (1, 32, 24) for it in items)
    with pytest.raises(DicomReadError, match=r"junk\.dcm"):
        DicomFrameDataset(tmp_path, (32, 24), on_error="raise", progress=False)
    mg = DicomFrameDataset(tmp_path, (32, 24), modalities=["MG"], label_tag="ViewPosition", progress=False)
    assert mg.classes == ["CC", "MLO"] and len(mg.skipped_files) == 2  # junk + the MR cine
