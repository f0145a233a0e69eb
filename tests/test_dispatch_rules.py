"""Every branch of the evidence rule of automatic dispatch (fm_engine/ops/_evidence.py), and agreement of
``explain`` with the backend that really runs.

The rule: the call's bucket entry, else the nearest measured bucket with every size within a factor of 4; fast
backends measured on the installed kernels, fastest first, each run only when faster than MARGIN x the
reference's time under the call's metric; no reference time, no entry, or no winner: the reference.

Each test points the user and package table folders at temporary folders and writes the tables it needs for the
device class of the ``device`` fixture. Every call goes through :func:`_runs`, which runs the op under
``ops.trace`` and checks that ``explain`` named the same backend, both in its ``chosen`` field and in the evidence
lines' final ``-> backend``.
"""

from __future__ import annotations

import random
import re
import warnings

import pytest
import torch

from fm_engine import ops
from fm_engine._device import device_class
from fm_engine.ops import _evidence as E


@pytest.fixture
def tables(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FM_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FM_ENGINE_BACKEND", raising=False)
    pkg = tmp_path / "package"
    pkg.mkdir()
    monkeypatch.setattr(E, "package_dir", lambda: pkg)
    E.reload()
    yield pkg
    E.reload()


def _write(cls: str, op: str, entries: dict, path=None, table_class: str | None = None) -> None:
    data = E.empty_table(table_class or cls)
    data["ops"][op] = entries
    E.write_table(path or E.table_path("user", cls), data)
    E.reload()


def _runs(fn, *args, **kwargs) -> str:
    """The backend that runs ``fn(*args, **kwargs)``, after checking that ``explain`` says the same."""
    why = ops.explain(fn, *args, **kwargs)
    with ops.trace() as calls:
        fn(*args, **kwargs)
    ran = calls[-1][1]
    assert why.chosen == ran, f"explain says {why.chosen}, {ran} ran:\n{why}"
    said = re.findall(r"-> (\w+)", "\n".join(why.evidence))
    assert said and said[-1] == ran, f"explain's evidence says -> {said[-1:]}, {ran} ran:\n{why}"
    return ran


def _x(device, n: int, grad: bool = False) -> torch.Tensor:
    return torch.randn(n, device=device, requires_grad=grad)


FWD = "dtype=float32,grad=0|n="
BWD = "dtype=float32,grad=1|n="


# --- the reference's time -----------------------------------------------------------------------


def test_entry_without_reference_is_a_corrupt_table(device, tables) -> None:
    cls = device_class(device)
    _write(cls, "relu2", {FWD + "64": {"backends": {"triton": {"fwd_ms": 0.01}}}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _runs(ops.relu2, _x(device, 64)) == "reference"
    (msg,) = [str(w.message) for w in caught if issubclass(w.category, E.EvidenceWarning)]
    assert "has no reference time" in msg and str(E.table_path("user", cls)) in msg
    t = E.read_table(E.table_path("user", cls), "user", cls)
    assert t.problem is not None and "no reference time" in t.problem


def test_reference_without_the_fast_backends_metric_is_a_corrupt_table(device, tables) -> None:
    # the reference timed forward only, triton forward + backward: a grad call has nothing to compare against
    cls = device_class(device)
    entry = {"backends": {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 0.5, "fwd_bwd_ms": 0.1}}}
    _write(cls, "relu2", {BWD + "64": entry})
    t = E.read_table(E.table_path("user", cls), "user", cls)
    assert t.problem is not None and "no reference time for fwd_bwd_ms (measured for triton)" in t.problem
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", E.EvidenceWarning)
        assert _runs(ops.relu2, _x(device, 64, grad=True)) == "reference"
    # the same times with the reference's backward timed too are a valid entry
    entry["backends"]["reference"]["fwd_bwd_ms"] = 1.0
    _write(cls, "relu2", {BWD + "64": entry})
    assert E.read_table(E.table_path("user", cls), "user", cls).problem is None
    assert _runs(ops.relu2, _x(device, 64, grad=True)) == "triton"


def test_rule_without_reference_time_runs_the_reference_even_past_the_validator(
    device, tables, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The rule itself must not read a missing reference time as "anything wins": with the table check switched
    # off, entries without a reference time still give the reference, and explain says so.
    monkeypatch.setattr(E, "_validate_ops", lambda ops_: None)
    cls = device_class(device)
    entries = {
        FWD + "64": {"backends": {"triton": {"fwd_ms": 0.01}}},
        BWD + "64": {"backends": {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 0.5, "fwd_bwd_ms": 0.1}}},
    }
    _write(cls, "relu2", entries)
    assert _runs(ops.relu2, _x(device, 64)) == "reference"
    assert _runs(ops.relu2, _x(device, 64, grad=True)) == "reference"
    assert "reference  not measured" in str(ops.explain(ops.relu2, _x(device, 64)))


def test_only_the_reference_measured(device, tables) -> None:
    cls = device_class(device)
    _write(cls, "relu2", {FWD + "128": {"backends": {"reference": {"fwd_ms": 1.0}}}})
    assert _runs(ops.relu2, _x(device, 128)) == "reference"
    text = str(ops.explain(ops.relu2, _x(device, 128)))
    assert "reference  1 ms" in text and "triton     " not in text.split("evidence")[1]


# --- nearest bucket ------------------------------------------------------------------------------


def test_nearest_bucket_up_to_4x_and_not_beyond(device, tables) -> None:
    cls = device_class(device)
    _write(cls, "relu2", {FWD + "256": {"backends": {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 0.5}}}})
    assert _runs(ops.relu2, _x(device, 256)) == "triton"  # the bucket itself
    for n in (64, 65, 128, 512, 1024):  # buckets 64 .. 1024: within two powers of two
        assert _runs(ops.relu2, _x(device, n)) == "triton", n
        assert "nearest measured bucket dtype=float32,grad=0|n=256" in str(ops.explain(ops.relu2, _x(device, n)))
    for n in (1, 2, 32, 1025, 2048, 4096):  # buckets 1, 2, 32 (8x below), 2048, 4096 (8x, 16x above)
        assert _runs(ops.relu2, _x(device, n)) == "reference", n
        assert f"evidence: none for relu2 at bucket {FWD}{E.pow2(n)}" in str(ops.explain(ops.relu2, _x(device, n)))


def test_nearest_bucket_needs_every_size_within_4x() -> None:
    a = E.Bucket.parse("dtype=float32|M=1024,H=64")
    assert E._distance(a, E.Bucket.parse("dtype=float32|M=4096,H=256")) == 4  # both 4x: used, distance 2 + 2
    assert E._distance(a, E.Bucket.parse("dtype=float32|M=1024,H=512")) is None  # one size 8x: never
    assert E._distance(a, E.Bucket.parse("dtype=float16|M=1024,H=64")) is None  # other flags: never
    assert E._distance(a, E.Bucket.parse("dtype=float32|H=64,M=1024")) is None  # other size names: never


def test_nearest_bucket_prefers_the_closer_and_breaks_ties_by_key(device, tables) -> None:
    cls = device_class(device)
    fast = {"backends": {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 0.5}}}
    slow = {"backends": {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 1.5}}}
    _write(cls, "relu2", {FWD + "256": fast, FWD + "2048": slow})
    assert _runs(ops.relu2, _x(device, 512)) == "triton"  # 256 is one power away, 2048 two
    assert _runs(ops.relu2, _x(device, 1024)) == "reference"  # 2048 one power away, 256 two
    _write(cls, "relu2", {FWD + "256": fast, FWD + "1024": slow})
    # 512 is one power from both: the smaller key text ("...n=1024" < "...n=256") decides, the same every time
    assert _runs(ops.relu2, _x(device, 512)) == "reference"
    assert "nearest measured bucket dtype=float32,grad=0|n=1024" in str(ops.explain(ops.relu2, _x(device, 512)))


