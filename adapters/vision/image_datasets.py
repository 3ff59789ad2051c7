"""Labelled image-classification datasets, validated completely before anything trains.

Contract (the text datasets' contract, ``adapters.datasets``, for images):

* Input is an uploaded file: a zip of label folders (``label/image.jpg``, the ImageFolder
  convention) or JSON Lines ``{"image": "<base64>", "label": ...}``; ``format=None`` sniffs it
  (zip magic bytes, else a first non-blank ``{``). The result is an ``ImageDataset`` or a
  ``DatasetError`` (code ``invalid_dataset``); nothing is half-accepted, and nothing is ever
  written to disk: zip members are read in memory.
* Checks stop at the FIRST problem, which is named: ``param="line N"`` (JSONL, ``.line == N``)
  or ``param="member '<name>'"`` (zip); whole-file problems have ``param="file"``.
* Zip (read by ``adapters.vision.zip_upload``: in memory, names checked before use, bytes
  counted as they decompress), in this order: a readable zip; at most ``max_members`` entries;
  every entry's name safe (no absolute path, drive letter, backslash, ``..``/``.``/empty
  segment, control character), not a symbolic link or other special file, not encrypted, not
  repeated (``__MACOSX/``, hidden dot files, ``Thumbs.db``, ``desktop.ini`` are skipped); every
  image at ``label/file``, or all of them at ``folder/label/file`` under ONE common folder
  (what zipping a folder gives); at most ``max_rows`` images; declared sizes within
  ``max_uncompressed_bytes``; then member by member, in the zip's order: its size (declared,
  then as actually read, against ``image.max_bytes`` and what is left of the total), its CRC,
  its label (the folder name), its image.
* JSONL: UTF-8 (a BOM is stripped); each non-blank line is an object with exactly ``image``
  (base64, optionally a ``data:...;base64,`` URL; whitespace ignored) and ``label`` (a string,
  or an integer, converted); ``max_rows`` counts lines as read.
* Each image is fully decoded once (``adapters.vision.images.decode_image``: format, bomb,
  truncation, minimum size) and then discarded: the dataset keeps the original bytes, and
  ``ImageDataset.image(i)`` decodes again on demand. Labels follow ``label_problem``.
* Images with the same decoded pixels (sha256 of size and RGB bytes: a PNG and a BMP of one
  picture are the same image) and the same label: the repeat is dropped and counted in
  ``duplicates_dropped``; with different labels: an error naming both places.
* Whole-dataset checks (as text): 2 to ``max_labels`` labels, ``min_examples_per_label`` each.
  ``labels`` are sorted; ``stratified_image_split`` is ``adapters.datasets.stratified_split``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from adapters.datasets import (
    BOM, Dataset, DatasetLimits, _Collector, _decode, _DuplicateKey, _kind, _pairs_without_repeats, _s,
    _show, label_problem, stratified_split,
)
from adapters.errors import DatasetError
from adapters.vision.images import ImageLimits, InvalidImageError, decode_image
from adapters.vision.zip_upload import ZipLimits, ZipProblem, ZipUpload

FORMATS = ("zip", "jsonl")
FIELDS = ("image", "label")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_DATA_URL = re.compile(r"^data:[\w.+/-]*;base64,")
_NAME_SHOWN = 200  # characters of a member name shown in messages


@dataclass(frozen=True)
class ImageDatasetLimits:
    """``dataset`` holds the text limits that mean the same here: ``max_rows`` (images, repeats
    included), ``max_labels``, ``min_examples_per_label``, ``max_bytes`` (the upload)."""

    dataset: DatasetLimits = DatasetLimits(max_rows=50_000, max_bytes=512 << 20)
    image: ImageLimits = ImageLimits()
    max_members: int = 60_000
    max_uncompressed_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("max_members", "max_uncompressed_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageDatasetLimits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class ImageExample:
    data: bytes = field(repr=False)  # the original file, as uploaded
    label: str
    source: str  # where it came from: "line 7" or "member 'cat/1.jpg'"


@dataclass(frozen=True)
class ImageDataset:
    examples: tuple[ImageExample, ...]
    labels: tuple[str, ...]  # sorted, unique; may name labels with no examples (split halves)
    duplicates_dropped: int = 0
    image_limits: ImageLimits = field(default=ImageLimits(), compare=False)
    _view: Dataset = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The text Dataset's checks (sorted unique labels, each example's label among them) and
        # label bookkeeping read only ``.label``: run them on our examples rather than repeat them.
        view = Dataset(self.examples, self.labels, self.duplicates_dropped)  # type: ignore[arg-type]
        object.__setattr__(self, "_view", view)

    def __len__(self) -> int:
        return len(self.examples)

    def label_ids(self) -> list[int]:
        """Each example's label as an index into ``labels``."""
        return self._view.label_ids()

    def counts(self) -> dict[str, int]:
        """Examples per label, in ``labels`` order, zeros included."""
        return self._view.counts()

    def image(self, i: int) -> Image.Image:
        """Example ``i`` decoded to RGB (it passed the same decode during validation)."""
        example = self.examples[i]
        return decode_image(example.data, param=example.source, limits=self.image_limits)


