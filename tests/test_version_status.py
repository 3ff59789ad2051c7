"""Version status tells what a version is: ``prod``, ``retired`` (was prod) or ``candidate``.

Every version used to show ``candidate``, prod included. Checked in the library (a real SQLite
registry) and over HTTP against a real ``bentoml serve``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from adapters.base import load_base, tiny_base
from adapters.catalog import Catalog
from adapters.peft_format import export_peft, zip_files
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from adapters.version_status import CANDIDATE, PROD, RETIRED, version_status
from tests.service_fixture import Served


def test_status_rule() -> None:
    assert version_status(2, prod=2, ever_prod={1, 2}) == PROD
    assert version_status(1, prod=2, ever_prod={1, 2}) == RETIRED
    assert version_status(3, prod=2, ever_prod={1, 2}) == CANDIDATE
    assert version_status(1, prod=None) == CANDIDATE


def test_registry_remembers_every_version_prod_pointed_at(tmp_path: Path) -> None:
    spec = tiny_base(seed=7).spec
    registry = Registry(f"sqlite:///{tmp_path / 'tailor.db'}")
    catalog = Catalog(registry, LocalStore(tmp_path / "store"))
    registry.create_tenant("acme")
    for seed in range(3):
        catalog.publish("acme", "clf", random_artifact(spec, seed=seed), promote=seed == 0, spec=spec)
    assert registry.alias_versions("acme", "clf") == {1}
    registry.set_alias("acme", "clf", "prod", 2)
    registry.set_alias("acme", "clf", "staging", 3)
    assert registry.alias_versions("acme", "clf") == {1, 2}
    assert registry.alias_versions("acme", "clf", "staging") == {3}
    assert registry.rollback("acme", "clf") == 1
    assert registry.alias_versions("acme", "clf") == {1, 2}


def statuses(c: httpx.Client) -> dict[int, str]:
    r = c.get("/v1/adapters/clf")
    assert r.status_code == 200, r.text
    return {v["version"]: v["status"] for v in r.json()["versions"]}


def test_statuses_over_http_follow_promotions_and_rollbacks(served: Served) -> None:  # noqa: F811
    spec = load_base(str(served.model_dir)).spec
    with served.client(served.admin_key) as admin:
        r = admin.post("/v1/tenants", json={"name": "statuses"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    with served.client(key) as c:
        for seed in (1, 2, 3):
            data = zip_files(export_peft(random_artifact(spec, seed=seed, n_labels=2), spec))
            r = c.post("/v1/adapters/clf/import", files={"file": ("a.zip", data, "application/zip")})
            assert r.status_code == 201, r.text
        first = c.get("/v1/adapters/clf").json()["versions"][0]
        assert first["source"] == "peft" and first["job_id"] is None  # imported, not trained here
        assert statuses(c) == {1: PROD, 2: CANDIDATE, 3: CANDIDATE}
        assert c.post("/v1/adapters/clf/promote", json={"version": 2}).status_code == 200
        assert statuses(c) == {1: RETIRED, 2: PROD, 3: CANDIDATE}
        assert c.post("/v1/adapters/clf/rollback").status_code == 200
        assert statuses(c) == {1: PROD, 2: RETIRED, 3: CANDIDATE}


@pytest.mark.parametrize("status", [PROD, RETIRED, CANDIDATE])
def test_the_api_documents_each_status(served: Served, status: str) -> None:  # noqa: F811
    schema = httpx.get(f"{served.url}/openapi.json").json()["components"]["schemas"]["VersionOut"]
    assert status in schema["properties"]["status"]["description"]
