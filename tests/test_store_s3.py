"""S3Store on a real S3 server (moto's server mode), beyond the shared contract tests in
tests/test_store.py: url parsing, bucket checks, verified puts, faults (refused, hanging,
5xx endpoints -> StoreUnavailableError, fast), and the store under the catalog, the engine,
uploaded files, a training worker process and the HTTP service."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import pytest

pytest.importorskip("moto")

from adapters.base import load_base, tiny_base  # noqa: E402
from adapters.catalog import Catalog  # noqa: E402
from adapters.datasets import DatasetLimits  # noqa: E402
from adapters.errors import (  # noqa: E402
    ArtifactError, ChecksumMismatchError, InvalidNameError, NotFoundError, StoreUnavailableError,
)
from adapters.jobs.files import Files  # noqa: E402
from adapters.jobs.supervisor import worker_command  # noqa: E402
from adapters.jobs.worker import parse_args  # noqa: E402
from adapters.peft_format import export_peft, zip_files  # noqa: E402
from adapters.registry import Registry  # noqa: E402
from adapters.runtime.engine import Engine, EngineConfig  # noqa: E402
from adapters.store import S3Location, open_store, parse_s3_url  # noqa: E402
from adapters.store.s3 import S3Store, StoreConfigError  # noqa: E402
from adapters.synthetic import random_artifact  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests.s3 import S3_TEST_ENV, TcpProxy, free_port, moto_endpoint, s3_env, s3_url  # noqa: E402,F401 - fixtures
from tests.training_data import FAST_HP, sentiment  # noqa: E402

TEXTS = ["good morning", "a dreadful film", "taxes and budgets"]


def raw_names(store: S3Store) -> list[str]:
    """Every object under the store's prefix, temporary ones included."""
    pages = store._client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.prefix)
    return sorted(o["Key"][len(store.prefix):] for p in pages for o in p.get("Contents", []))


def sent_requests(store: S3Store) -> list[str]:
    sent: list[str] = []

    def record(request, **_: object) -> None:
        path = request.url.split("?")[0].split(store.prefix, 1)[-1]
        sent.append(f"{request.method} {path}")

    store._client.meta.events.register("before-send.s3", record)
    return sent


# -- urls ------------------------------------------------------------------------------------------

def test_parse_s3_url_options_and_defaults() -> None:
    loc = parse_s3_url("s3://tailor-adapters", env={})
    assert loc == S3Location(bucket="tailor-adapters")
    assert (loc.prefix, loc.endpoint_url, loc.addressing_style, loc.connect_timeout, loc.read_timeout,
            loc.max_attempts) == ("", None, None, 2.0, 10.0, 2)
    loc = parse_s3_url("s3://my.bucket-1/prod/eu/?endpoint_url=http://127.0.0.1:9000/&region=eu-west-1"
                       "&create_bucket=true&read_timeout=0.5&max_attempts=1", env={})
    assert loc.bucket == "my.bucket-1" and loc.prefix == "prod/eu/"
    assert loc.endpoint_url == "http://127.0.0.1:9000" and loc.region == "eu-west-1"
    assert loc.create_bucket and loc.addressing_style == "path"  # custom endpoints want path style
    assert (loc.read_timeout, loc.max_attempts) == (0.5, 1)
    # the canonical url round-trips and drops the one-off create_bucket
    assert loc.url() == ("s3://my.bucket-1/prod/eu?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
                         "&addressing_style=path&read_timeout=0.5&max_attempts=1")
    assert parse_s3_url(loc.url(), env={}) == S3Location(**{**loc.__dict__, "create_bucket": False})


def test_endpoint_from_the_environment_and_url_wins() -> None:
    env = {"AWS_ENDPOINT_URL": "http://aws-env:1", "AWS_ENDPOINT_URL_S3": "http://aws-s3-env:2",
           "TAILOR_S3_ENDPOINT_URL": "https://tailor-env:3"}
    assert parse_s3_url("s3://bkt", env=env).endpoint_url == "https://tailor-env:3"
    del env["TAILOR_S3_ENDPOINT_URL"]
    assert parse_s3_url("s3://bkt", env=env).endpoint_url == "http://aws-s3-env:2"
    del env["AWS_ENDPOINT_URL_S3"]
    assert parse_s3_url("s3://bkt", env=env).endpoint_url == "http://aws-env:1"
    assert parse_s3_url("s3://bkt?endpoint_url=http://given:4", env=env).endpoint_url == "http://given:4"


