"""Training-time augmentation of RGB images: random resized crop and optional horizontal flip.

Contract:

* ``Augmentation.apply(image, rng)`` returns a new ``size`` x ``size`` RGB image; the input is
  not modified. All randomness comes from the ``random.Random`` passed in, so the output is a
  pure function of the image and the generator's state: ``example_rng(seed, epoch, index)``
  gives each example of each epoch its own generator, independent of batch order, worker
  count and ``PYTHONHASHSEED``.
* ``Augmentation.tensor(image, rng)`` is ``apply`` followed by ``images.to_tensor``: the same
  normalisation as serving, so only the crop differs between training and validation.
* Validation, the quality gate and serving never augment: they use ``images.preprocess``
  (the central square).

The crop is the Inception-style random resized crop (as torchvision's, reimplemented on PIL):
a region of ``scale`` x the image area and aspect ratio in ``ratio`` (log-uniform), up to 10
tries, else the central crop clamped to ``ratio``; then resized (bicubic) to the output size.
Default scale is 0.35-1, not ImageNet's 0.08-1: the tenants' data sets are small (20 to
20,000 images) and their subjects (a product, a defect) often fill only part of the photo;
crops down to 8% of the area would often cut the subject out and train on wrong labels, while
the backbone is already ImageNet-trained and needs less regularisation than training from
scratch. Flip is on by default and is the tenant's to turn off (text, digits, left/right
defects are not mirror-invariant).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image

from adapters.vision.images import INPUT_SIZE, to_tensor

_TRIES = 10


@dataclass(frozen=True)
class Augmentation:
    size: int = INPUT_SIZE
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"Augmentation.size must be a positive integer, got {self.size!r}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"Augmentation.scale must satisfy 0 < low <= high <= 1, got {self.scale!r}")
        low, high = self.ratio
        if not 0 < low <= high:
            raise ValueError(f"Augmentation.ratio must satisfy 0 < low <= high, got {self.ratio!r}")

    def apply(self, image: Image.Image, rng: random.Random) -> Image.Image:
        """A random crop of ``image`` resized to ``size`` x ``size``, maybe mirrored."""
        box = random_crop_box(image.size, rng, self.scale, self.ratio)
        out = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        if self.flip and rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out

    def tensor(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        """``apply``, then the serving normalisation: a CHW float32 tensor."""
        return to_tensor(self.apply(image, rng))


def example_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for one example in one epoch (string seeds hash with sha512: stable)."""
    return random.Random(f"{seed}\x00{epoch}\x00{index}")


def random_crop_box(
    size: tuple[int, int], rng: random.Random, scale: tuple[float, float], ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of a random crop of an image of ``size`` (width, height)."""
    width, height = size
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    # Fallback: the central crop, its aspect ratio clamped into ``ratio``.
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h
