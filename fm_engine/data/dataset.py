"""Datasets of DICOM frames for 2-D pre-training, and a resumable sampler.

:class:`DicomFrameDataset` indexes every frame of every DICOM file under a folder (a multi-frame file or
a series contributes one example per frame / slice). An example is a dict:

* ``image``: [C, H, W] uint16 (integer path) or float32 (fp32 path), resized and padded to ``size``
  (:func:`fm_engine.data.transforms.resize_pad`);
* ``scale``, ``offset``: float64 scalars, display = image * scale + offset;
* ``label``: int64 (class index of ``label_tag``'s value, -1 without a label tag);
* ``index``: the example index actually returned; ``skipped``: how many unreadable examples were passed
  over to reach it (only with ``on_error="skip"``).

With ``stored=True`` (the training path) the workers only read: an example holds the frame's stored values
``stored [C, H, W]`` at their own size and its intensity table instead of ``image`` (see
:mod:`fm_engine.data.device`); batch them with :func:`~fm_engine.data.device.collate_stored` and finish
them on the training device with :func:`~fm_engine.data.device.device_transform`, which gives the same
``image`` / ``scale`` / ``offset`` as the default path within one uint16 unit.

Bad files: with ``on_error="raise"`` the first bad file raises :class:`~fm_engine.data.dicom.DicomReadError`
(naming the file and the reason). With ``on_error="skip"`` files whose header is unusable are left out when
the index is built (``skipped_files`` lists (path, reason)); files whose pixel data turn out unreadable later
are replaced by the next readable example and counted in ``skipped``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fm_engine.data.dicom import DicomReadError, VoiChoice, _parse_header, read_dicom, read_header
from fm_engine.data.transforms import resize_pad


def list_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file under ``root`` (recursively, hidden files excluded), sorted; a file is returned as is."""
    root = Path(root)
    if root.is_file():
        return [str(root)]
    if not root.is_dir():
        raise ValueError(f"data: {root} does not exist (expected a folder or a file of DICOM images)")
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))


