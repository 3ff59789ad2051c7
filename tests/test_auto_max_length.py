"""Auto ``max_length``: 128 tokens where nearly every training text fits in them, else the
longest the base was trained at; the job records it and its adapter is served at it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.base import bundled_model_path, read_trained_length, tiny_base
from adapters.catalog import Catalog
from adapters.datasets import from_records
from adapters.jobs.manager import JobManager
from adapters.jobs.runner import WorkerContext, run_job
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from adapters.training import HyperparameterError, Hyperparameters
from adapters.training.hyperparams import LENGTH_QUANTILE, MAX_LENGTH_SHORT, auto_max_length
from tests.training_data import FAST_HP, sentiment

FILLER = " and the rest of the long story goes on" * 30  # ~270 tokens


def test_the_rule_gives_128_unless_more_than_five_percent_are_longer() -> None:
    assert (MAX_LENGTH_SHORT, LENGTH_QUANTILE) == (128, 0.95)
    assert auto_max_length([30] * 95 + [400] * 5, 256) == 128  # 95% fit: the few long ones are cut
    assert auto_max_length([30] * 94 + [400] * 6, 256) == 256  # 94% fit: the base's length
    assert auto_max_length([128] * 100, 256) == 128 and auto_max_length([129] * 100, 256) == 256
    assert auto_max_length([129] * 100, 512) == 512  # a base trained longer gives longer
    assert auto_max_length([400] * 10, 64) == 64  # never above the cap, even when it is under 128
    assert auto_max_length([], 256) == 128


def test_resolve_uses_the_lengths_only_when_max_length_is_auto() -> None:
    long = [300] * 50
    assert Hyperparameters().resolve(50, "lora", lengths=long, cap=256).max_length == 256
    assert Hyperparameters().resolve(50, "lora", lengths=[20] * 50, cap=256).max_length == 128
    assert Hyperparameters().resolve(50, "lora").max_length == 128  # no lengths known: the short length
    assert Hyperparameters(max_length=64).resolve(50, "lora", lengths=long, cap=256).max_length == 64  # asked for
    with pytest.raises(HyperparameterError, match="max_length"):
        Hyperparameters(max_length=4)


def test_the_trained_length_is_read_from_the_sentence_transformers_config(tmp_path: Path) -> None:
    assert read_trained_length(Path(bundled_model_path())) == 256  # all-MiniLM-L6-v2's max_seq_length
    assert read_trained_length(tmp_path) is None  # no such file
    for bad in ("not json", json.dumps({"max_seq_length": True}), json.dumps({"max_seq_length": -3}),
                json.dumps({"do_lower_case": False}), json.dumps([256])):
        (tmp_path / "sentence_bert_config.json").write_text(bad)
        assert read_trained_length(tmp_path) is None, bad
    (tmp_path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 384}))
    assert read_trained_length(tmp_path) == 384


def test_the_length_cap_and_token_counts() -> None:
    base = tiny_base(positions=256)
    assert base.trained_length is None and base.length_cap == 256  # its positions
    base.trained_length = 200
    assert base.length_cap == 200  # the trained length, where it is known and shorter
    counts = base.token_counts(["good", "good" + FILLER], cap=200)
    assert counts[0] == 3  # [CLS] good [SEP]
    assert counts[1] == 201  # longer than the cap: counted up to cap + 1
    assert base.token_counts([], cap=200) == []


@pytest.mark.parametrize("long_texts, expected", [(False, 128), (True, 256)])
def test_a_jobs_auto_max_length_is_recorded_in_the_job_and_its_adapter(
        tmp_path: Path, long_texts: bool, expected: int) -> None:
    registry = Registry(f"sqlite:///{tmp_path}/tailor.db")
    store = LocalStore(tmp_path / "store")
    jobs, catalog = JobManager(registry.engine, store), Catalog(registry, store)
    registry.create_tenant("acme")
    # long: the row's sentiment word repeated past 128 tokens (filler would drown a tiny model's signal)
    rows = [{**r, "text": r["text"] + (f" {r['text'].split()[0]}" * 140 if long_texts else "")} for r in sentiment(48)]
    jobs.submit("acme", "mood", training=from_records(rows), hyperparameters=FAST_HP)
    job = jobs.claim("w1")
    assert job is not None
    ctx = WorkerContext(manager=jobs, catalog=catalog, trainer_base=tiny_base(seed=1, initializer_range=0.3, positions=256),
                        engine=Engine(tiny_base(seed=1, initializer_range=0.3, positions=256), catalog),
                        worker_id="w1", checkpoint_root=tmp_path / "ckpt", threads=1)
    outcome = run_job(job, ctx)
    done = jobs.get("acme", job.id)
    assert outcome == "succeeded", (done.error, [e.message for e in jobs.events("acme", job.id)])
    assert done.resolved_hyperparameters["max_length"] == expected
    record = registry.resolve("acme", "mood", "prod")
    assert catalog.read(record).manifest.max_length == expected


CUT_NOTE = ("max_length 64: 10 of 40 training texts (25%) are longer and are cut to their first 64 tokens, in "
            "training and when served")


def run_with_cuts(hp: dict, *, cut: bool = True) -> tuple[list[str], list[dict]]:
    """Train a tiny base on 40 texts, every fourth made longer than 64 tokens when ``cut``:
    the run's "max_length" notes and its search records."""
    from adapters.training import TrainCallbacks, train

    base = tiny_base(seed=1, initializer_range=0.3, positions=256)
    rows = sentiment(40)
    long = [r["text"] + (f" {r['text'].split()[0]}" * 140 if i % 4 == 0 else "") for i, r in enumerate(rows)]
    texts = long if cut else [r["text"] for r in rows]
    ids = [0 if r["label"] == "neg" else 1 for r in rows]
    events: list[str] = []
    searches: list[dict] = []
    cb = TrainCallbacks(on_event=lambda level, message: events.append(message), on_search=searches.append)
    train(base, texts, ids, ("neg", "pos"), long[:8], ids[:8], hp=Hyperparameters.from_dict({**hp, "max_length": 64}),
          callbacks=cb, threads=1)
    return [m for m in events if m.startswith("max_length")], searches


def test_a_run_says_how_many_training_texts_max_length_cuts() -> None:
    assert run_with_cuts(FAST_HP)[0] == [CUT_NOTE]
    assert run_with_cuts(FAST_HP, cut=False)[0] == []  # none cut: nothing said


def test_with_the_search_on_the_cut_is_reported_once_not_per_candidate() -> None:
    notes, searches = run_with_cuts({"epochs": 6, "batch_size": 16, "patience": 6, "seed": 0, "search": True})
    assert sum(1 for r in searches if r["stage"] == "candidate_start") > 1  # several candidates trained
    assert notes == [CUT_NOTE]
