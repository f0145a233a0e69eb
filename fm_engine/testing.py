"""Test support: the parity rule of docs/KERNELS.md, the Triton interpreter patch, and stand-in spill reports
for the autotuner's register-spill check (:func:`reported_spills`).

Parity rule (docs/KERNELS.md, "Numerics and the parity rule"): compare the fast backend and the
reference computed in the same low precision against a reference computed in fp64 on upcast
inputs. For fp16 / bf16 the fast backend's max abs error must be at most

    2 * (max abs error of the same-dtype reference) + floor,    floor = eps(dtype) * max|ref64|

(one unit of the dtype's rounding at the output's scale). For fp32 the normwise relative error
max|fast - ref64| / max|ref64| must be at most 1e-5, or, where the fp32 reference itself misses that
(ill-conditioned values), within the low-precision rule above with fp32's epsilon. The same rule
applies to every gradient.
Non-finite values where the fp64 reference is finite always fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

FP32_RTOL = 1e-5


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def parity_error(
    fast: torch.Tensor,
    ref_lowp: torch.Tensor,
    ref_hi: torch.Tensor,
    dtype: torch.dtype,
    *,
    scale: float | None = None,
) -> tuple[float, float, bool]:
    """(error, bound, ok) of ``fast`` under the parity rule for ``dtype``.

    ``scale`` is the norm the relative rule divides by: ``max|ref_hi|`` by default. A tensor that is one
    part of a larger vector (the bias of a layer whose weight and bias gradients both come from one
    output gradient) is judged normwise over that vector by passing the vector's ``max|ref64|``; it may
    not be smaller than the tensor's own.
    """
    hi = ref_hi.detach().double()
    f = fast.detach().double()
    ref_lowp = ref_lowp.detach()
    if f.shape != hi.shape:
        raise AssertionError(f"shape {tuple(f.shape)} != reference shape {tuple(hi.shape)}")
    finite_ref = torch.isfinite(hi)
    if bool((finite_ref & ~torch.isfinite(f)).any()):
        return float("inf"), 0.0, False
    # where the reference is NaN or +-inf the fast result must be the same non-finite value
    nonfinite = ~finite_ref
    if bool(nonfinite.any()):
        same_nan = torch.isnan(f[nonfinite]) == torch.isnan(hi[nonfinite])
        same_inf = (f[nonfinite] == hi[nonfinite]) | torch.isnan(hi[nonfinite])
        if not bool((same_nan & same_inf).all()):
            return float("inf"), 0.0, False

    def max_abs(t: torch.Tensor) -> float:
        t = t[finite_ref]
        return float(t.abs().max()) if t.numel() else 0.0

    own_scale = max_abs(hi)
    if scale is not None and not scale >= own_scale:
        raise ValueError(f"scale: expected at least max|ref_hi| = {own_scale:.3e}, got {scale!r}")
    scale = own_scale if scale is None else scale
    err = max_abs(f - hi)
    if dtype == torch.float64:
        bound = 1e-12 * max(scale, 1e-300)
    else:
        low_rule = 2.0 * max_abs(ref_lowp.double() - hi) + _eps(dtype) * scale
        # fp32: 1e-5 relative, unless the fp32 reference itself cannot reach that (ill-conditioned values
        # such as a bias gradient that nearly cancels): then the low-precision rule with fp32's rounding.
        bound = max(FP32_RTOL * scale, low_rule) if dtype == torch.float32 else low_rule
    return err, bound, err <= bound


def assert_parity_tensor(
    name: str,
    fast: torch.Tensor,
    ref_lowp: torch.Tensor,
    ref_hi: torch.Tensor,
    dtype: torch.dtype,
    *,
    scale: float | None = None,
) -> None:
    """Raise AssertionError naming ``name`` where ``fast`` breaks the parity rule (see parity_error)."""
    err, bound, ok = parity_error(fast, ref_lowp, ref_hi, dtype, scale=scale)
    if not ok:
        raise AssertionError(
            f"{name}: max error {err:.3e} exceeds the parity bound {bound:.3e} ({dtype}); "
            f"same-dtype reference error {float((ref_lowp.double() - ref_hi.double()).abs().max()):.3e}"
        )


def _as_tuple(x: Any) -> tuple[torch.Tensor, ...]:
    if isinstance(x, torch.Tensor):
        return (x,)
    return tuple(t for t in x if isinstance(t, torch.Tensor))


def assert_parity(
    fast: Callable[..., Any],
    reference: Callable[..., Any],
    inputs: Sequence[Any],
    *,
    grad: Sequence[bool] | bool = True,
    dtype: torch.dtype | None = None,
    name: str = "op",
    hi_dtype: torch.dtype = torch.float64,
) -> None:
    """Check outputs and all gradients of ``fast(*inputs)`` against ``reference`` under the rule.

    ``inputs`` may mix tensors and other values; floating tensors are the differentiable inputs
    (select with ``grad``). The reference runs twice: on the inputs as given (same low precision)
    and on copies upcast to ``hi_dtype`` (fp64 by default). One random output gradient, drawn
    once, is used for all three backward passes.
    """
    tensors = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.is_floating_point()]
    if isinstance(grad, bool):
        grad_idx = tensors if grad else []
    else:
        grad_idx = [i for i, g in zip(tensors, grad, strict=True) if g]
    dtype = dtype or inputs[tensors[0]].dtype

    def prep(cast: torch.dtype | None) -> list[Any]:
        out = []
        for i, x in enumerate(inputs):
            if isinstance(x, torch.Tensor):
                x = x.detach()
                if cast is not None and x.is_floating_point():
                    x = x.to(cast)
                x = x.clone().requires_grad_(i in grad_idx)
            out.append(x)
        return out

    runs = []
    for fn, cast in ((fast, None), (reference, None), (reference, hi_dtype)):
        args = prep(cast)
        outs = _as_tuple(fn(*args))
        runs.append((args, outs))
    n_out = len(runs[0][1])
    if any(len(r[1]) != n_out for r in runs):
        raise AssertionError(f"{name}: fast and reference return different numbers of tensors")
    for k in range(n_out):
        assert_parity_tensor(f"{name} output {k}", runs[0][1][k], runs[1][1][k], runs[2][1][k], dtype)
    if not grad_idx:
        return
    diff_outs = [k for k in range(n_out) if runs[0][1][k].requires_grad]
    if not diff_outs:
        raise AssertionError(f"{name}: no output requires grad although gradients were requested")
    gen = torch.Generator(device="cpu").manual_seed(1234)
    cot = [torch.randn(runs[2][1][k].shape, generator=gen, dtype=torch.float64) for k in diff_outs]
    grads = []
    for args, outs in runs:
        o = [outs[k] for k in diff_outs]
        g = torch.autograd.grad(
            o, [args[i] for i in grad_idx], [c.to(t.dtype).to(t.device) for c, t in zip(cot, o)], allow_unused=True
        )
        grads.append(g)
    for j, i in enumerate(grad_idx):
        gf, gl, gh = grads[0][j], grads[1][j], grads[2][j]
        if gh is None:
            if gf is not None and bool(gf.abs().max() > 0):
                raise AssertionError(f"{name}: gradient of input {i} should be zero/None")
            continue
        if gf is None:
            raise AssertionError(f"{name}: fast backend gave no gradient for input {i}")
        assert_parity_tensor(f"{name} grad of input {i}", gf, gl, gh, dtype)


# --- Triton interpreter -----------------------------------------------------------------------


def patch_triton_interpreter() -> None:
    """Make Triton's interpreter compute bf16 the way the GPU does (test-only; idempotent).

    * ``tl.dot`` on bf16 operands multiplied the raw uint16 bit patterns: upcast them to fp32 first
      (bf16 products are exact in fp32, as on tensor cores);
    * ``.to(tl.bfloat16)`` from fp32 truncated the mantissa: round to nearest even, as the GPU does.
    """
    try:
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - triton missing
        return
    builder = getattr(_interp, "InterpreterBuilder", None)
    if builder is None or getattr(builder.create_dot, "_fm_engine_patched", False):
        return
    import numpy as np
    import triton.language as tl

    def bf16_to_f32(h: Any) -> Any:
        if getattr(h.dtype, "scalar", h.dtype) == tl.bfloat16:
            return _interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    orig_dot = builder.create_dot

    def create_dot(self: Any, a: Any, b: Any, d: Any, input_precision: Any, max_num_imprecise_acc: Any) -> Any:
        return orig_dot(self, bf16_to_f32(a), bf16_to_f32(b), d, input_precision, max_num_imprecise_acc)

    orig_cast = builder.cast_impl

    def cast_impl(self: Any, src: Any, dst_type: Any) -> Any:
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
            nan = np.isnan(src.data)
            out = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)
            return _interp.TensorHandle(out, dst_type.scalar)
        return orig_cast(self, src, dst_type)

    create_dot._fm_engine_patched = True  # type: ignore[attr-defined]
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    # the create_fp_trunc / create_fp_to_fp lambdas look cast_impl up on self, so they see the patch


def _version(text: str) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as ``"3.6.0"`` or ``"2.5.0rc1+git"``."""
    parts = []
    for piece in text.split(".")[:3]:
        digits = re.match(r"\d*", piece).group()  # type: ignore[union-attr]
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def interpreter_unusable_reason(triton_version: str | None = None, numpy_version: str | None = None) -> str | None:
    """None when Triton's interpreter works with the installed numpy, else why it does not.

    Triton 3.6 and older call ``int()`` on 1-element arrays inside the interpreter, which new numpy refuses
    (``TypeError: only 0-dimensional arrays can be converted to Python scalars``, seen with numpy 2.4 and
    2.5), so every interpreted kernel fails; docs/ARCHITECTURE.md pins numpy < 2.3 for Triton 3.6's interpreter.
    Newer Triton converts explicitly (3.8 with numpy 2.4, CI's newest leg, and 3.9 are known to work). The versions
    default to the installed ones.
    """
    if triton_version is None or numpy_version is None:
        try:
            import numpy
            import triton
        except Exception as e:  # pragma: no cover - depends on the machine
            return f"Triton's interpreter cannot be imported ({e.__class__.__name__}: {e})"
        triton_version = triton_version or triton.__version__
        numpy_version = numpy_version or numpy.__version__
    if _version(triton_version) < (3, 7) and _version(numpy_version) >= (2, 3):
        return (
            f"Triton {triton_version}'s interpreter does not work with numpy {numpy_version} "
            "(Triton <= 3.6 needs numpy < 2.3; install numpy<2.3 or a newer Triton)"
        )
    return None


