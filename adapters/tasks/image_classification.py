"""Image classification: a tenant's labels for photos, on a frozen vision backbone
(EfficientNet-Lite0, ``adapters.vision.backbone``).

Datasets: a zip of label folders or JSON Lines of base64 images
(``adapters.vision.image_datasets``). Predict requests carry images in ``images``.

Serving (``ImageServing``, a ``TaskServing``) over a ``VisionBase``:

* prepared: every LoRA-capable pointwise conv (``VisionBase.lora_paths``) wrapped in
  ``MultiLoraConv1x1``, and the backbone's ``_fc`` (an identity after the pooled features)
  replaced by the per-row ``MixedHead``: each row's head reads the pooled backbone features.
  Pooling is the backbone's own global average pool; adapters' text poolings do not apply;
* ``decode`` takes each image as bytes, or as a base64 string (a ``data:...;base64,`` prefix
  and whitespace allowed: what JSON carries), checks and fully decodes it
  (``adapters.vision.images.decode_image`` under ``ImageLimits``: errors name ``images[i]``,
  an image over a limit is an ``ImageTooLargeError``) and preprocesses it to the base's input
  (``preprocess``: central square, bicubic resize, normalise). Row inputs are CPU
  ``[3, S, S]`` float32 tensors; ``collate`` stacks them onto the base's device and dtype and
  ``run`` calls the plain module, whose output is the mixed head's logits.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence, Sized
from typing import Any

import torch

from adapters.errors import InvalidInputError
from adapters.fingerprint import BaseSpec
from adapters.runtime.context import BatchPlan
from adapters.runtime.head import MixedHead
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.lora_conv import wrap_convs
from adapters.tasks import IMAGE_CLASSIFICATION
from adapters.tasks.kind import TaskTrainer
from adapters.vision.backbone import VisionBase
from adapters.vision.image_datasets import ImageDataset, ImageDatasetLimits, parse_image_dataset
from adapters.vision.images import ImageLimits, ImageTooLargeError, InvalidImageError, decode_image, preprocess

name = IMAGE_CLASSIFICATION
input_field = "images"
peft_task_type: str | None = None  # peft has no image-classification task type: a plain PeftModel
lora_kernel: tuple[int, ...] = (1, 1)


def default_dataset_limits() -> ImageDatasetLimits:
    return ImageDatasetLimits()


def parse_dataset(data: bytes, *, format: str | None = None, limits: ImageDatasetLimits | None = None,
                  what: str = "training file") -> ImageDataset:
    """``adapters.vision.image_datasets.parse_image_dataset``: a zip of label folders or JSONL."""
    return parse_image_dataset(data, format=format, limits=limits or default_dataset_limits(), what=what)


def trainer() -> TaskTrainer:
    """``ImageHyperparameters`` and ``adapters.training.image_task.train_images`` (imported on the
    first ``resolve`` or ``train``: parsing a job's settings needs only the settings)."""
    from adapters.training.image_hyperparams import ImageHyperparameters

    def resolve(hp: Any, train_ds: Sized, method: str, base: Any) -> Any:
        from adapters.training.image_task import resolve_image_hyperparameters

        return resolve_image_hyperparameters(hp, len(train_ds), method, base)

    def train(*args: Any, **kw: Any) -> Any:
        from adapters.training.image_task import train_images

        return train_images(*args, **kw)

    return TaskTrainer(parse=ImageHyperparameters.from_dict, resolve=resolve, train=train)


_DATA_URL = re.compile(r"^data:[\w.+/-]*;base64,")


class ImageServing:
    """A vision base prepared for mixed-tenant serving (see the module docstring)."""

    def __init__(self, base: VisionBase, limits: ImageLimits | None = None) -> None:
        self.base = base
        self.spec: BaseSpec = base.spec
        self.limits = limits or ImageLimits()
        wrap_convs(base.model, list(base.lora_paths))
        if not isinstance(getattr(base.model, base.head_name), MixedHead):
            setattr(base.model, base.head_name, MixedHead(base.feature_dim))

    def decode(self, raw: Sequence[Any], *, param: str = input_field,
               limits: ImageLimits | None = None) -> list[torch.Tensor]:
        limits = limits or self.limits
        rows = []
        for i, value in enumerate(raw):
            where = f"{param}[{i}]"
            image = decode_image(_image_bytes(value, where, limits), param=where, limits=limits)
            rows.append(preprocess(image, self.base.input_size))
        return rows

    def check_row(self, row: Any, param: str) -> None:
        size = self.base.input_size
        if not isinstance(row, torch.Tensor):
            raise TypeError(f"{param} must be a decoded image tensor, not {type(row).__name__}")
        if tuple(row.shape) != (3, size, size) or not row.is_floating_point():
            raise InvalidInputError(f"{param} must be a float [3, {size}, {size}] image tensor, got "
                                    f"{row.dtype} {list(row.shape)}", param=param)
        if not bool(torch.isfinite(row).all()):
            raise InvalidInputError(f"{param} holds NaN or infinite values", param=param)

    def collate(self, rows: Sequence[torch.Tensor], adapters: Sequence[Any] | None = None) -> torch.Tensor:
        size = self.base.input_size
        if not rows:
            return torch.empty((0, 3, size, size), device=self.base.device, dtype=self.base.dtype)
        return torch.stack(list(rows)).to(device=self.base.device, dtype=self.base.dtype)

    def size(self, batch: torch.Tensor) -> int:
        return int(batch.shape[0])

    def run(self, batch: torch.Tensor, plan: BatchPlan, adapters: Sequence[LoadedAdapter | None]) -> torch.Tensor:
        return self.base.model(batch)

    def probe_rows(self) -> list[torch.Tensor]:
        """Flat black, white and grey images, the extremes of each channel, and seeded noise."""
        size = self.base.input_size
        flat = [torch.full((3, size, size), v) for v in (-1.0, 1.0, 0.0)]
        channel = torch.full((3, size, size), -1.0)
        channel[0] = 1.0
        noise = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
        return [*flat, channel, *noise]


def serving(base: VisionBase, limits: ImageLimits | None = None) -> ImageServing:
    if not isinstance(base, VisionBase):
        raise TypeError(f"an image-classification engine needs a VisionBase, not {type(base).__name__}")
    return ImageServing(base, limits)


def _image_bytes(value: Any, param: str, limits: ImageLimits) -> bytes:
    """The bytes of one request image: as given, or decoded from base64 (bounded before decoding)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise InvalidImageError(param, f"must be image bytes or a base64 string, not {type(value).__name__}")
    payload = "".join(_DATA_URL.sub("", value, count=1).split())
    if len(payload) > 4 * ((limits.max_bytes + 2) // 3):
        raise ImageTooLargeError(param, f"is about {len(payload) * 3 // 4:,} bytes; the limit is "
                                        f"{limits.max_bytes:,} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageError(param, "is not valid base64") from None
