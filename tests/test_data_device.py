"""Workers read stored values, the device applies the intensity chain, resize and padding: the result equals
the CPU path (read_dicom -> resize_pad -> collate_frames) within one uint16 unit, for every VOI kind."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset  # noqa: E402
from pydicom.sequence import Sequence  # noqa: E402

from fm_engine.data import DicomFrameDataset, DicomReadError, collate_frames, read_dicom, resize_pad  # noqa: E402
from fm_engine.data.device import (  # noqa: E402
    KIND_FINAL,
    KIND_FP32,
    KIND_UINT16,
    PixelSource,
    collate_stored,
    device_transform,
    read_stored,
    stored_example,
)
from fm_engine.data.synthetic import write_ct_series, write_mammogram, write_mr_cine  # noqa: E402


def shipped(name: str) -> str:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not shipped in this pydicom wheel")
    return path


def cpu_batch(paths, size, **kw):
    """Today's CPU path: every frame of every file, read_dicom -> resize_pad -> collate_frames."""
    items = []
    for p in paths:
        im = read_dicom(p, **kw)
        for t in range(im.pixels.shape[0]):
            items.append(
                {
                    "image": resize_pad(im.pixels[t], size),
                    "scale": torch.tensor(im.scale, dtype=torch.float64),
                    "offset": torch.tensor(im.offset, dtype=torch.float64),
                }
            )
    return collate_frames(items)


def device_batch(paths, size, device, **kw):
    items = []
    for p in paths:
        st = read_stored(p, **kw)
        items += [stored_example(st, t) for t in range(st.stored.shape[0])]
    return device_transform(collate_stored(items), size, device)


def assert_same(cpu, dev):
    """Same dtype, same affine; uint16 within 1 unit, fp32 display values within 1 / 65535 (on the CPU, where
    both run the same interpolation code, exactly equal)."""
    img = dev["image"].cpu()
    if dev["image"].device.type == "cpu":
        assert torch.equal(img, cpu["image"])
    assert img.dtype == cpu["image"].dtype and img.shape == cpu["image"].shape
    assert torch.equal(dev["scale"].cpu(), cpu["scale"]) and torch.equal(dev["offset"].cpu(), cpu["offset"])
    if img.dtype == torch.uint16:
        diff = (img.to(torch.int32) - cpu["image"].to(torch.int32)).abs().max()
        assert int(diff) <= 1
    else:
        torch.testing.assert_close(img, cpu["image"], rtol=0, atol=1 / 65535)


def check(paths, size, device, **kw):
    cpu = cpu_batch(paths, size, **kw)
    dev = device_batch(paths, size, device, **kw)
    assert_same(cpu, dev)
    return cpu, dev


def _modified(tmp_path, src, name, **changes):
    ds = pydicom.dcmread(src)
    for k, v in changes.items():
        if v is None:
            if k in ds:
                delattr(ds, k)
        else:
            setattr(ds, k, v)
    p = tmp_path / name
    ds.save_as(p)
    return str(p)


def _lut_item(n, first, bits, table):
    item = Dataset()
    item.LUTDescriptor = [n, first, bits]
    item.LUTData = table.astype("<u2").tobytes()
    return Sequence([item])


