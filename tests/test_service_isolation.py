"""One tenant cannot hurt another over HTTP: a real ``bentoml serve`` with a victim and an attacker.

The attacker floods ``/v1/predict`` with texts that are not valid Unicode (a lone UTF-16
surrogate, which JSON can carry) from several threads while the victim predicts: before the
fix every merged batch holding an attacker row failed, and the victim got 500s.
"""

from __future__ import annotations

import threading

from tests.test_service_http import TEXTS, adapter_zip, admin, assert_error, import_zip, new_tenant, spec  # noqa: F401

POISON = b'{"adapter": "clf", "inputs": ["fine", "\\ud800"]}'  # the JSON escape of a lone surrogate


def test_a_poisoned_flood_costs_the_victim_nothing(served, admin, spec):  # noqa: F811
    _, victim_key = new_tenant(admin, "victim")
    _, attacker_key = new_tenant(admin, "attacker", quotas={"requests_per_second": 1000})
    with served.client(victim_key) as v, served.client(attacker_key) as a:
        assert import_zip(v, "clf", adapter_zip(spec, seed=31, n_labels=3)).status_code == 201
        assert import_zip(a, "clf", adapter_zip(spec, seed=32, n_labels=2)).status_code == 201
        labels = set(v.get("/v1/adapters/clf").json()["versions"][0]["labels"])
        assert len(labels) == 3
        err = assert_error(a.post("/v1/predict", content=POISON, headers={"content-type": "application/json"}),
                           422, "invalid_input", "inputs[1]")
        assert "U+D800" in err["message"]

    done, attacking = threading.Event(), threading.Event()
    attacker_codes: list[int] = []

    def attack() -> None:
        with served.client(attacker_key) as c:
            for _ in range(3000):  # bounded; stops when the victim is done
                if done.is_set():
                    return
                r = c.post("/v1/predict", content=POISON, headers={"content-type": "application/json"})
                attacker_codes.append(r.status_code)
                attacking.set()

    threads = [threading.Thread(target=attack) for _ in range(3)]
    for t in threads:
        t.start()
    victim_codes: list[int] = []
    try:
        assert attacking.wait(60), "the attack never got an answer"
        with served.client(victim_key) as v:
            for i in range(60):
                r = v.post("/v1/predict", json={"adapter": "clf", "inputs": [TEXTS[i % len(TEXTS)], "and more"]})
                victim_codes.append(r.status_code)
                if r.status_code == 200:
                    assert [p["label"] in labels for p in r.json()["predictions"]] == [True, True], r.text
    finally:
        done.set()
        for t in threads:
            t.join(60)
    assert victim_codes == [200] * 60, victim_codes
    assert attacker_codes and set(attacker_codes) <= {422, 429}, sorted(set(attacker_codes))


def test_a_flood_of_unparsable_bodies_meets_the_rate_limit(served, admin):  # noqa: F811
    """FastAPI parses a body before the route's dependencies run: the gate limits the tenant first."""
    _, key = new_tenant(admin, "garbler", quotas={"requests_per_second": 2})
    with served.client(key) as c:
        assert c.get("/v1/adapters").status_code == 200  # the key is now known to this worker
        codes = [c.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}).status_code
                 for _ in range(8)]
    assert 400 in codes and 429 in codes, codes  # parsed while tokens last, then refused unread
    assert set(codes) <= {400, 429}


def test_a_known_bad_key_is_refused_at_the_door(served):  # noqa: F811
    bad = "tk-" + "b" * 40
    with served.client(bad) as c:
        for _ in range(3):
            assert_error(c.post("/v1/predict", json={"adapter": "clf", "inputs": ["x"]}), 401, "invalid_api_key")
            assert_error(c.get("/v1/adapters"), 401, "invalid_api_key")
