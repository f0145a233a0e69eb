"""A training step reaches steady state: after warm-up no kernel is specialised, compiled or autotuned anew.

The first GPU run found the fast AViT M-JEPA step 16x slower than eager. One cause visible without a
GPU: the predictor input was padded to each batch's own union length, so every step launched the fused
kernels at new sizes (a new ``triton.autotune`` key each time, i.e. a fresh tuning sweep per step on a
GPU). ``fm_engine.kernels._launches`` records, also in Triton's interpreter, what a GPU would compile or
tune; this test pins that nothing new appears once a tiny AViT M-JEPA step has run twice.
"""

from __future__ import annotations

import pytest
import torch
from fm_engine.kernels import _launches

import fm_engine
from fm_engine.models.mitub import AViT
from fm_engine.ssl import MJEPA


def _tiny_objective(device: torch.device) -> MJEPA:
    model = AViT(
        in_channels=1, dim=32, patch=4, depth=1, heads=2, kv_heads=1, kv_dim=16, target_grid=(4, 4),
        high_res_depth=1, head_dim=16, dropout=0.0, attn_dropout=0.0,
    )  # fmt: skip
    return MJEPA(model, predictor_depth=1, context_coarsen=2, target_coarsen=1).to(device)


def _step(obj: MJEPA, images: torch.Tensor, **kw: int) -> None:
    with fm_engine.use_backend("triton"):
        out = obj(images, intensity_scale=1 / 4095, **kw)
        out["loss"].backward()
    obj.zero_grad(set_to_none=True)


# 8x8 high-resolution tokens over the 4x4 pooled grid (context keys/values gathered with exact counts), and 9x11
# (ragged counts: padded to a static length behind a key-padding mask)
SIZES = pytest.mark.parametrize("size", [(32, 32), (36, 44)], ids=["multiple", "padded"])


@SIZES
def test_avit_mjepa_step_has_no_new_kernels_after_warmup(device: torch.device, size: tuple[int, int]) -> None:
    obj = _tiny_objective(device)
    images = torch.randint(0, 4096, (2, 1, *size), dtype=torch.int32).to(torch.uint16).to(device)
    with _launches.count() as warm:
        _step(obj, images)
        _step(obj, images)
    assert warm.total_launches > 0, "the step ran no Triton kernel: the test would prove nothing"
    for _ in range(2):  # fresh random masks each step
        with _launches.count() as steady:
            _step(obj, images)
        assert steady.total_launches == warm.total_launches / 2
        assert steady.new_specializations == [], steady.as_dict()
        assert steady.autotune_keys == [], steady.as_dict()
        assert steady.compilations == 0
    # negative control: a step whose predictor length crosses into another power-of-two bucket is new work
    # (a few extra slots stay in their bucket: autotuning is bucketed), so the counter can fail. What has been
    # seen is process-wide and both sizes share the predictor's shapes: each size crosses into its own bucket.
    with _launches.count() as changed:
        _step(obj, images, extra_padding=40 if size == (32, 32) else 100)
    assert changed.autotune_keys or changed.new_specializations, changed.as_dict()


def test_mjepa_kept_counts_are_static() -> None:
    from fm_engine.ssl.mjepa import coarse_mask, kept_tokens

    for grid, coarsen, ratio in (((4, 4), 2, 0.5), ((32, 24), 4, 0.5), ((32, 24), 2, 0.25), ((6,), 3, 0.9)):
        m = coarse_mask(3, grid, coarsen, ratio)
        assert m.sum(1).tolist() == [kept_tokens(grid, coarsen, ratio)] * 3


@SIZES
def test_avit_mjepa_step_compiles_as_one_graph(device: torch.device, size: tuple[int, int]) -> None:
    # the first GPU run's torch.compile of this step hit a graph break on Tensor.item() (mask counts) and
    # dynamo's recompile limit (a new predictor length every step); the reference stem's TF32 switch broke
    # every frame above it. fullgraph=True fails on any graph break; two steps with fresh masks must not
    # recompile (the compile counter of the backend counts graphs). The context keys/values have a static
    # count on both grids, so fresh masks never change a shape.
    obj = _tiny_objective(device)
    images = torch.randint(0, 4096, (2, 1, *size), dtype=torch.int32).to(torch.uint16).to(device)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def loss(obj: MJEPA, images: torch.Tensor) -> torch.Tensor:
        return obj(images, intensity_scale=1 / 4095)["loss"]

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=counting_backend)
    with fm_engine.use_backend("reference"):
        for _ in range(3):
            compiled(obj, images).backward()
    assert len(graphs) == 1
    torch._dynamo.reset()
