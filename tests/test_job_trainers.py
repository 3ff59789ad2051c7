"""Each task's job trainer (``adapters.jobs.trainers``) on real tiny models."""

from __future__ import annotations

from adapters.base import tiny_base
from adapters.datasets import from_records
from adapters.jobs.trainers import trainer_for
from adapters.tasks import TEXT_CLASSIFICATION
from tests.training_data import FAST_HP, sentiment


def test_a_validation_set_lacking_a_label_is_scored_against_the_training_labels() -> None:
    rows = sentiment(96) + [{"text": f"meh so so {i}", "label": "mid"} for i in range(32)]
    train_ds = from_records(rows)  # labels: mid, neg, pos
    val_ds = from_records([r for r in sentiment(12, seed=1)])  # labels: neg, pos (no "mid")
    assert train_ds.labels == ("mid", "neg", "pos") and val_ds.labels == ("neg", "pos")
    trainer = trainer_for(TEXT_CLASSIFICATION)
    base = tiny_base(seed=1)
    hp = trainer.resolve(trainer.parse(FAST_HP), train_ds, "lora", base)
    result = trainer.train(base, train_ds, val_ds, method="lora", hp=hp)
    matrix = result.metrics["confusion_matrix"]  # rows: true labels, in training-label order
    assert len(matrix) == 3
    assert sum(matrix[0]) == 0  # no validation example is "mid" (it was, when ids were the set's own)
    assert sum(matrix[1]) == 6 and sum(matrix[2]) == 6
