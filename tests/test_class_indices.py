"""Label-tag class indices (fm_engine.data.DicomFrameDataset): the classes are the tag's values sorted, so index k
names the same class in every folder, whatever order the files come in.

The files are written so that their order on disk (the dataset's file order) differs from the sorted class order:
a dataset that numbered classes as first seen would give other indices here.
"""

from __future__ import annotations

import pytest

pydicom = pytest.importorskip("pydicom")

from fm_engine.data import DicomFrameDataset  # noqa: E402
from fm_engine.data.synthetic import write_mammogram  # noqa: E402


def _folder(root, views: list[str]):
    """One mammogram per view, file names in the given order (a.dcm, b.dcm, ...), ViewPosition set to the view."""
    root.mkdir()
    for i, view in enumerate(views):
        path = root / f"{chr(ord('a') + i)}.dcm"
        write_mammogram(path, size=(16, 16), view="CC", seed=i)
        ds = pydicom.dcmread(path)
        ds.ViewPosition = view
        ds.save_as(path)
    return DicomFrameDataset(root, (8, 8), label_tag="ViewPosition", progress=False)


def test_class_indices_follow_sorted_values_not_file_order(tmp_path) -> None:
    views = ["MLO", "ML", "CC", "MLO", "XCCL", "CC"]  # first seen: MLO, ML, CC, XCCL; sorted: CC, ML, MLO, XCCL
    data = _folder(tmp_path / "one", views)
    assert [p.rsplit("/", 1)[-1] for p in data.files] == [f"{c}.dcm" for c in "abcdef"]  # the order on disk
    assert data.classes == ["CC", "ML", "MLO", "XCCL"]
    labels = [int(data[i]["label"]) for i in range(len(data))]
    assert labels == [data.classes.index(v) for v in views] == [2, 1, 0, 2, 3, 0]


def test_class_index_means_the_same_class_in_every_folder(tmp_path) -> None:
    # two folders with the same classes met in opposite orders
    first = _folder(tmp_path / "first", ["MLO", "CC"])
    second = _folder(tmp_path / "second", ["CC", "MLO"])
    assert first.classes == second.classes == ["CC", "MLO"]
    assert [int(first[i]["label"]) for i in range(2)] == [1, 0]
    assert [int(second[i]["label"]) for i in range(2)] == [0, 1]
