"""Augmentation recipes (kornia) and evaluation metrics (torchmetrics), checked against scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch

from fm_engine import augment, metrics


def test_gray_to_rgb_is_explicit() -> None:
    x = torch.rand(2, 1, 8, 8)
    y = augment.gray_to_rgb(x)
    assert y.shape == (2, 3, 8, 8) and all(torch.equal(y[:, c], x[:, 0]) for c in range(3))
    with pytest.raises(ValueError, match="images"):
        augment.gray_to_rgb(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="expand_gray"):
        augment.adam_augment(16, expand_gray=False)(x)


def test_recipes_shapes_and_contents() -> None:
    import kornia.augmentation as K

    x = torch.rand(4, 1, 40, 40)
    for recipe in (
        augment.moco_cxr_augment(32),
        augment.moco_cxr_augment(32, backbone="vit"),
        augment.adam_augment(32),
    ):
        v1, v2 = recipe.two_views(x)
        assert v1.shape == (4, 3, 32, 32) and torch.isfinite(v1).all()
        assert not torch.equal(v1, v2)  # independent draws
    types = lambda r: [type(t) for t in r.transforms]
    moco_r, moco_v, adam = augment.moco_cxr_augment(), augment.moco_cxr_augment(backbone="vit"), augment.adam_augment()
    assert K.RandomHorizontalFlip in types(moco_r) and K.RandomHorizontalFlip not in types(adam)
    assert not any("Grayscale" in t.__name__ for t in types(adam))
    assert moco_r.params["scale"] == (0.8, 1.0) and moco_v.params["scale"] == (0.7, 1.0)
    assert adam.params["scale"] == (0.2, 1.0) and adam.params["rotation"] == 30.0 and not adam.params["flip"]
    assert adam.params["blur_sigma"] == (0.1, 2.0) and adam.params["jitter"] == (0.4, 0.4, 0.4, 0.1, 0.8)
    assert [type(t) for t in adam.transforms][:4] == [
        K.RandomResizedCrop,
        K.ColorJitter,
        K.RandomGaussianBlur,
        K.RandomRotation,
    ]
    # ImageNet normalisation last: a constant mid-grey image maps to (0.5 - mean) / std per channel
    norm = moco_r.transforms[-1]
    out = norm(torch.full((1, 3, 4, 4), 0.5))
    want = [(0.5 - m) / s for m, s in zip(augment.IMAGENET_MEAN, augment.IMAGENET_STD, strict=True)]
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor(want))
    with pytest.raises(ValueError, match="backbone"):
        augment.moco_cxr_augment(backbone="cnn")


def test_multilabel_metrics_match_sklearn() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = (torch.rand(50, 4) < 0.4).long()
    y[:2, :3] = torch.tensor([[0, 0, 0], [1, 1, 1]])  # both classes in the first three labels
    y[:, 3] = 0  # one class only: undefined
    s = torch.rand(50, 4) + 0.5 * y
    rep = metrics.multilabel_report(s, y, ["a", "b", "c", "d"])
    for j, name in enumerate("abc"):
        assert rep["auroc"][name] == pytest.approx(roc_auc_score(y[:, j], s[:, j]), abs=1e-6)
        assert rep["auprc"][name] == pytest.approx(average_precision_score(y[:, j], s[:, j]), abs=1e-6)
    assert math.isnan(rep["auroc"]["d"])
    assert rep["mean_auroc"] == pytest.approx(sum(rep["auroc"][n] for n in "abc") / 3)
    per, mean = metrics.auroc(torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0, 0, 1]))
    assert per == [1.0] and mean == 1.0
    assert metrics.auprc(torch.tensor([0.9, 0.2, 0.1]), torch.tensor([0, 0, 1]))[1] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="targets"):
        metrics.auroc(s, y[:, :2])
    with pytest.raises(ValueError, match="targets"):
        metrics.auroc(s, y * 2)


def test_accuracy() -> None:
    logits = torch.tensor([[2.0, 0.1, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0], [0.0, 1.0, 0.0]])
    assert metrics.accuracy(logits, torch.tensor([0, 2, 0, 1])) == pytest.approx(0.75)
    assert metrics.accuracy(torch.tensor([0.9, 0.2, 0.6]), torch.tensor([1, 0, 0])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="targets"):
        metrics.accuracy(logits, torch.tensor([0, 1]))
