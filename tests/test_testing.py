"""The parity helper itself must reject wrong kernels (a rule that cannot fail tests nothing)."""

from __future__ import annotations

import pytest
import torch

from fm_engine import _alloc
from fm_engine.testing import assert_parity, parity_error


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


def test_outputs_are_poisoned_in_tests() -> None:
    assert _alloc.poisoning()
    assert torch.isnan(_alloc.empty(3, dtype=torch.float32, device="cpu")).all()
    assert (_alloc.empty(2, dtype=torch.int32, device="cpu") == torch.iinfo(torch.int32).max).all()
