"""Real labelled images for the image benchmarks: Fashion-MNIST from Debian's package.

``apt-get install dataset-fashion-mnist`` puts the four IDX files (gzip) under
``/usr/share/datasets/fashion-mnist/`` (``$TAILOR_FASHION_MNIST`` overrides the folder).
``fashion_mnist(n_train, n_test, seed)`` returns ``(train, test)`` lists of ``(image, label)``:
28 x 28 grayscale (mode ``L``) ``PIL`` images exactly as stored, and the class names below.
Train comes from the 60,000 training images, test from the 10,000 test images, so they never
overlap. Each is a stratified subset: ``n // 10`` images per class, plus one more for the first
``n % 10`` classes, drawn by a per-(split, class) RNG from ``seed``: the same seed gives the
same images, and a larger ``n`` keeps the images of a smaller one. Lists are in file order.
"""

from __future__ import annotations

import gzip
import os
import random
import struct
from pathlib import Path

from PIL import Image

LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC, _LABELS_MAGIC = 0x803, 0x801


def folder() -> Path:
    return Path(os.environ.get("TAILOR_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))


def available() -> bool:
    return all((folder() / name).is_file() for pair in FILES.values() for name in pair)


def fashion_mnist(
    n_train: int, n_test: int, seed: int = 0,
) -> tuple[list[tuple[Image.Image, str]], list[tuple[Image.Image, str]]]:
    """Seeded stratified subsets of the training and test files (see the module docstring)."""
    if not available():
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files not found in {folder()}: apt-get install dataset-fashion-mnist")
    return _subset("train", n_train, seed), _subset("test", n_test, seed)


def _subset(split: str, n: int, seed: int) -> list[tuple[Image.Image, str]]:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"the number of {split} images must be a non-negative integer, got {n!r}")
    if n == 0:
        return []
    images_file, labels_file = FILES[split]
    labels = _read_labels(folder() / labels_file)
    if n > len(labels):
        raise ValueError(f"asked for {n:,} {split} images; the file has {len(labels):,}")
    by_class: dict[int, list[int]] = {c: [] for c in range(len(LABELS))}
    for i, label in enumerate(labels):
        by_class[label].append(i)
    chosen: list[int] = []
    for c, indices in by_class.items():
        want = n // len(LABELS) + (1 if c < n % len(LABELS) else 0)
        if want > len(indices):
            raise ValueError(
                f"asked for {want:,} {split} images of {LABELS[c]!r}; the file has {len(indices):,}")
        order = indices[:]
        random.Random(f"{seed}\x00{split}\x00{c}").shuffle(order)
        chosen.extend(order[:want])
    chosen.sort()
    pixels, rows, cols = _read_images(folder() / images_file)
    size = rows * cols
    return [(Image.frombytes("L", (cols, rows), pixels[i * size:(i + 1) * size]), LABELS[labels[i]])
            for i in chosen]


def _read_labels(path: Path) -> bytes:
    data = gzip.decompress(path.read_bytes())
    magic, count = struct.unpack(">II", data[:8])
    if magic != _LABELS_MAGIC or len(data) != 8 + count:
        raise ValueError(f"{path} is not an IDX label file")
    return data[8:]


def _read_images(path: Path) -> tuple[bytes, int, int]:
    data = gzip.decompress(path.read_bytes())
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != _IMAGES_MAGIC or len(data) != 16 + count * rows * cols:
        raise ValueError(f"{path} is not an IDX image file")
    return data[16:], rows, cols
