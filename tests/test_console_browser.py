"""The web console at /ui in a real browser (Debian's chromium driven by Playwright) against a real
``bentoml serve`` with a training worker: the operator creates a tenant and copies its key; the
tenant uploads data (progress bar), starts a job, watches the loss curve grow to completion,
promotes the version and predicts in the playground; another tenant sees none of it; labels and
file names holding HTML are shown as text and run nothing; the key never reaches a URL, a cookie
or the server log.

Skips (saying why) without chromium (``scripts/system-packages.sh`` installs it) or Playwright.
Screenshots of the main pages go to a temporary folder, or to ``$TAILOR_CONSOLE_SCREENSHOTS``
when set (``docs/console/`` holds the README's copies). About 40-60 s on a 2-core machine.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.console_browser import TIMEOUT_MS, XSS, browser, shots, sign_in  # noqa: F401 (fixtures)
from tests.image_files import distinct
from tests.service_fixture import Served, image_base
from tests.training_data import FAST_HP, sentiment

FILE_NAME = f"{XSS}.jsonl"
# Long enough (~5 s on a 2-core box, 1 s polls) that the page reads the loss curve while the job
# still runs, so the test can see the curve grow; FAST_HP's 12 epochs can end within one poll.
LIVE_HP = {**FAST_HP, "epochs": 60, "patience": 60}

@pytest.fixture(scope="module")
def server(served_training: Served) -> Served:
    """The session's server with a training worker, over a base that trains in seconds."""
    return served_training


class Watch:
    """What a page did that it must not: dialogs, script errors, CSP violations, and every URL it
    requested (to look for the key)."""

    def __init__(self, page: Any) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.urls: list[str] = []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("request", lambda r: self.urls.append(r.url))


def new_page(browser: Any, server: Served) -> tuple[Any, Any, Watch]:
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    return context, page, Watch(page)


def sign_out(page: Any) -> None:
    page.click("#sign-out")
    page.wait_for_selector("#api-key")
    assert page.evaluate("Object.keys(sessionStorage).length") == 0


def image_adapter_zip() -> bytes:
    """A random LoRA adapter (peft files, zipped) on the vision base the server loads."""
    from adapters.peft_format import export_peft, zip_files
    from adapters.synthetic import random_image_artifact

    spec = image_base().spec
    return zip_files(export_peft(random_image_artifact(spec, seed=11, n_labels=3), spec))


def no_injected_markup(page: Any) -> None:
    """The HTML-looking label and file name never became elements."""
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0


