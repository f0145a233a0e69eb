"""RadDiffusion evaluation (docs/MODELS.md 3.5): CheXpert labels, pos_weight, study-level linear probe."""

from __future__ import annotations

import torch

from fm_engine.metrics import multilabel_report

CHEXPERT_LABELS = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)


def map_uncertain(labels: torch.Tensor) -> torch.Tensor:
    """CheXpert labels [S, 14] with 1 = positive, 0 = negative, -1 = uncertain, NaN = not mentioned ->
    float {0, 1}: uncertain maps to 1 (the "U-ones" policy), not mentioned to 0."""
    labels = torch.nan_to_num(labels.float(), nan=0.0)
    return (labels != 0).float()


def pos_weight(labels: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """BCE pos_weight per label = 1 / sqrt(label frequency); labels [S, L] in {0, 1} -> [L]."""
    if labels.dim() != 2:
        raise ValueError(f"labels: expected [studies, labels], got shape {tuple(labels.shape)}")
    freq = labels.float().mean(dim=0).clamp_min(eps)
    return freq.rsqrt()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    label_names: tuple[str, ...] = CHEXPERT_LABELS,
    max_iter: int = 1000,
) -> dict:
    """One logistic regression per label on study features [S, D] (scikit-learn, imported lazily).

    Labels [S, L] in {0, 1}. A label with one class in the training set predicts that class's constant
    probability. Returns :func:`fm_engine.metrics.multilabel_report` on the test set (per-label and mean
    AUROC / AUPRC).
    """
    from sklearn.linear_model import LogisticRegression

    xtr, xte = train_features.detach().double().cpu().numpy(), test_features.detach().double().cpu().numpy()
    ytr = train_labels.detach().cpu().numpy()
    probs = torch.empty(test_features.shape[0], train_labels.shape[1], dtype=torch.float64)
    for j in range(train_labels.shape[1]):
        if len(set(ytr[:, j].tolist())) < 2:
            probs[:, j] = float(ytr[0, j])
            continue
        clf = LogisticRegression(max_iter=max_iter).fit(xtr, ytr[:, j])
        probs[:, j] = torch.from_numpy(clf.predict_proba(xte)[:, 1])
    return multilabel_report(probs, test_labels.cpu(), label_names[: train_labels.shape[1]])
