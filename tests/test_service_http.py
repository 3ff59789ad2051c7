"""The service over real HTTP: a real ``bentoml serve .`` process, SQLite file and store, no mocks."""

from __future__ import annotations


import json
import re
import threading

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from adapters.base import load_base, tiny_base
from adapters.catalog import Catalog
from adapters.peft_format import TAILOR_FILE, export_peft, import_peft, unzip_files, zip_files
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from tests.service_fixture import LIMITS

TEXTS = ["good morning", "a dreadful film", "taxes and budgets", "the cup final", "so-so service"]
_tenant_seq = iter(range(10_000))


@pytest.fixture(scope="module")
def spec(served):  # noqa: F811
    return load_base(str(served.model_dir)).spec


@pytest.fixture(scope="module")
def admin(served):  # noqa: F811
    with served.client(served.admin_key) as c:
        yield c


def new_tenant(admin, prefix: str = "t", **body) -> tuple[str, str]:
    name = f"{prefix}{next(_tenant_seq)}"
    r = admin.post("/v1/tenants", json={"name": name, **body})
    assert r.status_code == 201, r.text
    return name, r.json()["api_key"]


def adapter_zip(spec, seed: int, n_labels: int = 3, **kw) -> bytes:
    return zip_files(export_peft(random_artifact(spec, seed=seed, n_labels=n_labels, **kw), spec))


def import_zip(client, name: str, data: bytes, **form) -> httpx.Response:
    return client.post(f"/v1/adapters/{name}/import", files={"file": ("adapter.zip", data, "application/zip")},
                       data={k: str(v) for k, v in form.items()})


def assert_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err.get("param") == param, err
    return err


@pytest.fixture(scope="module")
def acme(served, admin, spec):  # noqa: F811
    """A tenant with adapter 'clf': v1 (prod, 3 labels) and v2 (candidate, 2 labels)."""
    name, key = new_tenant(admin, "acme")
    with served.client(key) as c:
        r = import_zip(c, "clf", adapter_zip(spec, seed=1, n_labels=3))
        assert r.status_code == 201, r.text
        assert r.json()["version"] == 1 and r.json()["promoted"] and r.json()["aliases"] == ["prod"]
        r = import_zip(c, "clf", adapter_zip(spec, seed=2, n_labels=2))
        assert r.status_code == 201 and r.json()["version"] == 2 and not r.json()["promoted"]
        yield name, key, c


def predict(client, adapter: str, inputs=TEXTS) -> httpx.Response:
    return client.post("/v1/predict", json={"adapter": adapter, "inputs": inputs})


# -- tenants, keys, auth ----------------------------------------------------------------------------

def test_tenant_key_is_shown_once(served, admin):  # noqa: F811
    name, key = new_tenant(admin, "once", quotas={"max_adapters": 5})
    assert key.startswith("tk-")
    listed = admin.get("/v1/tenants")
    assert listed.status_code == 200
    assert key not in listed.text and "api_key" not in listed.text
    mine = [t for t in listed.json() if t["name"] == name]
    assert mine and mine[0]["quotas"]["max_adapters"] == 5
    keys = admin.get(f"/v1/tenants/{name}/keys").json()
    assert len(keys) == 1 and keys[0]["prefix"] == key[:8] and key not in json.dumps(keys)
    assert_error(admin.post("/v1/tenants", json={"name": name}), 409, "conflict")
    assert_error(admin.post("/v1/tenants", json={"name": "Bad Name"}), 422, "invalid_name", "name")
    assert_error(admin.post("/v1/tenants", json={"name": "q1", "quotas": {"nope": 1}}), 422, "invalid_quota")
    assert_error(admin.get("/v1/tenants/nobody/keys"), 404)


