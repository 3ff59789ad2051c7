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
    assert TASK_NAMES == ("text-classification", "image-classification", "text-generation")
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


def test_each_task_module_names_its_trainer_and_the_job_system_asks_it():
    """One place: ``trainer_for`` is the task module's ``trainer()``; text and image settings are
    parsed by their own rules; an unknown task has no trainer."""
    from adapters.jobs.trainers import TrainingUnavailableError, trainer_for
    from adapters.training import Hyperparameters
    from adapters.training.image_hyperparams import ImageHyperparameters

    for name, settings in ((TEXT_CLASSIFICATION, Hyperparameters), (IMAGE_CLASSIFICATION, ImageHyperparameters)):
        mine, asked = get_task(name).trainer(), trainer_for(name)
        assert asked.parse == mine.parse == settings.from_dict
        assert type(asked.parse({"epochs": 2})) is settings
    assert trainer_for("classification").parse == Hyperparameters.from_dict  # the legacy name is text
    assert not hasattr(get_task(TEXT_CLASSIFICATION), "training")  # no second, unused slot
    for bad in ("generation", None):
        with pytest.raises(TrainingUnavailableError, match="not available"):
            trainer_for(bad)  # type: ignore[arg-type]


def test_a_text_job_never_imports_the_image_task_or_trainer():
    code = ("import sys\n"
            "from adapters.jobs.trainers import trainer_for\n"
            "t = trainer_for('text-classification')\n"
            "from adapters.base import tiny_base\n"
            "from adapters.datasets import from_records\n"
            "ds = from_records([{'text': f'row {i}', 'label': 'ab'[i % 2]} for i in range(40)])\n"
            "t.resolve(t.parse({'epochs': 1}), ds, 'lora', tiny_base(seed=1))\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('adapters.training.image', 'adapters.vision', "
            "'adapters.tasks.image')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parsing_image_settings_does_not_import_the_image_trainer():
    code = ("import sys\n"
            "from adapters.jobs.trainers import trainer_for\n"
            "trainer_for('image-classification').parse({'hflip': False})\n"
            "assert 'adapters.training.image_task' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)
