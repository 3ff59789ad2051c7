"""The hyper-parameter search (successive halving) on a tiny random BERT: its plan and budget,
its events (each candidate as it starts and ends, in order, with its steps and seconds), its
time budget (a controlled clock: the exploration ends and the best so far is continued), a
cancel stopping it before the next step, determinism for a seed, explicit values left alone,
the winner continued exactly, a job's events written as they happen (and a tenant's cancel
through the real heartbeat), and resuming after the search ended."""

from __future__ import annotations

import threading

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
from adapters.training import HyperparameterError, Hyperparameters, TrainCallbacks, TrainingCancelled, train
from adapters.training.hyperparams import AUTO_SEARCH, SEARCH_MAX_EXAMPLES
from adapters.training.search import MAX_SECONDS, describe, plan, search_fit
from adapters.training.text_task import TextTask
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


TIMES = ("seconds", "seconds_so_far", "search_seconds")


def without_time(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMES} for r in records]


def stages(records: list[dict]) -> list[str]:
    return [r["stage"] for r in records]


def trained(n: int) -> list[str]:
    return ["candidate_start", "candidate_end"] * n


@pytest.fixture(scope="module")
def searched(base):
    return run(base, SEARCH_HP)


def test_candidates_rungs_and_choice_are_reported_within_the_budget(searched):
    res, records = searched
    assert stages(records) == ["plan", *trained(6), "rung", *trained(2), "rung", "continuing", "chosen"]
    p, chosen = records[0], records[-1]
    rung0, rung1 = (r for r in records if r["stage"] == "rung")
    names = [c["name"] for c in p["candidates"]]
    assert len(names) == len(set(names)) == 6  # learning rate x rank, both auto here
    assert {c["learning_rate"] for c in p["candidates"]} == {5e-4, 1e-3, 2e-3}
    assert {c["lora_r"] for c in p["candidates"]} == {4, 8}  # never above the default: no slower batches
    assert all(c["lora_alpha"] == 2 * c["lora_r"] for c in p["candidates"])
    assert p["rung_epochs"] == [1, 3, 9]
    assert p["budget_epochs"] == 6 * 1 + 2 * 2 + 1 * 6 and p["budget_steps"] == 5 * p["budget_epochs"]
    assert p["budget_seconds"] == MAX_SECONDS
    # every candidate reached the rung and was scored; the best third goes on, best first
    assert [c["name"] for c in rung0["candidates"]] == names and len(rung0["kept"]) == 2
    assert all(c["epochs"] == 1 and c["val_loss"] is not None for c in rung0["candidates"])
    score = {c["name"]: (-c["val_loss"], c["val_accuracy"] if c["val_accuracy"] is not None else -1)
             for c in rung0["candidates"]}
    assert min(score[n] for n in rung0["kept"]) >= max(score[n] for n in names if n not in rung0["kept"])
    assert [c["name"] for c in rung1["candidates"]] == rung0["kept"]
    assert all(c["epochs"] == 3 for c in rung1["candidates"]) and len(rung1["kept"]) == 1
    assert "stopped_by" not in rung0 and "stopped_by" not in rung1
    # the choice is the last rung's best, and the result is the winner's, trained to its end
    assert chosen["chosen"] == rung1["kept"][0]
    assert res.hyperparameters["search"] == [] and {k: res.hyperparameters[k] for k in chosen["values"]} \
        == chosen["values"]
    assert res.metrics["search"]["chosen"] == chosen["chosen"] and len(res.history) == 9
    # compute: no candidate stopped early (patience 9), so the budget is spent exactly
    assert chosen["steps"] == p["budget_steps"] <= 2 * p["plain_run_steps"]
    assert res.metrics["train_seconds"] == chosen["seconds"] > chosen["search_seconds"] > 0
    assert chosen["search_seconds"] <= p["budget_seconds"] and "stopped_by" not in chosen


