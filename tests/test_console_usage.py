"""adapters.usage: each tenant's counts for the operator view (GET /v1/usage), on a real SQLite
file: adapters, versions and their bytes, uploaded files, active keys, jobs by status; a
tenant's numbers never include another's."""

from __future__ import annotations

import json

from adapters.datasets import DatasetLimits, from_records
from adapters.jobs.files import Files
from adapters.jobs.manager import JobManager
from adapters.keys import KeyStore
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.usage import TenantUsage, tenant_usage
from tests.training_data import sentiment


def _version(reg: Registry, tenant: str, adapter: str, n: int, nbytes: int) -> None:
    reg.add_version(tenant, adapter, weights_key=f"{tenant}/{adapter}/{n}/w", manifest_key=f"{tenant}/{adapter}/{n}/m",
                    sha256=f"{n:064x}", nbytes=nbytes, base_fingerprint="fp", manifest={"labels": ["neg", "pos"]})


def test_usage_counts_each_tenants_own_rows(tmp_path) -> None:
    reg = Registry(f"sqlite:///{tmp_path / 'tailor.db'}")
    store = LocalStore(tmp_path / "store")
    keys, files, jobs = KeyStore(reg.engine), Files(reg.engine, store), JobManager(reg.engine, store)
    for t in ("acme", "globex", "idle"):
        reg.create_tenant(t)
    _version(reg, "acme", "sentiment", 1, 100)
    _version(reg, "acme", "sentiment", 2, 150)
    _version(reg, "acme", "topics", 3, 50)
    _version(reg, "globex", "sentiment", 4, 7)
    acme_key, _ = keys.create("acme")
    keys.create("acme")
    keys.revoke("acme", acme_key)
    keys.create("globex")
    data = "\n".join(json.dumps(r) for r in sentiment(20)).encode()
    uploaded = files.upload("globex", "reviews.jsonl", data, limits=DatasetLimits())
    training = from_records(sentiment(20))
    first = jobs.submit("acme", "sentiment", training=training)
    jobs.submit("acme", "sentiment", training=training)
    jobs.cancel("acme", first.id)

    usage = {u.tenant: u for u in tenant_usage(reg.engine)}
    assert list(usage) == ["acme", "globex", "idle"]
    assert usage["acme"] == TenantUsage(tenant="acme", adapters=2, versions=3, adapter_bytes=300, files=0,
                                        file_bytes=0, active_keys=1, jobs={"cancelled": 1, "queued": 1})
    assert usage["globex"] == TenantUsage(tenant="globex", adapters=1, versions=1, adapter_bytes=7, files=1,
                                          file_bytes=uploaded.bytes, active_keys=1, jobs={})
    assert uploaded.bytes > 0
    assert usage["idle"] == TenantUsage(tenant="idle")
    reg.close()
