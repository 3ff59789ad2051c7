"""A restart keeps everything: SIGTERM the served process, start it again on the same
TAILOR_HOME, and tenants, keys, uploaded files, adapters (versions, aliases), the finished
training job and the predictions are all as they were.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

from adapters.base import load_base
from adapters.peft_format import export_peft, zip_files
from adapters.synthetic import random_artifact
from service.client import TailorAPIError, TailorClient
from tests.service_fixture import save_tiny_base, start_served, stop_served
from tests.training_data import FAST_HP, sentiment

TEXTS = ["good good the day one", "awful awful the day two", "a plain sentence", "nice and grim"]
OVERRIDES = {"TAILOR_TRAIN_WORKERS": "1"}
JOB_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0  # a graceful stop on two busy cores takes up to ~20 s


def snapshot(s, admin_key: str, keys: dict[str, str], job_id: str) -> dict:
    """What a restart must keep, as JSON-comparable data."""
    out: dict = {}
    with TailorClient(s.url, admin_key) as admin:
        out["tenants"] = sorted(admin.list_tenants(), key=lambda t: t["name"])
        out["keys"] = {t: admin.list_keys(t) for t in sorted(keys)}
    for tenant, key in sorted(keys.items()):
        with TailorClient(s.url, key) as c:
            adapters = c.list_adapters()
            out[tenant] = {
                "adapters": adapters,
                "detail": {a["name"]: c.get_adapter(a["name"]) for a in adapters},
                "predictions": {a["name"]: c.predict(a["name"], TEXTS) for a in adapters},
                "files": c.list_files(),
                "jobs": c.list_jobs(),
            }
            if tenant == "alpha":
                out["job"] = c.get_job(job_id)
                out["events"] = c.job_events(job_id)
    return json.loads(json.dumps(out, default=str))


def assert_same_predictions(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for name, b in before.items():
        a = after[name]
        assert (a["adapter"], a["version"]) == (b["adapter"], b["version"])
        for pa, pb in zip(a["predictions"], b["predictions"], strict=True):
            assert pa["label"] == pb["label"] and pa["scores"].keys() == pb["scores"].keys()
            assert all(abs(pa["scores"][k] - pb["scores"][k]) < 1e-6 for k in pb["scores"]), (name, pa, pb)


def test_restart_keeps_tenants_keys_adapters_jobs_and_predictions(tmp_path):
    model_dir = save_tiny_base(tmp_path / "model", seed=1, initializer_range=0.3)  # trains in seconds
    spec = load_base(str(model_dir)).spec
    home = tmp_path / "home"
    s = start_served(home, model_dir, OVERRIDES)
    try:
        with TailorClient(s.url, s.admin_key) as admin:
            keys = {t: admin.create_tenant(t)["api_key"] for t in ("alpha", "beta")}
            revoked = admin.create_key("alpha")
            admin.revoke_key("alpha", revoked["key_id"])
        with TailorClient(s.url, keys["alpha"]) as alpha:
            job = alpha.create_job("senti", training_data=sentiment(48), hyperparameters=FAST_HP)
        with TailorClient(s.url, keys["beta"]) as beta:  # meanwhile: imports, an alias change, a file
            for seed in (1, 2):
                data = zip_files(export_peft(random_artifact(spec, seed=seed, n_labels=3), spec))
                beta.import_adapter("topics", data, labels=["a", "b", "c"], promote=seed == 1)
            beta.promote("topics", 2)
            beta.rollback("topics")
            path = tmp_path / "rows.jsonl"
            path.write_text("\n".join(json.dumps(r) for r in sentiment(12, seed=3)))
            beta.upload_file(path)
        with TailorClient(s.url, keys["alpha"]) as alpha:
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while (done := alpha.get_job(job["id"]))["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"job still {done['status']}:\n{s.log_tail()}"
                time.sleep(0.25)
        assert done["status"] == "succeeded", done
        assert done["version"] == 1 and done["metrics"] and done["finished_at"]
        before = snapshot(s, s.admin_key, keys, job["id"])
    finally:
        rc = stop_served(s, timeout=STOP_TIMEOUT_S)
    # SIGTERM stops it cleanly: exit status 0 (-15: it died of the signal, -9: it had to be killed)
    assert rc == 0, f"bentoml serve exited with {rc} after SIGTERM:\n{s.log_tail()}"

    s = start_served(home, model_dir, OVERRIDES, port=urlsplit(s.url).port)  # same home, same URL
    try:
        after = snapshot(s, s.admin_key, keys, job["id"])  # the old keys still work
        assert [t["name"] for t in after["tenants"]] == ["alpha", "beta"]
        assert after["tenants"] == before["tenants"] and after["keys"] == before["keys"]
        assert [k["active"] for k in after["keys"]["alpha"]] == [True, False]
        with TailorClient(s.url, revoked["api_key"]) as gone:
            try:
                gone.list_adapters()
                raise AssertionError("a key revoked before the restart works after it")
            except TailorAPIError as e:
                assert e.status == 401
        for tenant in ("alpha", "beta"):
            b, a = before[tenant], after[tenant]
            assert a["adapters"] == b["adapters"] and a["detail"] == b["detail"]
            assert a["files"] == b["files"] and a["jobs"] == b["jobs"]
            assert_same_predictions(b["predictions"], a["predictions"])
        assert after["alpha"]["detail"]["senti"]["prod"] == 1
        assert after["beta"]["detail"]["topics"]["prod"] == 1
        assert [v["version"] for v in after["beta"]["detail"]["topics"]["versions"]] == [1, 2]
        assert after["job"] == before["job"] and after["job"]["status"] == "succeeded"
        assert after["job"]["metrics"] == done["metrics"] and after["job"]["version"] == 1
        assert after["events"] == before["events"]
        # the revived training pool does not train the finished job again
        with TailorClient(s.url, keys["alpha"]) as alpha:
            assert alpha.get_job(job["id"])["status"] == "succeeded"
            assert alpha.list_jobs() == before["alpha"]["jobs"]
            assert [v["version"] for v in alpha.get_adapter("senti")["versions"]] == [1]
    finally:
        stop_served(s)
