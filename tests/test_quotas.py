"""Quotas that bound a tenant's footprint (issue 11, item 5).

``max_adapters``, ``max_versions_per_adapter`` and ``max_storage_bytes`` are enforced by the
library, in one transaction, on every path that creates an adapter, a version or stored bytes:
``Registry.add_version`` (imports and trained versions), ``JobManager.submit`` (a job for a new
adapter name reserves one) and ``Files.upload``; each refusal is a 409 naming the limit. Quota
values themselves are checked: no NaN or infinity, a sane ``requests_per_second``. Library
tests run on SQLite and PostgreSQL; then the same over HTTP against a real ``bentoml serve``.
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from dataclasses import replace

import httpx
import pytest

from adapters.base import load_base, tiny_base
from adapters.catalog import Catalog
from adapters.datasets import DatasetLimits, from_records
from adapters.errors import ConflictError
from adapters.jobs.files import Files
from adapters.jobs.manager import JobManager
from adapters.peft_format import export_peft, zip_files
from adapters.quotas import (
    AdapterQuotaError, QuotaError, StorageQuotaError, TenantQuotas, VersionQuotaError,
)
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from tests.training_data import FAST_HP, SLOW_HP, sentiment

ROWS = [{"text": f"good {i}", "label": "pos"} for i in range(5)] + [{"text": f"bad {i}", "label": "neg"}
                                                                      for i in range(5)]


# -- quota values ---------------------------------------------------------------------------------

def test_defaults_bound_every_tenant():
    q = TenantQuotas()
    assert (q.max_adapters, q.max_versions_per_adapter, q.max_storage_bytes) == (100, 100, 1 << 30)
    assert TenantQuotas.from_dict({"max_storage_bytes": 5 << 20, "max_versions_per_adapter": 3}).to_dict()[
        "max_storage_bytes"] == 5 << 20


@pytest.mark.parametrize("key", ["max_adapters", "max_storage_bytes", "max_versions_per_adapter",
                                 "requests_per_second", "max_labels"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, None, True, "5", [1], -1])
def test_bad_quota_values_are_refused_naming_the_key(key, value):
    with pytest.raises(QuotaError) as e:
        TenantQuotas.from_dict({key: value})
    assert e.value.param == f"quotas.{key}" and key in e.value.message


def test_counts_are_whole_and_bounded_and_the_rate_is_sane():
    for bad in ({"max_adapters": 2.5}, {"max_storage_bytes": 2**60}, {"max_labels": 1},
                {"requests_per_second": 1e-300}, {"requests_per_second": 0.005}, {"requests_per_second": 1e7}):
        with pytest.raises(QuotaError):
            TenantQuotas.from_dict(bad)
    for rate in (0, 0.01, 1.5, 1e6):
        assert TenantQuotas.from_dict({"requests_per_second": rate}).requests_per_second == rate
    assert TenantQuotas.from_dict({"max_adapters": 4.0}).max_adapters == 4


def test_a_made_up_key_is_named_safely():
    with pytest.raises(QuotaError) as e:
        TenantQuotas.from_dict({"\ud800": 1})
    assert e.value.param == "quotas" and "\\ud800" in e.value.message
    e.value.message.encode("utf-8")  # no lone surrogate reaches the error body


def test_stored_quotas_tolerate_what_older_versions_stored():
    # A NaN quota was once written as null; an unknown key may come from a newer version.
    q = TenantQuotas.stored({"requests_per_second": None, "max_adapters": 7, "from_the_future": 1})
    assert q.requests_per_second == 0.0 and q.max_adapters == 7
    assert TenantQuotas.stored(None) == TenantQuotas() == TenantQuotas.stored({})


# -- enforcement in the library ---------------------------------------------------------------------

@pytest.fixture()
def reg(database_url):
    r = Registry(database_url)
    yield r
    r.close()


def add(reg: Registry, tenant: str, adapter: str, nbytes: int = 10):
    prefix = f"tenants/{tenant}/adapters/{adapter}/{uuid.uuid4().hex}"
    return reg.add_version(tenant, adapter, weights_key=f"{prefix}/w", manifest_key=f"{prefix}/m",
                           sha256="0" * 64, nbytes=nbytes, base_fingerprint="fp", manifest={})


def test_max_adapters_counts_new_adapters_only(reg):
    reg.create_tenant("acme", quotas={"max_adapters": 2})
    add(reg, "acme", "a"), add(reg, "acme", "b")
    seq = reg.change_seq()
    with pytest.raises(AdapterQuotaError) as e:
        add(reg, "acme", "c")
    assert isinstance(e.value, ConflictError) and "max_adapters" in e.value.message and "is 2" in e.value.message
    assert [a.name for a in reg.list_adapters("acme")] == ["a", "b"] and reg.change_seq() == seq  # nothing written
    assert add(reg, "acme", "a").version == 2  # a new version of an existing adapter is no new adapter
    reg.delete_adapter("acme", "b")
    add(reg, "acme", "c")


def test_versions_per_adapter(reg):
    reg.create_tenant("acme", quotas={"max_versions_per_adapter": 2})
    add(reg, "acme", "a"), add(reg, "acme", "a")
    with pytest.raises(VersionQuotaError) as e:
        add(reg, "acme", "a")
    assert "max_versions_per_adapter" in e.value.message and "is 2" in e.value.message
    assert reg.get_adapter("acme", "a").versions == [1, 2]
    add(reg, "acme", "b")  # per adapter
    reg.delete_version("acme", "a", 1)
    assert add(reg, "acme", "a").version == 3


def test_storage_counts_versions_and_files(reg, tmp_path):
    reg.create_tenant("acme", quotas={"max_storage_bytes": 1000})
    reg.create_tenant("other", quotas={"max_storage_bytes": 1000})
    add(reg, "acme", "a", nbytes=600)
    with pytest.raises(StorageQuotaError) as e:
        add(reg, "acme", "a", nbytes=401)
    assert "max_storage_bytes" in e.value.message and "1,000 bytes" in e.value.message
    add(reg, "acme", "b", nbytes=400)  # exactly at the limit is allowed
    add(reg, "other", "a", nbytes=1000)  # per tenant
    files = Files(reg.engine, LocalStore(tmp_path / "store"))
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    with pytest.raises(StorageQuotaError):
        files.upload("acme", "d.jsonl", data, limits=DatasetLimits())
    assert files.list("acme") == [] and files.store.list("tenants/acme/") == []
    reg.delete_adapter("acme", "a")
    rec = files.upload("acme", "d.jsonl", data, limits=DatasetLimits())
    assert rec.bytes == len(data)
    with pytest.raises(StorageQuotaError):  # 400 in versions + the file leave less than 600
        add(reg, "acme", "c", nbytes=600)


def test_concurrent_creators_never_pass_max_adapters(reg):
    reg.create_tenant("acme", quotas={"max_adapters": 3})
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def create(i: int) -> None:
        start.wait()
        try:
            add(reg, "acme", f"a{i}")
            outcomes.append("ok")
        except AdapterQuotaError:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] * 3 + ["refused"] * 5
    assert len(reg.list_adapters("acme")) == 3


def test_publish_refused_by_a_quota_writes_no_bytes(reg, tmp_path):
    spec = tiny_base(seed=1).spec
    reg.create_tenant("acme", quotas={"max_versions_per_adapter": 1})
    catalog = Catalog(reg, LocalStore(tmp_path / "store"))
    catalog.publish("acme", "a", random_artifact(spec, seed=1), promote=True)
    before = catalog.store.list("tenants/acme/")
    with pytest.raises(VersionQuotaError):
        catalog.publish("acme", "a", random_artifact(spec, seed=2))
    assert catalog.store.list("tenants/acme/") == before


@pytest.fixture()
def jm(reg, tmp_path):
    return JobManager(reg.engine, LocalStore(tmp_path / "store"))


def submit(jm, adapter, tenant="acme"):
    return jm.submit(tenant, adapter, training=from_records(ROWS))


def test_a_job_for_a_new_adapter_name_counts_against_max_adapters(reg, jm):
    reg.create_tenant("acme", quotas={"max_adapters": 2})
    add(reg, "acme", "a")
    job = submit(jm, "x")  # reserves the second adapter
    with pytest.raises(AdapterQuotaError) as e:
        submit(jm, "y")
    assert "reserved by active jobs" in e.value.message and "is 2" in e.value.message
    with pytest.raises(AdapterQuotaError):  # an import may not take the reserved place either
        add(reg, "acme", "y")
    submit(jm, "a")  # jobs for existing adapters, and more jobs for the reserved name, are fine
    submit(jm, "x")
    add(reg, "acme", "x")  # the job's own publish: its reservation is its place
    assert len(jm.list("acme")) == 3 and job.status == "queued"


def test_cancelled_jobs_free_their_reservation(reg, jm):
    reg.create_tenant("acme", quotas={"max_adapters": 1})
    job = submit(jm, "x")
    with pytest.raises(AdapterQuotaError):
        submit(jm, "y")
    jm.cancel("acme", job.id)
    submit(jm, "y")


def test_a_job_needs_room_for_its_version_and_some_storage(reg, jm):
    reg.create_tenant("acme", quotas={"max_versions_per_adapter": 2, "max_storage_bytes": 100})
    add(reg, "acme", "a", nbytes=10)
    submit(jm, "a")  # 1 version + 1 job = 2
    with pytest.raises(VersionQuotaError) as e:
        submit(jm, "a")
    assert "1 active job" in e.value.message
    add(reg, "acme", "b", nbytes=90)  # storage now full
    with pytest.raises(StorageQuotaError):
        submit(jm, "c")
    assert len(jm.list("acme")) == 1  # and the refused jobs left no data behind:
    assert {k.split("/")[3] for k in jm.store.list("tenants/acme/jobs/")} == {jm.list("acme")[0].id}


# -- over HTTP, against a real bentoml serve with a training worker -------------------------------------

@pytest.fixture(scope="module")
def server(served_training):
    """The session's server with a training worker; ``spec``: its text base's."""
    s = replace(served_training)
    s.spec = load_base(str(s.model_dir)).spec
    return s


def tenant(server, **quotas) -> httpx.Client:
    name = f"q{uuid.uuid4().hex[:10]}"
    with server.client(server.admin_key) as admin:
        r = admin.post("/v1/tenants", json={"name": name, "quotas": quotas})
        assert r.status_code == 201, r.text
        assert {k: r.json()["quotas"][k] for k in quotas} == quotas
    return server.client(r.json()["api_key"])


def import_zip(c: httpx.Client, server, name: str, seed: int) -> httpx.Response:
    data = zip_files(export_peft(random_artifact(server.spec, seed=seed), server.spec))
    return c.post(f"/v1/adapters/{name}/import", files={"file": ("a.zip", data, "application/zip")})


def refused(r: httpx.Response, code: str, limit: str) -> dict:
    assert r.status_code == 409, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == code and limit in err["message"], err
    return err


def wait_job(c: httpx.Client, job_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.25)


def test_quota_values_are_checked_over_http(server):
    with server.client(server.admin_key) as admin:
        for quotas in ({"requests_per_second": 1e-300}, {"max_adapters": 1.5}, {"max_storage_bytes": -1}):
            r = admin.post("/v1/tenants", json={"name": f"bad{uuid.uuid4().hex[:8]}", "quotas": quotas})
            assert r.status_code == 422 and r.json()["error"]["param"] == f"quotas.{next(iter(quotas))}", r.text
        # NaN and Infinity are not JSON, but Python's parser reads them: refused, never stored as null
        for raw in ('{"max_adapters": NaN}', '{"requests_per_second": Infinity}'):
            body = '{"name": "nan%s", "quotas": %s}' % (uuid.uuid4().hex[:8], raw)
            r = admin.post("/v1/tenants", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, r.text


def test_adapter_quota_on_import_and_job_submit_over_http(server):
    with tenant(server, max_adapters=2) as c:
        assert import_zip(c, server, "a", 1).status_code == 201
        job = c.post("/v1/jobs", json={"adapter": "b", "training_data": sentiment(40), "promote": "never",
                                       "hyperparameters": FAST_HP})
        assert job.status_code == 201, job.text  # reserves the second adapter
        refused(import_zip(c, server, "c", 2), "adapter_quota_exceeded", "max_adapters) is 2")
        refused(c.post("/v1/jobs", json={"adapter": "d", "training_data": sentiment(20)}),
                "adapter_quota_exceeded", "max_adapters) is 2")
        assert import_zip(c, server, "a", 3).status_code == 201  # a version of an existing adapter
        done = wait_job(c, job.json()["id"])
        assert done["status"] == "succeeded", (done["error"], done["metrics"])  # its reservation is its own place
        assert sorted(a["name"] for a in c.get("/v1/adapters").json()) == ["a", "b"]


def test_version_quota_on_import_and_on_publish_over_http(server):
    with tenant(server, max_versions_per_adapter=1, max_concurrent_jobs=1) as c:
        # a long job holds the tenant's one running slot, so "v"'s job waits behind it
        slow = c.post("/v1/jobs", json={"adapter": "slow", "training_data": sentiment(200), "promote": "never",
                                        "hyperparameters": SLOW_HP}).json()
        job = c.post("/v1/jobs", json={"adapter": "v", "training_data": sentiment(40), "promote": "never",
                                       "hyperparameters": FAST_HP})
        assert job.status_code == 201, job.text
        refused(c.post("/v1/jobs", json={"adapter": "v", "training_data": sentiment(20)}),
                "version_quota_exceeded", "max_versions_per_adapter) is 1")
        assert import_zip(c, server, "v", 4).status_code == 201  # takes the one version first
        refused(import_zip(c, server, "v", 5), "version_quota_exceeded", "max_versions_per_adapter) is 1")
        c.post(f"/v1/jobs/{slow['id']}/cancel")
        done = wait_job(c, job.json()["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "version_quota_exceeded", done
        assert "max_versions_per_adapter) is 1" in done["error"]["message"]
        assert [v["version"] for v in c.get("/v1/adapters/v").json()["versions"]] == [1]


def test_storage_quota_on_upload_import_and_publish_over_http(server):
    data = "".join(json.dumps(r) + "\n" for r in sentiment(40)).encode()
    with tenant(server, max_storage_bytes=len(data) + 100) as c:
        up = c.post("/v1/files", files={"file": ("d.jsonl", data)})
        assert up.status_code == 201, up.text
        limit = f"max_storage_bytes) is {len(data) + 100:,} bytes"
        refused(c.post("/v1/files", files={"file": ("e.jsonl", data)}), "storage_quota_exceeded", limit)
        refused(import_zip(c, server, "big", 6), "storage_quota_exceeded", limit)
        job = c.post("/v1/jobs", json={"adapter": "t", "training_file": up.json()["id"],
                                       "hyperparameters": FAST_HP})
        assert job.status_code == 201, job.text  # 100 bytes left: not full, but no adapter fits
        done = wait_job(c, job.json()["id"])
        assert done["status"] == "failed" and done["error"]["code"] == "storage_quota_exceeded", done
        assert limit in done["error"]["message"]
        assert c.get("/v1/adapters").json() == [] and len(c.get("/v1/files").json()) == 1
