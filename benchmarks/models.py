"""Training-step benchmark for any registered model: eager reference vs fast backends vs torch.compile.

Uses the registry hooks (``ModelSpec.example`` and ``ModelSpec.loss``): one step = loss forward +
backward on a synthetic batch. Backend labels: "reference" (every op on its eager reference),
"fast" (automatic dispatch: the fastest backend each op supports) and "compile" (torch.compile of
the reference step).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from fm_engine import use_backend
from fm_engine.models.registry import create_model, get_spec

from .harness import Case, compiled


def cases(name: str, device: torch.device, quick: bool) -> list[Case]:
    spec = get_spec(name)
    model = create_model(name).to(device)
    batch_size = 1 if quick else 8
    batch = spec.example(model, batch_size, device, quick)
    params = [p for p in model.parameters() if p.requires_grad]

    def step_with(backend: str) -> Any:
        def step(*_: Any) -> torch.Tensor:
            with use_backend(backend):
                return spec.loss(model, batch)

        return step

    ref_model = copy.deepcopy(model)

    def ref_step(*_: Any) -> torch.Tensor:
        with use_backend("reference"):
            return spec.loss(ref_model, batch)

    ref_params = [p for p in ref_model.parameters() if p.requires_grad]

    def setup() -> list[Any]:
        # gradients flow to the parameters of both copies; the harness clears them after every step
        return [*params, *ref_params]

    fns = {"reference": step_with("reference"), "fast": step_with("auto"), "compile": compiled(ref_step)}
    return [
        Case(
            op=f"model:{name}",
            name=f"train step B{batch_size}" + (" (small)" if quick else ""),
            setup=setup,
            fns=fns,
            kind="model",
            items=batch_size,
        )
    ]
