"""The soak's tenants: each created through the admin API, each given recognisable adapter
versions through ``POST /v1/adapters/clf/import`` (zipped peft files, label names that say
tenant and version), so any prediction reveals which tenant's adapter and version answered.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx

from adapters.fingerprint import BaseSpec
from adapters.peft_format import export_peft, zip_files
from adapters.synthetic import random_artifact
from bench.soak_checks import ADAPTER, version_labels

HOSTILE = "hostile"
# Well-behaved tenants get an explicit, generous rate limit: the soak measures isolation, not
# the default limit (which may change); the hostile tenant keeps the service's default.
TENANT_QUOTAS = {"requests_per_second": 1000.0}


@dataclass
class Tenant:
    name: str
    key: str
    versions: list[int] = field(default_factory=list)
    n_labels: dict[int, int] = field(default_factory=dict)  # version -> label count


def label_count(index: int, version: int) -> int:
    """2 or 3 labels, varying by tenant and version (heads of different sizes in one batch)."""
    return 2 + (index + version) % 2


def adapter_zip(spec: BaseSpec, seed: int, n_labels: int) -> bytes:
    return zip_files(export_peft(random_artifact(spec, seed=seed, n_labels=n_labels), spec))


def new_tenant(url: str, admin_key: str, name: str, quotas: dict[str, float] | None = None) -> Tenant:
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {admin_key}"}) as admin:
        r = admin.post("/v1/tenants", json={"name": name, **({"quotas": quotas} if quotas else {})})
    if r.status_code != 201:
        raise RuntimeError(f"creating tenant {name}: {r.status_code} {r.text}")
    return Tenant(name, r.json()["api_key"])


def import_versions(url: str, tenant: Tenant, spec: BaseSpec, index: int, versions: int) -> None:
    """Versions 1..``versions`` of ``clf`` (v1 becomes prod), labels from ``version_labels``."""
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {tenant.key}"}) as c:
        for v in range(1, versions + 1):
            k = label_count(index, v)
            r = c.post(f"/v1/adapters/{ADAPTER}/import",
                       files={"file": ("adapter.zip", adapter_zip(spec, 1000 * index + v, k), "application/zip")},
                       data={"labels": json.dumps(version_labels(tenant.name, v, k))})
            if r.status_code != 201 or r.json()["version"] != v:
                raise RuntimeError(f"importing {tenant.name}/{ADAPTER} v{v}: {r.status_code} {r.text}")
            tenant.versions.append(v)
            tenant.n_labels[v] = k


def create_tenants(url: str, admin_key: str, spec: BaseSpec, n: int, versions: int,
                   threads: int = 4) -> list[Tenant]:
    """``n`` tenants ``t000``.. with ``versions`` versions of ``clf`` each. Raises on any
    refusal: the soak needs all of them."""
    def make(index: int) -> Tenant:
        tenant = new_tenant(url, admin_key, f"t{index:03d}", TENANT_QUOTAS)
        import_versions(url, tenant, spec, index, versions)
        return tenant

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(make, range(n)))
