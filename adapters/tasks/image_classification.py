"""Image classification: a tenant's labels for photos, on a frozen vision backbone
(EfficientNet-Lite0, ``adapters.vision.backbone``).

Datasets: a zip of label folders or JSON Lines of base64 images
(``adapters.vision.image_datasets``). Predict requests carry images in ``images``.
"""

from __future__ import annotations

from typing import Any

from adapters.tasks import IMAGE_CLASSIFICATION
from adapters.vision.image_datasets import ImageDataset, ImageDatasetLimits, parse_image_dataset

name = IMAGE_CLASSIFICATION
input_field = "images"
training: Any = None  # the trainer's hooks for this task (adapters.training), wired in there


def default_dataset_limits() -> ImageDatasetLimits:
    return ImageDatasetLimits()


def parse_dataset(data: bytes, *, format: str | None = None, limits: ImageDatasetLimits | None = None,
                  what: str = "training file") -> ImageDataset:
    """``adapters.vision.image_datasets.parse_image_dataset``: a zip of label folders or JSONL."""
    return parse_image_dataset(data, format=format, limits=limits or default_dataset_limits(), what=what)