def test_each_candidate_is_reported_as_it_starts_and_ends(searched):
    res, records = searched
    p = records[0]
    starts = [r for r in records if r["stage"] == "candidate_start"]
    ends = [r for r in records if r["stage"] == "candidate_end"]
    rung0, rung1 = (r for r in records if r["stage"] == "rung")
    # rung 0: every candidate from scratch to epoch 1; rung 1: the survivors on to epoch 3
    assert [(s["rung"], s["name"], s["from_epoch"], s["to_epoch"]) for s in starts] == \
        [(0, c["name"], 0, 1) for c in p["candidates"]] + [(1, n, 1, 3) for n in rung0["kept"]]
    for s, e in zip(starts, ends):  # each start is followed by its own end, with what it reached and cost
        assert records.index(e) == records.index(s) + 1 and e["name"] == s["name"] and e["rung"] == s["rung"]
        assert e["epochs"] == s["to_epoch"] and e["steps"] == 5 * (s["to_epoch"] - s["from_epoch"])
        assert e["seconds"] > 0 and e["val_loss"] is not None and "cut" not in e and "stopped" not in e
        assert {k: e[k] for k in ("learning_rate", "lora_r")} == {k: s[k] for k in ("learning_rate", "lora_r")}
        # the search's running totals: steps so far grow by each candidate's steps, within the budget
        assert e["steps_so_far"] == s["steps_so_far"] + e["steps"] <= p["budget_steps"]
        assert e["seconds_so_far"] >= s["seconds_so_far"] and e["budget_seconds"] == p["budget_seconds"]
    # a candidate's end report is what the rung that follows ranks
    assert [{k: e[k] for k in ("name", "val_loss", "val_accuracy")} for e in ends[:6]] == \
        [{k: c[k] for k in ("name", "val_loss", "val_accuracy")} for c in rung0["candidates"]]
    cont = records[-2]
    assert cont["chosen"] == records[-1]["chosen"] == rung1["kept"][0]
    assert (cont["from_epoch"], cont["to_epoch"]) == (3, 9) and cont["steps_so_far"] == ends[-1]["steps_so_far"]
    assert records[-1]["steps"] == cont["steps_so_far"] + 5 * 6
    for r in records:  # every event has a line for the job's log, the CLI and the console
        assert describe(r)
    assert "training lr=0.001,r=8 from epoch 0 to 1" in describe(starts[0])
    assert f"{ends[0]['name']} at epoch 1: validation accuracy" in describe(ends[0])


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
    assert stages(records) == ["plan", *trained(2), "rung", "continuing", "chosen"]
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
    assert [e.data["stage"] for e in events] == ["plan", *trained(2), "rung", "continuing", "chosen"]
    assert "2 candidates (r=8, r=4)" in events[0].message and "budget" in events[0].message
    assert all(e.message == describe(e.data) for e in events)
    assert events[-1].data["chosen"] in events[0].message and events[-1].data["steps"] <= events[0].data["budget_steps"]
    done = jobs.get("acme", job.id)
    assert done.metrics["search"]["chosen"] == events[-1].data["chosen"]


def search_directly(base, hp: dict, **kw):
    """``search_fit`` as ``train`` calls it, with the keywords it does not pass (time budget, clock)."""
    x, y, vx, vy = data()
    records: list[dict] = []
    kw.setdefault("callbacks", TrainCallbacks(on_search=records.append))
    rhp = Hyperparameters.from_dict(hp).resolve(len(x), "lora")
    res = search_fit(lambda h: TextTask(base, LABELS, "lora", h, x, y, vx, vy), rhp, len(x), threads=1, **kw)
    return res, records


def test_the_time_budget_ends_the_exploration_and_continues_the_best_so_far(base):
    now = [0.0]  # the search's clock: time passes when the second candidate starts
    records: list[dict] = []

    def tell(record: dict) -> None:
        records.append(record)
        if record["stage"] == "candidate_start" and record["name"] == "lr=0.0005,r=8":
            now[0] = 100.0  # past the 60 s budget: it trains one step and stops

    res, _ = search_directly(base, SEARCH_HP, max_seconds=60.0, clock=lambda: now[0],
                             callbacks=TrainCallbacks(on_search=tell))
    assert stages(records) == ["plan", *trained(2), "rung", "continuing", "chosen"]
    p, _, first, _, cut, rung, cont, chosen = records
    assert p["budget_seconds"] == 60.0
    assert first["name"] == "lr=0.001,r=8" and first["steps"] == 5 and "cut" not in first
    assert cut["name"] == "lr=0.0005,r=8" and cut["cut"] == "time budget" and cut["steps"] == 1
    assert cut["epochs"] == 0 and cut["val_loss"] is None  # never validated: ranks last
    # the other four never started; the rung ranked who had trained and ended the exploration
    assert rung["stopped_by"] == "time budget" and rung["kept"] == ["lr=0.001,r=8"]
    assert [c["name"] for c in rung["candidates"]] == [c["name"] for c in p["candidates"]]
    assert [c["epochs"] for c in rung["candidates"]] == [1, 0, 0, 0, 0, 0]
    assert (cont["chosen"], cont["from_epoch"], cont["to_epoch"]) == ("lr=0.001,r=8", 1, 9)
    assert chosen["stopped_by"] == "time budget" and chosen["search_seconds"] == 100.0
    assert chosen["steps"] == 5 + 1 + 5 * 8 <= p["budget_steps"]  # the cut candidate's one step counted
    # the winner was continued, not retrained: the plain run with its values
    plain, _ = run(base, {**SEARCH_HP, **chosen["values"], "search": False})
    assert plain.history == res.history
    w, wp = weights(res), weights(plain)
    assert all(torch.equal(w[k], wp[k]) for k in w)


