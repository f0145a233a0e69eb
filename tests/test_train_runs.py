"""`fm-engine train` as a new user meets it: run folders that never lose data, config values checked once,
resume and extend, bad files, curves, and the smaller CLI promises. CLI behaviour runs in a subprocess."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("pydicom")

from trainkit import TINY, tiny_run

from fm_engine.data.synthetic import write_demo_dataset
from fm_engine.train.config import TrainConfig
from fm_engine.train.mjepa import latest_checkpoint, train_mjepa


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mg")
    write_demo_dataset(d, count=6, size=(96, 72), seed=1)
    return d


def tiny(data: Path, out: Path, **kw) -> dict:
    return tiny_run(data, out, **{"checkpoint_every": 1, "keep_checkpoints": 2, **kw})


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`fm-engine ARGS` in a fresh process (the installed entry point's module)."""
    return subprocess.run(
        [sys.executable, "-m", "fm_engine", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "default"},
        timeout=timeout,
        check=False,
    )


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The run failed with exit 2 and one `error: ...` line, no traceback."""
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def steps_in(csv_path: Path) -> list[int]:
    with open(csv_path, newline="") as f:
        return [int(row["step"]) for row in csv.DictReader(f)]


def write_cfg(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


# -- 1. run folders never lose data -----------------------------------------------------------------------------
def test_run_folder_refused_resumed_or_moved_aside(data_dir, tmp_path):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path / "c.yaml", tiny(data_dir, out))
    r = cli("train", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert steps_in(out / "metrics.csv") == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000003", "step_0000004"]
    before = (out / "metrics.csv").read_bytes()

    # a second run into the same folder, no flag: refused before anything is written
    msg = one_line_error(cli("train", "--config", cfg, "--steps", "2"))
    assert "already holds a run" in msg and "--resume" in msg and "--overwrite" in msg
    assert (out / "metrics.csv").read_bytes() == before

    # --resume on a folder without a checkpoint is an error, not a fresh start
    msg = one_line_error(cli("train", "--config", cfg, "--resume", "--out", str(tmp_path / "empty")))
    assert msg.startswith("error: resume:") and "no checkpoint" in msg
    assert not (tmp_path / "empty" / "metrics.csv").exists()

    # --overwrite moves the old run aside (nothing deleted) and starts a new one
    r = cli("train", "--config", cfg, "--overwrite", "--steps", "2")
    assert r.returncode == 0, r.stderr
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "metrics.csv").read_bytes() == before
    assert (aside / "checkpoints" / "step_0000004" / "model.safetensors").is_file()
    assert steps_in(out / "metrics.csv") == [1, 2]
    assert latest_checkpoint(out).name == "step_0000002"

    # `latest` naming a folder that is gone: --resume says so
    shutil.rmtree(out / "checkpoints" / "step_0000002")
    msg = one_line_error(cli("train", "--config", cfg, "--resume"))
    assert "step_0000002" in msg and "not a checkpoint" in msg


def test_pruning_touches_only_this_runs_checkpoints(data_dir, tmp_path):
    other = tmp_path / "other"
    train_mjepa(TrainConfig(**tiny(data_dir, other, steps=4, checkpoint_every=2, seed=9)).validate())
    out = tmp_path / "run"
    train_mjepa(TrainConfig(**tiny(data_dir, out, stop_after=2)).validate())
    # another run's later checkpoints in the same folder (copied by hand): they sort after this run's own
    for n in ("step_0000002", "step_0000004"):
        shutil.copytree(other / "checkpoints" / n, out / "checkpoints" / n.replace("step_00000", "step_00003"))
    last = train_mjepa(TrainConfig(**tiny(data_dir, out, resume=True)).validate())
    assert last["step"] == 4
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert names == ["step_0000003", "step_0000004", "step_0000302", "step_0000304"]
    assert latest_checkpoint(out).name == "step_0000004"
    assert steps_in(out / "metrics.csv") == [1, 2, 3, 4]


# -- 3. config values -------------------------------------------------------------------------------------------
def test_config_values_any_spelling_and_flat_readback(data_dir, tmp_path):
    from fm_engine.train.config import FIELDS, load_config_file, make_config

    values = tiny(data_dir, tmp_path / "run", steps=2)
    text = yaml.safe_dump({k: v for k, v in values.items() if k != "lr"}) + "lr: 1e-3\nhflip: '0.25'\n"
    assert yaml.safe_load(text)["lr"] == "1e-3"  # PyYAML reads this spelling as a string
    r = cli("train", "--config", write_cfg(tmp_path / "c.yaml", yaml.safe_load(text)), "--clip", "2.5e0")
    assert r.returncode == 0, r.stderr
    saved_text = (tmp_path / "run" / "config.yaml").read_text()
    lines = saved_text.splitlines()
    assert [ln.split(":", 1)[0] for ln in lines] == list(FIELDS)  # flat: one `key: value` line per option
    saved = yaml.safe_load(saved_text)
    assert saved["lr"] == 0.001 and saved["clip"] == 2.5 and saved["hflip"] == 0.25 and saved["steps"] == 2
    assert saved["model_overrides"] == TINY
    again = make_config(str(tmp_path / "run" / "config.yaml"))  # --config reads it back to the same config
    assert again.to_dict() == make_config(str(tmp_path / "c.yaml"), clip="2.5e0").to_dict()
    assert load_config_file(tmp_path / "run" / "config.yaml").keys() == set(FIELDS)
    toml = tmp_path / "c.toml"
    toml.write_text('lr = "2E-4"\nsteps = 1e1\nresume = "no"\nmodalities = "MG"\n[model_overrides]\ndepth = 2\n')
    cfg = make_config(str(toml))
    assert (cfg.lr, cfg.steps, cfg.resume, cfg.modalities) == (2e-4, 10, False, ["MG"])
    assert cfg.model_overrides == {"depth": 2}


@pytest.mark.parametrize(
    "args, expected",
    [
        (("--steps", "ten"), ["steps (--steps)", "'ten'", "an integer"]),
        (("--hflip", "5"), ["hflip (--hflip)", "5", "[0, 1]"]),
        (("--override", "depht=2"), ["depht", "valid keys", "depth", "dim", "heads"]),
    ],
)
def test_config_errors_name_option_value_and_expectation(data_dir, tmp_path, args, expected):
    r = cli("train", "--config", write_cfg(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run")), *args)
    msg = one_line_error(r)
    for part in expected:
        assert part in msg, msg
    assert not (tmp_path / "run").exists()


def test_config_file_errors_in_process(tmp_path):
    from fm_engine.train.config import TrainConfig, coerce, make_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: ten\n")
    with pytest.raises(ValueError, match=r"steps \(--steps\): expected an integer, got 'ten'"):
        make_config(str(bad))
    for field, value, match in [
        ("lr", "fast", "lr .*a number"),
        ("batch_size", 2.5, "batch_size .*an integer"),
        ("vflip", -0.1, r"vflip .*\[0, 1\]"),
        ("pct_start", 1, r"pct_start .*\(0, 1\)"),
        ("ema_momentum", 1.5, "ema_momentum"),
        ("context_ratio", 0, "context_ratio"),
        ("workers", -1, "workers"),
        ("voi", "40,x", "voi .*CENTER,WIDTH"),
        ("amp", "fp16", "amp"),
        ("tensorboard", "maybe", "tensorboard .*true or false"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**{field: value}).validate()
    assert coerce("lr", "1E-3", "float") == 1e-3 and coerce("steps", "1_000", "int") == 1000
    assert coerce("size", [512, 384], "str | None") == "512x384" and coerce("stop_after", "null", "int | None") is None


# -- 4. resume and extend ---------------------------------------------------------------------------------------
def test_resume_cannot_extend_and_warns_about_overrides(data_dir, tmp_path):
    import torch

    out = tmp_path / "run"
    values = tiny(data_dir, out, checkpoint_every=2)
    train_mjepa(TrainConfig(**values, stop_after=2).validate())
    cfg = write_cfg(tmp_path / "c.yaml", values)
    # a longer schedule on resume: refused before training, saying how to train on
    msg = one_line_error(cli("train", "--config", cfg, "--resume", "--steps", "6"))
    assert "steps (--steps)" in msg and "--init" in msg and "step_0000002/encoder.safetensors" in msg
    assert steps_in(out / "metrics.csv") == [1, 2]
    # another batch size and peak lr: the run goes on with them and says which saved values they override
    r = cli("train", "--config", cfg, "--resume", "--batch-size", "3", "--lr", "2e-3")
    assert r.returncode == 0, r.stderr
    assert "override the saved run's values" in r.stderr
    assert "batch_size 2 -> 3" in r.stderr and "lr 0.001 -> 0.002" in r.stderr
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # the lr of step 3 is the one-cycle schedule with the new peak
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=4, pct_start=0.1)
    for _ in range(2):
        opt.step()
        sched.step()
    assert float(rows[2]["lr"]) == pytest.approx(sched.get_last_lr()[0], rel=1e-9)
    state = torch.load(out / "checkpoints" / "step_0000004" / "state.pt", weights_only=False)
    assert state["config"]["batch_size"] == 3
    # resuming a finished run with the same steps has nothing to do, and says so
    r = cli("train", "--config", cfg, "--resume", "--batch-size", "3", "--lr", "2e-3")
    assert r.returncode == 0 and "nothing to do" in r.stdout, r.stdout + r.stderr


# -- 5. bad files -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    """Six good mammograms and one whose pixel data are cut short (its header reads: it fails when loaded)."""
    d = tmp_path_factory.mktemp("bad")
    paths = write_demo_dataset(d, count=6, size=(96, 72), seed=2)
    raw = Path(paths[0]).read_bytes()
    (d / "trunc.dcm").write_bytes(raw[: len(raw) * 2 // 3])
    return d


def test_bad_file_same_one_line_error_whatever_the_workers(bad_dir, tmp_path):
    # one batch of all 7 examples, so the cut file is read for sure
    cfg = write_cfg(tmp_path / "c.yaml", tiny(bad_dir, tmp_path / "run", steps=1, batch_size=7, on_error="raise"))
    errors = []
    for workers in ("0", "2"):
        r = cli("train", "--config", cfg, "--workers", workers, "--out", str(tmp_path / f"w{workers}"))
        errors.append(one_line_error(r))
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert errors[0] == errors[1] and "trunc.dcm" in errors[0], errors


def test_skipped_files_listed_with_reasons_and_counted(bad_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(bad_dir, data)
    (data / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path / "c.yaml", tiny(data, out, steps=1, batch_size=7, workers=2))
    r = cli("train", "--config", cfg)
    assert r.returncode == 0, r.stderr
    with open(out / "skipped.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "reason"]
    reasons = {Path(file).name: reason for file, reason in rows[1:]}
    assert set(reasons) == {"notes.txt", "trunc.dcm"} and all(reasons.values()), reasons
    assert "skipped files: 2" in r.stdout, r.stdout


def test_label_tag_problem_reported_as_one(data_dir, tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", tiny(data_dir, tmp_path / "run", label_tag="BodyPartThickness"))
    msg = one_line_error(cli("train", "--config", cfg))
    assert "label_tag (--label-tag)" in msg and "BodyPartThickness" in msg and "6 readable" in msg, msg
    assert "no readable DICOM image" not in msg


# -- 6. seeing training -----------------------------------------------------------------------------------------
def test_curves_memory_heldout_probe_and_umask(data_dir, tmp_path, monkeypatch):
    import fm_engine.train.curves as curves

    drawn = []
    real = curves.plot_curves

    def counting(csv_path, png):
        drawn.append(steps_in(Path(csv_path))[-1])
        return real(csv_path, png)

    monkeypatch.setattr(curves, "plot_curves", counting)
    probe = tmp_path / "probe"
    write_demo_dataset(probe, count=4, size=(96, 72), seed=3, progress=False)
    out = tmp_path / "run"
    old = os.umask(0o027)
    try:
        train_mjepa(TrainConfig(**tiny(data_dir, out, checkpoint_every=2, probe_data=str(probe))).validate())
    finally:
        os.umask(old)
    assert drawn == [2, 4, 4]  # at each checkpoint and at the end
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(float(r["memory_gib"]) > 0.01 for r in rows)  # a number (GiB), not text
    held = [r["probe_acc_heldout"] for r in rows]
    assert held[0] == "" and held[2] == "" and 0 <= float(held[1]) <= 1 and 0 <= float(held[3]) <= 1
    # files and folders follow the umask (0o027: group may read), not tempfile's / safetensors' 0600 / 0700
    for p in [out, *out.rglob("*")]:
        mode = p.stat().st_mode & 0o777
        assert mode == (0o750 if p.is_dir() else 0o640), (p, oct(mode))


def test_training_extras_in_pyproject():
    import tomllib

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(d.startswith("matplotlib") for d in extras["train"])
    assert any(d.startswith("pydicom") for d in extras["train"])
    assert any(d.startswith("tensorboard") for d in extras["tensorboard"])


# -- 7. smaller items -------------------------------------------------------------------------------------------
def test_version_and_help_without_duplicated_defaults():
    import re

    import fm_engine

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fm_engine {fm_engine.__version__}", r.stdout + r.stderr
    r = cli("train", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())  # argparse wraps lines
    blocks = re.split(r" (?=--[a-z])", text[text.index("options:") :])
    for block in blocks:
        assert block.count("default") <= 1, block
    assert "(default: None)" not in text and "(default: the model's registered size)" in text


def test_tune_op_on_a_cpu_names_what_needs_a_gpu():
    r = subprocess.run(
        [sys.executable, "-m", "fm_engine", "tune", "--op", "relu2", "--no-progress"],
        capture_output=True,
        text=True,
        env={**os.environ, "TRITON_INTERPRET": "0", "CUDA_VISIBLE_DEVICES": "", "FM_ENGINE_CACHE_DIR": "/nonexistent"},
        timeout=300,
        check=False,
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "nothing to tune: pass --model" not in out
    assert "relu2: runs here: compile, reference; cannot run here:" in out and "triton (" in out and "relu2_mlp" in out
    assert "fm-engine tune --model NAME" in out


def test_info_reports_optional_packages():
    r = cli("info")
    assert r.returncode == 0, r.stderr
    for dist, enables in [
        ("pydicom", "reading DICOM"),
        ("pylibjpeg-libjpeg", "JPEG"),
        ("pylibjpeg-openjpeg", "JPEG 2000"),
        ("kornia", "fm_engine.augment"),
        ("matplotlib", "curves.png"),
        ("tensorboard", "--tensorboard"),
    ]:
        (line,) = [ln for ln in r.stdout.splitlines() if ln.split()[:1] == [dist]]
        assert enables in line, line


@pytest.mark.parametrize("cut", [None, 2000])
def test_convert_avit_bad_file_one_line_error(tmp_path, cut):
    from fm_engine.checkpoint import save_checkpoint
    from fm_engine.models.registry import create_model

    path = tmp_path / "enc.safetensors"
    if cut is None:
        path.write_text("not a checkpoint\n")
    else:
        save_checkpoint(path, create_model("vit-i1-p16-d512", **TINY), name="vit-i1-p16-d512")
        path.write_bytes(path.read_bytes()[:cut])
    avit = "vit-i1-p16-d512-a32_24"
    msg = one_line_error(cli("convert-avit", "--checkpoint", str(path), "--model", avit, "--out", str(tmp_path / "o")))
    assert str(path) in msg and "not a readable safetensors checkpoint" in msg, msg


def test_demo_size_rule_checked_before_any_file(tmp_path):
    msg = one_line_error(cli("train", "--demo", "--demo-dir", str(tmp_path / "demo"), "--size", "120x96"))
    assert "size (--size): 120x96" in msg and "multiple of patch x coarsening" in msg and "128x96" in msg, msg
    assert not (tmp_path / "demo" / "data").exists()


# -- 2. install as written --------------------------------------------------------------------------------------
def test_demo_without_pydicom_names_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['pydicom'] = None\n"  # as if pydicom were not installed
        "from fm_engine.cli import main\n"
        f"sys.exit(main(['train', '--demo', '--demo-dir', {str(tmp_path / 'demo')!r}, '--no-progress']))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    msg = one_line_error(r)
    assert "pydicom is not installed" in msg and ".[train]" in msg, msg


def test_readme_drop_in_example_runs():
    """The README's example of fm_engine.nn modules in one's own model runs as written."""
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index("### The drop-in modules in your own model") :]
    code = section[section.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # asserts fast path == reference itself
    assert tuple(scope["tokens"].shape) == (2, 192, 256)


def test_readme_install_lines_and_extras():
    import re

    import tomllib

    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    install = text[text.index("## Install") : text.index("## The main job")]
    block = install[install.index("```bash\n") : install.index("```\n", install.index("```bash\n") + 7)]
    lines = [ln.split("#")[0].strip() for ln in block.splitlines()[1:] if ln.strip()]
    # the CPU-only route: PyTorch's CPU wheel index, before the package, said above the command
    assert lines[0] == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert "without an NVIDIA GPU" in install[: install.index("```bash")]
    assert lines[1] == 'pip install -e ".[train]"' and lines[2] == "fm-engine train --demo"
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in re.findall(r'"\.\[(\w+)\]"', install):
        assert name in extras, name


def test_readme_gpu_figures_are_the_committed_ones():
    import json

    root = Path(__file__).resolve().parents[1]
    text = " ".join((root / "README.md").read_text().split())
    run = root / "benchmarks" / "results" / "2026-11-30-h200"
    assert "Project revision 86ff747" in (run / "README.md").read_text()
    assert "benchmarks/results/2026-11-30-h200/" in text and "revision 86ff747" in text
    rows = {
        (r["backend"], bool(r.get("overrides"))): r
        for r in json.loads((run / "models.json").read_text())
        if r["model"] == "vit-i1-p16-d512-a32_24"
    }
    assert f"{rows[('reference', True)]['images_per_s']:.1f} images/s" in text  # 37.1
    assert f"({rows[('reference', False)]['images_per_s']:.1f} images/s" in text  # 24.4
    assert f"at {rows[('auto', True)]['images_per_s']:.1f} ({rows[('auto', False)]['images_per_s']:.1f})" in text
    assert f"peaked at {rows[('reference', True)]['peak_gb']:.2f} GB" in text
    assert f"{rows[('reference', False)]['peak_gb']:.2f} GB (model defaults)" in text
