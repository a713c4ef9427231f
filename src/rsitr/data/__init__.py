"""Data layer: caption formats, corpora, scene labels, image loading, transforms and datasets.

``load_corpus`` reads any supported caption source (``precomp``, ``karpathy``, ``pir``, ``csv``,
``folder``) into a :class:`RetrievalCorpus`; ``check_corpus`` reports whether it is usable. The
torch-based parts (transforms, datasets) are imported on first use, so that reading and checking
data does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from rsitr.data.check import check_corpus
from rsitr.data.corpus import BlankCaption, ImageRecord, RetrievalCorpus
from rsitr.data.formats import CaptionFormat, detect_format, get_format, list_formats, register_format
from rsitr.data.images import (
    DEFAULT_MAX_SIDE,
    GeoInfo,
    ImageFailure,
    ImageInfo,
    ImageLoader,
    inspect_image,
    load_image,
    read_geo_info,
    read_image_array,
)
from rsitr.data.labels import UCM_CLASSES, assign_scenes, infer_dataset, read_labels_csv, scene_from_filename
from rsitr.data.loading import load_corpus, resolve_images

# Synthetic scenes (rsitr.data.synth) register their public names here:

_LAZY = {
    "CaptionDataset": "rsitr.data.datasets",
    "CaptionPairDataset": "rsitr.data.datasets",
    "ImageDataset": "rsitr.data.datasets",
    "collate_skip_failed": "rsitr.data.datasets",
    "EvalTransform": "rsitr.data.transforms",
    "TrainTransform": "rsitr.data.transforms",
    "to_tensor": "rsitr.data.transforms",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rsitr.data' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_SIDE",
    "UCM_CLASSES",
    "BlankCaption",
    "CaptionDataset",
    "CaptionFormat",
    "CaptionPairDataset",
    "EvalTransform",
    "GeoInfo",
    "ImageDataset",
    "ImageFailure",
    "ImageInfo",
    "ImageLoader",
    "ImageRecord",
    "RetrievalCorpus",
    "TrainTransform",
    "assign_scenes",
    "check_corpus",
    "collate_skip_failed",
    "detect_format",
    "get_format",
    "infer_dataset",
    "inspect_image",
    "list_formats",
    "load_corpus",
    "load_image",
    "read_geo_info",
    "read_image_array",
    "read_labels_csv",
    "register_format",
    "resolve_images",
    "scene_from_filename",
    "to_tensor",
]
