"""Resizing / padding and the batched augmentations keep integers and aspect ratio."""

from __future__ import annotations

import pytest
import torch

from fm_engine.data import AugmentConfig, augment_batch, parse_size, resize_pad, stem_inputs
from fm_engine.data.transforms import fit_size


def test_parse_size():
    assert parse_size("3072x2304") == (3072, 2304)
    assert parse_size([512, 384]) == (512, 384)
    with pytest.raises(ValueError, match="size"):
        parse_size("3072")


def test_resize_pad_keeps_aspect_and_integers():
    img = torch.randint(0, 65536, (2, 1, 60, 30), dtype=torch.int32).to(torch.uint16)
    out = resize_pad(img, (40, 40))
    assert out.dtype == torch.uint16 and out.shape == (2, 1, 40, 40)
    nh, nw = fit_size(60, 30, (40, 40))
    assert (nh, nw) == (40, 20)
    left = (40 - nw) // 2
    assert int(out[..., :left].to(torch.int32).abs().sum()) == 0  # padding value 0
    assert int(out[..., left + nw :].to(torch.int32).abs().sum()) == 0
    assert int(out[..., left : left + nw].to(torch.int32).amax()) > 0
    # same size: untouched (bit-exact integers)
    same = resize_pad(img, (60, 30))
    assert torch.equal(same.to(torch.int32), img.to(torch.int32))
    # a constant image stays exactly that constant after resampling
    const = torch.full((1, 1, 64, 32), 40001, dtype=torch.int32).to(torch.uint16)
    r = resize_pad(const, (16, 16)).to(torch.int32)
    assert set(r.unique().tolist()) == {0, 40001}


def test_augment_flips_integers_and_folds_jitter_into_affine():
    b = 64
    img = torch.randint(0, 65536, (b, 1, 8, 6), dtype=torch.int32).to(torch.uint16)
    scale = torch.full((b,), 1 / 65535, dtype=torch.float64)
    offset = torch.zeros(b, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    out, s, o = augment_batch(img, scale, offset, AugmentConfig(0.5, 0.5, 0.1, 0.1), gen)
    assert out.dtype == torch.uint16
    src, dst = img.to(torch.int32), out.to(torch.int32)
    kinds = set()
    for i in range(b):
        for k, f in enumerate((lambda x: x, lambda x: x.flip(-1), lambda x: x.flip(-2), lambda x: x.flip(-1, -2))):
            if torch.equal(dst[i], f(src[i])):
                kinds.add(k)
                break
        else:
            raise AssertionError(f"example {i} is not a flip of its input")
    assert kinds == {0, 1, 2, 3}
    assert float((s * 65535 - 1).abs().max()) <= 0.1 + 1e-12 and float(s.std()) > 0
    # the same generator state gives the same augmentation
    gen2 = torch.Generator().manual_seed(0)
    out2, s2, o2 = augment_batch(img, scale, offset, AugmentConfig(0.5, 0.5, 0.1, 0.1), gen2)
    assert torch.equal(out2.to(torch.int32), dst) and torch.equal(s2, s) and torch.equal(o2, o)


def test_stem_inputs_uniform_affine_keeps_uint16():
    img = torch.randint(0, 4096, (3, 1, 4, 4), dtype=torch.int32).to(torch.uint16)
    x, s, o = stem_inputs(img, torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.25, dtype=torch.float64))
    assert x.dtype == torch.uint16 and (s, o) == (0.5, 0.25)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    x, s, o = stem_inputs(img, scale, torch.zeros(3, dtype=torch.float64))
    assert x.dtype == torch.float32 and (s, o) == (1.0, 0.0)
    torch.testing.assert_close(x, img.to(torch.float32) * scale.view(-1, 1, 1, 1).float(), rtol=0, atol=0)
    # stored values that differ by 1 stay different in the fp32 stem input
    img2 = torch.tensor([[[[40000, 40001]]]], dtype=torch.int32).to(torch.uint16)
    x2, _, _ = stem_inputs(
        img2.expand(2, -1, -1, -1),
        torch.tensor([1 / 65535, 1 / 4095], dtype=torch.float64),
        torch.zeros(2, dtype=torch.float64),
    )
    assert bool((x2[..., 0] != x2[..., 1]).all())


def test_one_stored_step_reaches_the_stem_tokens(tmp_path):
    # a 12-bit mammogram; change one stored value by 1 and follow it through dataset -> batch -> stem
    pydicom = pytest.importorskip("pydicom")
    import fm_engine
    from fm_engine.data import DicomFrameDataset, collate_frames
    from fm_engine.data.synthetic import write_mammogram

    write_mammogram(tmp_path / "a.dcm", size=(32, 32), seed=4)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    arr = ds.pixel_array.copy()
    arr[16, 16] = 2000
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "a.dcm")
    arr[16, 16] = 2001
    ds.PixelData = arr.tobytes()
    ds.save_as(tmp_path / "b.dcm")
    batch = collate_frames([DicomFrameDataset(tmp_path, (32, 32), progress=False)[i] for i in range(2)])
    x, s, o = stem_inputs(batch["image"], batch["scale"], batch["offset"])
    assert x.dtype == torch.uint16 and int(x[0, 0, 16, 16]) - int(x[1, 0, 16, 16]) == 1  # MONOCHROME1 flips
    vit = fm_engine.create_model("vit-i1-p16-d512", dim=32, depth=0, heads=2, kv_heads=1, head_dim=16, patch=16)
    with fm_engine.use_backend("reference"):
        tokens = vit.embed(x, s, o)
    assert tokens.dtype == torch.float32
    assert not torch.equal(tokens[0, 3], tokens[1, 3])  # the patch holding (16, 16)
    assert torch.equal(tokens[0, 0], tokens[1, 0])
