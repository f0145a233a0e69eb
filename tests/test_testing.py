"""The parity helper itself must reject wrong kernels (a rule that cannot fail tests nothing); the check of
whether Triton's interpreter can run here."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fm_engine import _alloc
from fm_engine.ops._dispatch import interpreting
from fm_engine.testing import assert_parity, interpreter_unusable_reason, parity_error


def ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.tanh(x @ w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accepts_the_reference_itself(dtype: torch.dtype) -> None:
    x, w = torch.randn(8, 16).to(dtype), torch.randn(16, 4).to(dtype)
    assert_parity(ref, ref, [x, w], name="self")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rejects_a_small_output_error(dtype: torch.dtype) -> None:
    x, w = torch.randn(8, 16).to(dtype), torch.randn(16, 4).to(dtype)
    bad = lambda x, w: ref(x, w) * 1.02
    with pytest.raises(AssertionError, match="output 0"):
        assert_parity(bad, ref, [x, w], name="bad")


def test_rejects_a_wrong_gradient() -> None:
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.001

    x, w = torch.randn(8, 16), torch.randn(16, 4)
    with pytest.raises(AssertionError, match="grad of input 0"):
        assert_parity(lambda x, w: ref(WrongGrad.apply(x), w), ref, [x, w], name="wrong grad")


def test_nonfinite_values_must_match() -> None:
    hi = torch.tensor([1.0, float("nan"), float("inf"), -2.0], dtype=torch.float64)
    ok = hi.float()
    assert parity_error(ok, ok, hi, torch.float32)[2]
    swallowed = torch.nan_to_num(ok)
    assert not parity_error(swallowed, ok, hi, torch.float32)[2]
    flipped = ok.clone()
    flipped[2] = -float("inf")
    assert not parity_error(flipped, ok, hi, torch.float32)[2]
    spurious = ok.clone()
    spurious[0] = float("nan")
    assert not parity_error(spurious, ok, hi, torch.float32)[2]


def test_normwise_scale_of_a_larger_vector() -> None:
    # a bias gradient that nearly cancels (max 1e-3) beside a weight gradient of max 1.0
    bias_hi = torch.tensor([1e-3, -5e-4, 2e-4], dtype=torch.float64)
    noisy = (bias_hi + 3e-6).float()  # rounding noise carried by the sum: 3e-3 of the bias, 3e-6 of the layer
    assert not parity_error(noisy, bias_hi.float(), bias_hi, torch.float32)[2]
    assert parity_error(noisy, bias_hi.float(), bias_hi, torch.float32, scale=1.0)[2]
    # an error at the bias's own size still fails against the layer's scale
    wrong = (bias_hi * 1.5).float()
    assert not parity_error(wrong, bias_hi.float(), bias_hi, torch.float32, scale=1.0)[2]
    with pytest.raises(ValueError, match="scale: expected at least"):
        parity_error(noisy, bias_hi.float(), bias_hi, torch.float32, scale=1e-4)


def test_outputs_are_poisoned_in_tests() -> None:
    assert _alloc.poisoning()
    assert torch.isnan(_alloc.empty(3, dtype=torch.float32, device="cpu")).all()
    assert (_alloc.empty(2, dtype=torch.int32, device="cpu") == torch.iinfo(torch.int32).max).all()


# --- whether Triton's interpreter can run here ----------------------------------------------------


def test_interpreter_unusable_reason_compares_versions() -> None:
    reason = interpreter_unusable_reason("3.6.0", "2.5.0")
    assert reason is not None and "numpy 2.5.0" in reason and "numpy < 2.3" in reason
    assert interpreter_unusable_reason("3.6.0", "2.3.0") is not None
    assert interpreter_unusable_reason("3.6.0", "2.2.6") is None
    assert interpreter_unusable_reason("3.9.0", "2.5.0") is None
    if interpreting():  # this process runs the kernels in the interpreter, so it works here
        assert interpreter_unusable_reason() is None


def test_setup_stops_early_when_the_interpreter_cannot_run() -> None:
    """Without a GPU (hidden here) the suite would run every kernel in the interpreter: with a numpy the
    interpreter cannot use, setup raises one clear error instead of failing kernel by kernel."""
    script = textwrap.dedent(
        """
        import os

        import numpy
        import torch
        import triton

        numpy.__version__, triton.__version__ = "2.5.0", "3.6.0"
        from fm_engine.testing import setup_interpreter_if_no_gpu

        for preset in (None, "1"):
            if preset is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = preset
            try:
                setup_interpreter_if_no_gpu()
            except RuntimeError as e:
                print("RuntimeError:", e)
            else:
                print("no error")
        """
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, r.stdout
    for line in lines:
        assert line.startswith("RuntimeError: TRITON_INTERPRET=1"), r.stdout
        assert "Triton 3.6.0's interpreter does not work with numpy 2.5.0" in line, r.stdout