# --- kernel versions, device classes -------------------------------------------------------------


def test_stale_measurement_is_ignored_and_the_current_one_used(device, tables) -> None:
    cls = device_class(device)
    x = torch.randn(8, 32, device=device)
    w1, w2 = torch.randn(64, 32, device=device), torch.randn(32, 64, device=device)
    key = ops.get_op("relu2_mlp").bucket((x, w1, w2, 0.0), {}).key
    backends = {
        "reference": {"fwd_ms": 1.0},
        "triton": {"fwd_ms": 0.2, "version": "0123456789ab"},  # fastest, but of other kernel code
        "hybrid": {"fwd_ms": 0.5, "version": E.backend_version("relu2_mlp", "hybrid")},
    }
    _write(cls, "relu2_mlp", {key: {"backends": backends}})
    assert _runs(ops.relu2_mlp, x, w1, w2) == "hybrid"
    assert "triton     0.2 ms, measured on another version of its kernels: ignored" in str(
        ops.explain(ops.relu2_mlp, x, w1, w2)
    )
    backends["hybrid"]["version"] = "ba9876543210"  # now both stale: the reference
    _write(cls, "relu2_mlp", {key: {"backends": backends}})
    assert _runs(ops.relu2_mlp, x, w1, w2) == "reference"
    del backends["triton"]["version"]  # no version recorded: taken as measured on the installed kernels
    _write(cls, "relu2_mlp", {key: {"backends": backends}})
    assert _runs(ops.relu2_mlp, x, w1, w2) == "triton"