@pytest.mark.parametrize("url, words", [
    ("s3://Upper/x", "bucket"), ("s3://ab", "bucket"), ("s3://a_b_c", "bucket"), ("s3://-abc", "bucket"),
    ("s3://a..b", "bucket"), ("s3://192.168.1.1", "IP address"), ("s3://" + "a" * 64, "bucket"),
    ("s3://bkt/../x", "prefix"), ("s3://bkt/a//b", "prefix"), ("s3://bkt/.tmp", "prefix"),
    ("s3://bkt/a b", "prefix"), ("s3://key:secret@bkt/x", "credentials"),
    ("s3://bkt?endpoint=http://h", "unknown"), ("s3://bkt?region=a&region=b", "twice"),
    ("s3://bkt?endpoint_url=ftp://h", "http(s)://"), ("s3://bkt?endpoint_url=http://", "http(s)://"),
    ("s3://bkt?read_timeout=soon", "not a number"), ("s3://bkt?max_attempts=0", "out of range"),
    ("s3://bkt?create_bucket=maybe", "create_bucket"), ("s3://bkt?addressing_style=dns", "addressing_style"),
])
def test_bad_s3_urls_are_refused_with_a_reason(url: str, words: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)  # parsing fails before any client exists or request is made
    assert words in str(info.value)


# -- opening ---------------------------------------------------------------------------------------

def test_open_store_url_round_trip(s3_env: str) -> None:
    store = open_store(s3_url(s3_env, prefix="rt"))
    assert isinstance(store, S3Store) and (store.bucket, store.prefix) == ("tailor-test", "rt/")
    assert store.url == f"s3://tailor-test/rt?endpoint_url={s3_env}&addressing_style=path"
    store.put("k", b"shared")
    again = open_store(store.url)  # what a worker process gets: same objects
    assert again.get("k") == b"shared"
    whole = open_store(f"s3://tailor-test?endpoint_url={s3_env}")  # no prefix: keys are object names
    assert whole.get("rt/k") == b"shared"
    assert whole.list("rt") == ["rt/k"]
    with pytest.raises(InvalidNameError):
        store.delete_prefix("")  # never the whole store


def test_missing_bucket_is_a_clear_error_unless_created(s3_env: str) -> None:
    with pytest.raises(StoreConfigError, match="'no-such-bucket' does not exist.*create_bucket=1"):
        open_store(f"s3://no-such-bucket/x?endpoint_url={s3_env}")
    store = open_store(f"s3://made-on-demand/x?endpoint_url={s3_env}&create_bucket=1")
    store.put("k", b"v")
    assert open_store(f"s3://made-on-demand/x?endpoint_url={s3_env}").get("k") == b"v"
    open_store(f"s3://made-on-demand/x?endpoint_url={s3_env}&create_bucket=1")  # exists: fine


