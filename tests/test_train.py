"""`fm-engine train`: resume bit-for-bit, two-process DDP on CPU, config files and CLI, the demo job."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("pydicom")

from trainkit import TINY, tiny_run

from fm_engine.data.synthetic import write_demo_dataset
from fm_engine.train.cli import main
from fm_engine.train.config import FIELDS, TrainConfig, make_config
from fm_engine.train.mjepa import Trainer, latest_checkpoint, train_mjepa


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mg")
    write_demo_dataset(d, count=6, size=(96, 72), seed=1)
    return d


def tiny_config(data: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**tiny_run(data, out, **{"grad_accum": 2, "checkpoint_every": 2, **kw})).validate()


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_resume_is_bit_for_bit(data_dir, tmp_path):
    full = train_mjepa(tiny_config(data_dir, tmp_path / "full"))
    assert full["step"] == 4 and full["probe_acc"] is not None
    # a run "killed" after 3 steps: its last checkpoint is step 2, step 3 is lost
    killed = train_mjepa(tiny_config(data_dir, tmp_path / "killed", stop_after=3))
    assert killed["step"] == 3
    assert latest_checkpoint(tmp_path / "killed").name == "step_0000002"
    resumed = Trainer(tiny_config(data_dir, tmp_path / "killed", resume=True))
    assert resumed.step == 2
    resumed.train()
    a, b = _weights(tmp_path / "full/checkpoints/step_0000004"), _weights(tmp_path / "killed/checkpoints/step_0000004")
    assert a.keys() == b.keys() and any(k.startswith("ema_encoder.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(tmp_path / "full/checkpoints/step_0000004/state.pt", weights_only=False)
    sb = torch.load(tmp_path / "killed/checkpoints/step_0000004/state.pt", weights_only=False)
    assert (
        (sa["epoch"], sa["batch_in_epoch"]) == (sb["epoch"], sb["batch_in_epoch"]) == (2, 2)
    )  # 8 batches of 3 per epoch
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # the weights moved, and differ from a run with another seed (the comparison can fail)
    init = Trainer(tiny_config(data_dir, tmp_path / "init"))
    assert not torch.equal(init.objective.state_dict()["encoder.stem.proj.weight"], a["encoder.stem.proj.weight"])
    rows = (tmp_path / "killed/metrics.csv").read_text().splitlines()
    assert (
        rows[0].startswith("step,epoch,loss")
        and rows == (tmp_path / "full/metrics.csv").read_text().splitlines()[:1] + rows[1:]
    )
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]  # rows after the checkpoint replaced


def test_activation_checkpointing_same_gradients(data_dir, tmp_path):
    from fm_engine.ops._dispatch import use_backend

    def grads(ac: bool, reseed: int | None = None) -> dict[str, torch.Tensor]:
        t = Trainer(tiny_config(data_dir, tmp_path / str(ac), activation_checkpointing=ac, label_tag=None))
        t._it = None
        batch = t._next_batch()
        if reseed is not None:
            torch.manual_seed(reseed)
        with use_backend("reference"):
            t._micro_step(batch, sync=True)
        return {n: p.grad.clone() for n, p in t.objective.encoder.named_parameters()}

    plain, ckpt, other = grads(False), grads(True), grads(False, reseed=123)
    # recomputation replays dropout with the saved RNG state: the same gradients up to summation order
    for k in plain:
        scale = float(plain[k].abs().max())
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-4, atol=1e-5 * scale, msg=k)
    # other masks / dropout (what a recomputation with a fresh RNG draw would see) change them far more
    assert max(float((other[k] - plain[k]).abs().max() / plain[k].abs().max()) for k in plain) > 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, port: int, cfgs: list[TrainConfig], out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    for cfg in cfgs:  # one process group for both runs (saves a second start-up)
        trainer = Trainer(cfg)
        trainer.train()
        if cfg.strategy == "ddp":
            torch.save({k: v.clone() for k, v in trainer.objective.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ddp_and_fsdp_two_processes_cpu(data_dir, tmp_path):
    import torch.multiprocessing as mp

    cfgs = [
        tiny_config(data_dir, tmp_path / s, steps=2, grad_accum=1, checkpoint_every=2, label_tag=None, strategy=s)
        for s in ("ddp", "fsdp")
    ]
    mp.spawn(_dist_worker, args=(2, _free_port(), cfgs, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in r0:  # online weights (DDP all-reduce) and EMA weights (deterministic update) agree on both ranks
        assert torch.equal(r0[k], r1[k]), k
    state = torch.load(tmp_path / "ddp/checkpoints/step_0000002/state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # masks differ per rank
    # FSDP computes the same step as DDP (same data, masks and dropout; only reduction order differs)
    ddp, fsdp = (
        _weights(tmp_path / "ddp/checkpoints/step_0000002"),
        _weights(tmp_path / "fsdp/checkpoints/step_0000002"),
    )
    assert ddp.keys() == fsdp.keys() == r0.keys()
    for k in ddp:
        assert torch.equal(ddp[k], r0[k]), k  # the checkpoint holds what the ranks hold
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-4, atol=1e-5, msg=k)


def test_config_file_and_cli_flags(data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    helptext = capsys.readouterr().out
    for name in FIELDS:
        if name != "model_overrides":
            assert "--" + name.replace("_", "-") in helptext, name
    assert "--demo" in helptext and "--config" in helptext
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "train": dict(
                    data=str(data_dir),
                    out=str(tmp_path / "cli"),
                    model="vit-i1-p16-d512",
                    size="64x64",
                    steps=5,
                    model_overrides=dict(TINY),
                    predictor_depth=1,
                    batch_size=2,
                    workers=0,
                    device="cpu",
                    amp="fp32",
                    checkpoint_every=1,
                    progress=False,
                    backend="reference",
                )
            }
        )
    )
    assert main(["train", "mjepa", "--config", str(cfg_file), "--steps", "1", "--override", "depth=2"]) == 0
    saved = yaml.safe_load((tmp_path / "cli/config.yaml").read_text())
    assert saved["steps"] == 1 and saved["amp"] == "fp32" and saved["model_overrides"]["depth"] == 2
    assert saved["model_overrides"]["dim"] == TINY["dim"]
    enc = tmp_path / "cli/checkpoints/step_0000001/encoder.safetensors"
    assert enc.is_file()
    # convert the ViT encoder to an AViT through the CLI
    out = tmp_path / "avit.safetensors"
    assert (
        main(
            [
                "convert-avit",
                "--checkpoint",
                str(enc),
                "--model",
                "vit-i1-p16-d512-a32_24",
                "--out",
                str(out),
                "--override",
                "target_grid=[4,4]",
                "--override",
                "kv_dim=16",
                "--override",
                "high_res_depth=1",
            ]
        )
        == 0
    )
    from fm_engine.checkpoint import load_checkpoint

    avit = load_checkpoint(out, strict=True).model
    from safetensors.torch import load_file

    vit_w = load_file(str(enc))
    assert torch.equal(avit.state_dict()["blocks.1.mlp.fc1.weight"], vit_w["blocks.1.mlp.fc1.weight"])
    with pytest.raises(ValueError, match="unknown options"):
        bad = tmp_path / "bad.toml"
        bad.write_text("stepz = 3\n")
        make_config(str(bad))
    assert main(["train", "--data", str(tmp_path / "nothing"), "--no-progress"]) == 2  # clear error, no traceback


def test_demo_job_reduced(tmp_path, capfd):
    from fm_engine.train.demo import run_demo

    summary = run_demo(tmp_path, count=8, steps=2, size=(64, 64), batch_size=2, progress=False, backend="reference")
    err = capfd.readouterr().err
    assert "it/s" not in err and "file/s" not in err and "synthetic DICOM" not in err  # no progress bar at all
    assert Path(summary["stage2 checkpoint"], "encoder.safetensors").is_file()
    assert "tensors copied" in summary["converted AViT"]
    assert summary["stage1 probe accuracy, training batch"] is not None
    assert summary["stage1 probe accuracy, held-out images"] is not None


def test_tuning_tables_printed_kept_and_checked_on_resume(data_dir, tmp_path, monkeypatch, capsys):
    import warnings

    from fm_engine._device import device_class
    from fm_engine.checkpoint import read_metadata
    from fm_engine.ops import _evidence as E

    monkeypatch.setenv("FM_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    cls = device_class(torch.device("cpu"))
    table = E.empty_table(cls)
    table["ops"]["relu2"] = {"dtype=float32,grad=0|n=8": {"backends": {"reference": {"fwd_ms": 1.0}}}}
    E.write_table(E.table_path("user", cls), table)
    E.reload()
    try:
        cfg = dict(backend="auto", steps=4, checkpoint_every=2)
        train_mjepa(tiny_config(data_dir, tmp_path / "run", stop_after=2, **cfg))
        printed = capsys.readouterr().out
        assert f"tuning tables: user {E.table_path('user', cls)}" in printed, printed
        expected = E.in_use(cls)["sha256"]
        assert len(expected) == 64
        ckpt = tmp_path / "run/checkpoints/step_0000002"
        assert torch.load(ckpt / "state.pt", weights_only=False)["tuning"]["sha256"] == expected
        assert read_metadata(ckpt / "model.safetensors")["extra"]["tuning_sha256"] == expected
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(tiny_config(data_dir, tmp_path / "run", resume=True, **cfg))  # same tables: quiet
        assert not [w for w in caught if "tuning tables" in str(w.message)]
        table["ops"]["relu2"]["dtype=float32,grad=0|n=8"]["backends"]["reference"]["fwd_ms"] = 2.0
        E.write_table(E.table_path("user", cls), table)
        E.reload()
        with pytest.warns(UserWarning, match="tuning tables differ"):
            Trainer(tiny_config(data_dir, tmp_path / "run", resume=True, **cfg))
    finally:
        E.reload()
