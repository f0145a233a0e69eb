"""DICOM reading, synthetic DICOM generation and datasets (pydicom is imported lazily).

Tensor layout: a DICOM image, multi-frame file or series is ``[T, C, H, W]``; a training batch is
``[B, C, H, W]``; display value = pixels * scale + offset (see :mod:`fm_engine.data.dicom`).
"""

from fm_engine.data.dataset import DicomFrameDataset, ResumableSampler, collate_frames, list_files
from fm_engine.data.device import collate_stored, device_transform, read_stored
from fm_engine.data.dicom import DicomImage, DicomReadError, read_dicom, read_series, sort_series
from fm_engine.data.prepared import PreparedDataset, ShardSampler, is_prepared, prepare
from fm_engine.data.transforms import AugmentConfig, augment_batch, parse_size, resize_pad, stem_inputs

__all__ = [
    "AugmentConfig",
    "DicomFrameDataset",
    "DicomImage",
    "DicomReadError",
    "PreparedDataset",
    "ResumableSampler",
    "ShardSampler",
    "augment_batch",
    "collate_frames",
    "collate_stored",
    "device_transform",
    "is_prepared",
    "list_files",
    "parse_size",
    "prepare",
    "read_dicom",
    "read_series",
    "read_stored",
    "resize_pad",
    "sort_series",
    "stem_inputs",
]
