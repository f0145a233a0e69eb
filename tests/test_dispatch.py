"""Backend dispatch: choice order, explain(), refusals that say why, the op registry."""

from __future__ import annotations

import pytest
import torch

import fm_engine
from fm_engine import ops
from fm_engine.ops._dispatch import BACKENDS, Op, registered_ops


def backend_of(fn, *args, **kwargs) -> str:
    with ops.trace() as calls:
        fn(*args, **kwargs)
    assert len(calls) == 1
    return calls[0][1]


@pytest.fixture
def no_tables(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """An empty user table folder, so automatic dispatch sees only what a test writes."""
    from fm_engine.ops import _evidence

    monkeypatch.setenv("FM_ENGINE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("FM_ENGINE_BACKEND", raising=False)
    _evidence.reload()
    yield tmp_path
    _evidence.reload()


def test_choice_order(device, no_tables, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(8, device=device)
    assert backend_of(ops.relu2, x) == "reference"  # automatic, with no measurement: the reference
    monkeypatch.setenv("FM_ENGINE_BACKEND", "triton")
    assert backend_of(ops.relu2, x) == "triton"  # environment
    with fm_engine.use_backend("reference"):
        assert backend_of(ops.relu2, x) == "reference"  # context beats environment
        with fm_engine.use_backend("triton"):
            assert backend_of(ops.relu2, x) == "triton"  # innermost context
        assert backend_of(ops.relu2, x, backend="triton") == "triton"  # argument beats context
    assert backend_of(ops.relu2, x) == "triton"  # context popped: the environment again


def test_triton_refusal_names_the_machine_kind(device) -> None:
    x = torch.randn(8)  # a CPU tensor
    if device.type == "cuda":
        # CPU tensors: Triton needs CUDA tensors (this process does not interpret)
        with pytest.raises(ops.BackendUnsupportedError, match="Triton needs CUDA tensors"):
            ops.relu2(x, backend="triton")
    else:
        assert ops.relu2(x, backend="triton").shape == x.shape  # the interpreter runs CPU tensors


def test_unknown_backend_names_fail() -> None:
    x = torch.randn(4)
    with pytest.raises(ValueError, match="backend: unknown backend 'cudnn'"):
        ops.relu2(x, backend="cudnn")
    with pytest.raises(ValueError, match=r"use_backend\(name\): unknown backend"):
        with fm_engine.use_backend("fast"):
            pass


def test_unknown_env_backend_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FM_ENGINE_BACKEND", "speedy")
    with pytest.raises(ValueError, match="FM_ENGINE_BACKEND: unknown backend 'speedy'"):
        ops.relu2(torch.randn(3))


def test_explain_lists_every_backend(device, no_tables) -> None:
    x = torch.randn(4, 6, device=device).t()  # non-contiguous: the element-wise fast kernels refuse it
    e = ops.explain(ops.relu2, x)
    assert [v.backend for v in e.verdicts][: len(BACKENDS)] == list(BACKENDS)
    verdict = {v.backend: v for v in e.verdicts}
    assert verdict["reference"].ok
    assert not verdict["triton"].ok and "non-contiguous" in verdict["triton"].reason
    assert e.chosen == "reference"
    text = str(e)
    assert "relu2" in text and "non-contiguous" in text
    assert "evidence: none for relu2" in text and "fm-engine tune" in text
    e = ops.explain("relu2", x.contiguous())
    assert e.chosen == "reference" and {v.backend: v.ok for v in e.verdicts}["triton"]
    assert ops.explain("relu2", x.contiguous(), backend="triton").chosen == "triton"


def test_explain_reports_invalid_input() -> None:
    e = ops.explain("relu2_mlp", torch.randn(2, 3), torch.randn(4, 5), torch.randn(3, 4))
    assert e.chosen is None and "w1" in (e.error or "")
    with pytest.raises(KeyError, match="unknown op 'nope'"):
        ops.explain("nope", torch.randn(2))


def test_registry_is_consistent() -> None:
    regs = registered_ops()
    assert {"relu2", "relu2_mlp", "cross_attention", "patch_embed", "window_attention", "temporal_attention"} <= set(
        regs
    )
    for name, op in regs.items():
        assert "reference" in op.backends, name
        assert op.bucket_fn is not None, f"{name} declares no measurement bucket: auto could never pick a kernel"
        for b in op.backends.values():
            why = b.available()
            assert why is None or (isinstance(why, str) and why), (name, b.name)
    with pytest.raises(ValueError, match="registered twice"):
        Op("relu2", lambda x: x)


def test_cuda_extension_build_status() -> None:
    """With nvcc at install time the extension is built (csrc compiles and links); otherwise it says why."""
    import os
    import shutil

    status = fm_engine._C_status()
    assert (fm_engine._C is None) == (status is not None)
    if shutil.which("nvcc") and os.environ.get("FM_ENGINE_BUILD_CUDA", "1") != "0":
        assert fm_engine._C is not None, status
        assert hasattr(fm_engine._C, "relu2_forward") and hasattr(fm_engine._C, "relu2_backward")
    if fm_engine._C is None:
        assert "fm_engine._C" in status


def test_dropout_during_graph_capture_is_refused_by_one_helper(monkeypatch) -> None:
    """The fast backends refuse dropout while a CUDA graph is captured (a host-drawn seed would be frozen in the
    graph); the rule and its message are written once, in _checks.dropout_capture, and every dropout op uses it."""
    from pathlib import Path

    from fm_engine.ops import _checks

    class OnCuda:  # stands for a CUDA tensor (only .is_cuda is read)
        is_cuda = True

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    reason = _checks.dropout_capture(0.1, OnCuda())  # type: ignore[arg-type]
    assert reason is not None and reason.startswith("dropout during CUDA graph capture")
    assert _checks.dropout_capture(0.0, OnCuda()) is None  # type: ignore[arg-type]
    assert _checks.dropout_capture(0.1, torch.zeros(1)) is None  # a CPU tensor: no graph to capture into
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _checks.dropout_capture(0.1, OnCuda()) is None  # type: ignore[arg-type]
    ops_dir = Path(_checks.__file__).parent
    texts = {p.stem: p.read_text() for p in ops_dir.glob("*.py")}
    assert sum(t.count("CUDA graph capture (the seed") for t in texts.values()) == 1
    for op in ("cross_attention", "relu2", "temporal_attention", "window_attention"):
        assert "_checks.dropout_capture(dropout_p, " in texts[op], op