def test_endpoint_taken_from_the_environment(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAILOR_S3_ENDPOINT_URL", s3_env)
    store = open_store("s3://tailor-test/from-env?create_bucket=1")
    store.put("k", b"v")
    assert f"endpoint_url={s3_env}" in store.url  # a worker gets it explicitly


def test_credentials_come_from_the_environment_only(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    store = open_store(s3_url(moto_endpoint, create_bucket="0"))  # logged, not raised
    t0 = time.perf_counter()
    with pytest.raises(StoreUnavailableError, match="NoCredentialsError"):
        store.get("k")
    assert time.perf_counter() - t0 < 5


# -- put and get -----------------------------------------------------------------------------------

def test_put_verifies_a_temporary_object_before_the_final_key_exists(s3_env: str) -> None:
    store = open_store(s3_url(s3_env))
    assert isinstance(store, S3Store)
    sent = sent_requests(store)
    data = b"weights" * 1000
    digest = store.put("t1/a/v1/w", data)
    assert digest == hashlib.sha256(data).hexdigest()
    # temp upload, temp HEAD (size + checksums), server-side copy, temp delete -- in that order
    assert [s.split(" ")[0] for s in sent] == ["PUT", "HEAD", "PUT", "DELETE"]
    assert sent[0].split(" ")[1].startswith(".tmp/") and sent[1] == sent[0].replace("PUT", "HEAD")
    assert sent[2] == "PUT t1/a/v1/w" and sent[3] == sent[0].replace("PUT", "DELETE")
    assert raw_names(store) == ["t1/a/v1/w"]
    head = store._client.head_object(Bucket=store.bucket, Key=store.prefix + "t1/a/v1/w", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == digest
    assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_crash_leftover_temp_objects_are_invisible_and_cleaned(s3_env: str) -> None:
    store = open_store(s3_url(s3_env))
    assert isinstance(store, S3Store)
    store.put("t1/a/v1/w", b"complete")
    client, bucket = store._client, store.bucket
    # A writer that died after its upload leaves a temp object; strangers leave odd names.
    client.put_object(Bucket=bucket, Key=store.prefix + ".tmp/dead1234", Body=b"parti")
    client.put_object(Bucket=bucket, Key=store.prefix + "t1/a/v1/not a key", Body=b"x")
    assert store.list() == ["t1/a/v1/w"] and store.list("t1/a/v1") == ["t1/a/v1/w"]
    with pytest.raises(InvalidNameError):
        store.get(".tmp/dead1234")
    assert store.cleanup_temp(older_than_s=3600) == 0  # may belong to a live writer
    assert store.cleanup_temp(older_than_s=0) == 1
    assert raw_names(store) == ["t1/a/v1/not a key", "t1/a/v1/w"]
    assert store.get("t1/a/v1/w") == b"complete"


def test_recorded_checksum_guards_reads_without_an_expected_one(s3_env: str, caplog) -> None:
    store = open_store(s3_url(s3_env))
    assert isinstance(store, S3Store)
    digest = store.put("k", b"original")
    # bit rot that keeps the metadata: the bytes no longer match what put recorded
    store._client.put_object(Bucket=store.bucket, Key=store.prefix + "k", Body=b"originaL",
                             Metadata={"sha256": digest})
    with caplog.at_level(logging.WARNING, logger="tailor.store"):
        with pytest.raises(ChecksumMismatchError, match=digest):
            store.get("k")
    assert "checksum mismatch" in caplog.text and "refused" in caplog.text


def test_large_object_refused_from_its_size(s3_env: str) -> None:
    store = open_store(s3_url(s3_env))
    store.put("big", os.urandom(3 << 20))
    sent = sent_requests(store)  # type: ignore[arg-type]
    with pytest.raises(ArtifactError, match=str(3 << 20)):
        store.get("big", max_bytes=1 << 20)
    assert len(sent) == 1  # one GET, body abandoned unread, no retry


def test_an_upload_that_does_not_verify_is_not_published(s3_env: str, caplog) -> None:
    store = open_store(s3_url(s3_env))
    assert isinstance(store, S3Store)
    good = hashlib.sha256(b"abc").digest()
    cases = [({"ContentLength": 2, "Metadata": {"sha256": good.hex()}}, "size 2 != 3"),
             ({"ContentLength": 3, "Metadata": {}}, "sha256 metadata differs"),
             ({"ContentLength": 3, "Metadata": {"sha256": good.hex()}, "ChecksumSHA256": "AAAA"}, "server checksum")]
    for head, words in cases:
        with caplog.at_level(logging.DEBUG, logger="tailor.store"):
            with pytest.raises(StoreUnavailableError, match="did not verify") as info:
                store._verify_written("k", head, 3, good.hex(), base64.b64encode(good).decode())
        assert info.value.code == "store_unavailable" and words in caplog.text
    store._verify_written("k", {"ContentLength": 3, "Metadata": {"sha256": good.hex()}}, 3, good.hex(),
                          base64.b64encode(good).decode())  # servers without SHA-256 checksums pass


# -- faults ----------------------------------------------------------------------------------------

def test_unreachable_endpoint_is_unavailable_fast(s3_env: str, caplog) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING, logger="tailor.store"):
        t0 = time.perf_counter()
        store = open_store(f"s3://tailor-test/x?endpoint_url={dead}")  # a replica still starts
    assert time.perf_counter() - t0 < 5 and "unreachable at start" in caplog.text
    calls = {
        "put": lambda: store.put("k", b"v"), "get": lambda: store.get("k", sha256="0" * 64),
        "exists": lambda: store.exists("k"), "size": lambda: store.size("k"), "list": lambda: store.list(),
        "delete": lambda: store.delete("k"), "delete_prefix": lambda: store.delete_prefix("a"),
        "cleanup_temp": lambda: store.cleanup_temp(),
    }
    for name, call in calls.items():
        t0 = time.perf_counter()
        with pytest.raises(StoreUnavailableError) as info:
            call()
        assert time.perf_counter() - t0 < 5, name
        assert info.value.code == "store_unavailable" and "retry" in info.value.message
        assert dead.rsplit(":", 1)[1] not in info.value.message  # no endpoint shown to API clients
    assert dead in caplog.text  # ... but it is in the log


@pytest.mark.parametrize("fault", ["reset", "hang", "http503"])
def test_faults_are_unavailable_and_pass(s3_env: str, fault: str) -> None:
    with TcpProxy.to(s3_env) as proxy:
        store = open_store(s3_url(proxy.url, read_timeout="0.5", connect_timeout="0.5", max_attempts="1"))
        store.put("k", b"before")
        proxy.mode = fault
        t0 = time.perf_counter()
        for call in (lambda: store.get("k"), lambda: store.put("k", b"during"), lambda: store.list()):
            with pytest.raises(StoreUnavailableError):
                call()
        assert time.perf_counter() - t0 < 4  # three calls, one try each, 0.5 s timeouts
        proxy.mode = "forward"
        assert store.get("k") == b"before"  # the failed put published nothing
        assert store.list() == ["k"]


# -- the store under the rest of Tailor ------------------------------------------------------------

@pytest.fixture()
def world(tmp_path: Path, s3_env: str):
    """A registry (SQLite), a tiny base and a catalog on S3 through a proxy we can cut."""
    proxy = TcpProxy.to(s3_env)
    store = open_store(s3_url(proxy.url))
    base = tiny_base(seed=3)
    registry = Registry(f"sqlite:///{tmp_path}/registry.db")
    for tenant in ("acme", "globex"):
        registry.create_tenant(tenant)
    yield base, Catalog(registry, store), proxy
    proxy.close()


def test_catalog_publish_and_engine_load_from_s3(world) -> None:
    base, catalog, _ = world
    art = random_artifact(base.spec, seed=1, n_labels=3)
    record = catalog.publish("acme", "clf", art, promote=True, spec=base.spec)
    assert sorted(catalog.store.list("tenants/acme/adapters/clf")) == sorted([record.weights_key,
                                                                                record.manifest_key])
    engine = Engine(base, catalog, EngineConfig(max_resident=8, device_slots=9, max_batch_size=8))
    loaded = engine.acquire(engine.resolve("acme", "clf"))
    preds = engine.classify(TEXTS, [loaded] * len(TEXTS))
    assert all(p is not None and set(p.scores) == {"label_0", "label_1", "label_2"} for p in preds)
    assert catalog.read(record, base.spec).encode()[0] == art.encode()[0]
    # changed behind the registry's back: refused on the next cold load
    store = catalog.store
    store._client.put_object(Bucket=store.bucket, Key=store.prefix + record.weights_key, Body=b"x" * 64)
    fresh = Engine(base, catalog, EngineConfig(max_resident=8, device_slots=9, max_batch_size=8))
    with pytest.raises(ChecksumMismatchError):
        fresh.acquire(fresh.resolve("acme", "clf"))


def test_store_outage_fails_only_cold_loads_and_is_not_cached(world) -> None:
    base, catalog, proxy = world
    for name, seed in (("warm", 1), ("cold", 2)):
        catalog.publish("acme", name, random_artifact(base.spec, seed=seed), promote=True, spec=base.spec)
    engine = Engine(base, catalog, EngineConfig(max_resident=8, device_slots=9, max_batch_size=8))
    warm = engine.acquire(engine.resolve("acme", "warm"))
    proxy.mode = "reset"
    for _ in range(2):  # the failure is raised each time, never remembered
        with pytest.raises(StoreUnavailableError):
            engine.acquire(engine.resolve("acme", "cold"))
    assert engine.cache.stats.load_errors == 2
    again = engine.acquire(engine.resolve("acme", "warm"))  # resident: still serving
    assert again is warm and engine.classify(TEXTS, [warm] * 3)[0] is not None
    proxy.mode = "forward"
    cold = engine.acquire(engine.resolve("acme", "cold"))  # back: the next request loads it
    assert engine.classify(TEXTS, [warm, cold, None])[1] is not None


def test_uploaded_files_live_in_s3(world) -> None:
    _, catalog, proxy = world
    files = Files(catalog.registry.engine, catalog.store)
    data = b"".join(f'{{"text": "row {i}", "label": "{"ab"[i % 2]}"}}\n'.encode() for i in range(10))
    rec = files.upload("acme", "train.jsonl", data, limits=DatasetLimits())
    assert catalog.store.list("tenants/acme/files") == [rec.store_key]
    again, ds = files.load("acme", rec.id)
    assert again.sha256 == rec.sha256 and len(ds) == 10 and ds.labels == ("a", "b")
    proxy.mode = "reset"
    with pytest.raises(StoreUnavailableError):
        files.upload("acme", "more.jsonl", data, limits=DatasetLimits())
    with pytest.raises(StoreUnavailableError):
        files.load("acme", rec.id)
    proxy.mode = "forward"
    assert [f.id for f in files.list("acme")] == [rec.id]  # the failed upload recorded nothing
    files.delete("acme", rec.id)
    assert catalog.store.list("tenants/acme/files") == []
    with pytest.raises(NotFoundError):
        files.get("acme", rec.id)


def test_worker_command_passes_the_s3_url_intact() -> None:
    url = "s3://tailor-test/p/q?endpoint_url=http://127.0.0.1:9000&region=eu-west-1&read_timeout=30"
    settings = Settings(home=Path("h"), admin_key="", base_model=None, database_url="sqlite:///x.db", store_url=url)
    cmd = worker_command(settings, threads=1)
    assert cmd[cmd.index("--store-url") + 1] == url  # one argv element: no shell ever splits it
    assert parse_args(cmd[3:]).store_url == url


def test_http_service_on_s3_trains_serves_and_fails_only_cold_loads(tmp_path: Path, s3_env: str) -> None:
    """The service on an s3:// store: uploads and a training job (its worker subprocess gets the
    url with its query) go through S3; while S3 is cut off, resident adapters keep answering
    and a cold one gets 503 store_unavailable; once S3 is back it loads."""
    from tests.service_fixture import serving

    model_dir = tmp_path / "model"
    tiny = tiny_base(seed=1, initializer_range=0.3)  # trains in seconds
    tiny.model.save_pretrained(model_dir)
    tiny.tokenizer.save_pretrained(model_dir)
    spec = load_base(str(model_dir)).spec
    rows = sentiment(40)
    jsonl = "".join(json.dumps(r) + "\n" for r in rows).encode()
    with TcpProxy.to(s3_env) as proxy:
        overrides = {**S3_TEST_ENV, "TAILOR_STORE_URL": s3_url(proxy.url), "TAILOR_TRAIN_WORKERS": "1",
                     "TAILOR_TRAIN_THREADS": "1"}
        with serving(tmp_path / "home", model_dir, overrides) as served:
            with served.client(served.admin_key) as admin:
                r = admin.post("/v1/tenants", json={"name": "acme"})
                assert r.status_code == 201, r.text
                key = r.json()["api_key"]
            with served.client(key) as c:
                r = c.post("/v1/files", files={"file": ("train.jsonl", jsonl)})
                assert r.status_code == 201, r.text
                r = c.post("/v1/jobs", json={"adapter": "trained", "training_file": r.json()["id"],
                                              "hyperparameters": {**FAST_HP, "epochs": 3}})
                assert r.status_code == 201, r.text
                job_id, deadline = r.json()["id"], time.monotonic() + 180
                while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed"):
                    assert time.monotonic() < deadline, job
                    time.sleep(0.2)
                assert job["status"] == "succeeded", job
                z = zip_files(export_peft(random_artifact(spec, seed=2, n_labels=2), spec))
                r = c.post("/v1/adapters/cold/import", files={"file": ("a.zip", z, "application/zip")})
                assert r.status_code == 201, r.text
                trained = f"trained@{job['version']}"  # served by version whatever the gate decided
                r = c.post("/v1/predict", json={"adapter": trained, "inputs": TEXTS})
                assert r.status_code == 200, (r.text, job)

                proxy.mode = "reset"
                r = c.post("/v1/predict", json={"adapter": trained, "inputs": TEXTS})
                assert r.status_code == 200, r.text  # resident: S3 not needed
                r = c.post("/v1/predict", json={"adapter": "cold", "inputs": TEXTS})
                assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
                assert r.headers.get("retry-after")
                r = c.post("/v1/files", files={"file": ("more.jsonl", jsonl)})
                assert r.status_code == 503, r.text

                proxy.mode = "forward"
                assert c.post("/v1/predict", json={"adapter": "cold", "inputs": TEXTS}).status_code == 200
                assert len(c.get("/v1/files").json()) == 1  # the failed upload recorded nothing
            assert "unavailable during get" in (served.home / "serve.log").read_text()