@pytest.mark.parametrize("size", [(64, 64), (49, 40), (200, 150)])
def test_voi_kinds_match_cpu_path(tmp_path, device, size):
    mr, ct = shipped("MR_small.dcm"), shipped("CT_small.dcm")
    table = (np.sqrt(np.arange(4096) / 4095.0) * 4095).astype(np.uint16)
    mlut = (np.arange(4096) * 3 // 2).astype(np.uint16)
    cases = {
        "window": [mr],
        "none_signed_rescale": [ct],
        "mono1": [_modified(tmp_path, mr, "m1.dcm", PhotometricInterpretation="MONOCHROME1")],
        "voi_lut": [_modified(tmp_path, mr, "lut.dcm", VOILUTSequence=_lut_item(4096, 0, 12, table))],
        "sigmoid": [_modified(tmp_path, mr, "sig.dcm", VOILUTFunction="SIGMOID")],
        "linear_exact": [_modified(tmp_path, mr, "lx.dcm", VOILUTFunction="LINEAR_EXACT")],
        "modality_lut": [
            _modified(
                tmp_path,
                mr,
                "mlut.dcm",
                ModalityLUTSequence=_lut_item(4096, 0, 16, mlut),
                RescaleSlope=None,
                RescaleIntercept=None,
                WindowCenter=None,
                WindowWidth=None,
            )
        ],
        "mono1_sigmoid": [
            _modified(tmp_path, mr, "m1s.dcm", PhotometricInterpretation="MONOCHROME1", VOILUTFunction="SIGMOID")
        ],
    }
    kinds = {}
    for name, paths in cases.items():
        check(paths, size, device)
        kinds[name] = read_stored(paths[0]).kind
    assert kinds["sigmoid"] == KIND_FP32 and kinds["window"] == KIND_UINT16 and kinds["voi_lut"] == KIND_UINT16
    # explicit windows and the options of read_dicom
    check([ct], size, device, voi=(40.0, 400.0))
    check([ct], size, device, voi=(40.0, 400.0), precision="fp32")
    check([mr], size, device, voi="none")


def test_multiframe_series_mammogram_and_mixed_batch(tmp_path, device):
    mg = write_mammogram(tmp_path / "mg.dcm", size=(96, 64), view="MLO", bits_stored=14, seed=3)
    mg2 = write_mammogram(tmp_path / "mg2.dcm", size=(80, 60), view="CC", seed=4)
    cine = write_mr_cine(tmp_path / "cine.dcm", frames=3, size=(24, 20))
    ct = write_ct_series(tmp_path / "ct", slices=2, size=(32, 32), seed=1)
    check([mg, cine, *ct], (48, 40), device)  # all uint16, three sizes: padded to the batch maximum
    sig = _modified(tmp_path, shipped("MR_small.dcm"), "sig.dcm", VOILUTFunction="SIGMOID")
    _, dev = check([mg, sig, mg2], (48, 40), device)  # mixed: every image becomes fp32 display values
    assert dev["image"].dtype == torch.float32 and bool((dev["scale"] == 1).all())
    b = collate_stored([stored_example(read_stored(p), 0) for p in (mg, mg2)])
    assert b["stored"].shape == (2, 1, 96, 64) and b["sizes"].tolist() == [[96, 64], [80, 60]]
    assert b["lut"].numel() == 2**14 + 2**12  # two distinct tables (14-bit and 12-bit)
    pad = b["stored"].to(torch.int32)
    assert int(pad[1, :, 80:, :].abs().sum()) == 0 and int(pad[1, :, :, 60:].abs().sum()) == 0


def test_shared_table_is_sent_once(tmp_path):
    a = write_mammogram(tmp_path / "a.dcm", size=(32, 24), seed=1)
    b = write_mammogram(tmp_path / "b.dcm", size=(32, 24), seed=2)
    batch = collate_stored([stored_example(read_stored(p), 0) for p in (a, b)])
    assert batch["lut"].numel() == 4096 and batch["lut_base"].tolist() == [0, 0]


def test_rgb_8bit_and_32bit_final_path(tmp_path, device):
    check([shipped("SC_rgb_rle.dcm")], (64, 64), device)
    check([shipped("SC_rgb_small_odd.dcm")], (8, 8), device)
    # 32-bit stored values: no table fits, the worker applies the chain (KIND_FINAL)
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    arr = ds.pixel_array.astype(np.uint32) * 70000
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
    ds.PixelData = arr.astype("<u4").tobytes()
    del ds.WindowCenter, ds.WindowWidth
    p = tmp_path / "u32.dcm"
    ds.save_as(p)
    assert read_stored(p).kind == KIND_FINAL
    check([str(p)], (40, 40), device)
    ds.WindowCenter, ds.WindowWidth = 600 * 70000, 30000  # 30,000 stored values inside: uint16 + affine
    ds.save_as(p)
    assert read_stored(p).precision == "uint16"
    check([str(p)], (40, 40), device)


def test_dataset_stored_mode_equals_default_mode(tmp_path, device):
    write_mammogram(tmp_path / "a.dcm", size=(64, 48), view="CC", seed=1)
    write_mr_cine(tmp_path / "cine.dcm", frames=2, size=(16, 16))
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    cpu_ds = DicomFrameDataset(tmp_path, (32, 24), progress=False)
    st_ds = DicomFrameDataset(tmp_path, (32, 24), progress=False, stored=True)
    n = len(cpu_ds)
    cpu = collate_frames([cpu_ds[i] for i in range(n)])
    dev = device_transform(collate_stored([st_ds[i] for i in range(n)]), (32, 24), device)
    assert_same(cpu, dev)
    assert torch.equal(dev["label"].cpu(), cpu["label"]) and torch.equal(dev["index"].cpu(), cpu["index"])
    # through a DataLoader with a worker process and pinned memory
    loader = torch.utils.data.DataLoader(st_ds, batch_size=n, num_workers=1, collate_fn=collate_stored)
    assert_same(cpu, device_transform(next(iter(loader)), (32, 24), device))


def test_worker_batches_in_reused_buffers_equal_fresh_ones(tmp_path):
    write_mammogram(tmp_path / "a.dcm", size=(64, 48), view="CC", seed=1)
    write_mr_cine(tmp_path / "cine.dcm", frames=2, size=(16, 16))
    ds = DicomFrameDataset(tmp_path, (32, 24), progress=False, stored=True)
    order = [i % len(ds) for i in range(36)]  # 18 batches of 2 (sizes mixed: padded), 9 per worker
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, sampler=order, num_workers=2, collate_fn=functools.partial(collate_stored, ring=ds.ring)
    )
    n = 0
    for batch in loader:
        want = collate_stored([ds[int(i)] for i in batch["index"]])  # fresh memory, main process
        assert want.keys() == batch.keys() - {"ring"} and int(batch["ring"][0]) in (0, 1)
        for k in want:
            assert torch.equal(torch.as_tensor(want[k]), torch.as_tensor(batch[k])), k
        ds.release(batch)  # its worker may now refill the buffer
        n += 1
    reused, fresh = ds.ring.counts
    slots = ds.ring.state.shape[1]
    assert n == 18 and reused + fresh == 18 and fresh <= 2 * slots and reused >= 18 - 2 * slots