def test_a_cancel_during_the_search_stops_it_at_once(base):
    records: list[dict] = []
    cancelled = [False]
    polls_after = [0]

    def tell(record: dict) -> None:
        records.append(record)
        if record["stage"] == "candidate_start" and record["name"] == "lr=0.0005,r=8":
            cancelled[0] = True  # the tenant cancels as the second candidate starts

    def should_stop() -> bool:
        if cancelled[0]:
            polls_after[0] += 1
        return cancelled[0]

    with pytest.raises(TrainingCancelled):
        search_directly(base, SEARCH_HP, callbacks=TrainCallbacks(on_search=tell, should_stop=should_stop))
    # the second candidate trained no step: its first poll stopped it; nothing came after
    assert stages(records) == ["plan", "candidate_start", "candidate_end", "candidate_start"]
    assert polls_after[0] == 1


class Watched(JobManager):
    """A real JobManager that lets the test act when an event is written and see heartbeats."""

    def __init__(self, *a, on_event=None, **kw):
        super().__init__(*a, **kw)
        self.on_event = on_event
        self.cancel_told = threading.Event()  # a heartbeat answered "cancel requested"
        self.cancel_seen = threading.Event()  # and the heartbeat thread has acted on it (it beats again)

    def event(self, job_id, level, message, **kw):
        super().event(job_id, level, message, **kw)
        if self.on_event is not None:
            self.on_event(job_id, kw.get("data") or {})

    def heartbeat(self, job_id, worker_id):
        if self.cancel_told.is_set():  # the Heartbeat set its flag before calling again
            self.cancel_seen.set()
        cancel = super().heartbeat(job_id, worker_id)
        if cancel:
            self.cancel_told.set()
        return cancel


def test_a_jobs_search_events_are_written_as_they_happen_and_a_cancel_stops_it(tmp_path):
    registry = Registry(f"sqlite:///{tmp_path}/tailor.db")
    store = LocalStore(tmp_path / "store")
    seen_live: list[list[str]] = []

    def on_event(job_id: str, data: dict) -> None:
        if data.get("stage") == "candidate_end" and not seen_live:
            # the plan and the first candidate are already in the job's log, read back from the database
            seen_live.append([e.data["stage"] for e in jobs.events("acme", job_id) if e.type == "search"])
            jobs.cancel("acme", job_id)
            assert jobs.cancel_seen.wait(30), "the heartbeat never saw the cancel"

    jobs = Watched(registry.engine, store, on_event=on_event)
    catalog = Catalog(registry, store)
    registry.create_tenant("acme")
    jobs.submit("acme", "mood", training=from_records(sentiment(60)),
                hyperparameters={"epochs": 6, "learning_rate": 0.01, "search": True})
    job = jobs.claim("w1")
    ctx = WorkerContext(manager=jobs, catalog=catalog, trainer_base=tiny_base(seed=1, initializer_range=0.3),
                        engine=Engine(tiny_base(seed=1, initializer_range=0.3), catalog),
                        worker_id="w1", checkpoint_root=tmp_path / "ckpt", threads=1, heartbeat_seconds=0.05)
    assert run_job(job, ctx) == "cancelled"
    assert seen_live == [["plan", "candidate_start", "candidate_end"]]
    events = [e.data["stage"] for e in jobs.events("acme", job.id) if e.type == "search"]
    assert events == ["plan", "candidate_start", "candidate_end", "candidate_start"]  # stopped before its first step
    assert jobs.get("acme", job.id).status == "cancelled"
    assert not any(a.versions for a in registry.list_adapters("acme"))  # nothing was registered
