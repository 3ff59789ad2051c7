"""A task's datasets as the job system keeps them: stored once validated, read back without re-parsing.

Files and jobs are task-agnostic; what differs by task about their data is here, one entry per
task kind of ``adapters.tasks`` (an unknown task is ``InvalidTaskError``, 422, naming it):

* ``task_name(value, param=...)``: the canonical task name (legacy ``"classification"``: text).
* ``dump(task, ds) -> bytes`` and ``load(task, data)``: the stored form of a validated dataset.
  Text: JSON Lines ``{"text", "label"}``, read back by the text parser (exactly as before tasks).
  Image: a header line ``{"dataset": "image-classification", "version": 1, "examples": N,
  "labels": [...], "duplicates_dropped": D, "image_limits": {...}}`` then N lines ``{"label",
  "source", "image": <base64 of the file as uploaded>}``. Reading it back opens no zip and
  decodes no image: every image passed ``decode_image`` at upload and is decoded again, with
  the limits recorded here, when training reads it (``ImageDataset.image``). The store's sha256,
  kept in the file or job row, protects the bytes; a stored form that does not read back is a
  ``DatasetError`` saying it is damaged.
* ``task_of(ds)``: the task a dataset object is data for (by its type).
* ``limits_for(task, limits)``: the limits the task's parser takes, from the tenant's
  ``DatasetLimits`` (``TenantQuotas.dataset_limits``, as every upload gets) or the task's own
  limits type; None: the task's defaults.
* ``upload_format(task, filename, format, data)``: the format to parse with (None: the parser
  sniffs) and the one the file record shows.
* ``split(ds, fraction, seed)`` and ``check_validation(train, validation)``: the stratified
  split and the separate-validation-set check of ``adapters.datasets`` for either task (image
  repeats across the two sets are files with identical bytes); ``validation_fraction(n)``: the
  share a job holds out when it names no validation file; ``NOUNS[task]``: what an example is
  called in messages ("texts", "images").
* ``raw_inputs(ds)``: ``(inputs, limits)``, the examples as a predict request would carry them
  (texts; image files) and the per-input limits to decode them with (``Engine.decode_rows``).
* Text generation (``adapters.generation.datasets``): stored as that module's ``dump`` form (a
  header line, then one chat or prompt/completion per line with its source line), split by a
  seeded shuffle; it has no labels and no ``raw_inputs`` (its gate scores validation loss).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import asdict, fields, replace
from typing import TYPE_CHECKING, Any

from adapters.datasets import (
    Dataset, DatasetLimits, Example, check_validation_set, parse_dataset, stratified_split,
)
from adapters.errors import DatasetError, InvalidTaskError  # noqa: F401 (InvalidTaskError: importable from here as before)
from adapters.generation import datasets as generation_data
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION, TEXT_GENERATION, canonical_task, get_task

if TYPE_CHECKING:
    from adapters.vision.image_datasets import ImageDataset

IMAGE_FORMAT_VERSION = 1
NOUNS = {TEXT_CLASSIFICATION: "texts", IMAGE_CLASSIFICATION: "images", TEXT_GENERATION: "examples"}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def task_name(value: Any, *, param: str = "task") -> str:
    try:
        return canonical_task(value)
    except ValueError as e:
        raise InvalidTaskError(str(e), param=param) from None


def dataset_to_jsonl(ds: Dataset) -> bytes:
    return b"".join(
        json.dumps({"text": e.text, "label": e.label}, ensure_ascii=False).encode() + b"\n"
        for e in ds.examples
    )


def dataset_from_jsonl(data: bytes, limits: DatasetLimits | None = None) -> Dataset:
    """Read back a text dataset stored by ``dump`` (it was validated on the way in)."""
    return parse_dataset(data, format="jsonl", limits=limits or DatasetLimits(max_bytes=1 << 40))


def task_of(ds: Any) -> str:
    """The task ``ds`` is a dataset of; ``InvalidTaskError`` for anything that is not one."""
    if isinstance(ds, Dataset):
        return TEXT_CLASSIFICATION
    if isinstance(ds, generation_data.GenerationDataset):
        return TEXT_GENERATION
    from adapters.vision.image_datasets import ImageDataset

    if isinstance(ds, ImageDataset):
        return IMAGE_CLASSIFICATION
    raise InvalidTaskError(f"not a dataset of any task: {type(ds).__name__}", param="training")


def dump(task: str, ds: Any) -> bytes:
    have = task_of(ds)
    if have != task:
        raise InvalidTaskError(f"a {have} dataset cannot be stored as {task} data", param="task")
    if task == TEXT_GENERATION:
        return generation_data.dump(ds)
    return dataset_to_jsonl(ds) if task == TEXT_CLASSIFICATION else _dump_images(ds)


def load(task: str, data: bytes) -> Any:
    if task_name(task) == TEXT_GENERATION:
        return generation_data.load(data)
    return dataset_from_jsonl(data) if task_name(task) == TEXT_CLASSIFICATION else _load_images(data)


def limits_for(task: str, limits: Any = None) -> Any:
    """The task parser's limits: ``limits`` itself when it is of the task's limits type; the
    task's defaults with ``limits`` as their ``dataset`` part when it is a (tenant's)
    ``DatasetLimits`` and the task's limits hold one; the task's defaults for None."""
    default = get_task(task).default_dataset_limits()
    if limits is None or isinstance(limits, type(default)):
        return limits or default
    if isinstance(limits, DatasetLimits) and isinstance(getattr(default, "dataset", None), DatasetLimits):
        return replace(default, dataset=limits)
    raise TypeError(f"{task} datasets take {type(default).__name__} or DatasetLimits, "
                    f"not {type(limits).__name__}")


def upload_format(task: str, filename: str, format: str | None, data: bytes) -> tuple[str | None, str]:
    """(the format to parse with, the format the record shows) for an upload."""
    name = filename.lower()
    if task == TEXT_CLASSIFICATION:  # as before tasks existed
        if format is None and name.endswith((".csv", ".jsonl", ".json")):
            format = "csv" if name.endswith(".csv") else "jsonl"
        return format, format or ("jsonl" if data.lstrip()[:1] == b"{" else "csv")
    if format is None and name.endswith((".zip", ".jsonl", ".json")):
        format = "zip" if name.endswith(".zip") else "jsonl"
    shown = format.strip().lower() if isinstance(format, str) else ("zip" if data[:4] in _ZIP_MAGIC else "jsonl")
    return format, shown


def validation_fraction(n: int) -> float:
    """The share of an upload of ``n`` examples a job holds out for validation when it names no
    validation file: a fifth under 500 examples, a tenth from 500 on (``split`` takes it)."""
    return 0.2 if n < 500 else 0.1


def split(ds: Any, *, fraction: float, seed: int) -> tuple[Any, Any]:
    if isinstance(ds, Dataset):
        return stratified_split(ds, fraction=fraction, seed=seed)
    if isinstance(ds, generation_data.GenerationDataset):
        return generation_data.split(ds, fraction=fraction, seed=seed)
    from adapters.vision.image_datasets import stratified_image_split

    return stratified_image_split(ds, fraction=fraction, seed=seed)


def check_validation(train: Any, validation: Any) -> int:
    """``check_validation_set`` for either task: the validation labels must all be trained;
    returns how many validation examples repeat a training one (texts, or image files)."""
    if isinstance(train, Dataset):
        return check_validation_set(train, validation)
    if isinstance(train, generation_data.GenerationDataset):
        return generation_data.check_validation(train, validation)
    return check_validation_set(_by_digest(train), _by_digest(validation))


def raw_inputs(ds: Any) -> tuple[list[Any], Any]:
    if isinstance(ds, Dataset):
        return ds.texts(), None
    return [e.data for e in ds.examples], ds.image_limits


# --- images ------------------------------------------------------------------------------


def _by_digest(ds: ImageDataset) -> Dataset:
    """A text view of an image dataset whose "texts" are the files' sha256 digests."""
    return Dataset(tuple(Example(hashlib.sha256(e.data).hexdigest(), e.label) for e in ds.examples), ds.labels)