def test_auth(served, admin):  # noqa: F811
    name, key = new_tenant(admin, "auth")
    with served.client() as anon:
        assert_error(anon.get("/v1/adapters"), 401, "missing_api_key")
        assert_error(anon.get("/v1/tenants"), 401)
        assert_error(anon.get("/v1/adapters", headers={"Authorization": "Bearer tk-wrong"}), 401, "invalid_api_key")
        assert_error(anon.get("/v1/adapters", headers={"Authorization": "Basic abc"}), 401)
    with served.client(key) as c:
        assert c.get("/v1/adapters").json() == []
        assert_error(c.get("/v1/tenants"), 403, "forbidden")
        assert_error(c.post("/v1/tenants", json={"name": "evil"}), 403)
    assert_error(admin.get("/v1/adapters"), 403)  # the admin key acts on no tenant
    # a second key; revoking the first is effective at once and leaves the second working
    r = admin.post(f"/v1/tenants/{name}/keys")
    assert r.status_code == 201
    second = r.json()["api_key"]
    first_id = admin.get(f"/v1/tenants/{name}/keys").json()[0]["key_id"]
    r = admin.delete(f"/v1/tenants/{name}/keys/{first_id}")
    assert r.status_code == 200 and r.json()["revoked_at"] and not r.json()["active"]
    with served.client(key) as c:
        assert_error(c.get("/v1/adapters"), 401, "invalid_api_key")
    with served.client(second) as c:
        assert c.get("/v1/adapters").status_code == 200
    other, _ = new_tenant(admin, "auth")
    assert_error(admin.delete(f"/v1/tenants/{other}/keys/{first_id}"), 404)  # not that tenant's key


# -- adapters and predict -------------------------------------------------------------------------------

def test_predict_matches_the_in_process_engine(served, acme, spec, tmp_path):  # noqa: F811
    _, _, c = acme
    r = predict(c, "clf")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == "clf" and body["version"] == 1
    preds = body["predictions"]
    assert len(preds) == len(TEXTS)
    for p in preds:
        assert set(p["scores"]) == {"label_0", "label_1", "label_2"}
        assert p["label"] == max(p["scores"], key=p["scores"].get) and p["score"] == p["scores"][p["label"]]
        assert abs(sum(p["scores"].values()) - 1) < 1e-5
    # the same adapter, run by an engine in this process on the same base, gives the same scores
    base = load_base(str(served.model_dir))
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/local.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("local")
    files = unzip_files(adapter_zip(spec, seed=1, n_labels=3), max_bytes=1 << 24)
    catalog.publish("local", "clf", import_peft(files, base.spec), promote=True, spec=base.spec)
    engine = Engine(base, catalog, EngineConfig(max_resident=8, device_slots=17, max_batch_size=16))
    local = engine.classify(TEXTS, [engine.acquire(engine.resolve("local", "clf"))] * len(TEXTS))
    for remote, mine in zip(preds, local):
        assert remote["label"] == mine.label
        assert all(abs(remote["scores"][k] - v) < 1e-5 for k, v in mine.scores.items())


def test_versions_aliases_promote_rollback(served, acme):  # noqa: F811
    _, _, c = acme
    assert predict(c, "clf@1").json()["version"] == 1
    assert predict(c, "clf@prod").json()["version"] == 1
    v2 = predict(c, "clf@2").json()
    assert v2["version"] == 2 and set(v2["predictions"][0]["scores"]) == {"label_0", "label_1"}
    detail = c.get("/v1/adapters/clf").json()
    assert detail["prod"] == 1 and [v["version"] for v in detail["versions"]] == [1, 2]
    assert detail["versions"][0]["aliases"] == ["prod"] and detail["versions"][1]["labels"] == ["label_0", "label_1"]
    assert all("created_at" in v and "metrics" in v and "status" in v for v in detail["versions"])
    assert [a["name"] for a in c.get("/v1/adapters").json()] == ["clf"]

    r = c.post("/v1/adapters/clf/promote", json={"version": 2})
    assert r.status_code == 200 and r.json()["previous"] == 1 and r.json()["aliases"]["prod"] == 2
    assert predict(c, "clf").json()["version"] == 2  # this process sees its own change at once
    r = c.post("/v1/adapters/clf/rollback")
    assert r.status_code == 200 and r.json()["version"] == 1
    assert predict(c, "clf").json()["version"] == 1
    assert_error(c.post("/v1/adapters/clf/rollback"), 409, "conflict")  # nothing left to roll back to
    assert_error(c.post("/v1/adapters/clf/promote", json={"version": 9}), 404)
    assert_error(c.post("/v1/adapters/clf/promote", json={"version": "2"}), 422, param="version")
    assert_error(c.post("/v1/adapters/clf/promote", json={}), 422, param="version")


