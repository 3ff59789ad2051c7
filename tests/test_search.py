"""The hyper-parameter search (successive halving) on a tiny random BERT: its plan and budget,
its events, determinism for a seed, explicit values left alone, the winner continued exactly,
a job's events, and resuming after the search ended."""

from __future__ import annotations

import pytest
import torch

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.datasets import from_records
from adapters.jobs.manager import JobManager
from adapters.jobs.runner import WorkerContext, run_job
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from adapters.training import HyperparameterError, Hyperparameters, TrainCallbacks, train
from adapters.training.hyperparams import AUTO_SEARCH, SEARCH_MAX_EXAMPLES
from adapters.training.search import plan
from tests.training_data import sentiment

LABELS = ("neg", "pos")
# 9 epochs: rungs at 1, 3 and 9 epochs (6 candidates, then 2, then 1); 80 examples at batch 16: 5 steps an epoch
SEARCH_HP = {"epochs": 9, "batch_size": 16, "patience": 9, "seed": 0, "search": True}


@pytest.fixture(scope="module")
def base():
    return tiny_base(seed=1, initializer_range=0.3)


def data(n_train: int = 80, n_val: int = 30):
    tr, va = sentiment(n_train, seed=0), sentiment(n_val, seed=1)
    ids = {name: i for i, name in enumerate(LABELS)}
    return ([r["text"] for r in tr], [ids[r["label"]] for r in tr],
            [r["text"] for r in va], [ids[r["label"]] for r in va])


def run(base, hp, **kw):
    records: list[dict] = []
    kw.setdefault("callbacks", TrainCallbacks(on_search=records.append))
    x, y, vx, vy = data()
    res = train(base, x, y, LABELS, vx, vy, method="lora", hp=Hyperparameters.from_dict(hp), threads=1, **kw)
    return res, records


def weights(res) -> dict[str, torch.Tensor]:
    w = res.artifact.weights
    out = {f"{k}.{i}": t for k, pair in w.lora.items() for i, t in enumerate(pair)}
    return {**out, "head.w": w.head_weight, "head.b": w.head_bias}


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.fixture(scope="module")
def searched(base):
    return run(base, SEARCH_HP)


def test_candidates_rungs_and_choice_are_reported_within_the_budget(searched):
    res, records = searched
    assert [r["stage"] for r in records] == ["plan", "rung", "rung", "chosen"]
    p, rung0, rung1, chosen = records
    names = [c["name"] for c in p["candidates"]]
    assert len(names) == len(set(names)) == 6  # learning rate x rank, both auto here
    assert {c["learning_rate"] for c in p["candidates"]} == {5e-4, 1e-3, 2e-3}
    assert {c["lora_r"] for c in p["candidates"]} == {4, 8}  # never above the default: no slower batches
    assert all(c["lora_alpha"] == 2 * c["lora_r"] for c in p["candidates"])
    assert p["rung_epochs"] == [1, 3, 9]
    assert p["budget_epochs"] == 6 * 1 + 2 * 2 + 1 * 6 and p["budget_steps"] == 5 * p["budget_epochs"]
    # every candidate reached the rung and was scored; the best third goes on, best first
    assert [c["name"] for c in rung0["candidates"]] == names and len(rung0["kept"]) == 2
    assert all(c["epochs"] == 1 and c["val_loss"] is not None for c in rung0["candidates"])
    score = {c["name"]: (-c["val_loss"], c["val_accuracy"] if c["val_accuracy"] is not None else -1)
             for c in rung0["candidates"]}
    assert min(score[n] for n in rung0["kept"]) >= max(score[n] for n in names if n not in rung0["kept"])
    assert [c["name"] for c in rung1["candidates"]] == rung0["kept"]
    assert all(c["epochs"] == 3 for c in rung1["candidates"]) and len(rung1["kept"]) == 1
    # the choice is the last rung's best, and the result is the winner's, trained to its end
    assert chosen["chosen"] == rung1["kept"][0]
    assert res.hyperparameters["search"] == [] and {k: res.hyperparameters[k] for k in chosen["values"]} \
        == chosen["values"]
    assert res.metrics["search"]["chosen"] == chosen["chosen"] and len(res.history) == 9
    # compute: no candidate stopped early (patience 9), so the budget is spent exactly
    assert chosen["steps"] == p["budget_steps"] <= 2 * p["plain_run_steps"]
    assert res.metrics["train_seconds"] == chosen["seconds"] > 0


def test_the_winner_is_continued_not_retrained_and_equals_a_plain_run(base, searched):
    res, records = searched
    chosen = records[-1]["values"]
    plain, plain_records = run(base, {**SEARCH_HP, **chosen, "search": False})
    assert plain_records == []  # explicit values (and search: false) search nothing
    assert plain.history == res.history
    w, wp = weights(res), weights(plain)
    assert w.keys() == wp.keys() and all(torch.equal(w[k], wp[k]) for k in w)


def test_the_search_is_deterministic_for_a_seed(base, searched):
    res, records = searched
    again, again_records = run(base, SEARCH_HP)
    assert without_time(again_records) == without_time(records)
    w, wa = weights(res), weights(again)
    assert all(torch.equal(w[k], wa[k]) for k in w)


