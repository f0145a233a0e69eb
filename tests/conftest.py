"""Test setup. Runs before any test module imports a kernel:

* without a CUDA GPU, ``TRITON_INTERPRET=1`` so the Triton backends run in Triton's interpreter,
  with the interpreter's bf16 ``tl.dot`` patched (fm_engine.testing.patch_triton_interpreter) and
  autotuning reduced to each kernel's interpreter config (kernels/_aot.py: runtime_configs); when the
  interpreter cannot work with the installed numpy, setup stops here with the reason;
* ``FM_ENGINE_POISON=1`` so every output a fast backend allocates starts as NaN;
* the ``gpu`` marker skips tests when no CUDA GPU is present; the ``device`` fixture is the GPU when there
  is one, else the CPU (kernels in the interpreter), and every kernel test runs on it;
* every kernel module is imported here, and a guard fails any test (setup, call or teardown) that changes
  ``TRITON_INTERPRET`` inside the test process: kernel modules are decorated at import, so a flip before
  their import turns this worker's kernels into interpreted functions (or the reverse), and interpreted
  kernels leak Triton's interpreter patches into later real compilations. Code that needs the other mode
  runs in a subprocess with its own environment (tests/test_cli.py, tests/test_env_guard.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ.setdefault("FM_ENGINE_POISON", "1")

from fm_engine.testing import setup_interpreter_if_no_gpu

INTERPRET = setup_interpreter_if_no_gpu()

import importlib  # noqa: E402
import pkgutil  # noqa: E402

import fm_engine.kernels  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

# Every kernel module is imported now, in this process's one mode: Triton decides when it decorates a kernel
# whether it is compiled or interpreted, so a test that flips TRITON_INTERPRET (which the guard below fails)
# cannot leave this worker with kernels of the other kind.
for _module in pkgutil.iter_modules(fm_engine.kernels.__path__):
    importlib.import_module(f"fm_engine.kernels.{_module.name}")

HAS_GPU = torch.cuda.is_available()

# Tests run small tensors, usually two pytest-xdist workers on two cores: one intra-op thread per
# worker avoids oversubscription, which made small training steps several times slower.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# environment variables that must keep their value for the whole test process
GUARDED_ENV = ("TRITON_INTERPRET",)


def _check_guarded_env(before: dict[str, str | None], when: str) -> None:
    changed = {k: (v, os.environ.get(k)) for k, v in before.items() if os.environ.get(k) != v}
    if not changed:
        return
    for k, (v, _) in changed.items():  # put it back so later tests in this worker see the original mode
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    what = ", ".join(f"{k} from {v!r} to {now!r}" for k, (v, now) in changed.items())
    pytest.fail(
        f"this test changed {what} inside the test process ({when}); kernel modules are decorated for one "
        "mode at import (compiled or interpreted), and a flip makes dispatch disagree with them or, before "
        "their import, turns the worker's kernels into the other kind and leaks interpreter patches into "
        "later compilations. Run that code in a subprocess with its own environment, or skip with a reason.",
        pytrace=False,
    )


def _guarded(when: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in GUARDED_ENV}
    try:
        return (yield)
    finally:
        _check_guarded_env(before, when)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded("setup"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from _guarded("call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    return (yield from _guarded("teardown"))


@pytest.fixture
def device() -> torch.device:
    """CPU (kernels in the interpreter) without a GPU, else the GPU."""
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """fp32 matrix products and cuDNN convolutions in full fp32 during the test. PyTorch lets cuDNN use TF32
    by default on a GPU, which would put errors of 1e-3 into the eager (non-op) layers of both runs of a model
    parity test; docs/KERNELS.md's fp32 rule is 1e-5. No effect on a CPU."""
    prev = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = prev


@pytest.fixture(autouse=True)
def _seed() -> None:
    # fresh random inputs in every run; the seed is printed so a failure can be replayed
    # with FM_ENGINE_TEST_SEED=<seed>
    seed = int(os.environ.get("FM_ENGINE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