def test_unknown_and_foreign_adapters_are_404(served, admin, acme):  # noqa: F811
    _, _, c = acme
    err = assert_error(predict(c, "nope"), 404, "adapter_not_found")
    assert "nope" in err["message"]
    assert_error(predict(c, "clf@7"), 404, "adapter_not_found")
    assert_error(predict(c, "clf@staging"), 404, "adapter_not_found")
    assert_error(predict(c, "../etc"), 422, "invalid_name", "adapter")
    _, other_key = new_tenant(admin, "other")
    with served.client(other_key) as o:
        for r in (predict(o, "clf"), o.get("/v1/adapters/clf"), o.get("/v1/adapters/clf/export"),
                  o.post("/v1/adapters/clf/promote", json={"version": 1}), o.delete("/v1/adapters/clf")):
            assert_error(r, 404)  # another tenant's adapter does not exist for you (not 403)
    assert predict(c, "clf").status_code == 200  # and it is still there for its owner


def test_export_round_trips(served, acme, spec):  # noqa: F811
    _, _, c = acme
    r = c.get("/v1/adapters/clf/export", params={"version": 2})
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    assert r.headers["x-tailor-version"] == "2"
    files = unzip_files(r.content, max_bytes=1 << 24)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    got = import_peft(files, spec)
    want = random_artifact(spec, seed=2, n_labels=2)
    assert torch.equal(got.weights.head_weight, want.weights.head_weight)
    assert torch.equal(got.weights.head_bias, want.weights.head_bias)
    assert set(got.weights.lora) == set(want.weights.lora)
    for path, (a, b) in want.weights.lora.items():
        assert torch.equal(got.weights.lora[path][0], a) and torch.equal(got.weights.lora[path][1], b)
    assert c.get("/v1/adapters/clf/export").headers["x-tailor-version"] == "1"  # default: prod
    assert_error(c.get("/v1/adapters/clf/export", params={"version": 5}), 404)


def test_import_options_and_bad_uploads(served, admin, spec):  # noqa: F811
    _, key = new_tenant(admin, "imp", quotas={"max_adapters": 2})
    with served.client(key) as c:
        r = import_zip(c, "named", adapter_zip(spec, seed=3, n_labels=2), labels='["neg", "pos"]', promote="false")
        assert r.status_code == 201 and r.json()["labels"] == ["neg", "pos"] and not r.json()["promoted"]
        assert_error(predict(c, "named"), 404)  # not promoted: no prod yet
        assert set(predict(c, "named@1").json()["predictions"][0]["scores"]) == {"neg", "pos"}
        r = import_zip(c, "named", adapter_zip(spec, seed=3, n_labels=2), labels="bad,good")
        assert r.status_code == 201 and r.json()["promoted"] and r.json()["labels"] == ["bad", "good"]
        assert_error(import_zip(c, "named", adapter_zip(spec, seed=3), labels="a,b"), 422, "invalid_artifact")
        assert_error(import_zip(c, "x", b"this is not a zip"), 422, "invalid_artifact")
        assert_error(import_zip(c, "x", b""), 422)
        assert_error(import_zip(c, "x", zip_files({"readme.txt": b"hi"})), 422, "invalid_artifact")
        # an adapter trained on another base: same shapes, other fingerprint
        other = tiny_base(seed=99).spec
        err = assert_error(import_zip(c, "x", adapter_zip(other, seed=4)), 422, "base_mismatch")
        assert "base" in err["message"]
        # a plain peft adapter (no fingerprint) for another architecture: its shapes do not fit
        wide = tiny_base(seed=5, hidden_size=64).spec
        files = export_peft(random_artifact(wide, seed=4), wide)
        del files[TAILOR_FILE]
        err = assert_error(import_zip(c, "x", zip_files(files)), 422, "invalid_artifact")
        assert "features" in err["message"] or "fit" in err["message"]
        assert_error(c.post("/v1/adapters/x/import", data={"labels": "a"}), 422, param="file")
        assert_error(import_zip(c, "Bad Name", adapter_zip(spec, seed=4)), 422, "invalid_name")
        assert_error(import_zip(c, "x", adapter_zip(spec, seed=4), promote="maybe"), 422, param="promote")
        r = import_zip(c, "second", adapter_zip(spec, seed=5))
        assert r.status_code == 201
        assert_error(import_zip(c, "third", adapter_zip(spec, seed=6)), 409, "adapter_quota_exceeded")
        assert [a["name"] for a in c.get("/v1/adapters").json()] == ["named", "second"]


