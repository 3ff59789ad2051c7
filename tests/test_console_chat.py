"""The console's text-generation side in a real browser (Debian's chromium driven by Playwright)
against a real ``bentoml serve`` with generation on the tiny random Llama (``served_generation``).

* The playground's chat panel: the API's refusal shows next to the form naming its field; a reply
  streams in piece by piece and joins to exactly the answer the API gives whole, with its finish
  reason and usage; a long reply shows while it streams, Stop aborts it and the service cancels
  the sequence (its metrics say so).
* The New job form uploads chats for text generation and starts a job; a real worker process (the
  served process trains nothing here) trains it on the service's database and store; the job page
  draws validation loss and perplexity per epoch; the trained adapter answers in markup, which the
  chat shows as text (no element is made from it, nor from a user's message holding markup).

About 20 s + 60 s on a loaded 2-core machine, plus the server start (shared with the generation
tests). Skips (saying why) without chromium or Playwright, like tests/test_console_browser.py. The
screenshot goes to a temporary folder, or to ``$TAILOR_CONSOLE_SCREENSHOTS`` when set
(``docs/console/chat.png`` is the README's copy).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.console_browser import TIMEOUT_MS, XSS, browser, shots, sign_in  # noqa: F401 (fixtures)
from tests.service_fixture import REPO, Served, generation_base
from tests.test_service_generation import _metric, _wait_for, gen_zip
from tests.test_service_http import import_zip

SYSTEM = "Be brief."
ASK = f"What does {XSS} do?"
ANSWER = "<b>Understood.</b>"  # what the console's job teaches an adapter to say: markup
FAST = {"epochs": 6, "learning_rate": 0.02, "batch_size": 4, "seed": 0}  # learns ANSWER (tests/test_generation_training.py)
LONG_TOKENS = 1800  # most of the fixture's 2,048-token KV cache: seconds of tokens unless stopped

@pytest.fixture(scope="module")
def chatter(served_generation: Served) -> str:  # noqa: F811
    """A tenant's key; the tenant has the generation adapter ``bot``."""
    with served_generation.client(served_generation.admin_key) as admin:
        r = admin.post("/v1/tenants", json={"name": "chatco"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    with served_generation.client(key) as c:
        r = import_zip(c, "bot", gen_zip(generation_base(), 1))
        assert r.status_code == 201 and r.json()["task"] == "text-generation", r.text
    return key


def chats() -> bytes:
    """16 chats whose every answer is ANSWER (markup): a trained adapter answers with it."""
    words = ["apple", "river", "cloud", "stone", "green", "tiger", "piano", "lemon", "candle", "rocket", "mirror",
             "forest", "shadow", "garden", "silver", "winter"]
    return b"".join(json.dumps({"messages": [{"role": "user", "content": f"Tell me about the {w}."},
                                             {"role": "assistant", "content": ANSWER}]}).encode() + b"\n"
                    for w in words)


def new_page(browser: Any, served: Served) -> tuple[Any, Any, list[str]]:
    """A signed-out page on ``served``, and the script errors and dialogs it will have had."""
    context = browser.new_context(base_url=served.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    bad: list[str] = []
    page.on("pageerror", lambda e: bad.append(str(e)))
    page.on("console", lambda m: bad.append(m.text) if m.type == "error" and "Failed to load resource" not in m.text
            else None)
    page.on("dialog", lambda d: (bad.append(f"dialog: {d.message}"), d.dismiss()))
    return context, page, bad


def no_markup(page: Any) -> None:
    """Every turn is text nodes only: nothing a tenant or a model wrote became an element."""
    assert page.locator("#chat-log .turn-text *").count() == 0
    assert page.locator("img[src='x']").count() == 0
    assert page.evaluate("document.querySelectorAll('[onerror]').length") == 0


def test_chat_streams_the_reply_stops_a_long_one_and_shows_refusals(
        served_generation: Served, chatter: str, browser: Any) -> None:  # noqa: F811
    served = served_generation
    request = {"model": "bot", "temperature": 0, "max_tokens": 6,
               "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": ASK}]}
    with served.client(chatter) as c:
        whole = c.post("/v1/chat/completions", json=request).json()  # what the streamed reply must join to
    context, page, bad = new_page(browser, served)
    sign_in(page, chatter)
    page.goto("/ui/#/playground/bot")
    page.wait_for_selector("#chat-message")
    assert page.locator("#predict").is_hidden()  # the chat panel has its own Send and results

    # -- the API's refusal shows next to the form, naming the field; the message is kept ------------
    page.fill("#chat-temperature", "5")
    page.fill("#chat-message", ASK)
    page.click("#chat-send")
    page.wait_for_selector("#chat-error:not([hidden])")
    assert "(temperature)" in page.locator("#chat-error").inner_text()
    assert page.locator("#chat-log li").count() == 0 and page.input_value("#chat-message") == ASK

    # -- a reply, streamed in pieces, joins to the whole answer; finish reason and usage shown ----------
    page.fill("#chat-system", SYSTEM)
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "6")
    page.click("#chat-send")
    reply = page.locator("#chat-log li.turn-assistant").first
    page.wait_for_selector("#chat-log li.turn-assistant[data-state=done]")
    assert page.locator("#chat-error").is_hidden()
    assert reply.locator(".turn-text").text_content() == whole["choices"][0]["message"]["content"]
    assert int(reply.get_attribute("data-chunks")) >= 2  # drawn piece by piece, as generated
    assert page.locator("#chat-log li.turn-user .turn-text").text_content() == ASK
    finish, u = whole["choices"][0]["finish_reason"], whole["usage"]
    assert reply.get_attribute("data-finish-reason") == finish
    assert page.locator("#chat-status strong").inner_text() == finish
    assert page.locator("#chat-usage").text_content() == (
        f" · {u['prompt_tokens']} prompt + {u['completion_tokens']} completion = {u['total_tokens']} tokens")
    no_markup(page)

    # -- a long reply shows while it streams; Stop aborts the fetch and the service cancels it ---------
    cancelled = _metric(served, "tailor_generation_requests_total", finish_reason="cancelled")
    tokens = _metric(served, "tailor_generation_tokens_total", task="text-generation")
    page.fill("#chat-max-tokens", str(LONG_TOKENS))
    page.fill("#chat-message", "Now tell me a long story.")
    page.click("#chat-send")
    long = page.locator("#chat-log li.turn-assistant").nth(1)
    page.wait_for_selector("#chat-log li.turn-assistant[data-state=streaming]:not([data-chunks='0'])")
    assert long.locator(".turn-text").text_content()  # shown before the reply has ended
    assert page.locator("#chat-send").is_disabled()
    page.click("#chat-stop")
    page.wait_for_selector("#chat-log li.turn-assistant[data-state=stopped]")
    assert page.locator("#chat-status strong").inner_text() == "stopped"
    assert page.locator("#chat-send").is_enabled() and page.locator("#chat-stop").is_disabled()
    _wait_for(served, "tailor_generation_active_sequences", 0)
    assert _metric(served, "tailor_generation_requests_total", finish_reason="cancelled") == cancelled + 1
    assert _metric(served, "tailor_generation_tokens_total", task="text-generation") - tokens < LONG_TOKENS
    # "New conversation" empties it
    page.click("#chat-clear")
    assert page.locator("#chat-log li").count() == 0
    assert bad == [], bad
    assert chatter not in served.log_tail(100_000)
    context.close()


