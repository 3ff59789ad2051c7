"""An image dataset as training and validation batches: decoded once, augmented per epoch.

Contract:

* ``TrainImages(ds, image_size, poll, budget)`` decodes every training image once
  (``ds.image(i)``) and keeps it shrunk so its short side is at most ``KEEP_SIDE`` x
  ``image_size`` (never enlarged: the random crop then reads as much detail as it can use)
  while the kept pixels fit ``budget`` bytes (default ``MEMORY_BUDGET``); images past the
  budget are decoded again whenever they are used (the same pixels, slower).
  ``batch(idx, epoch, augment, seed)`` is the ``[B, 3, S, S]`` float32 batch of those
  examples, each cropped and flipped by ``augment`` with its own generator
  ``example_rng(seed, epoch, index)``: a function of (seed, epoch, example) only.
* ``centre_crops(ds, size, poll)`` is what serving sees of each image (``images.preprocess``:
  the central square at ``size``) as ``uint8`` ``[N, 3, size, size]`` (a quarter of float32's
  memory); ``normalise`` turns rows of it into exactly ``preprocess``'s float32 values.
"""

from __future__ import annotations

import torch
from PIL import Image

from adapters.training.task_hooks import Poll
from adapters.vision.augment import Augmentation, example_rng
from adapters.vision.image_datasets import ImageDataset
from adapters.vision.images import center_square

KEEP_SIDE = 1.5  # kept short side, in training crop sides
MEMORY_BUDGET = 2 << 30  # bytes of decoded training pixels kept in memory
POLL_EVERY = 32  # images decoded between cancellation polls


class TrainImages:
    def __init__(self, ds: ImageDataset, image_size: int, poll: Poll, budget: int = MEMORY_BUDGET) -> None:
        self.ds, self.side = ds, round(KEEP_SIDE * image_size)
        self.kept: list[Image.Image | None] = []
        used = 0
        for i in range(len(ds)):
            if i % POLL_EVERY == 0:
                poll()
            image = self._load(i) if used < budget else None
            if image is not None:
                used += image.width * image.height * 3
            self.kept.append(image)

    def image(self, i: int) -> Image.Image:
        kept = self.kept[i]
        return kept if kept is not None else self._load(i)

    def batch(self, idx: list[int], epoch: int, augment: Augmentation, seed: int) -> torch.Tensor:
        return torch.stack([augment.tensor(self.image(i), example_rng(seed, epoch, i)) for i in idx])

    def _load(self, i: int) -> Image.Image:
        image = self.ds.image(i)
        short = min(image.size)
        if short <= self.side:
            return image
        w, h = image.size
        return image.resize((max(1, round(w * self.side / short)), max(1, round(h * self.side / short))),
                            Image.Resampling.BICUBIC)


def centre_crops(ds: ImageDataset, size: int, poll: Poll) -> torch.Tensor:
    out = torch.empty((len(ds), 3, size, size), dtype=torch.uint8)
    for i in range(len(ds)):
        if i % POLL_EVERY == 0:
            poll()
        square = center_square(ds.image(i), size)
        pixels = torch.frombuffer(bytearray(square.tobytes()), dtype=torch.uint8)
        out[i] = pixels.view(size, size, 3).permute(2, 0, 1)
    return out


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``uint8`` CHW rows -> float32 ``(x / 255 - 0.5) / 0.5``, the arithmetic of ``images.to_tensor``."""
    return pixels.to(torch.float32).div_(255.0).sub_(0.5).div_(0.5)
