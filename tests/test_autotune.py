"""fm_engine.kernels._autotune on the test device (the interpreter without a GPU); a fake timer stands in for do_bench.

Checks that a bucket is tuned once (a second call of the same bucket, or of another size in it, does not
time again), that winners survive in the disk table across processes, that a stale or corrupt table is
ignored with one warning, that reset / restore hooks leave correct outputs after the tuning runs, and that
configs that fail are skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from fm_engine.kernels import _autotune
from fm_engine.kernels._autotune import dtype, pow2

from fm_engine import _device
from fm_engine.ops import _evidence as E
from fm_engine.testing import reported_spills

ROOT = Path(__file__).resolve().parents[1]
# the kernels run on the GPU where there is one, else in the interpreter (conftest sets TRITON_INTERPRET=1)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def TABLE() -> Path:
    """This device's autotune table (under the test's FM_ENGINE_CACHE_DIR)."""
    return _autotune.table_path(_device.device_class(DEV))


CONFIGS = [triton.Config({"BLOCK": b}, num_warps=4, num_stages=1) for b in (64, 128, 256)]


@_autotune.autotune(
    name="test_scale",
    configs=CONFIGS,
    interpreter_config=CONFIGS[0],
    key=lambda a: (pow2(a["n"]), dtype(a["x_ptr"])),
)
@triton.jit
def scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * 3.0, mask=m)


def _zero_out(a: dict) -> None:
    a["out_ptr"].zero_()


@_autotune.autotune(
    name="test_accumulate",
    configs=CONFIGS,
    interpreter_config=CONFIGS[0],
    key=lambda a: (pow2(a["n"]),),
    reset=_zero_out,
)
@triton.jit
def accumulate_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(out_ptr + offs, tl.load(out_ptr + offs, mask=m) + tl.load(x_ptr + offs, mask=m), mask=m)


@_autotune.autotune(
    name="test_in_place",
    configs=CONFIGS,
    interpreter_config=CONFIGS[0],
    key=lambda a: (pow2(a["n"]),),
    restore=("x_ptr",),
)
@triton.jit
def double_in_place_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) * 2.0, mask=m)


class FakeTimer:
    """Returns the next of ``times`` per config timed (after running the launch once, as do_bench would)."""

    def __init__(self, times: list[float]) -> None:
        self.times = list(times)
        self.calls = 0

    def __call__(self, run) -> float:
        run()
        t = self.times[self.calls % len(self.times)]
        self.calls += 1
        return t


def grid(n: int):
    return lambda meta: (triton.cdiv(n, meta["BLOCK"]),)


def scale(x: torch.Tensor) -> tuple[torch.Tensor, triton.Config]:
    y = torch.full_like(x, float("nan"))
    cfg = scale_kernel[grid(x.numel())](x, y, x.numel())
    return y, cfg


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FM_ENGINE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FM_ENGINE_AUTOTUNE", raising=False)
    _autotune.forget()
    _autotune.reset_stats()
    yield tmp_path
    _autotune.forget()


def test_pow2_buckets() -> None:
    assert [pow2(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]
    assert pow2 is E.pow2  # one definition: the tuning cache and the evidence tables bucket sizes alike


def test_same_bucket_is_tuned_once(cache_dir: Path) -> None:
    timer = FakeTimer([3.0, 1.0, 2.0])  # the second config (BLOCK 128) wins
    x = torch.randn(1000, device=DEV)
    with scale_kernel.override(CONFIGS, timer):
        y, cfg = scale(x)
        assert cfg.kwargs["BLOCK"] == 128 and timer.calls == 3
        torch.testing.assert_close(y, x * 3)  # the final launch wrote the output
        assert scale_kernel.stats == {"tunings": 1, "memory_hits": 0, "disk_hits": 0, "untuned": 0}
        _, cfg2 = scale(torch.randn(1000, device=DEV))  # same bucket
        _, cfg3 = scale(torch.randn(700, device=DEV))  # 700 -> 1024: same bucket again
        assert cfg2 is cfg and cfg3 is cfg and timer.calls == 3
        assert scale_kernel.stats["memory_hits"] == 2
        scale(torch.randn(1025, device=DEV))  # next bucket: tuned
        assert timer.calls == 6 and scale_kernel.stats["tunings"] == 2
        scale(torch.randn(1000, dtype=torch.float64, device=DEV))  # a dtype is part of the bucket
        assert scale_kernel.stats["tunings"] == 3
    # the table on disk: one file for the interpreter's device class, Triton's version recorded
    (path,) = (cache_dir / "autotune").iterdir()
    assert path == TABLE()
    data = json.loads(path.read_text())
    assert data["triton"] == triton.__version__
    assert len(data["entries"]) == 3 and all(k.startswith("test_scale|") for k in data["entries"])


def test_winner_is_read_back_from_disk(cache_dir: Path) -> None:
    timer = FakeTimer([2.0, 3.0, 1.0])
    with scale_kernel.override(CONFIGS, timer):
        _, cfg = scale(torch.randn(300, device=DEV))
        _autotune.forget()  # as a new process: memory empty, the disk table stays
        y, cfg2 = scale(x := torch.randn(300, device=DEV))
    assert cfg2.kwargs == cfg.kwargs == {"BLOCK": 256}
    assert timer.calls == 3
    assert _autotune.stats()["disk_hits"] == 1 and _autotune.stats()["tunings"] == 1
    torch.testing.assert_close(y, x * 3)


def test_another_process_does_not_tune_again(cache_dir: Path) -> None:
    """Tune here, then a fresh Python process (same cache folder) finds the winner on disk."""
    timer = FakeTimer([5.0, 4.0, 1.0])
    with scale_kernel.override(CONFIGS, timer):
        scale(torch.randn(513, device=DEV))
    script = textwrap.dedent(
        """
        import json, sys, torch, triton
        sys.path.insert(0, sys.argv[1])
        from tests import test_autotune as T
        from fm_engine.kernels import _autotune
        def no_timing(run):
            raise AssertionError("timed in the second process")
        with T.scale_kernel.override(T.CONFIGS, no_timing):
            y, cfg = T.scale(x := torch.randn(600, device=T.DEV))
        assert torch.equal(y, x * 3)
        print(json.dumps({"stats": _autotune.stats(), "block": cfg.kwargs["BLOCK"]}))
        """
    )
    env = {**os.environ, "FM_ENGINE_CACHE_DIR": str(cache_dir)}  # the same mode (interpreter or GPU) as here
    r = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["block"] == 256
    assert out["stats"]["tunings"] == 0 and out["stats"]["disk_hits"] == 1


@pytest.mark.parametrize("content", ["not json {", json.dumps({"format": 1, "triton": "0.0.1", "entries": {}})])
def test_stale_or_corrupt_table_is_ignored_with_one_warning(cache_dir: Path, content: str) -> None:
    path = TABLE()
    path.parent.mkdir(parents=True)
    path.write_text(content)
    timer = FakeTimer([1.0, 2.0, 3.0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with scale_kernel.override(CONFIGS, timer):
            y, _ = scale(x := torch.randn(100, device=DEV))
            scale(torch.randn(5000, device=DEV))  # another bucket: the table is read and rewritten again
    msgs = [str(w.message) for w in caught if "autotune cache" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "ignored" in msgs[0]
    torch.testing.assert_close(y, x * 3)
    data = json.loads(path.read_text())  # replaced by a valid table of this Triton
    assert data["triton"] == triton.__version__ and len(data["entries"]) == 2


def test_reset_hook_clears_accumulated_outputs(cache_dir: Path) -> None:
    """Three timed runs accumulate into the output; the reset before the final launch makes it right."""
    x = torch.randn(500, device=DEV)
    out = torch.zeros(500, device=DEV)
    with accumulate_kernel.override(CONFIGS, FakeTimer([1.0, 2.0, 3.0])):
        accumulate_kernel[grid(500)](x, out, 500)
    torch.testing.assert_close(out, x)


def test_restore_hook_for_in_place_kernels(cache_dir: Path) -> None:
    x = torch.randn(300, device=DEV)
    expected = x * 2
    with double_in_place_kernel.override(CONFIGS, FakeTimer([2.0, 1.0, 3.0])):
        double_in_place_kernel[grid(300)](x, 300)
    torch.testing.assert_close(x, expected)


def test_failing_configs_are_skipped(cache_dir: Path) -> None:
    bad = triton.Config({"BLOCK": 100}, num_warps=4, num_stages=1)  # tl.arange needs a power of two
    timer = FakeTimer([1.0, 5.0])
    with scale_kernel.override([bad, CONFIGS[1]], timer):
        y, cfg = scale(x := torch.randn(200, device=DEV))
    assert cfg.kwargs["BLOCK"] == 128
    torch.testing.assert_close(y, x * 3)
    with scale_kernel.override([bad], timer), pytest.raises(Exception, match=r"test_scale|BLOCK|arange"):
        scale(torch.randn(200, device=DEV))


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter only: on a GPU the first call tunes")
def test_interpreter_never_times_by_default(cache_dir: Path) -> None:
    y, cfg = scale(x := torch.randn(77, device=DEV))
    assert cfg is scale_kernel.interpreter_config
    assert _autotune.stats() == {"tunings": 0, "memory_hits": 0, "disk_hits": 0, "untuned": 0}
    assert not (cache_dir / "autotune").exists()
    torch.testing.assert_close(y, x * 3)


def test_autotune_off_pins_the_first_config(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FM_ENGINE_AUTOTUNE", "0")
    with scale_kernel.override(CONFIGS[::-1], FakeTimer([9.0, 1.0, 1.0])):
        _, cfg = scale(torch.randn(64, device=DEV))
    assert cfg.kwargs["BLOCK"] == 256 and _autotune.stats()["tunings"] == 0


def test_names_are_unique() -> None:
    with pytest.raises(ValueError, match="taken"):
        _autotune.autotune(name="test_scale", configs=CONFIGS, interpreter_config=CONFIGS[0], key=lambda a: ())(
            scale_kernel.fn
        )


# --- LaunchTuner: launchers whose config decides their buffers (the attention kernels) --------------------

LAUNCHER = _autotune.LaunchTuner("test_launcher", [scale_kernel.fn])
LAUNCH_CANDS = [{"BLOCK": 64, "num_warps": 4}, {"BLOCK": 128, "num_warps": 4}, {"BLOCK": 256, "num_warps": 8}]


def test_launch_tuner_times_each_candidate_once_per_bucket(cache_dir: Path) -> None:
    ran: list[int] = []
    timer = FakeTimer([3.0, 2.0, 1.0])  # the third candidate wins
    dev = DEV
    with LAUNCHER.override(LAUNCH_CANDS, timer):
        cfg = LAUNCHER.choose(dev, (1024, "float32"), [{"BLOCK": 1}], lambda c: ran.append(c["BLOCK"]))
        assert cfg == LAUNCH_CANDS[2] and ran == [64, 128, 256] and timer.calls == 3
        assert LAUNCHER.choose(dev, (1024, "float32"), [], lambda c: ran.append(-1)) == cfg  # memory
        assert ran == [64, 128, 256] and LAUNCHER.stats["memory_hits"] == 1
        _autotune.forget()  # a new process: read back from the disk table
        assert LAUNCHER.choose(dev, (1024, "float32"), [], lambda c: ran.append(-1)) == cfg
        assert LAUNCHER.stats["disk_hits"] == 1 and ran == [64, 128, 256]
        LAUNCHER.choose(dev, (2048, "float32"), [], lambda c: ran.append(c["BLOCK"]))  # another bucket
        assert LAUNCHER.stats["tunings"] == 2 and len(ran) == 6
    entries = json.loads(TABLE().read_text())["entries"]
    assert sorted(k.split("|")[2] for k in entries if k.startswith("test_launcher|")) == [
        '[1024, "float32"]',
        '[2048, "float32"]',
    ]


def test_launch_tuner_without_a_choice_runs_nothing(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dev = DEV
    never = lambda c: pytest.fail("timed a launch")
    assert LAUNCHER.choose(dev, (1,), LAUNCH_CANDS[:1], never) == LAUNCH_CANDS[0]  # one candidate
    monkeypatch.setenv("FM_ENGINE_AUTOTUNE", "0")
    assert LAUNCHER.choose(dev, (1,), LAUNCH_CANDS[::-1], never) == LAUNCH_CANDS[2]  # tuning off: the first
    with pytest.raises(ValueError, match="no candidates"):
        LAUNCHER.choose(dev, (1,), [], never)
    assert _autotune.stats()["tunings"] == 0


def test_launch_tuner_skips_failing_candidates(cache_dir: Path) -> None:
    def run(c: dict) -> None:
        if c["BLOCK"] == 64:
            raise RuntimeError("out of resources")

    with LAUNCHER.override(LAUNCH_CANDS, FakeTimer([1.0, 2.0, 3.0])):
        assert LAUNCHER.choose(DEV, (5,), [], run) == LAUNCH_CANDS[1]
    with LAUNCHER.override(LAUNCH_CANDS[:2], FakeTimer([1.0])), pytest.raises(RuntimeError, match="no config ran"):
        LAUNCHER.choose(DEV, (6,), [], lambda c: run({"BLOCK": 64}))


# --- register spills: candidates whose compiled kernels spill are not chosen ----------------------------------


def test_spills_reads_the_compiled_kernels_report() -> None:
    assert _autotune.spills(types.SimpleNamespace(n_spills=8, n_regs=255)) == 8
    assert _autotune.spills(types.SimpleNamespace(n_spills=0, n_regs=40)) == 0
    assert _autotune.spills(types.SimpleNamespace(n_regs=40)) is None  # not loaded yet: unknown
    assert _autotune.spills(None) is None  # the interpreter's launches return nothing


def test_spilling_configs_are_never_chosen(cache_dir: Path) -> None:
    """BLOCK 64 would be fastest but spills on this (faked) Triton: dropped after its first launch, untimed."""
    timer = FakeTimer([1.0, 2.0, 3.0])
    with scale_kernel.override(CONFIGS, timer), reported_spills(scale_kernel.fn, lambda a: 6 * (a["BLOCK"] == 64)):
        y, cfg = scale(x := torch.randn(1000, device=DEV))
    assert cfg.kwargs["BLOCK"] == 128
    assert timer.calls == 2  # the spilling config was launched once (compiled, checked) and never timed
    torch.testing.assert_close(y, x * 3)
    ((_, spilled),) = scale_kernel.spilled.items()
    assert spilled == [(_autotune.config_dict(CONFIGS[0]), 6)]
    (entry,) = json.loads(TABLE().read_text())["entries"].values()
    assert entry["config"]["kwargs"] == {"BLOCK": 128} and entry["spilled"] == [[entry["spilled"][0][0], 6]]
    assert entry["spilled"][0][0]["kwargs"] == {"BLOCK": 64}


def test_when_every_config_spills_the_fastest_runs_with_a_warning(cache_dir: Path) -> None:
    timer = FakeTimer([3.0, 1.0, 2.0])
    with (
        scale_kernel.override(CONFIGS, timer),
        reported_spills(scale_kernel.fn, lambda a: a["BLOCK"] // 64) as reported,
        pytest.warns(RuntimeWarning, match=r"test_scale: every candidate that runs spills registers on Triton"),
    ):
        y, cfg = scale(x := torch.randn(1000, device=DEV))
    assert cfg.kwargs["BLOCK"] == 128 and timer.calls == 3
    assert reported[:3] == [1, 2, 4]  # each first launch reported its spills before any was timed
    torch.testing.assert_close(y, x * 3)


def test_launch_tuner_never_chooses_a_spilling_candidate(cache_dir: Path) -> None:
    """A launcher's candidates are checked through the compiled kernels of the tuner's JIT functions."""
    timer = FakeTimer([3.0, 2.0, 1.0])  # the third candidate would win, but its kernel spills
    x = torch.randn(1000, device=DEV)
    y = torch.empty_like(x)

    def run(c: dict) -> None:
        scale_kernel.fn[(triton.cdiv(1000, c["BLOCK"]),)](x, y, 1000, BLOCK=c["BLOCK"], num_warps=c["num_warps"])

    with LAUNCHER.override(LAUNCH_CANDS, timer), reported_spills(scale_kernel.fn, lambda a: 2 * (a["BLOCK"] == 256)):
        assert LAUNCHER.choose(DEV, (7, "float32"), [], run) == LAUNCH_CANDS[1]
    assert timer.calls == 2
    assert LAUNCHER.spilled == {(_device.device_class(DEV), (7, "float32")): [(LAUNCH_CANDS[2], 2)]}
    torch.testing.assert_close(y, x * 3)


def test_compiled_launches_records_and_restores(cache_dir: Path) -> None:
    """The recorder shadows ``fn.run`` only inside its block (nested blocks and a function listed twice too),
    and records what each launch returns; on a GPU, Triton's own compiled kernel with its spill report."""
    fn = scale_kernel.fn
    x = torch.randn(64, device=DEV)
    y = torch.empty_like(x)
    with reported_spills(fn, lambda a: a["BLOCK"]) as reported:
        own = vars(fn)["run"]
        with _autotune.compiled_launches([fn, fn]) as outer:
            with _autotune.compiled_launches([fn]) as inner:
                fn[(2,)](x, y, 64, BLOCK=32)
            fn[(1,)](x, y, 64, BLOCK=64)
        assert vars(fn)["run"] is own  # the stand-in installed before the blocks is back
    assert "run" not in vars(fn)
    assert reported == [32, 64]
    assert [k.n_spills for k in inner] == [32] and [k.n_spills for k in outer] == [32, 64]
    torch.testing.assert_close(y, x * 3)
    if torch.cuda.is_available():
        with _autotune.compiled_launches([fn]) as real:
            fn[(1,)](x, y, 64, BLOCK=64)
        assert len(real) == 1 and _autotune.spills(real[0]) == 0


@pytest.mark.gpu
def test_gpu_tunes_a_bucket_once(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: the first relu2 backward of a size tunes (do_bench), the next one of the same bucket does not,
    and a fresh process state reads the winner from disk."""
    from fm_engine.kernels import relu2 as K

    monkeypatch.delenv("FM_ENGINE_AUTOTUNE", raising=False)  # the GPU suite pins configs for the other tests

    x = torch.randn(1 << 20, device="cuda")
    dy = torch.randn_like(x)
    ref = 2 * torch.relu(x) * dy
    for _ in range(2):
        torch.testing.assert_close(K.relu2_backward(x, dy), ref)
    assert K.relu2_bwd_kernel.stats["tunings"] == 1 and K.relu2_bwd_kernel.stats["memory_hits"] == 1
    _autotune.forget()
    torch.testing.assert_close(K.relu2_backward(x[: 1000 * 1000], dy[: 1000 * 1000]), ref[: 1000 * 1000])
    assert K.relu2_bwd_kernel.stats["disk_hits"] == 1 and K.relu2_bwd_kernel.stats["tunings"] == 1
