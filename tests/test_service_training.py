"""Training over the API, end to end: a real ``bentoml serve .`` with its training pool, two
tenants each training through ``tailor train FILE --wait``, predicting with what they trained,
and never reaching each other's jobs, files or adapters.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from service.cli import main
from service.client import TailorAPIError, TailorClient
from tests.training_data import FAST_HP, SLOW_HP, sentiment

TOPICS = [("sport", "goal"), ("money", "bank"), ("music", "song")]


def topics(n: int, seed: int = 0) -> list[dict[str, str]]:
    return [{"text": f"{TOPICS[i % 3][1]} {TOPICS[i % 3][1]} report {seed} {i}", "label": TOPICS[i % 3][0]}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def hp_flags(hp: dict) -> list[str]:
    return [arg for k, v in hp.items() for arg in ("--hp", f"{k}={json.dumps(v)}")]


@pytest.fixture(scope="module")
def server(served_training):
    """The session's server with a training worker; ``keys``: this module's tenants' keys, by the
    short names the tests use (the tenants are called ``cli-NAME`` there)."""
    s = replace(served_training)
    with TailorClient(s.url, s.admin_key) as admin:
        s.keys = {t: admin.create_tenant(f"cli-{t}")["api_key"] for t in ("acme", "globex")}
    return s


def cli(monkeypatch, capsys, server, tenant: str, *argv: str) -> tuple[int, str, str]:
    monkeypatch.setenv("TAILOR_URL", server.url)
    monkeypatch.setenv("TAILOR_API_KEY", server.keys[tenant])
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one exposed series, labels in any order (0 when it is absent)."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        head, _, rest = series.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if head == name and found == labels:
            return float(value)
    return 0.0


def accuracy(client: TailorClient, adapter: str, rows: list[dict[str, str]]) -> float:
    preds = client.predict(adapter, [r["text"] for r in rows])["predictions"]
    return sum(p["label"] == r["label"] for p, r in zip(preds, rows, strict=True)) / len(rows)


def test_two_tenants_train_with_the_cli_and_stay_isolated(server, tmp_path, monkeypatch, capsys):
    # acme: a progress bar (forced, since stderr is captured here) with the live loss
    rc, out, err = cli(monkeypatch, capsys, server, "acme", "--progress", "train", "sentiment",
                       str(write_jsonl(tmp_path / "acme.jsonl", sentiment(160))), "--wait", *hp_flags(FAST_HP))
    assert rc == 0, err
    acme_job = json.loads(out)
    assert acme_job["status"] == "succeeded" and acme_job["version"] == 1, acme_job
    assert acme_job["metrics"]["val_accuracy"] >= 0.9 and acme_job["finished_at"]
    assert acme_job["progress"]["fraction"] == 1.0
    assert "training:" in err and "loss=" in err and "val_acc=" in err, err[-2000:]
    assert "epoch 1/12:" in err and f"job {acme_job['id']}: succeeded as version 1" in err

    # globex: an uploaded file's id, a validation file, and event lines instead of a bar
    with TailorClient(server.url, server.keys["globex"]) as g:
        train_file = g.upload_file(write_jsonl(tmp_path / "g.jsonl", topics(60)))
    rc, out, err = cli(monkeypatch, capsys, server, "globex", "--no-progress", "train", "topics", train_file["id"],
                       "--validation", str(write_jsonl(tmp_path / "gv.jsonl", topics(15, seed=1))),
                       "--wait", *hp_flags(FAST_HP))
    assert rc == 0, err
    globex_job = json.loads(out)
    assert globex_job["status"] == "succeeded" and globex_job["version"] == 1, globex_job
    assert "step 10/" in err and "train loss" in err and "epoch 1/12:" in err
    assert "\r" not in err  # no bar drawn

    with TailorClient(server.url, server.keys["acme"]) as a, TailorClient(server.url, server.keys["globex"]) as g:
        assert accuracy(a, "sentiment", sentiment(16, seed=9)) >= 0.9
        assert accuracy(g, "topics", topics(15, seed=9)) >= 0.9
        assert set(a.predict("sentiment", "good")["predictions"][0]["scores"]) == {"neg", "pos"}
        assert set(g.predict("topics@1", "bank")["predictions"][0]["scores"]) == {"money", "music", "sport"}

        # each key on the other's job, file and adapter ids: 404, as if they did not exist
        for mine, theirs, job, adapter in ((a, g, globex_job, "topics"), (g, a, acme_job, "sentiment")):
            for call in (lambda: mine.get_job(job["id"]), lambda: mine.job_events(job["id"]),
                         lambda: mine.cancel_job(job["id"]), lambda: mine.predict(adapter, "x"),
                         lambda: mine.predict(f"{adapter}@1", "x"), lambda: mine.get_adapter(adapter),
                         lambda: mine.export_adapter(adapter), lambda: mine.promote(adapter, 1),
                         lambda: mine.delete_adapter(adapter)):
                with pytest.raises(TailorAPIError) as e:
                    call()
                assert e.value.status == 404, e.value
            assert job["id"] not in [j["id"] for j in mine.list_jobs()]
            assert adapter not in [x["name"] for x in mine.list_adapters()]
        with pytest.raises(TailorAPIError) as e:
            a.get_file(train_file["id"])
        assert e.value.status == 404
        assert [j["id"] for j in a.list_jobs()] == [acme_job["id"]]
        assert [j["id"] for j in g.list_jobs()] == [globex_job["id"]]
        # and the other's deletes above removed nothing
        assert g.get_adapter("topics")["prod"] == 1 and a.get_adapter("sentiment")["prod"] == 1

    # another tenant's file id cannot be trained on either: 404, and no job is made
    rc, _, err = cli(monkeypatch, capsys, server, "acme", "train", "stolen", train_file["id"], "--wait")
    assert rc == 1 and "404" in err, err
    rc, out, _ = cli(monkeypatch, capsys, server, "acme", "jobs")  # alone: the list
    assert rc == 0 and [j["id"] for j in json.loads(out)] == [acme_job["id"]]


    # /metrics: jobs by status and how long they ran, read from the database every few seconds
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "tailor_job_training_seconds_count", status="succeeded") >= 2:
            break
        time.sleep(0.5)
    assert metric(text, "tailor_job_training_seconds_count", status="succeeded") >= 2, text[-3000:]
    assert metric(text, "tailor_job_training_seconds_bucket", le="+Inf", status="succeeded") >= 2
    assert metric(text, "tailor_job_training_seconds_sum", status="succeeded") > 0
    assert metric(text, "tailor_jobs", status="succeeded") >= 2


def test_train_refuses_bad_data_before_any_job_exists(server, tmp_path, monkeypatch, capsys):
    rc, _, err = cli(monkeypatch, capsys, server, "acme", "train", "x", str(tmp_path / "missing.jsonl"))
    assert rc == 1 and "no such file" in err
    one_label = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t {i}", "label": "a"} for i in range(20)])
    rc, _, err = cli(monkeypatch, capsys, server, "acme", "train", "x", str(one_label))
    assert rc == 1 and "422" in err, err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine", "label": "a"}\n{"text": "no label"}\n')
    rc, _, err = cli(monkeypatch, capsys, server, "acme", "train", "x", str(broken))
    assert rc == 1 and "422" in err and "line 2" in err, err
    good = write_jsonl(tmp_path / "good.jsonl", sentiment(20))
    with TailorClient(server.url, server.keys["acme"]) as a:
        files = a.list_files()
        for bad_hp in ("nope=1", "epochs=0", "learning_rate=fast"):
            rc, _, err = cli(monkeypatch, capsys, server, "acme", "train", "x", str(good), "--hp", bad_hp)
            assert rc == 1 and "422" in err and bad_hp.split("=")[0] in err, err
        rc, _, err = cli(monkeypatch, capsys, server, "acme", "train", "x", str(good), "--validation", str(broken))
        assert rc == 1 and "422" in err and "line 2" in err, err
        assert "x" not in [j["adapter"] for j in a.list_jobs(limit=100)]
        assert a.list_files() == files  # the refused commands' uploads are gone with them


def test_wait_exits_1_when_the_job_does_not_succeed(server, tmp_path, monkeypatch, capsys):
    data = write_jsonl(tmp_path / "g.jsonl", sentiment(40, seed=2))
    # target modules the base lacks are refused when the job is submitted (no job is created) ...
    bad_targets = {**FAST_HP, "target_modules": ["attention.nonexistent"]}
    rc, out, err = cli(monkeypatch, capsys, server, "globex", "train", "broken", str(data), "--wait",
                       *hp_flags(bad_targets))
    assert rc == 1 and "matches no linear layer" in err, (out, err)
    with TailorClient(server.url, server.keys["globex"]) as g:
        assert "broken" not in [j["adapter"] for j in g.list_jobs()]
    # ... while a job that fails once it runs (a learning rate that diverges) ends --wait with 1
    rc, out, err = cli(monkeypatch, capsys, server, "globex", "train", "broken", str(data), "--wait",
                       *hp_flags({**FAST_HP, "learning_rate": 1.0}))
    assert rc == 1
    job = json.loads(out)
    assert job["status"] == "failed" and job["error"]["code"] == "training_diverged", job
    assert f"job {job['id']}: failed" in err
    with TailorClient(server.url, server.keys["globex"]) as g:
        assert "broken" not in [a["name"] for a in g.list_adapters()]  # a failed job registers nothing
        slow = g.create_job("slow", training_file=g.upload_file(data)["id"],
                            hyperparameters=SLOW_HP)
        g.cancel_job(slow["id"])
    rc, out, err = cli(monkeypatch, capsys, server, "globex", "jobs", "follow", slow["id"])
    assert rc == 1 and f"job {slow['id']}: cancelled" in err


def test_job_and_adapter_quotas_are_409_and_leave_nothing(server, tmp_path):
    rows = sentiment(40, seed=4)
    with TailorClient(server.url, server.admin_key) as admin:
        key = admin.create_tenant("cli-quota", {"max_active_jobs": 1, "max_training_rows": 30})["api_key"]
    with TailorClient(server.url, key) as q:
        with pytest.raises(TailorAPIError) as e:  # more rows than the quota allows: 422, no job
            q.create_job("big", training_data=rows)
        assert e.value.status == 422 and "30" in e.value.message
        first = q.create_job("slow", training_data=rows[:30],
                             hyperparameters=SLOW_HP)
        with pytest.raises(TailorAPIError) as e:
            q.create_job("second", training_data=rows[:30])
        assert (e.value.status, e.value.code) == (409, "job_quota_exceeded"), e.value
        assert [j["id"] for j in q.list_jobs()] == [first["id"]]
        q.cancel_job(first["id"])  # accepted before the job could publish: it ends cancelled
        deadline = time.monotonic() + 180
        while (job := q.get_job(first["id"]))["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "cancelled", (job, q.job_events(first["id"])[-8:])
        second = q.create_job("second", training_data=rows[:30], promote="never")
        assert second["status"] in ("queued", "running")  # accepted (a free worker may claim it at once)
        q.cancel_job(second["id"])


def test_an_image_job_from_a_zip_runs_in_the_training_pool_on_the_image_base(server, tmp_path, monkeypatch, capsys):
    """``tailor train ADAPTER photos.zip --wait``: the zip is uploaded as an image dataset, the
    job is an image job, and the pool's worker trains it with the image trainer on the same
    ``tiny:SEED`` vision base the service runs (its batch-norm statistics calibrated, so it
    learns colours); the version it publishes is served by the service's image engine: worker
    and server built ``tiny:SEED`` alike (one fingerprint)."""
    from tests.image_files import make_zip, solid

    with TailorClient(server.url, server.admin_key) as admin:
        server.keys["pics"] = admin.create_tenant("cli-pics")["api_key"]
    colours = {"red": lambda i: (190 + 3 * i, 20 + i, 30), "blue": lambda i: (20 + i, 40, 180 + 3 * i)}
    folder = {f"{label}/{i:02d}.png": solid(colour(i), size=(20 + i, 18))
              for label, colour in colours.items() for i in range(12)}
    photos = tmp_path / "photos.zip"
    photos.write_bytes(make_zip(folder))
    rc, out, err = cli(monkeypatch, capsys, server, "pics", "--no-progress", "train", "colours", str(photos),
                       "--wait", *hp_flags({"epochs": 2, "seed": 0}))
    job = json.loads(out)
    assert (job["task"], job["dataset"]["training_examples"], job["dataset"]["labels"]) == (
        "image-classification", 20, ["blue", "red"]), job  # 4 of the 24 held out for validation
    assert "training lora on 20 examples, validating on 4" in err and "epoch 2/2:" in err, err
    assert rc == 0 and job["status"] == "succeeded" and job["version"] == 1, job
    with TailorClient(server.url, server.keys["pics"]) as c:
        assert [(f["task"], f["format"]) for f in c.list_files()] == [("image-classification", "zip")]
        served = c.predict("colours", images=[folder["red/00.png"], folder["blue/11.png"]])
        assert served["version"] == 1 and [p["label"] for p in served["predictions"]] == ["red", "blue"], served
