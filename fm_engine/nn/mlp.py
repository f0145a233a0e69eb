"""ReLU² modules (MiT-UB feed-forward)."""

from __future__ import annotations

import torch
from torch import nn

from fm_engine import ops


class ReLU2(nn.Module):
    """``relu(x) ** 2`` element-wise; x: any shape."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.relu2(x, backend=self.backend)


class ReLU2MLP(nn.Module):
    """``fc2(dropout(relu(fc1(x)) ** 2))`` without biases; x: [..., dim] -> [..., dim].

    Parameter names ``fc1.weight`` [hidden, dim] and ``fc2.weight`` [dim, hidden] match an eager
    ``fc1 -> relu² -> fc2`` MLP, so its state_dict loads unchanged. Dropout acts in training only.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, backend: str | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.dropout = float(dropout)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        return ops.relu2_mlp(x, self.fc1.weight, self.fc2.weight, p, backend=self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.fc1.in_features}, hidden={self.fc1.out_features}, dropout={self.dropout}"