def test_explicit_hyperparameters_turn_the_search_off_for_those_fields(base):
    small, on = 80, {"search": True}
    assert Hyperparameters.from_dict(on).resolve(small, "lora").search == ("learning_rate", "lora_r", "lora_alpha")
    assert Hyperparameters.from_dict({**on, "learning_rate": 0.01}).resolve(small, "lora").search \
        == ("lora_r", "lora_alpha")
    assert Hyperparameters.from_dict({**on, "lora_r": 4}).resolve(small, "lora").search == ("learning_rate",)
    assert Hyperparameters.from_dict({**on, "lora_r": 4, "learning_rate": 0.01}).resolve(small, "lora").search == ()
    assert Hyperparameters.from_dict({**on, "lora_alpha": 3}).resolve(small, "lora").search \
        == ("learning_rate", "lora_r")
    assert Hyperparameters.from_dict({"search": False}).resolve(small, "lora").search == ()
    # "auto": the rule when AUTO_SEARCH is on (small LoRA runs only), else nothing
    assert Hyperparameters().resolve(small, "lora").search == (("learning_rate", "lora_r", "lora_alpha")
                                                                if AUTO_SEARCH else ())
    assert Hyperparameters().resolve(SEARCH_MAX_EXAMPLES + 1, "lora").search == ()  # too big to be cheap
    assert Hyperparameters.from_dict({"search": True, "epochs": 6}).resolve(5000, "lora").search  # asked for
    assert Hyperparameters.from_dict({"epochs": 5}).resolve(small, "lora").search == ()  # < 6 epochs: over budget
    for asked, method in (({"epochs": 5, "search": True}, "lora"), ({"search": True}, "head")):
        with pytest.raises(HyperparameterError, match="search needs method lora and at least 6 epochs") as e:
            Hyperparameters.from_dict(asked).resolve(small, method)
        assert e.value.param == "hyperparameters.search"
    assert Hyperparameters().resolve(small, "head").search == Hyperparameters().resolve(small, "full").search == ()
    # an explicit learning rate and alpha stay what they were in every candidate
    p = plan(Hyperparameters.from_dict({**on, "epochs": 9, "learning_rate": 0.01, "lora_alpha": 3}).resolve(small, "lora"),
             small)
    assert [c.values for c in p.candidates] == [{"lora_r": 8}, {"lora_r": 4}]
    assert {(c.hp.learning_rate, c.hp.lora_alpha) for c in p.candidates} == {(0.01, 3.0)}
    assert p.rungs == [3, 9] and p.budget_epochs == 2 * 3 + 6
    res, records = run(base, {**SEARCH_HP, "learning_rate": 0.01})
    assert [c["name"] for c in records[0]["candidates"]] == ["r=8", "r=4"]
    assert res.hyperparameters["learning_rate"] == 0.01
    with pytest.raises(ValueError, match="no hyper-parameter is left to search"):
        plan(Hyperparameters.from_dict({"search": False}).resolve(small, "lora"), small)


def test_a_run_resumed_after_its_search_ended_skips_the_search(base, tmp_path):
    hp = {**SEARCH_HP, "epochs": 6, "patience": 6, "learning_rate": 0.01}  # rank only: rungs at 2, 6
    first, records = run(base, hp, checkpoint_dir=tmp_path)
    assert [r["stage"] for r in records] == ["plan", "rung", "chosen"]
    again, again_records = run(base, hp, checkpoint_dir=tmp_path)  # e.g. a job requeued after it finished
    assert [r["stage"] for r in again_records] == ["resumed"]
    assert again_records[0]["chosen"] == records[-1]["chosen"] and again.history == first.history
    w, wa = weights(first), weights(again)
    assert all(torch.equal(w[k], wa[k]) for k in w)


def test_a_jobs_events_carry_the_search(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path}/tailor.db")
    store = LocalStore(tmp_path / "store")
    jobs, catalog = JobManager(registry.engine, store), Catalog(registry, store)
    registry.create_tenant("acme")
    submitted = jobs.submit("acme", "mood", training=from_records(sentiment(60)),
                            hyperparameters={"epochs": 6, "learning_rate": 0.01, "search": True})
    job = jobs.claim("w1")
    assert job is not None and job.id == submitted.id
    base = tiny_base(seed=1, initializer_range=0.3)
    ctx = WorkerContext(manager=jobs, catalog=catalog, trainer_base=base,
                        engine=Engine(tiny_base(seed=1, initializer_range=0.3), catalog),
                        worker_id="w1", checkpoint_root=tmp_path / "ckpt", threads=1)
    assert run_job(job, ctx) == "succeeded"
    events = [e for e in jobs.events("acme", job.id) if e.type == "search"]
    assert [e.data["stage"] for e in events] == ["plan", "rung", "chosen"]
    assert "2 candidates (r=8, r=4)" in events[0].message and "budget" in events[0].message
    assert events[-1].data["chosen"] in events[0].message and events[-1].data["steps"] <= events[0].data["budget_steps"]
    done = jobs.get("acme", job.id)
    assert done.metrics["search"]["chosen"] == events[-1].data["chosen"]