def test_delete_adapter_and_tenant(served, admin, spec):  # noqa: F811
    name, key = new_tenant(admin, "del")
    with served.client(key) as c:
        assert import_zip(c, "gone", adapter_zip(spec, seed=8)).status_code == 201
        assert predict(c, "gone").status_code == 200
        r = c.delete("/v1/adapters/gone")
        assert r.status_code == 200 and r.json()["deleted"]
        assert_error(predict(c, "gone"), 404, "adapter_not_found")
        assert_error(c.get("/v1/adapters/gone"), 404)
        assert_error(c.delete("/v1/adapters/gone"), 404)
        assert import_zip(c, "kept", adapter_zip(spec, seed=9)).status_code == 201
        assert predict(c, "kept").status_code == 200
    store = served.home / "store" / "tenants" / name
    assert store.exists()
    r = admin.delete(f"/v1/tenants/{name}")
    assert r.status_code == 200 and r.json()["deleted"]
    assert not store.exists()  # its files went with it
    with served.client(key) as c:
        assert_error(c.get("/v1/adapters"), 401, "invalid_api_key")
    assert_error(admin.delete(f"/v1/tenants/{name}"), 404)
    assert name not in [t["name"] for t in admin.get("/v1/tenants").json()]


# -- bad input: always a 4xx with the JSON error shape ------------------------------------------------

def test_bad_requests_are_4xx_json(served, acme):  # noqa: F811
    _, _, c = acme
    raw = {"Content-Type": "application/json"}
    assert_error(c.post("/v1/predict", content=b'{"adapter": "clf", "inputs": [', headers=raw), 400, "invalid_json")
    assert_error(c.post("/v1/predict", content=b"", headers=raw), 422)
    assert_error(c.post("/v1/predict", content=b"adapter=clf", headers={"Content-Type": "text/plain"}), 415,
                 "unsupported_media_type")
    assert_error(c.post("/v1/predict", json=["clf"]), 422)
    assert_error(c.post("/v1/predict", json={"adapter": "clf", "inputs": "one text"}), 422, param="inputs")
    assert_error(c.post("/v1/predict", json={"adapter": "clf", "inputs": ["ok", 3]}), 422, param="inputs[1]")
    assert_error(c.post("/v1/predict", json={"adapter": 7, "inputs": ["x"]}), 422, param="adapter")
    assert_error(c.post("/v1/predict", json={"adapter": "clf"}), 422, param="inputs")
    assert_error(c.post("/v1/predict", json={"adapter": "clf", "inputs": []}), 422, param="inputs")
    err = assert_error(c.post("/v1/predict", json={"adapter": "clf", "inputs": ["x"], "temperature": 1}), 422,
                       param="temperature")
    assert "unknown field" in err["message"]
    n = int(LIMITS["TAILOR_MAX_INPUTS"])
    assert_error(predict(c, "clf", ["x"] * (n + 1)), 422, "too_many_inputs", "inputs")
    assert predict(c, "clf", ["x"] * n).status_code == 200
    chars = int(LIMITS["TAILOR_MAX_INPUT_CHARS"])
    assert_error(predict(c, "clf", ["fine", "y" * (chars + 1)]), 422, "input_too_long", "inputs[1]")
    big = json.dumps({"adapter": "clf", "inputs": ["z" * 1000] * 1100}).encode()  # > 1 MiB body limit
    assert_error(c.post("/v1/predict", content=big, headers=raw), 413, "payload_too_large")

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(40):
            yield b"z" * 50_000

    assert_error(c.post("/v1/predict", content=chunks(), headers=raw), 413, "payload_too_large")
    huge = b"\0" * (int(LIMITS["TAILOR_MAX_UPLOAD_BYTES"]) + 1000)
    assert_error(import_zip(c, "clf", huge), 413)
    assert_error(c.get("/v1/nothing-here"), 404, "not_found")
    assert_error(c.get("/nothing"), 404, "not_found")
    err = assert_error(c.get("/v1/predict"), 405, "method_not_allowed")
    assert "POST" in err["message"]
    assert_error(c.get("/v1/adapters/clf/export", params={"version": "x/y"}), 422)
    assert_error(c.get("/v1/jobs/not-a-job"), 404)
    assert predict(c, "clf").status_code == 200  # and the server is fine