def test_foreign_device_class_is_never_used(device, tables) -> None:
    cls = device_class(device)
    foreign = "Some Other GPU sm_75" if cls != "Some Other GPU sm_75" else "Yet Another GPU sm_80"
    entry = {"backends": {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 0.1}}}
    # a valid table of another class, in its own file (user and package folders): not this device's evidence
    _write(foreign, "relu2", {FWD + "64": entry}, path=E.table_path("user", foreign))
    _write(foreign, "relu2", {FWD + "64": entry}, path=E.table_path("package", foreign))
    assert _runs(ops.relu2, _x(device, 64)) == "reference"
    assert f"evidence: none for relu2 at bucket {FWD}64 on {cls}" in str(ops.explain(ops.relu2, _x(device, 64)))
    # a table of another class under this device's file name: skipped, with a warning naming both classes
    _write(cls, "relu2", {FWD + "64": entry}, table_class=foreign)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _runs(ops.relu2, _x(device, 64)) == "reference"
    msgs = [str(w.message) for w in caught if issubclass(w.category, E.EvidenceWarning)]
    assert len(msgs) == 1 and f"measured on {foreign!r}, not on this device ({cls!r})" in msgs[0]
    # the same entry in a table of this class decides
    _write(cls, "relu2", {FWD + "64": entry})
    assert _runs(ops.relu2, _x(device, 64)) == "triton"


