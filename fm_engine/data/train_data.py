"""The training loop's data: a DICOM folder (read by workers, finished on the device) or a prepared dataset.

:func:`open_training_data` recognises a prepared dataset by its streaming index file
(:func:`fm_engine.data.prepared.is_prepared`) and otherwise indexes a DICOM folder. Either way the loop uses
the same four things: ``dataset`` (with ``classes`` and ``skipped_files``), ``collate``, ``sampler(...)``
(``set_epoch(epoch, start)`` restarts mid-epoch) and ``to_device(batch, device)``, which returns ``image``
[B, C, H, W] (uint16 + per-example affine where exact, else float32), ``scale`` / ``offset`` [B] float64 and
the other entries on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Collection
from typing import Any

import torch

from fm_engine.data.dicom import VoiChoice


@dataclasses.dataclass
class TrainData:
    """dataset, collate function, sampler factory and device step of one training data source."""

    dataset: Any
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]]
    size: tuple[int, int]
    kind: str  # "dicom" or "prepared"

    @property
    def channels(self) -> int:
        first = self.dataset[0]
        return int((first["image"] if "image" in first else first["stored"]).shape[0])

    def sampler(self, *, seed: int, rank: int, world_size: int) -> Any:
        """ResumableSampler (DICOM folder) or ShardSampler (prepared: ranks read disjoint chunks)."""
        from fm_engine.data.dataset import ResumableSampler
        from fm_engine.data.prepared import ShardSampler

        if self.kind == "prepared":
            return ShardSampler(self.dataset.chunk_sizes, seed=seed, rank=rank, world_size=world_size)
        return ResumableSampler(len(self.dataset), seed=seed, rank=rank, world_size=world_size)

    def to_device(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        """The batch on ``device`` with ``image`` at the model size (the device transform for DICOM)."""
        if "stored" in batch:
            from fm_engine.data.device import device_transform

            return device_transform(batch, self.size, device)
        return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def open_training_data(
    data: str | os.PathLike[str],
    size: tuple[int, int],
    *,
    voi: VoiChoice = "auto",
    window_index: int = 0,
    precision: str = "auto",
    modalities: Collection[str] | None = None,
    label_tag: str | None = None,
    on_error: str = "skip",
    progress: bool = True,
) -> TrainData:
    """A prepared dataset (its size must equal ``size``; the reading options were fixed when it was prepared)
    or a DICOM folder read with the given options."""
    from fm_engine.data.dataset import DicomFrameDataset
    from fm_engine.data.device import collate_stored
    from fm_engine.data.prepared import PreparedDataset, collate_prepared, is_prepared

    if is_prepared(data):
        ds = PreparedDataset(data)
        if ds.size != tuple(size):
            raise ValueError(
                f"size: {data} was prepared at {ds.size[0]}x{ds.size[1]}, the run asks for {size[0]}x{size[1]} "
                "(prepare it again at the model size)"
            )
        return TrainData(ds, collate_prepared, tuple(size), "prepared")  # type: ignore[arg-type]
    dicom = DicomFrameDataset(
        data,
        size,
        voi=voi,
        window_index=window_index,
        precision=precision,
        modalities=modalities,
        label_tag=label_tag,
        on_error=on_error,
        progress=progress,
        stored=True,
    )
    # batches in the dataset's reused worker buffers, handed back by the training loop (dataset.release)
    collate = functools.partial(collate_stored, ring=dicom.ring)
    return TrainData(dicom, collate, tuple(size), "dicom")  # type: ignore[arg-type]