def setup_interpreter_if_no_gpu() -> bool:
    """Set TRITON_INTERPRET=1 when no CUDA GPU is present (call before importing kernels).

    Returns True when the kernels will run in Triton's interpreter. Raises RuntimeError, before any kernel
    runs, when they would but the interpreter cannot work here (see interpreter_unusable_reason).
    """
    if "TRITON_INTERPRET" not in os.environ:
        has_gpu = False
        try:
            has_gpu = torch.cuda.is_available()
        except Exception:
            has_gpu = False
        if not has_gpu:
            os.environ["TRITON_INTERPRET"] = "1"
    if os.environ.get("TRITON_INTERPRET") == "1":
        reason = interpreter_unusable_reason()
        if reason is not None:
            raise RuntimeError(
                f"TRITON_INTERPRET=1 (no CUDA GPU, or set by hand): the Triton kernels would run in Triton's "
                f"interpreter, but {reason}"
            )
        patch_triton_interpreter()
        return True
    return False


@contextlib.contextmanager
def reported_spills(fn: Any, spills_of: Callable[[dict[str, Any]], int]) -> Iterator[list[int]]:
    """Inside the block, launches ``fn[grid](...)`` of the JIT function ``fn`` run as usual but return a stand-in
    for Triton's compiled kernel whose ``n_spills`` is ``spills_of(launch arguments by name)``, as a
    ``CompiledKernel`` reports once it is loaded on a GPU. The interpreter compiles nothing and so reports no
    spill: this lets CPU tests check that the autotuner (fm_engine.kernels._autotune) drops candidates that
    spill. Yields the values reported, one per launch."""
    real = fn.run
    reported: list[int] = []

    def run(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs)
        reported.append(int(spills_of({**dict(zip(fn.arg_names, args)), **kwargs})))
        return types.SimpleNamespace(n_spills=reported[-1], n_regs=255)

    fn.run = run  # fn[grid](...) calls fn.run
    try:
        yield reported
    finally:
        del fn.run
