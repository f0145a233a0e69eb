"""`fm-engine prepare`: a DICOM folder -> LitData prepared dataset at model size; resumable, parallel,
skipped.csv; the training run reads it (disjoint shards per rank, bit-for-bit resume)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("pydicom")
pytest.importorskip("litdata")

from fm_engine.data import DicomFrameDataset, collate_frames
from fm_engine.data.prepared import PreparedDataset, ShardSampler, collate_prepared, is_prepared, prepare
from fm_engine.data.synthetic import write_demo_dataset, write_mammogram, write_mr_cine
from fm_engine.data.train_data import open_training_data

SIZE = (48, 40)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dicom")
    write_mammogram(d / "a.dcm", size=(64, 48), view="CC", seed=1)
    write_mammogram(d / "b.dcm", size=(80, 60), view="MLO", bits_stored=14, seed=2)
    write_mr_cine(d / "cine.dcm", frames=3, size=(16, 16))
    (d / "junk.dcm").write_bytes(b"not dicom")
    return d


def test_prepare_writes_model_size_samples_equal_to_the_reader(folder, tmp_path):
    out = tmp_path / "cache"
    summary = prepare(folder, SIZE, out, part_frames=2, progress=False)
    assert summary["complete"] and summary["samples"] == 5 and summary["parts"] == 3
    assert is_prepared(out) and (out / "index.json").is_file()
    ref = DicomFrameDataset(folder, SIZE, progress=False)
    ds = PreparedDataset(out)
    assert len(ds) == len(ref) == 5 and ds.size == SIZE
    for i in range(len(ds)):
        got, want = ds[i], ref[i]
        assert got["image"].dtype == want["image"].dtype == torch.uint16
        assert torch.equal(got["image"].to(torch.int32), want["image"].to(torch.int32))  # both on the CPU: exact
        assert torch.equal(got["scale"], want["scale"]) and torch.equal(got["offset"], want["offset"])
        raw = ds.raw(i)
        fi, t = ref.frames[i]
        assert raw["path"] == ref.files[fi] and raw["frame"] == t
    assert [int(ds[i]["label"]) for i in range(5)] == [-1] * 5
    # a batch read copies each image once into one tensor, which the collate passes on without copying
    items = ds.__getitems__([4, 0, 2])
    batch = collate_prepared(items)
    assert batch["image"].data_ptr() == items[0]["image"].data_ptr() and batch["image"].shape == (3, 1, *SIZE)
    # the image bytes were read from the chunk file directly (the layout check passed), not copied from the map
    probe = torch.empty_like(items[0]["image"])
    assert ds._read_image_into(4, ds.raw(4)["image"], probe) and torch.equal(
        probe.view(torch.int16), ds[4]["image"].view(torch.int16)
    )
    want = collate_frames([ds[4], ds[0], ds[2]])
    assert want.keys() == batch.keys() - {"ring"}  # outside a DataLoader worker the batch is not in the ring
    assert torch.equal(batch["ring"], torch.tensor([[-1, -1, 0]] * 3))
    for k in want:
        assert torch.equal(want[k].to(torch.int32), batch[k].to(torch.int32)), k
    with open(out / "skipped.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "reason"] and len(rows) == 2 and rows[1][0].endswith("junk.dcm")
    assert "not a readable DICOM file" in rows[1][1]
    # the training data recognises it by the index file; another size is refused
    td = open_training_data(out, SIZE, progress=False)
    assert td.kind == "prepared" and td.channels == 1
    with pytest.raises(ValueError, match="prepared at 48x40"):
        open_training_data(out, (64, 64), progress=False)
    # other settings into the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        prepare(folder, (32, 32), out, part_frames=2, progress=False)


def test_worker_batch_buffers_reused_only_once_handed_back(folder, tmp_path):
    out = tmp_path / "cache"
    prepare(folder, SIZE, out, part_frames=2, progress=False)
    ds = PreparedDataset(out)
    want = {i: ds[i]["image"].clone() for i in range(len(ds))}
    order = [i % len(ds) for i in range(40)]  # 20 batches of 2, 10 per worker

    def batches():
        return torch.utils.data.DataLoader(ds, batch_size=2, sampler=order, num_workers=2, collate_fn=collate_prepared)

    def same(batch) -> bool:
        return all(torch.equal(batch["image"][j], want[int(i)]) for j, i in enumerate(batch["index"]))

    # handed back after use: each worker refills its 4 buffers instead of allocating afresh
    slots = ds.ring.state.shape[1]
    seen = 0
    for batch in batches():
        assert same(batch) and batch["ring"][0, 0] in (0, 1)
        ds.release(batch)
        seen += 1
    reused, fresh = ds.ring.counts
    assert seen == 20 and reused + fresh == 20 and fresh <= 2 * slots and reused >= 20 - 2 * slots
    # never handed back: no buffer is refilled while a batch holds it, every batch keeps its images
    ds = PreparedDataset(out)
    held = list(batches())
    assert ds.ring.counts == (0, 20) and all(same(b) for b in held)
    # a stale hand-back (a token the slot no longer holds) leaves the slot's current batch alone
    ds.ring.state[0, 1] = 7
    ds.release({"ring": torch.tensor([[0, 1, 12345]])})
    assert int(ds.ring.state[0, 1]) == 7
    ds.release([{"ring": torch.tensor([0, 1, 7])}])
    assert int(ds.ring.state[0, 1]) == 0


def test_prepare_resumes_and_runs_parallel(folder, tmp_path):
    out = tmp_path / "cache"
    first = prepare(folder, SIZE, out, part_frames=2, progress=False, stop_after_parts=1)  # "interrupted"
    assert not first["complete"] and first["parts_done"] == 1 and not is_prepared(out)
    done_part = (out / "parts" / "part-00000.json").read_text()
    chunk = next(out.glob("part-00000-*.bin"))
    mtime = chunk.stat().st_mtime_ns
    second = prepare(folder, SIZE, out, part_frames=2, progress=False, workers=2)
    assert second["complete"] and second["samples"] == 5
    assert (out / "parts" / "part-00000.json").read_text() == done_part and chunk.stat().st_mtime_ns == mtime
    one = tmp_path / "one"
    prepare(folder, SIZE, one, part_frames=2, progress=False)
    a, b = PreparedDataset(out), PreparedDataset(one)
    for i in range(len(a)):
        assert torch.equal(a[i]["image"].to(torch.int32), b[i]["image"].to(torch.int32))


def test_shard_sampler_disjoint_chunks_and_resume():
    sizes = [5, 3, 4, 4, 2, 6]
    for epoch in range(3):
        samplers = [ShardSampler(sizes, seed=7, rank=r, world_size=3) for r in range(3)]
        for s in samplers:
            s.set_epoch(epoch)
        owned = [set(s.chunks_of(s.rank)) for s in samplers]
        assert set.union(*owned) == set(range(6)) and sum(len(o) for o in owned) == 6  # a partition of the chunks
        starts = [0, 5, 8, 12, 16, 18]
        for s, chunks in zip(samplers, owned):
            order = s.order()
            assert len(order) == 8 == len(s)  # ceil(24 / 3)
            allowed = {starts[c] + j for c in chunks for j in range(sizes[c])}
            assert set(order) <= allowed  # a rank reads only its own chunks
        # restart mid-epoch: the rest of the same order
        s = ShardSampler(sizes, seed=7, rank=1, world_size=3)
        s.set_epoch(epoch, 3)
        assert list(s) == samplers[1].order()[3:] and len(s) == 5
    a, b = ShardSampler(sizes, seed=7), ShardSampler(sizes, seed=7)
    b.set_epoch(1)
    assert sorted(a.order()) == list(range(24)) and a.order() != b.order()
    with pytest.raises(ValueError, match="at least as many chunks"):
        ShardSampler([3, 3], world_size=3, rank=0)


def test_training_from_prepared_dataset_resumes_bit_for_bit(tmp_path):
    from trainkit import tiny_run

    from fm_engine.train.config import TrainConfig
    from fm_engine.train.mjepa import Trainer, latest_checkpoint, train_mjepa

    src = tmp_path / "mg"
    write_demo_dataset(src, count=6, size=(96, 72), seed=1)
    cache = tmp_path / "cache"
    prepare(src, (64, 64), cache, part_frames=2, label_tag="ViewPosition", progress=False)

    def cfg(out, **kw):
        run = tiny_run(cache, tmp_path / out, **{"grad_accum": 1, "checkpoint_every": 2, "seed": 3, **kw})
        return TrainConfig(**run).validate()

    # two loader workers (batches in their reused shared buffers) here, none in the interrupted and resumed run
    full = train_mjepa(cfg("full", workers=2))
    assert full["step"] == 4 and isinstance(full["trainer"].dataset, PreparedDataset)
    assert sum(full["trainer"].dataset.ring.counts) >= 4  # every batch came through a worker's ring
    killed = train_mjepa(cfg("killed", stop_after=3))
    assert killed["step"] == 3 and latest_checkpoint(tmp_path / "killed").name == "step_0000002"
    resumed = Trainer(cfg("killed", resume=True))
    assert resumed.step == 2
    resumed.train()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full/checkpoints/step_0000004/model.safetensors"))
    b = load_file(str(tmp_path / "killed/checkpoints/step_0000004/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "full/checkpoints/step_0000004/state.pt", weights_only=False)
    assert (sa["epoch"], sa["batch_in_epoch"]) == (1, 1)  # 3 batches of 2 per epoch: the position is exact
    # the same images as the DICOM folder's training path gives
    td = open_training_data(src, (64, 64), progress=False)
    dicom = td.to_device(td.collate([td.dataset[i] for i in range(6)]), torch.device("cpu"))
    prep = collate_frames([PreparedDataset(cache)[i] for i in range(6)])
    assert torch.equal(dicom["image"].to(torch.int32), prep["image"].to(torch.int32))
    meta = json.loads((cache / "prepared.json").read_text())
    assert meta["format"] == "litdata" and meta["classes"] == ["CC", "MLO"]


def test_prepare_and_bench_commands(folder, tmp_path, capsys):
    from fm_engine.cli import main

    out = tmp_path / "cache"
    assert main(["prepare", "--data", str(folder), "--size", "48x40", "--out", str(out), "--no-progress"]) == 0
    assert "5 samples" in capsys.readouterr().out and is_prepared(out)
    assert main(["prepare", "--data", str(folder), "--size", "48", "--out", str(tmp_path / "x")]) == 2
    assert "size" in capsys.readouterr().err
    for data, source, stages in (
        (folder, "dicom", {"read", "decode", "collate", "device_transform"}),
        (out, "prepared", {"read", "collate", "device_transform"}),
    ):
        res = tmp_path / f"bench-{source}"
        argv = ["bench", "--data", str(data), "--size", "48x40", "--workers", "2", "--min-seconds", "0.05"]
        assert main([*argv, "--out", str(res)]) == 0
        r = json.loads((res / "data.json").read_text())
        assert r["source"] == source and r["workers"] == 2 and set(r["seconds_per_image"]) == stages
        assert r["per_worker_img_s"] > 0 and r["total_img_s"] > 0 and r["images_timed"] >= 5
        assert r["skipped_files"] == 1  # junk.dcm (prepared: listed in its skipped.csv)
        assert "images/s per worker" in (res / "data.md").read_text()
    # a prepared dataset of another size is refused by name
    assert main(["bench", "--data", str(out), "--size", "64x64", "--min-seconds", "0"]) == 2
    assert "prepared at 48x40" in capsys.readouterr().err