def _dump_images(ds: ImageDataset) -> bytes:
    header = {"dataset": IMAGE_CLASSIFICATION, "version": IMAGE_FORMAT_VERSION, "examples": len(ds),
              "labels": list(ds.labels), "duplicates_dropped": ds.duplicates_dropped,
              "image_limits": asdict(ds.image_limits)}
    lines = [json.dumps(header, ensure_ascii=False).encode()]
    lines += [json.dumps({"label": e.label, "source": e.source, "image": base64.b64encode(e.data).decode()},
                         ensure_ascii=False).encode() for e in ds.examples]
    return b"\n".join(lines) + b"\n"


def _load_images(data: bytes) -> ImageDataset:
    from adapters.vision.image_datasets import ImageDataset, ImageExample
    from adapters.vision.images import ImageLimits

    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    try:
        header = json.loads(lines[0])
        if header.get("dataset") != IMAGE_CLASSIFICATION or header.get("version") != IMAGE_FORMAT_VERSION:
            raise ValueError(f"unknown header {str(header)[:200]}")
        if header["examples"] != len(lines) - 1:
            raise ValueError(f"the header counts {header['examples']} examples, the file has {len(lines) - 1}")
        known = {f.name for f in fields(ImageLimits)}
        limits = ImageLimits(**{k: v for k, v in header["image_limits"].items() if k in known})
        examples = []
        for line in lines[1:]:
            row = json.loads(line)
            examples.append(ImageExample(base64.b64decode(row["image"], validate=True), row["label"],
                                         row["source"]))
        return ImageDataset(tuple(examples), tuple(header["labels"]), int(header["duplicates_dropped"]), limits)
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, binascii.Error, DatasetError) as e:
        raise DatasetError(f"the stored image dataset is damaged ({e}); upload it again", param="file") from None
