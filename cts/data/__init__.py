"""Datasets, augmentation and loaders for CTS / Segmenter.

Every dataset is prepared once into one canonical folder layout (see :mod:`cts.data.info`)
and read by :class:`SegmentationFolder`.
"""

from cts.data.download import ChecksumError, download_file, extract_archive
from cts.data.folder import SegmentationFolder
from cts.data.info import DatasetInfo, DatasetNotFoundError, load_dataset_info, write_dataset_info
from cts.data.io import CorruptFileError
from cts.data.loader import EpochSampler, SampleKey, build_loader, sample_rng
from cts.data.prepare import DATASETS, prepare_dataset
from cts.data.synthetic import generate_scene_dataset
from cts.data.transforms import PolicyTransform, TrainTransform, ValTransform
from cts.data.validate import SplitStatistics, split_statistics, validate_split

__all__ = [
    "DATASETS",
    "ChecksumError",
    "CorruptFileError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "EpochSampler",
    "PolicyTransform",
    "SampleKey",
    "SegmentationFolder",
    "SplitStatistics",
    "TrainTransform",
    "ValTransform",
    "build_loader",
    "download_file",
    "extract_archive",
    "generate_scene_dataset",
    "load_dataset_info",
    "prepare_dataset",
    "sample_rng",
    "split_statistics",
    "validate_split",
    "write_dataset_info",
]