def parse_image_dataset(
    data: bytes, *, format: str | None = None, limits: ImageDatasetLimits = ImageDatasetLimits(),
    what: str = "training file",
) -> ImageDataset:
    """Parse and validate an uploaded zip of label folders or JSONL of base64 images."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DatasetError(f"{what} must be bytes, got {type(data).__name__}", param="file")
    data = bytes(data)
    if len(data) > limits.dataset.max_bytes:
        raise DatasetError(
            f"{what} is {len(data):,} bytes; the limit is {limits.dataset.max_bytes:,} bytes", param="file")
    if not data.strip():
        raise DatasetError(f"{what} is empty", param="file")
    if format is None:
        if data[:4] in _ZIP_MAGIC:
            format = "zip"
        elif data.removeprefix(BOM).lstrip()[:1] == b"{":
            format = "jsonl"
        else:
            raise DatasetError(
                f"{what} is neither a zip of label folders (label/image.jpg) nor JSON Lines "
                '({"image": "<base64>", "label": ...} per line)', param="file")
    elif not isinstance(format, str) or format.strip().lower() not in FORMATS:
        raise DatasetError(f"format must be 'zip' or 'jsonl', got {format!r}", param="format")
    format = format.strip().lower()
    if format == "zip":
        collector = _ImageCollector(limits, what, unit="member")
        _read_zip(data, collector, limits)
    else:
        collector = _ImageCollector(limits, what, unit="line")
        _read_jsonl(_decode(data, what), collector, limits)
    return collector.finish_images()


def stratified_image_split(
    ds: ImageDataset, *, fraction: float = 0.1, seed: int = 0, min_per_label: int = 1,
) -> tuple[ImageDataset, ImageDataset]:
    """``(train, validation)``: exactly ``adapters.datasets.stratified_split`` (same rule, same
    seed behaviour), on image examples."""
    train, validation = stratified_split(ds._view, fraction=fraction, seed=seed, min_per_label=min_per_label)
    return (
        ImageDataset(train.examples, ds.labels, train.duplicates_dropped, ds.image_limits),  # type: ignore
        ImageDataset(validation.examples, ds.labels, 0, ds.image_limits),  # type: ignore[arg-type]
    )


# --- internals ---------------------------------------------------------------------------


class _ImageCollector(_Collector):
    """The text collector's limits, errors and whole-dataset checks; image rows instead of text."""

    def __init__(self, limits: ImageDatasetLimits, what: str, *, unit: str) -> None:
        super().__init__(limits.dataset, what, unit=unit, whole_param="file")
        self.image_limits = limits.image

    def add_image(self, data: bytes, label: Any, where: int | str) -> None:
        lines = self.unit == "line"
        subject, sep = ("'image' ", ": ") if lines else ("", " ")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str):
            self.fail(where, f"'label' must be a string (or an integer), got {_kind(label)}")
        label = label.strip()
        problem = label_problem(label)
        if problem:
            self.fail(where, f"'label' {problem}" if lines else f"its folder name (the label) {problem}")
        try:
            image = decode_image(data, param=f"{self.unit} {where}", limits=self.image_limits)
        except InvalidImageError as error:
            self.fail(where, f"{subject}{error.problem}", sep=sep)
        digest = hashlib.sha256(b"%dx%d:" % image.size + image.tobytes()).digest()
        if not self.first_time(digest, label, where, "image"):
            return
        self.examples.append(ImageExample(data, label, f"{self.unit} {where}"))  # type: ignore[arg-type]

    def finish_images(self) -> ImageDataset:
        text_view = self.finish()  # label count and examples-per-label checks, sorted labels
        return ImageDataset(text_view.examples, text_view.labels,  # type: ignore[arg-type]
                            text_view.duplicates_dropped, self.image_limits)