def test_a_generation_job_from_the_console_trains_draws_perplexity_and_chats_in_markup(
        served_generation: Served, chatter: str, browser: Any, shots: Path, tmp_path: Path) -> None:  # noqa: F811
    served = served_generation
    context, page, bad = new_page(browser, served)
    sign_in(page, chatter)

    # -- New job: chats uploaded for text generation, a job started ------------------------------------
    page.goto("/ui/#/new-job")
    page.select_option("#task", "text-generation")
    page.set_input_files("#dataset-file", files=[{"name": "chats.jsonl", "mimeType": "application/json",
                                                 "buffer": chats()}])
    page.click("#upload")
    page.wait_for_selector("#uploaded-file")
    assert "16 examples" in page.locator("#uploaded-file").inner_text()
    page.wait_for_selector("#training-file option:nth-child(2)", state="attached")
    page.fill("#adapter-name", "assistant")
    page.select_option("#training-file", index=1)
    assert page.locator("#method option").all_text_contents() == ["lora"]  # no head: the API refuses it
    page.check("#hp-custom")
    for name, value in FAST.items():
        page.fill(f"#hp-{name}", str(value))
    page.click("#start-job")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    page.wait_for_selector("#view .job-status p:has-text('text-generation')")

    # -- a worker process (the service here trains nothing itself) trains it; the page draws its curves --
    done = subprocess.run(
        [sys.executable, "-m", "adapters.jobs.worker", "--database-url", f"sqlite:///{served.home / 'tailor.db'}",
         "--store-url", str(served.home / "store"), "--checkpoints", str(tmp_path / "ckpt"),
         "--tasks", "text-generation", "--generation-base-model", served.env["TAILOR_GENERATION_BASE_MODEL"],
         "--once", "--threads", "1", "--nice", "0"],
        cwd=REPO, env=served.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    page.wait_for_selector("h1[data-status=succeeded]")
    page.wait_for_selector(f"#val-chart[data-points='{FAST['epochs']}']")
    legend = page.locator("#val-chart").inner_text()
    assert "val loss" in legend and "val perplexity" in legend and "accuracy" not in legend
    assert int(page.locator("#loss-chart").get_attribute("data-points")) > FAST["epochs"]
    assert page.locator("#val-chart canvas").count() == 1

    # -- its reply is markup, shown as text ---------------------------------------------------------------
    page.goto("/ui/#/playground/assistant")
    page.wait_for_selector("#playground-version option[value='@1']", state="attached")
    page.select_option("#playground-version", "@1")
    page.fill("#chat-temperature", "0")
    page.fill("#chat-max-tokens", "12")
    page.fill("#chat-message", "Tell me about the lantern.")  # a question it never saw
    page.click("#chat-send")
    page.wait_for_selector("#chat-log li.turn-assistant[data-state=done]")
    text = page.locator("#chat-log li.turn-assistant .turn-text").text_content()
    assert text.startswith(ANSWER), text
    assert page.locator("#chat-log b").count() == 0
    no_markup(page)
    page.screenshot(path=shots / "chat.png", full_page=True)
    assert bad == [], bad
    context.close()
