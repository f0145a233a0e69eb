"""Test setup. Runs before any test module imports a kernel:

* without a CUDA GPU, ``TRITON_INTERPRET=1`` so the Triton backends run in Triton's interpreter,
  with the interpreter's bf16 ``tl.dot`` patched (fm_engine.testing.patch_triton_interpreter) and
  autotuning reduced to each kernel's interpreter config (kernels/_aot.py: runtime_configs);
* ``FM_ENGINE_POISON=1`` so every output a fast backend allocates starts as NaN;
* the ``gpu`` marker skips tests when no CUDA GPU is present.
"""

from __future__ import annotations

import os

os.environ.setdefault("FM_ENGINE_POISON", "1")

from fm_engine.testing import setup_interpreter_if_no_gpu

INTERPRET = setup_interpreter_if_no_gpu()

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture
def device() -> torch.device:
    """CPU (kernels in the interpreter) without a GPU, else the GPU."""
    return torch.device("cuda" if HAS_GPU else "cpu")


@pytest.fixture(autouse=True)
def _seed() -> None:
    # fresh random inputs in every run; the seed is printed so a failure can be replayed
    # with FM_ENGINE_TEST_SEED=<seed>
    seed = int(os.environ.get("FM_ENGINE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"torch seed {seed}")
    torch.manual_seed(seed)