def test_console_end_to_end(server: Served, browser: Any, shots: Path, tmp_path: Path) -> None:
    context, page, watch = new_page(browser, server)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}) as admin:
        others = [t["name"] for t in admin.get("/v1/tenants").json()]  # other modules' tenants on this server

    # -- a wrong key is refused on the sign-in form, and nothing is kept ---------------------------
    page.goto("/ui/")
    page.fill("#api-key", "tk-not-a-key")
    page.click("form.signin button[type=submit]")
    page.wait_for_selector("form.signin .error:has-text('invalid')")
    assert page.evaluate("Object.keys(sessionStorage).length") == 0 and page.locator("#sign-out").count() == 0

    # -- the operator signs in, creates a tenant and copies its key -----------------------------
    sign_in(page, server.admin_key)
    assert page.url.endswith("#/operator")
    page.wait_for_selector("#health-ready:has-text('yes')")
    page.fill("#tenant-name", "acme")
    page.click("#tenant-form button[type=submit]")
    shown = page.locator("#tenant-created #new-key")
    shown.wait_for()
    page.click("#tenant-created #copy-key")
    page.wait_for_selector("#tenant-created [role=status]:has-text('Copied')")
    key = page.evaluate("navigator.clipboard.readText()")
    assert key == shown.input_value() and key.startswith("tk-")
    page.wait_for_selector("#tenants-table tr[data-tenant='acme']")
    # a bad name: the API's refusal names the field, next to the form; nothing is created
    page.fill("#tenant-name", "acme")
    page.click("#tenant-form button[type=submit]")
    page.wait_for_selector("#tenant-error:has-text('already exists')")
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.admin_key}"}) as admin:
        other = admin.post("/v1/tenants", json={"name": "globex"}).json()["api_key"]
        assert [t["name"] for t in admin.get("/v1/tenants").json()] == sorted([*others, "acme", "globex"])
    sign_out(page)

    # -- the tenant uploads data with a progress bar ----------------------------------------------
    sign_in(page, key)
    assert page.url.endswith("#/adapters")
    page.wait_for_selector("#view .empty")
    page.click("nav a[href='#/new-job']")
    rows = [{**r, "label": XSS if r["label"] == "neg" else r["label"]} for r in sentiment(160)]
    data = "\n".join(json.dumps(r) for r in rows).encode()
    page.set_input_files("#dataset-file", files=[{"name": FILE_NAME, "mimeType": "application/json", "buffer": data}])
    page.click("#upload")
    page.wait_for_selector("#uploaded-file")
    assert page.locator("#upload-progress").evaluate("p => p.value") == 1
    assert XSS in page.locator("#uploaded-file").inner_text()
    # a bad row is refused with the line named, next to the upload
    page.set_input_files("#dataset-file", files=[{"name": "bad.jsonl", "mimeType": "application/json",
                                                 "buffer": data + b'\n{"text": "", "label": "pos"}\n'}])
    page.click("#upload")
    page.wait_for_selector("#upload-error:not([hidden])")
    refusal = page.locator("#upload-error").inner_text()
    assert "line 161" in refusal and "'text' is empty" in refusal, refusal
    no_injected_markup(page)

    # -- starts a job (custom hyper-parameters, promote by hand) and watches it train --------------
    page.fill("#adapter-name", "sentiment")
    page.select_option("#training-file", index=1)
    page.select_option("#promote", "never")
    page.check("#hp-custom")
    fields = {"epochs", "learning_rate", "batch_size", "lora_r", "patience", "seed"}  # the form's own inputs
    for name, value in LIVE_HP.items():
        if name in fields:
            page.fill(f"#hp-{name}", str(value))
    page.fill("#hp-extra", json.dumps({k: v for k, v in LIVE_HP.items() if k not in fields}))
    page.click("#start-job")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]
    page.wait_for_selector("#loss-chart:not([data-points='0'])")  # (no wait_for_function: the CSP forbids eval)
    first = int(page.locator("#loss-chart").get_attribute("data-points"))
    page.wait_for_selector("h1[data-status=succeeded]", timeout=120_000)
    page.wait_for_selector("#val-chart:not([data-points='0'])")
    points = int(page.locator("#loss-chart").get_attribute("data-points"))
    epochs = int(page.locator("#val-chart").get_attribute("data-points"))
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as api:
        job = api.get(f"/v1/jobs/{job_id}").json()
        events = api.get(f"/v1/jobs/{job_id}/events").json()
    loss_steps = {e["data"]["step"] for e in events if e["type"] == "metrics" and "train_loss" in (e["data"] or {})}
    assert points == len(loss_steps) > first  # the curve grew while the job ran, to its last sample
    assert epochs == job["progress"]["epoch"] == LIVE_HP["epochs"]
    assert page.locator("#loss-chart canvas").count() == 1 and page.locator("#val-chart canvas").count() == 1
    assert "promote=never" in page.locator("#gate").inner_text()
    assert "learning_rate" in page.locator("#hyperparameters").inner_text()
    page.wait_for_selector("#job-progress[data-fraction='1']")
    page.screenshot(path=shots / "job.png", full_page=True)

    # -- promotes the candidate ----------------------------------------------------------------------
    page.locator("a[href='#/adapters/sentiment']").first.click()
    page.wait_for_selector("#versions-table tr[data-version='1'] .badge-candidate")
    page.click("#versions-table tr[data-version='1'] button.promote")
    page.wait_for_selector("#versions-table tr[data-version='1'] .badge-prod")
    assert XSS in page.locator("#versions-table").inner_text()
    no_injected_markup(page)
    page.screenshot(path=shots / "adapters.png", full_page=True)

    # -- predicts in the playground: every label's score as a bar -----------------------------------
    page.click("nav a[href='#/playground']")
    page.wait_for_selector("#playground-text")
    page.fill("#playground-text", f"great great the day one\nawful awful the day two\n{XSS}")
    page.click("#predict")
    page.wait_for_selector("#predictions li.prediction")
    assert page.locator("#predictions li.prediction").count() == 3
    assert page.locator("#predictions li.prediction").first.locator(".bar").count() == 2
    predicted = page.locator("#predictions .predicted").all_inner_texts()
    assert predicted[:2] == ["pos", XSS], predicted
    assert page.locator("#predictions .input-text").nth(2).inner_text() == XSS
    no_injected_markup(page)
    page.screenshot(path=shots / "playground.png", full_page=True)

    # -- an image adapter (imported through the API) takes images from the file picker -----------------
    labels = ["shoe", "boot", XSS]
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
        r = api.post("/v1/adapters/products/import", data={"labels": json.dumps(labels)},
                     files={"file": ("products.zip", image_adapter_zip())})
        assert r.status_code == 201, r.text
    page.goto("/ui/#/playground/products")
    page.wait_for_selector("#playground-images")
    page.set_input_files("#playground-images", files=[
        {"name": f"{XSS}.png", "mimeType": "image/png", "buffer": distinct(3, size=(24, 20))},
        {"name": "boot.jpg", "mimeType": "image/jpeg", "buffer": distinct(99, fmt="JPEG", size=(32, 32))}])
    page.wait_for_selector("#playground-panel img.thumb >> nth=1")
    page.click("#predict")
    page.wait_for_selector("#prediction-meta:has-text('products v1')")
    preds = page.locator("#predictions li.prediction")
    assert preds.count() == 2 and preds.first.locator(".bar").count() == 3
    assert set(page.locator("#predictions .score-label").all_inner_texts()) == set(labels)
    assert page.locator("#predictions .input-text").first.inner_text() == f"{XSS}.png"
    no_injected_markup(page)
    page.screenshot(path=shots / "playground-images.png", full_page=True)
    # the API's refusal shows on the page, which keeps working: prod had no earlier version
    page.goto("/ui/#/adapters/products")
    page.click("#rollback")
    page.wait_for_selector("#view .error:has-text('nothing to roll back to')")
    assert page.locator("#versions-table tr[data-version='1'] .badge-prod").count() == 1

    # -- exports the version as a peft zip ------------------------------------------------------------
    page.goto("/ui/#/adapters/sentiment")
    with page.expect_download() as download:
        page.click("#versions-table tr[data-version='1'] button.export")
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert saved.name == "sentiment-v1.zip" and saved.read_bytes()[:4] == b"PK\x03\x04"
    sign_out(page)

    # -- another tenant sees none of it --------------------------------------------------------------
    sign_in(page, other)
    page.wait_for_selector("#view .empty")
    assert "sentiment" not in page.locator("#view").inner_text()
    page.goto("/ui/#/jobs")
    page.wait_for_selector("#view .empty")
    page.goto(f"/ui/#/jobs/{job_id}")
    page.wait_for_selector("#view .error:not([hidden])")
    assert "not found" in page.locator("#view .error").inner_text()
    assert page.locator("#loss-chart").get_attribute("data-points") == "0"
    page.goto("/ui/#/adapters/sentiment")
    page.wait_for_selector("#view .error:not([hidden])")
    assert "not found" in page.locator("#view .error").inner_text()
    sign_out(page)

    # -- the operator's view counts what acme made ---------------------------------------------------
    sign_in(page, server.admin_key)
    row = page.locator("#tenants-table tr[data-tenant='acme']")
    row.locator("td.adapters:has-text('2')").wait_for()  # sentiment and products
    assert "succeeded 1" in row.locator("td.jobs").inner_text()
    page.wait_for_selector("#health-tasks th:has-text('text-classification')")
    row.locator("button.show-keys").click()
    panel = page.locator(".keys-panel[data-tenant='acme']")
    panel.locator("tr[data-key]").first.wait_for()
    page.screenshot(path=shots / "operator.png", full_page=True)
    # a second key, shown once, then revoked (after an in-page confirmation): refused at once
    panel.locator("button.create-key").click()
    extra = panel.locator("#new-key").input_value()
    panel.locator("tr[data-key]").nth(1).wait_for()
    assert httpx.get(f"{server.url}/v1/adapters", headers={"Authorization": f"Bearer {extra}"}).status_code == 200
    extra_id = httpx.get(f"{server.url}/v1/tenants/acme/keys",
                         headers={"Authorization": f"Bearer {server.admin_key}"}).json()[-1]["key_id"]
    panel.locator(f"tr[data-key='{extra_id}'] button.revoke").click()
    panel.locator(".confirm button.danger").click()
    panel.locator(f"tr[data-key='{extra_id}'] td:has-text('revoked')").wait_for()
    assert httpx.get(f"{server.url}/v1/adapters", headers={"Authorization": f"Bearer {extra}"}).status_code == 401
    sign_out(page)

    # -- the tenant cancels a second job, then deletes the adapter (after confirming) ----------------
    sign_in(page, key)
    page.click("nav a[href='#/new-job']")
    page.wait_for_selector("#training-file option:nth-child(2)", state="attached")
    page.fill("#adapter-name", "sentiment")
    page.select_option("#training-file", index=1)
    page.click("#start-job")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    page.click("#cancel-job")
    page.wait_for_selector("h1[data-status=cancelled]")
    page.goto("/ui/#/adapters/sentiment")
    page.click("#delete-adapter")
    page.click(".confirm button:has-text('Cancel')")
    assert page.locator(".confirm").count() == 0 and page.url.endswith("#/adapters/sentiment")
    assert page.locator("#versions-table tr[data-version='1']").count() == 1  # nothing deleted
    page.click("#delete-adapter")
    page.click(".confirm button.danger")
    page.wait_for_url(re.compile(r"#/adapters$"))
    page.wait_for_selector("#adapters-table tr[data-adapter='products']")
    assert page.locator("#adapters-table tr[data-adapter='sentiment']").count() == 0
    sign_out(page)

    # -- nothing ran, nothing leaked -------------------------------------------------------------------
    assert watch.dialogs == []
    assert not [e for e in watch.errors if "Failed to load resource" not in e], watch.errors
    for secret in (key, other, extra, server.admin_key):
        assert not any(secret in u for u in watch.urls)
        assert secret not in server.log_tail(100_000)
    assert context.cookies() == []
    context.close()
