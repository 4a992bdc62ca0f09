"""Datasets: the ``DATASETS`` registry of :class:`DatasetSpec`, :func:`load`, :func:`download`, the tiny benchmark.

See docs/DATASETS.md for every dataset (source URL, checksum, layout) and the OOD subsampling protocol.
"""

from greg.data import catalog as _catalog  # noqa: F401  (registers the real datasets)
from greg.data import tiny as _tiny  # noqa: F401  (registers the tiny benchmark)
from greg.data.base import (
    DATASETS,
    MAX_IMAGE_PIXELS,
    N_OOD,
    CorruptDataError,
    DatasetSpec,
    ImageDataset,
    ImageTransform,
    RawImages,
    Resource,
    load,
    names,
    spec,
    subsample,
    weights_path,
)
from greg.data.downloader import (
    ChecksumError,
    DownloadError,
    ManualDownloadRequired,
    download,
    verify,
)

__all__ = [
    "DATASETS",
    "MAX_IMAGE_PIXELS",
    "N_OOD",
    "ChecksumError",
    "CorruptDataError",
    "DatasetSpec",
    "DownloadError",
    "ImageDataset",
    "ImageTransform",
    "ManualDownloadRequired",
    "RawImages",
    "Resource",
    "download",
    "load",
    "names",
    "spec",
    "subsample",
    "verify",
    "weights_path",
]