def _read_jsonl(text: str, collector: _ImageCollector, limits: ImageDatasetLimits) -> None:
    base64_limit = 4 * ((limits.image.max_bytes + 2) // 3)
    for line_no, line in enumerate(text.split("\n"), start=1):  # "\n" only, as the text parser
        if not line.strip():
            continue
        collector.count_row(line_no)
        value = _json_line(line, line_no, collector)
        if not isinstance(value, dict):
            collector.fail(
                line_no, f'expected a JSON object like {{"image": ..., "label": ...}}, got {_kind(value)}')
        extra = [key for key in value if key not in FIELDS]
        missing = [name for name in FIELDS if name not in value]
        if extra or missing:
            problem = f"unexpected field{_s(len(extra))} {', '.join(_show(k) for k in extra[:5])}" if extra \
                else f"missing field{_s(len(missing))} " + " and ".join(map(repr, missing))
            collector.fail(line_no, f"{problem}; each line needs exactly 'image' and 'label'")
        payload = value["image"]
        if not isinstance(payload, str):
            collector.fail(line_no, f"'image' must be a base64 string, got {_kind(payload)}")
        payload = "".join(_DATA_URL.sub("", payload, count=1).split())
        if len(payload) > base64_limit:
            collector.fail(line_no, f"'image' is {len(payload) * 3 // 4:,} bytes; the limit is "
                                    f"{limits.image.max_bytes:,} bytes")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            collector.fail(line_no, "'image' is not valid base64")
        collector.add_image(data, value["label"], line_no)


def _json_line(line: str, line_no: int, collector: _ImageCollector) -> Any:
    try:
        return json.loads(line, object_pairs_hook=_pairs_without_repeats)
    except _DuplicateKey as error:
        collector.fail(line_no, f"field {_show(error.key)} appears more than once")
    except json.JSONDecodeError as error:
        collector.fail(line_no, f"not valid JSON: {error.msg} (column {error.colno})")
    except (ValueError, RecursionError) as error:  # too deep, or an integer too long
        collector.fail(line_no, f"not valid JSON: {error}")


def _read_zip(data: bytes, collector: _ImageCollector, limits: ImageDatasetLimits) -> None:
    zip_limits = ZipLimits(limits.max_members, limits.image.max_bytes, limits.max_uncompressed_bytes)
    try:
        with ZipUpload(data, zip_limits) as upload:
            if not upload.files:
                collector.fail_whole("has no images; expected folders named after the labels, each "
                                     "holding that label's images (label/image.jpg)")
            labelled = _label_folders(upload.files, collector)
            if len(labelled) > limits.dataset.max_rows:
                collector.fail_whole(
                    f"has {len(labelled):,} images; the limit is {limits.dataset.max_rows:,}")
            declared = upload.declared_bytes()
            if declared > zip_limits.max_total_bytes:
                collector.fail_whole(f"unpacks to {declared:,} bytes; the limit is "
                                     f"{zip_limits.max_total_bytes:,} bytes")
            for info, label in labelled:
                collector.add_image(upload.read(info), label, _show(info.filename, _NAME_SHOWN))
    except ZipProblem as error:
        if error.member is None:
            collector.fail_whole(error.problem)
        collector.fail(_show(error.member, _NAME_SHOWN), error.problem, sep=" ")


def _label_folders(
    files: Sequence[zipfile.ZipInfo], collector: _ImageCollector,
) -> list[tuple[zipfile.ZipInfo, str]]:
    """Each image with its folder name; one common enclosing folder is looked through."""
    paths = [info.filename.split("/") for info in files]
    wrapped = len({path[0] for path in paths}) == 1 and all(len(path) == 3 for path in paths)
    labelled = []
    for info, path in zip(files, paths):
        if wrapped:
            path = path[1:]
        if len(path) != 2:
            where = _show(info.filename, _NAME_SHOWN)
            problem = "is not in a label folder" if len(path) == 1 else "is nested too deeply"
            collector.fail(where, f"{problem}; put each image in a folder named after its label "
                                  "(label/image.jpg, optionally all inside one folder)", sep=" ")
        labelled.append((info, path[0]))
    return labelled
