"""Evaluation metrics: per-label and mean AUROC / AUPRC for multi-label outputs, accuracy.

Computed by torchmetrics (imported lazily; an optional dependency, ``pip install fm_engine[vision]``).
A label whose targets hold one class only has no defined AUROC / AUPRC: it reports NaN and the
mean is taken over the labels that have both classes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _check(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if scores.dim() == 1:
        scores = scores[:, None]
    if targets.dim() == 1:
        targets = targets[:, None]
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(
            f"targets: expected the shape of scores {tuple(scores.shape)} [N, L], got {tuple(targets.shape)}"
        )
    if not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError("targets: expected binary values 0 / 1")
    return scores.detach().float().cpu(), targets.detach().long().cpu()


def _per_label(scores: torch.Tensor, targets: torch.Tensor, kind: str) -> list[float]:
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    fn = binary_auroc if kind == "auroc" else binary_average_precision
    out = []
    for j in range(scores.shape[1]):
        t = targets[:, j]
        if int(t.min()) == int(t.max()):
            out.append(math.nan)
        else:
            out.append(float(fn(scores[:, j], t)))
    return out


def _mean(values: Sequence[float]) -> float:
    ok = [v for v in values if not math.isnan(v)]
    return sum(ok) / len(ok) if ok else math.nan


def auroc(scores: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], float]:
    """Per-label ROC-AUC and their mean. scores (probabilities or logits) and targets {0, 1}: [N, L] or [N]."""
    s, t = _check(scores, targets)
    per = _per_label(s, t, "auroc")
    return per, _mean(per)


def auprc(scores: torch.Tensor, targets: torch.Tensor) -> tuple[list[float], float]:
    """Per-label area under the precision-recall curve (average precision) and their mean."""
    s, t = _check(scores, targets)
    per = _per_label(s, t, "auprc")
    return per, _mean(per)


def multilabel_report(scores: torch.Tensor, targets: torch.Tensor, label_names: Sequence[str] | None = None) -> dict:
    """{"auroc": {name: v}, "auprc": {name: v}, "mean_auroc": v, "mean_auprc": v}; scores, targets [N, L]."""
    s, t = _check(scores, targets)
    names = list(label_names) if label_names is not None else [str(j) for j in range(s.shape[1])]
    if len(names) != s.shape[1]:
        raise ValueError(f"label_names: {len(names)} names for {s.shape[1]} labels")
    roc, pr = _per_label(s, t, "auroc"), _per_label(s, t, "auprc")
    return {
        "auroc": dict(zip(names, roc, strict=True)),
        "auprc": dict(zip(names, pr, strict=True)),
        "mean_auroc": _mean(roc),
        "mean_auprc": _mean(pr),
    }


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy. logits [N, C] with targets [N] class indices (multi-class), or scores [N] with
    binary targets [N] (threshold 0.5 on probabilities)."""
    from torchmetrics.functional.classification import binary_accuracy, multiclass_accuracy

    logits, targets = logits.detach().cpu(), targets.detach().cpu().long()
    if logits.dim() == 2:
        if targets.shape != logits.shape[:1]:
            raise ValueError(
                f"targets: expected class indices of shape ({logits.shape[0]},), got {tuple(targets.shape)}"
            )
        return float(multiclass_accuracy(logits, targets, num_classes=logits.shape[1], average="micro"))
    if logits.shape != targets.shape:
        raise ValueError(f"targets: expected shape {tuple(logits.shape)}, got {tuple(targets.shape)}")
    return float(binary_accuracy(logits.float(), targets))