def test_rate_limit_per_tenant(served, admin, spec):  # noqa: F811
    _, key = new_tenant(admin, "rl", quotas={"requests_per_second": 2})
    with served.client(key) as c:
        codes = [c.get("/v1/adapters") for _ in range(6)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and codes[0].status_code == 200
    assert_error(limited[0], 429, "rate_limited")
    assert int(limited[0].headers["retry-after"]) >= 1


# -- concurrency, metrics, docs, health -------------------------------------------------------------------

def test_concurrent_tenants_share_forward_passes(served, admin, spec):  # noqa: F811
    tenants = []
    for i in range(2):
        _, key = new_tenant(admin, "cc")
        with served.client(key) as c:
            assert import_zip(c, "clf", adapter_zip(spec, seed=20 + i, n_labels=2 + i)).status_code == 201
        tenants.append(key)
    before = _batch_histogram(served)
    barrier = threading.Barrier(32)

    def one(i: int) -> httpx.Response:
        with served.client(tenants[i % 2]) as c:
            barrier.wait()
            return predict(c, "clf", [f"request {i} text {j}" for j in range(1 + i % 3)])

    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(one, range(32)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200][:2]
    for i, r in enumerate(responses):
        assert len(r.json()["predictions"]) == 1 + i % 3
        assert len(r.json()["predictions"][0]["scores"]) == 2 + i % 2  # each tenant got its own adapter
    after = _batch_histogram(served)
    batches = after["count"] - before["count"]
    rows = after["sum"] - before["sum"]
    singles = after["le1"] - before["le1"]
    assert rows == sum(1 + i % 3 for i in range(32))
    assert batches < 32 and singles < batches, (before, after)  # requests were merged


def _batch_histogram(served) -> dict[str, float]:  # noqa: F811
    """The text engine's merged-batch-size histogram: count, sum and batches of one row."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {"count": 0.0, "sum": 0.0, "le1": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{served.url}/metrics").text):
        for sample in family.samples:
            if sample.labels.get("task") != "text-classification":
                continue
            if sample.name in ("tailor_batch_size_count", "tailor_batch_size_sum"):
                out[sample.name.rsplit("_", 1)[1]] = sample.value
            elif sample.name == "tailor_batch_size_bucket" and float(sample.labels["le"]) == 1.0:
                out["le1"] = sample.value
    return out


def test_metrics_docs_health(served, acme):  # noqa: F811
    _, _, c = acme
    for _ in range(2):  # a load, then a resident hit (whatever ran before this test)
        assert predict(c, "clf").status_code == 200
    assert c.get("/v1/adapters/clf").status_code == 200  # a templated route
    text = httpx.get(f"{served.url}/metrics").text
    for name in ("tailor_http_requests_total", "tailor_http_request_duration_seconds_bucket",
                 "tailor_predict_rows_total", "tailor_batch_size_bucket", "tailor_adapter_cache_hits_total",
                 "tailor_adapter_cache_misses_total", "tailor_adapters_resident", "tailor_adapter_load_seconds_count"):
        assert name in text, name
    assert 'endpoint="/v1/adapters/{name}"' in text  # route templates, not raw paths
    assert 'endpoint="/v1/adapters/clf"' not in text
    assert 'tenant="' not in text  # tenant labels are off by default
    docs = httpx.get(f"{served.url}/docs")
    assert docs.status_code == 200 and "text/html" in docs.headers["content-type"] and "swagger" in docs.text.lower()
    css = re.search(r'href="([^"]+\.css)"', docs.text).group(1)
    assert httpx.get(f"{served.url}{css}").status_code == 200  # assets are served locally
    spec = httpx.get(f"{served.url}/openapi.json").json()
    assert {"/v1/predict", "/v1/tenants", "/v1/adapters/{name}/import", "/v1/jobs"} <= set(spec["paths"])
    assert httpx.get(f"{served.url}/healthz").status_code == 200
    assert httpx.get(f"{served.url}/readyz").status_code == 200


def test_files_and_jobs(served, admin):  # noqa: F811
    _, key = new_tenant(admin, "jobs")
    rows = [{"text": f"great thing {i}", "label": "pos"} for i in range(6)]
    rows += [{"text": f"awful thing {i}", "label": "neg"} for i in range(6)]
    jsonl = "\n".join(json.dumps(r) for r in rows).encode()
    with served.client(key) as c:
        r = c.post("/v1/files", files={"file": ("train.jsonl", jsonl)})
        assert r.status_code == 201, r.text
        f = r.json()
        assert f["rows"] == 12 and f["labels"] == ["neg", "pos"]
        assert [x["id"] for x in c.get("/v1/files").json()] == [f["id"]]
        assert c.get(f"/v1/files/{f['id']}").json()["filename"] == "train.jsonl"
        err = assert_error(c.post("/v1/files", files={"file": ("bad.jsonl", b'{"text": "x"}\n{"oops"\n')}), 422,
                           "invalid_dataset")
        assert "line" in err.get("param", "") or err.get("line")
        r = c.post("/v1/jobs", json={"adapter": "trained", "training_file": f["id"],
                                      "hyperparameters": {"epochs": 1}})
        assert r.status_code == 201, r.text
        job = r.json()
        assert job["status"] == "queued" and job["adapter"] == "trained"
        assert c.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]
        assert [j["id"] for j in c.get("/v1/jobs").json()] == [job["id"]]
        events = c.get(f"/v1/jobs/{job['id']}/events").json()
        assert events and "message" in events[0]
        r = c.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert_error(c.post(f"/v1/jobs/{job['id']}/cancel"), 409)
        r = c.post("/v1/jobs", json={"adapter": "inline", "training_data": rows, "promote": "never"})
        assert r.status_code == 201, r.text
        assert_error(c.post("/v1/jobs", json={"adapter": "x"}), 422, param="training_file")
        assert_error(c.post("/v1/jobs", json={"adapter": "x", "training_data": [{"text": 1}]}), 422,
                     "invalid_dataset")
        assert_error(c.post("/v1/jobs", json={"adapter": "x", "training_file": "file-nope"}), 404)
        assert_error(c.post("/v1/jobs", json={"adapter": "x", "training_data": rows, "method": "magic"}), 422,
                     param="method")
        assert_error(c.post("/v1/jobs", json={"adapter": "x", "training_data": rows,
                                               "hyperparameters": {"nope": 1}}), 422)
        assert c.delete(f"/v1/files/{f['id']}").status_code == 200
        assert_error(c.get(f"/v1/files/{f['id']}"), 404)
    _, other = new_tenant(admin, "jobs")
    with served.client(other) as o:
        assert_error(o.get(f"/v1/jobs/{job['id']}"), 404)
        assert o.get("/v1/jobs").json() == []





# -- the Python client and the CLI, against the same server ------------------------------------------

def test_client_round_trip(served, spec, tmp_path):  # noqa: F811
    from service.client import TailorAPIError, TailorClient

    with TailorClient(served.url, served.admin_key) as admin_client:
        created = admin_client.create_tenant("clientco", {"max_adapters": 3})
        assert created["api_key"].startswith("tk-")
        assert "clientco" in [t["name"] for t in admin_client.list_tenants()]
    with TailorClient(served.url, created["api_key"]) as c:
        assert c.ready()
        zpath = tmp_path / "a.zip"
        zpath.write_bytes(adapter_zip(spec, seed=30, n_labels=2))
        assert c.import_adapter("s", zpath, labels=["no", "yes"])["version"] == 1
        folder = tmp_path / "peft"
        folder.mkdir()
        for name, data in export_peft(random_artifact(spec, seed=31, n_labels=2), spec).items():
            (folder / name).write_bytes(data)
        assert c.import_adapter("s", folder, promote=False)["version"] == 2  # a save_pretrained folder
        result = c.predict("s", "hello there")
        assert result["version"] == 1 and set(result["predictions"][0]["scores"]) == {"no", "yes"}
        assert c.promote("s", 2)["aliases"]["prod"] == 2
        assert c.rollback("s")["version"] == 1
        assert [v["version"] for v in c.get_adapter("s")["versions"]] == [1, 2]
        data = c.export_adapter("s", 2, dest=tmp_path / "out.zip")
        assert (tmp_path / "out.zip").read_bytes() == data
        assert import_peft(unzip_files(data, max_bytes=1 << 24), spec).manifest.labels == ("label_0", "label_1")
        with pytest.raises(TailorAPIError) as e:
            c.predict("missing", ["x"])
        assert e.value.status == 404 and e.value.code == "adapter_not_found"
        with pytest.raises(TailorAPIError) as e:
            c.export_adapter("missing")
        assert e.value.status == 404
        assert c.delete_adapter("s")["deleted"]
        assert c.list_adapters() == []


def test_cli(served, spec, tmp_path, capsys, monkeypatch):  # noqa: F811
    from service.cli import main

    monkeypatch.setenv("TAILOR_URL", served.url)
    assert main(["--key", served.admin_key, "tenants", "create", "clico", "--quota", "max_adapters=4"]) == 0
    key = json.loads(capsys.readouterr().out)["api_key"]
    monkeypatch.setenv("TAILOR_API_KEY", key)
    zpath = tmp_path / "a.zip"
    zpath.write_bytes(adapter_zip(spec, seed=40, n_labels=2))
    assert main(["adapters", "import", "mood", str(zpath), "--labels", "sad,happy"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == 1
    assert main(["predict", "mood", "what a day", "oh no", "--tsv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "# mood@1" and len(lines) == 3
    assert lines[1].split("\t")[0] in ("sad", "happy") and lines[1].endswith("what a day")
    assert main(["adapters", "list"]) == 0
    assert [a["name"] for a in json.loads(capsys.readouterr().out)] == ["mood"]
    out = tmp_path / "mood.zip"
    assert main(["adapters", "export", "mood", "-o", str(out)]) == 0
    capsys.readouterr()
    assert import_peft(unzip_files(out.read_bytes(), max_bytes=1 << 24), spec).manifest.labels == ("sad", "happy")
    assert main(["predict", "nothing", "x"]) == 1
    assert "404 adapter_not_found" in capsys.readouterr().err
    assert main(["--key", "tk-bogus", "adapters", "list"]) == 1
    assert "401" in capsys.readouterr().err
