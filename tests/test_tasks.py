"""The task seam (issue 14 item 1): names, the legacy manifest value, each kind's members."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapters.datasets import Dataset, DatasetLimits
from adapters.errors import DatasetError
from adapters.tasks import (
    IMAGE_CLASSIFICATION, TASK_NAMES, TEXT_CLASSIFICATION, canonical_task, get_task, task_of_manifest,
)
from adapters.vision.image_datasets import ImageDataset, ImageDatasetLimits
from tests.image_files import image_folder, make_zip


def test_names_and_the_legacy_value():
    assert TASK_NAMES == ("text-classification", "image-classification")
    assert canonical_task("classification") == TEXT_CLASSIFICATION  # adapters written before kinds
    for name in TASK_NAMES:
        assert canonical_task(name) == name
        assert get_task(name).name == name
    assert get_task("classification") is get_task(TEXT_CLASSIFICATION)
    assert task_of_manifest({}) == TEXT_CLASSIFICATION
    assert task_of_manifest({"task": IMAGE_CLASSIFICATION}) == IMAGE_CLASSIFICATION


@pytest.mark.parametrize("bad", ["generation", "Text-Classification", "", None, 3, "x" * 500])
def test_unknown_tasks_are_refused_naming_the_supported_ones(bad):
    with pytest.raises(ValueError, match="supported: text-classification, image-classification"):
        canonical_task(bad)
    with pytest.raises(ValueError):
        get_task(bad)


def test_each_kind_names_its_request_field_and_parses_its_datasets():
    text, image = get_task(TEXT_CLASSIFICATION), get_task(IMAGE_CLASSIFICATION)
    assert (text.input_field, image.input_field) == ("inputs", "images")
    assert isinstance(text.default_dataset_limits(), DatasetLimits)
    assert isinstance(image.default_dataset_limits(), ImageDatasetLimits)
    rows = b"".join(b'{"text": "t%d", "label": "%s"}\n' % (i, b"ab"[i % 2 : i % 2 + 1]) for i in range(6))
    ds = text.parse_dataset(rows, format=None)
    assert isinstance(ds, Dataset) and ds.labels == ("a", "b")
    photos = make_zip(image_folder({"cat": 2, "dog": 2}))
    ids = image.parse_dataset(photos, format="zip")
    assert isinstance(ids, ImageDataset) and ids.labels == ("cat", "dog") and len(ids) == 4
    with pytest.raises(DatasetError):  # each parses only its own kind of file
        text.parse_dataset(photos)
    with pytest.raises(DatasetError):
        image.parse_dataset(rows, format="zip")


def test_importing_the_names_is_cheap():
    """Any module (the artifact format, the job system) may import the names: no torch, no
    task module, so no import cycle."""
    code = ("import sys, adapters.tasks; "
            "assert 'torch' not in sys.modules, 'torch'; "
            "assert not any(m.startswith('adapters.tasks.') for m in sys.modules), 'task module'")
    subprocess.run([sys.executable, "-c", code], check=True)
