"""Low-rank adaptation (LoRA) of linear layers, for fine-tuning MiT-UB backbones (docs/MODELS.md 1.6).

``LoRALinear`` wraps an ``nn.Linear`` (``base``, frozen by :func:`freeze_except_lora`) with factors
``lora_A`` [rank, in] and ``lora_B`` [out, rank]: y = base(x) + (alpha / rank) * x A^T B^T.
``lora_B`` starts at zero, so a fresh adapter leaves the model's output unchanged.

Modules that hand their weight straight to a fused op instead of calling the layer (``ReLU2MLP``
passes ``fc1.weight`` / ``fc2.weight`` to ``relu2_mlp``; the stems pass ``pos.weight`` to
``patch_embed``) read ``LoRALinear.weight``, which is the effective weight W + (alpha / rank) * B A:
the op then computes the adapted layer and gradients reach A and B through that sum.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

# attribute names of the linear layers each target group covers
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "attn": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "mlp": ("fc1", "fc2"),
    "pos": ("pos", "kv_pos"),
}


class LoRALinear(nn.Module):
    """``base(x) + scaling * (x @ lora_A.T) @ lora_B.T`` with ``scaling = alpha / rank``.

    x: [..., in_features] -> [..., out_features]. ``weight`` / ``bias`` give the effective parameters
    (see the module docstring). :meth:`merge` folds the update into ``base.weight`` (the forward then
    costs one matrix product); :meth:`unmerge` takes it out again.
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank: expected a positive int, got {rank}")
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        """The low-rank update ``scaling * B @ A``: [out, in]."""
        return self.scaling * (self.lora_B @ self.lora_A)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight if self.merged else self.base.weight + self.delta()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``base.weight`` (idempotent)."""
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (idempotent)."""
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def apply_lora(
    model: nn.Module, targets: Iterable[str] = ("attn", "mlp", "pos"), rank: int = 8, alpha: float = 16.0
) -> list[str]:
    """Replace the linear layers of the ``targets`` groups ("attn": q/k/v/out projections, "mlp": fc1/fc2,
    "pos": the stems' position Linears) by :class:`LoRALinear` in place. Returns the wrapped layer names."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"targets: unknown groups {unknown}; expected some of {tuple(LORA_TARGETS)}")
    attrs = {a for t in targets for a in LORA_TARGETS[t]}
    wrapped = []
    for parent_name, parent in list(model.named_modules()):
        if isinstance(parent, LoRALinear):
            continue
        for attr, child in list(parent.named_children()):
            if attr in attrs and type(child) is nn.Linear:
                setattr(parent, attr, LoRALinear(child, rank, alpha))
                wrapped.append(f"{parent_name}.{attr}" if parent_name else attr)
    if not wrapped:
        raise ValueError(f"model: no linear layer matches targets {targets}")
    return wrapped


def freeze_except_lora(model: nn.Module, unfreeze_norms: bool = False, unfreeze_stem: bool = False) -> list[str]:
    """Freeze every parameter except the LoRA factors (optionally also LayerNorms and the ``stem``).

    Returns the names of the parameters left trainable.
    """
    model.requires_grad_(False)
    for module_name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
        elif unfreeze_norms and isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
        if unfreeze_stem and module_name.split(".")[-1] == "stem":
            module.requires_grad_(True)
            for sub in module.modules():
                if isinstance(sub, LoRALinear):
                    sub.base.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every :class:`LoRALinear` by a plain ``nn.Linear`` holding the merged weight, in place
    (the state_dict then has the un-adapted model's names). Returns ``model``."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.merge()
                setattr(parent, attr, child.base)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors of ``model`` (what a fine-tuning run needs to save)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}