def test_stored_values_are_not_transformed_in_the_worker(tmp_path):
    path = write_mammogram(tmp_path / "a.dcm", size=(64, 48), seed=5)  # pixel data over 4 KiB: not in the header
    st = read_stored(path)
    raw = pydicom.dcmread(path).pixel_array
    # uncompressed: the worker has read the header only; the batch reads the pixel bytes once, unchanged
    assert isinstance(st.stored, PixelSource) and st.stored.dtype == torch.uint16 and st.stored.shape == (1, 1, 64, 48)
    assert np.array_equal(st.stored[0].load()[0].to(torch.int32).numpy(), raw.astype(np.int32))
    batch = collate_stored([stored_example(st, 0)])
    assert np.array_equal(batch["stored"][0, 0].to(torch.int32).numpy(), raw.astype(np.int32))
    # a file whose pixel data is cut short is found when the worker reads it, not in the batch
    data = open(path, "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[:-10])
    with pytest.raises(DicomReadError, match=r"cut\.dcm"):
        read_stored(tmp_path / "cut.dcm")
    assert set(st.seconds) == {"read", "decode"}


@pytest.mark.parametrize("shape", [(40, 30), (64, 48)])  # pixel data read with the header / read by the batch
def test_native_pixel_data_high_bits_cleared_on_device(tmp_path, device, shape):
    # uncompressed 12-bit data whose unused high bits are set (allowed by DICOM): the worker passes the file's
    # bytes through untouched and the device clears the bits, as pydicom's decoder does for the CPU path
    path = write_mammogram(tmp_path / "a.dcm", size=shape, seed=6)
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array.astype(np.uint16) | np.uint16(0xA000)
    ds.PixelData = arr.tobytes()
    p = tmp_path / "hi.dcm"
    ds.save_as(p)
    st = read_stored(p)
    values = st.stored[0].load() if isinstance(st.stored, PixelSource) else st.stored[0]
    assert isinstance(st.stored, PixelSource) == (shape == (64, 48))
    assert st.mask == 0x0FFF and int(values.to(torch.int32).min()) >= 0xA000
    check([str(p)], shape, device)
    check([str(p)], (20, 16), device)
    check([str(p)], (20, 16), device, precision="fp32")
