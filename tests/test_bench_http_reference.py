"""bench.http's one-client reference: the in-process engine measured on both sides of a phase."""

from __future__ import annotations

from bench.http import one_client_reference


def test_the_one_client_reference_is_the_mean_of_both_sides() -> None:
    before = {"rows_per_s": 100.0, "p50_ms": 10.0, "threads": 2, "by_threads": {}}
    after = {"rows_per_s": 60.0, "p50_ms": 16.0, "threads": 1, "by_threads": {}}
    run = {"rows_per_s": 64.0}
    one_client_reference(run, before, after)
    assert run["engine_one_client_rows_per_s"] == 80.0
    assert run["engine_one_client_p50_ms"] == 13.0
    assert run["ratio_vs_engine_one_client"] == 0.8  # 64 / 80, not 64 / 100 (before alone)
    assert run["engine_one_client_threads"] == [2, 1]
    assert run["engine_one_client_sides"] == {"before": before, "after": after}