class DicomFrameDataset(torch.utils.data.Dataset):
    """One example per frame of every DICOM file under ``root`` (see the module docstring).

    size: (H, W) model input size; voi / window_index / precision / modalities: as in
    :func:`fm_engine.data.dicom.read_dicom`; label_tag: a header keyword (e.g. "ViewPosition") whose values,
    sorted, become class indices (``classes``); on_error: "raise" or "skip"; stored: examples hold stored
    values + intensity table for the device transform instead of the finished ``image``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: tuple[int, int],
        *,
        voi: VoiChoice = "auto",
        window_index: int = 0,
        precision: str = "auto",
        modalities: Collection[str] | None = None,
        label_tag: str | None = None,
        on_error: str = "skip",
        progress: bool = True,
        stored: bool = False,
    ) -> None:
        from tqdm.auto import tqdm

        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
        self.size = (int(size[0]), int(size[1]))
        self.voi, self.window_index, self.precision = voi, window_index, precision
        self.modalities = modalities
        self.on_error = on_error
        self.label_tag = label_tag
        self.stored = stored
        self.skipped_files: list[tuple[str, str]] = []
        self.files: list[str] = []
        self.frames: list[tuple[int, int]] = []
        values: list[str | None] = []
        for path in tqdm(list_files(root), desc="indexing DICOM", unit="file", disable=not progress, leave=False):
            try:
                ds = read_header(path)
                h = _parse_header(ds, path, modalities)
                value = None
                if label_tag is not None:
                    if ds.get(label_tag) in (None, ""):
                        raise DicomReadError(path, f"no {label_tag} value (label_tag)")
                    value = str(ds.get(label_tag))
            except DicomReadError as e:
                if on_error == "raise":
                    raise
                self.skipped_files.append((e.path, e.reason))
                continue
            fi = len(self.files)
            self.files.append(path)
            values.append(value)
            self.frames.extend((fi, t) for t in range(h.frames))
        if not self.frames:
            raise ValueError(f"data: no readable DICOM image under {root} ({len(self.skipped_files)} files skipped)")
        self.classes = sorted({v for v in values if v is not None})
        self._labels = [self.classes.index(v) if v is not None else -1 for v in values]
        # stored=True: the workers' reused batch buffers, for collate_stored(batch, ring=self.ring)
        self.ring = None
        if stored:
            from fm_engine.data.device import BatchRing

            self.ring = BatchRing()

    def __len__(self) -> int:
        return len(self.frames)

    def _load(self, index: int) -> dict[str, Any]:
        fi, t = self.frames[index]
        if self.stored:
            from fm_engine.data.device import read_stored, stored_example

            st = read_stored(
                self.files[fi],
                voi=self.voi,
                window_index=self.window_index,
                precision=self.precision,
                modalities=self.modalities,
            )
            if t >= st.stored.shape[0]:
                raise DicomReadError(self.files[fi], f"frame {t} missing ({st.stored.shape[0]} frames decoded)")
            return {
                **stored_example(st, t),
                "label": torch.tensor(self._labels[fi], dtype=torch.int64),
                "index": torch.tensor(index, dtype=torch.int64),
            }
        im = read_dicom(
            self.files[fi],
            voi=self.voi,
            window_index=self.window_index,
            precision=self.precision,
            modalities=self.modalities,
        )
        if t >= im.pixels.shape[0]:
            raise DicomReadError(self.files[fi], f"frame {t} missing ({im.pixels.shape[0]} frames decoded)")
        return {
            "image": resize_pad(im.pixels[t], self.size),
            "scale": torch.tensor(im.scale, dtype=torch.float64),
            "offset": torch.tensor(im.offset, dtype=torch.float64),
            "label": torch.tensor(self._labels[fi], dtype=torch.int64),
            "index": torch.tensor(index, dtype=torch.int64),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        skipped = 0
        for k in range(len(self)):
            i = (index + k) % len(self)
            try:
                out = self._load(i)
            except DicomReadError:
                if self.on_error == "raise":
                    raise
                skipped += 1
                continue
            out["skipped"] = torch.tensor(skipped, dtype=torch.int64)
            return out
        raise ValueError(f"data: every one of the {len(self)} examples is unreadable")

    def release(self, batch: Any) -> None:
        """Hand back a batch collated with ``collate_stored(..., ring=self.ring)`` once nothing reads its stored
        values any more, so that its worker may refill the buffer (a no-op for other batches)."""
        if self.ring is not None:
            self.ring.release(batch)


def collate_frames(batch: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack examples; uint16 images stay uint16 unless the batch mixes precisions, in which case every
    image becomes its fp32 display values (scale 1, offset 0)."""
    if any(b["image"].dtype != torch.uint16 for b in batch) and any(b["image"].dtype == torch.uint16 for b in batch):
        batch = [
            {
                **b,
                "image": (b["image"].to(torch.float64) * b["scale"] + b["offset"]).to(torch.float32),
                "scale": torch.tensor(1.0, dtype=torch.float64),
                "offset": torch.tensor(0.0, dtype=torch.float64),
            }
            for b in batch
        ]
    return {k: torch.stack([b[k] for b in batch]) for k in batch[0]}


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffled, rank-sharded example order that can restart in the middle of an epoch.

    Epoch e uses ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e`` (identical on every
    rank), padded by wrapping to a multiple of ``world_size``; rank r takes positions r, r + W, ....
    ``set_epoch(e, start)`` skips the first ``start`` examples of this rank's share (resume).
    """

    def __init__(self, length: int, *, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        if length < 1:
            raise ValueError(f"length: expected >= 1, got {length}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        self.length, self.seed, self.rank, self.world_size, self.shuffle = length, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def per_rank(self) -> int:
        return math.ceil(self.length / self.world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.length, generator=g).tolist()
        else:
            perm = list(range(self.length))
        total = self.per_rank() * self.world_size
        perm = (perm * math.ceil(total / self.length))[:total]
        return perm[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank() - self.start