# --- the margin ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fast_ms", "expected"),
    [(0.97, "reference"), (0.9699, "triton"), (0.98, "reference"), (1.0, "reference"), (0.5, "triton")],
)
def test_three_percent_margin_is_strict(device, tables, fast_ms: float, expected: str) -> None:
    cls = device_class(device)
    _write(cls, "relu2", {FWD + "64": {"backends": {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": fast_ms}}}})
    assert _runs(ops.relu2, _x(device, 64)) == expected


def test_margin_uses_the_calls_metric(device, tables) -> None:
    # within 3% forward, 2x faster forward + backward: the grad call takes triton, the no-grad call does not
    cls = device_class(device)
    times = {"reference": {"fwd_ms": 1.0, "fwd_bwd_ms": 4.0}, "triton": {"fwd_ms": 0.99, "fwd_bwd_ms": 2.0}}
    _write(cls, "relu2", {BWD + "64": {"backends": times}, FWD + "64": {"backends": times}})
    assert _runs(ops.relu2, _x(device, 64)) == "reference"
    assert _runs(ops.relu2, _x(device, 64, grad=True)) == "triton"


def test_two_fast_backends_tied(device, tables) -> None:
    cls = device_class(device)
    x = torch.randn(8, 32, device=device)
    w1, w2 = torch.randn(64, 32, device=device), torch.randn(32, 64, device=device)
    key = ops.get_op("relu2_mlp").bucket((x, w1, w2, 0.0), {}).key
    equal = {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 0.5}, "hybrid": {"fwd_ms": 0.5}}
    _write(cls, "relu2_mlp", {key: {"backends": equal}})
    assert E.measured_order(cls, "relu2_mlp", key) == "hybrid,triton"  # equal times: by name, the same every run
    assert _runs(ops.relu2_mlp, x, w1, w2) == "hybrid"
    close = {"reference": {"fwd_ms": 1.0}, "triton": {"fwd_ms": 0.96}, "hybrid": {"fwd_ms": 0.97}}
    _write(cls, "relu2_mlp", {key: {"backends": close}})
    assert E.measured_order(cls, "relu2_mlp", key) == "triton"  # hybrid misses the margin by nothing
    assert _runs(ops.relu2_mlp, x, w1, w2) == "triton"


def test_fastest_backend_that_refuses_the_call_passes_to_the_next(device, tables) -> None:
    # cuda is measured fastest but cannot take a CPU tensor: the next one in the order runs, and explain agrees
    if device.type == "cuda":
        pytest.skip("on a GPU the CUDA backend may accept the call")
    cls = device_class(device)
    times = {"reference": {"fwd_ms": 1.0}, "cuda": {"fwd_ms": 0.1}, "triton": {"fwd_ms": 0.5}}
    _write(cls, "relu2", {FWD + "64": {"backends": times}})
    assert _runs(ops.relu2, _x(device, 64)) == "triton"
    assert "(does not accept this call)" in str(ops.explain(ops.relu2, _x(device, 64)))


# --- explain and the run agree, whatever the table -------------------------------------------------


def _random_times(rng: random.Random, grad: bool) -> dict:
    out: dict = {}
    for b in ("reference", "triton", "cuda"):
        if b != "reference" and rng.random() < 0.25:
            continue
        t = {"fwd_ms": rng.choice([0.5, 0.96, 0.97, 0.98, 1.0, 2.0])}
        if grad or rng.random() < 0.5:
            t["fwd_bwd_ms"] = rng.choice([1.0, 1.94, 2.0, 3.0])
        if b != "reference":
            t["version"] = rng.choice([None, "0123456789ab", E.backend_version("relu2", b)])
            if t["version"] is None:
                del t["version"]
        out[b] = t
    if rng.random() < 0.2:  # a reference time missing: only reachable past the table check
        out["reference"].pop("fwd_ms" if rng.random() < 0.5 else "fwd_bwd_ms", None)
    return out


@pytest.mark.parametrize("checked", [True, False], ids=["validated", "unvalidated"])
def test_explain_agrees_with_the_run_on_random_tables(
    device, tables, monkeypatch: pytest.MonkeyPatch, checked: bool
) -> None:
    if not checked:
        monkeypatch.setattr(E, "_validate_ops", lambda ops_: None)
    cls = device_class(device)
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    for trial in range(12):
        entries = {}
        for n in rng.sample([16, 64, 256, 1024], rng.randint(1, 3)):
            grad = rng.random() < 0.5
            entries[(BWD if grad else FWD) + str(n)] = {"backends": _random_times(rng, grad)}
        _write(cls, "relu2", entries)
        for n in (16, 40, 100, 256, 700, 3000):
            for grad in (False, True):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", E.EvidenceWarning)
                    x = _x(device, n, grad)
                    ran = _runs(ops.relu2, x)
                    if not checked or E.read_table(E.table_path("user", cls), "user", cls).problem is None:
                        # the choice is the rule's, recomputed here from the entries
                        op = ops.get_op("relu2")
                        accepts = {b for b in op.backends if op.verdict(b, (x,), {}).ok}
                        assert ran == _expected(cls, op.bucket((x,), {}), accepts), (seed, trial, n, grad, entries)


def _expected(cls: str, bucket: E.Bucket, accepts: set[str]) -> str:
    """The evidence rule written out again: nearest entry, metric, versions, reference time, margin."""
    match = E.lookup(cls, "relu2", bucket)
    if match is None:
        return "reference"
    m = "fwd_bwd_ms" if bucket.grad else "fwd_ms"
    backends = match.entry["backends"]
    ref = backends.get("reference", {}).get(m)
    if ref is None:
        return "reference"
    best, best_t = "reference", None
    for b, t in sorted(backends.items()):
        if b == "reference" or b not in accepts or m not in t:
            continue
        if "version" in t and t["version"] != E.backend_version("relu2", b):
            continue
        if t[m] < 0.97 * ref and (best_t is None or t[m] < best_t):
            best, best_t = b, t[m]
    return best
