"""The soak under churn (``bench.soak``), quick and small, against a real ``bentoml serve`` with
two serving workers and a training worker over a tiny base: tenants' predictions, promotions
and rollbacks, training jobs, a hostile tenant, one serving worker SIGKILLed. Its invariants
are asserted here: no wrong-adapter answer, no 5xx (or dropped request) for a well-formed call
outside the kill's window, no hostile 5xx, RSS flat after warm-up, no stuck job, every
promotion served within a second, the killed worker back.

Select it with ``-m soak``; it takes about 1.5-2 minutes on 2 cores (most of it starting the
service and respawning the killed worker).

The judging itself is tested first, on made-up answers: it must flag each kind of wrong answer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.soak import arguments, run
from bench.soak_checks import STALE_S, Answer, Change, Timeline, in_window, judge, version_labels
from tests.service_fixture import save_tiny_base

pytestmark = pytest.mark.soak
PER_PROCESS_RSS = ("rss_growth_of_surviving_processes", "rss_growth_of_each_serving_worker")


def answer(tenant: str, ref: str, version: int, labels: list[str], sent: float, received: float,
           adapter: str = "clf") -> Answer:
    body = {"adapter": adapter, "version": version,
            "predictions": [{"label": labels[0], "score": 0.6, "scores": {x: 1 / len(labels) for x in labels}}]}
    return Answer("load", tenant, ref, sent, received, 200, "1", json.dumps(body).encode())


def test_judge_flags_every_kind_of_wrong_answer():
    timeline = Timeline(initial={"t000": 1, "t001": 1})
    timeline.add(Change("t000", "promote", sent=10.0, received=10.2, old=1, new=2))
    timeline.add(Change("t000", "rollback", sent=20.0, received=20.1, old=2, new=1))
    n = {("t000", 1): 2, ("t000", 2): 3, ("t001", 1): 2}
    v1, v2 = version_labels("t000", 1, 2), version_labels("t000", 2, 3)

    def verdict(a: Answer) -> tuple[bool, bool]:
        v = judge(a, timeline, n)
        return v.ok, v.stale

    assert verdict(answer("t000", "clf", 1, v1, 1.0, 2.0)) == (True, False)
    assert verdict(answer("t000", "clf", 2, v2, 12.0, 13.0)) == (True, False)
    assert verdict(answer("t000", "clf", 1, v1, 10.1, 10.3)) == (True, False)  # the switch may come late
    assert verdict(answer("t000", "clf", 2, v2, 9.0, 10.05)) == (True, False)  # ... or early
    assert verdict(answer("t000", "clf", 1, v1, 10.5, 10.6)) == (True, True)  # old prod within STALE_S
    assert verdict(answer("t000", "clf", 1, v1, 10.2 + STALE_S + 0.1, 12.0)) == (False, False)  # too stale
    assert verdict(answer("t000", "clf", 2, v2, 1.0, 2.0)) == (False, False)  # not prod yet
    assert verdict(answer("t000", "clf@2", 2, v2, 1.0, 2.0)) == (True, False)  # pinned
    assert verdict(answer("t000", "clf@2", 1, v1, 1.0, 2.0)) == (False, False)  # pinned, other version
    other_tenants = version_labels("t001", 1, 2)
    assert verdict(answer("t000", "clf", 1, other_tenants, 1.0, 2.0)) == (False, False)
    assert verdict(answer("t000", "clf", 1, v2[:2], 1.0, 2.0)) == (False, False)  # labels of another version
    assert verdict(answer("t000", "clf", 2, v2[:2], 12.0, 13.0)) == (False, False)  # a head missing a label
    assert verdict(answer("t000", "clf", 7, version_labels("t000", 7, 2), 1.0, 2.0)) == (False, False)
    assert verdict(answer("t000", "clf", 1, v1, 1.0, 2.0, adapter="other")) == (False, False)
    assert verdict(Answer("load", "t000", "clf", 1.0, 2.0, 200, "1", b"not json")) == (False, False)
    assert in_window(5.0, 6.0, (5.5, 8.0)) and not in_window(1.0, 2.0, (5.5, 8.0)) and not in_window(1, 2, None)


def test_soak_quick(tmp_path: Path):
    model_dir = save_tiny_base(tmp_path / "model", seed=1, initializer_range=0.3)  # trains in seconds
    out = tmp_path / "soak.json"
    args = arguments(["--quick", "--out", str(out), "--base-model", str(model_dir), "--seconds", "30",
                      "--warmup", "8", "--tenants", "8", "--clients", "4", "--hostile-clients", "1",
                      "--churn-every", "1.5", "--job-every", "4", "--job-grace", "60"])
    result = run(args)
    assert json.loads(out.read_text())["checks"] == result["checks"]
    assert out.with_suffix(".png").stat().st_size > 0
    checks, examples = result["checks"], result["examples"]
    print(json.dumps({k: v["value"] for k, v in checks.items()}))  # shown with -rA or on failure

    def value(name: str) -> object:
        return checks[name]["value"]

    # the run did what it says: answers judged for every tenant, changes, jobs, an attack, a kill
    assert checks["answers_judged"]["ok"] and checks["tenants_answered"]["ok"], checks
    assert checks["changes"]["ok"] and checks["jobs_succeeded"]["ok"], (checks, result["jobs"]["jobs"])
    assert checks["hostile_requests"]["ok"], checks
    assert result["promotions"]["by_kind"].get("rollback", 0) >= 1, result["promotions"]["by_kind"]
    assert checks["worker_respawned"]["ok"], (result["kill"], result["notes"])
    # the invariants
    assert value("wrong_adapter_answers") == 0, examples["wrong"]
    assert value("well_formed_failures_outside_window") == 0, (examples["failures"], result["kill"])
    assert value("well_formed_unexpected_4xx") == 0, examples["unexpected_4xx"]
    assert value("hostile_5xx_outside_window") == 0, (examples["hostile"], result["hostile"]["by_kind"])
    assert checks["promotion_served_max_s"]["ok"], result["promotions"]
    assert checks["stuck_jobs"]["ok"], result["jobs"]["jobs"]
    rss = {k: v for k, v in result["rss"].items() if k not in ("series", "per_process")}
    assert checks["rss_growth_after_warmup"]["ok"], rss
    # Per-process growth is judged by the full 10-minute run (bench/results/soak-cpu.json): in
    # 30 s a serving worker is still filling its caches and allocator arenas (measured +12.6%
    # in a clean CI-sized run while the process tree grew 1.9%), so here it is reported only.
    for name in PER_PROCESS_RSS:
        assert isinstance(checks[name]["value"], float) and checks[name]["value"] > -0.5, (name, rss)
    judged_here = {k: c for k, c in checks.items() if k not in PER_PROCESS_RSS}
    assert all(c["ok"] for c in judged_here.values()), judged_here
    assert not result["notes"], result["notes"]  # e.g. a change whose answer disagreed with the client's model
    assert not result["kill"]["left_behind_after_stop"], result["kill"]
