"""Text generation over real HTTP, through the official ``openai`` client: one ``bentoml serve``
process (``served_generation``) serves a tiny text classifier base and the tiny random Llama;
tenants import generation adapters (peft exports of random LoRA) and call them by ``model``.

No mocks: real HTTP and server-sent events, real SQLite and store. Generated text means nothing
(random weights); what is checked is that it is the adapter's, deterministic, streamed exactly
as it is answered whole, isolated between tenants, and that every refusal names its cause.
"""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest

from adapters.peft_format import TAILOR_FILE, export_peft, zip_files
from adapters.generation.synthetic import random_generation_artifact
from tests.service_fixture import generation_base
from tests.test_service_http import adapter_zip, assert_error, import_zip

HELLO = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
KV_TOKENS = 2048  # the fixture's 1 MiB KV cache at 512 bytes a token
HOG_TOKENS = 2000  # a sequence that holds most of the KV cache for seconds (if it is not cancelled)
_seq = iter(range(10_000))


@pytest.fixture(scope="module")
def gbase():
    return generation_base()


@pytest.fixture(scope="module")
def admin(served_generation):  # noqa: F811
    with served_generation.client(served_generation.admin_key) as c:
        yield c


def tenant(admin, prefix: str) -> tuple[str, str]:
    name = f"{prefix}{next(_seq)}"
    r = admin.post("/v1/tenants", json={"name": name})
    assert r.status_code == 201, r.text
    return name, r.json()["api_key"]


def gen_zip(gbase, seed: int, **kw) -> bytes:
    art = random_generation_artifact(gbase.spec, r=4, seed=seed, std=kw.pop("std", 0.2), **kw)
    return zip_files(export_peft(art, gbase.spec))


@pytest.fixture(scope="module")
def tenants(served_generation, admin, gbase):  # noqa: F811
    """``a``: generation adapter ``bot`` (v1 prod, v2 at alias ``beta``) and text classifier ``clf``;
    ``b``: generation adapter ``other``. Returns {"a": (name, key), "b": (name, key)}."""
    from adapters.base import load_base

    made = {}
    a, key_a = tenant(admin, "gena")
    with served_generation.client(key_a) as c:
        for data in (gen_zip(gbase, 1), gen_zip(gbase, 2)):
            r = import_zip(c, "bot", data)
            assert r.status_code == 201 and r.json()["task"] == "text-generation", r.text
        assert c.post("/v1/adapters/bot/promote", json={"version": 2, "alias": "beta"}).status_code == 200
        spec = load_base(str(served_generation.model_dir)).spec
        r = import_zip(c, "clf", adapter_zip(spec, seed=3))
        assert r.status_code == 201 and r.json()["task"] == "text-classification", r.text
    made["a"] = (a, key_a)
    b, key_b = tenant(admin, "genb")
    with served_generation.client(key_b) as c:
        r = import_zip(c, "other", gen_zip(gbase, 4))
        assert r.status_code == 201, r.text
    made["b"] = (b, key_b)
    return made


def oai(served, key: str) -> openai.OpenAI:
    # no retries: a 429 must reach the test, not be waited out by the client
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0, timeout=120)


def chat(client: openai.OpenAI, model: str, **kw):
    return client.chat.completions.create(model=model, messages=HELLO, **{"max_tokens": 8, "temperature": 0, **kw})


# -- chat, completions, streaming ------------------------------------------------------------------

def test_chat_completions_through_the_openai_client(served_generation, tenants, gbase):  # noqa: F811
    c = oai(served_generation, tenants["a"][1])
    first = chat(c, "bot")
    assert first.object == "chat.completion" and first.id.startswith("chatcmpl-") and first.model == "bot"
    choice = first.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    u = first.usage
    assert u.completion_tokens >= 1 and u.prompt_tokens > 10 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert first.system_fingerprint == "bot@1"  # prod
    # deterministic, and each ref is its own adapter: prod, a pinned version, an alias, the base
    assert chat(c, "bot").choices[0].message.content == choice.message.content
    assert chat(c, "bot@1").choices[0].message.content == choice.message.content
    beta = chat(c, "bot@beta")
    assert beta.system_fingerprint == "bot@2" and beta.choices[0].message.content != choice.message.content
    base = chat(c, gbase.spec.name)
    assert base.system_fingerprint == gbase.spec.name and base.choices[0].message.content != choice.message.content
    # a fixed seed gives the same sampled text; max_completion_tokens wins over max_tokens
    one = chat(c, "bot", temperature=1.0, seed=11, max_tokens=3, max_completion_tokens=6)
    assert one.usage.completion_tokens <= 6
    assert chat(c, "bot", temperature=1.0, seed=11, max_completion_tokens=6).choices[0].message.content \
        == one.choices[0].message.content


def test_streamed_chunks_join_to_the_whole_answer(served_generation, tenants):  # noqa: F811
    c = oai(served_generation, tenants["a"][1])
    whole = chat(c, "bot", max_tokens=10)
    chunks = list(chat(c, "bot", max_tokens=10, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishing = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishing == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    # on the wire: data: lines, the last one [DONE]; no stream unless asked
    with httpx.Client(base_url=served_generation.url, timeout=120,
                      headers={"Authorization": f"Bearer {tenants['a'][1]}"}) as h:
        body = {"model": "bot", "messages": HELLO, "max_tokens": 4, "temperature": 0}
        with h.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line for line in r.iter_lines() if line]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        plain = h.post("/v1/chat/completions", json=body)
        assert plain.headers["content-type"].startswith("application/json") and plain.json()["usage"]


def test_completions_whole_and_streamed(served_generation, tenants):  # noqa: F811
    c = oai(served_generation, tenants["a"][1])
    whole = c.completions.create(model="bot", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens >= 1
    streamed = list(c.completions.create(model="bot", prompt="Once upon a time", max_tokens=8, temperature=0,
                                         stream=True))
    assert "".join(ch.choices[0].text for ch in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    listed = c.completions.create(model="bot", prompt=["Once upon a time"], max_tokens=8, temperature=0)
    assert listed.choices[0].text == whole.choices[0].text
    # stop strings end the text before them (taken from the answer itself)
    text = whole.choices[0].text
    cut = next((i for i in range(1, len(text)) if text[i].strip() and text[:i].strip()), None)
    if cut is not None:
        stopped = c.completions.create(model="bot", prompt="Once upon a time", max_tokens=8, temperature=0,
                                       stop=[text[cut:cut + 3]])
        assert stopped.choices[0].finish_reason == "stop" and text.startswith(stopped.choices[0].text)
        assert len(stopped.choices[0].text) <= cut


# -- models and isolation ----------------------------------------------------------------------------

def test_models_lists_only_the_callers_generation_adapters_and_the_base(served_generation, tenants, gbase):  # noqa: F811
    a = oai(served_generation, tenants["a"][1])
    b = oai(served_generation, tenants["b"][1])
    ids_a = [m.id for m in a.models.list()]
    assert ids_a == ["bot", "bot@beta", gbase.spec.name]  # clf is a classifier: not listed
    assert [m.id for m in b.models.list()] == ["other", gbase.spec.name]
    owned = {m.id: m.owned_by for m in a.models.list()}
    assert owned == {"bot": tenants["a"][0], "bot@beta": tenants["a"][0], gbase.spec.name: "tailor"}
    assert a.models.retrieve("bot@beta").id == "bot@beta"
    with pytest.raises(openai.NotFoundError):
        b.models.retrieve("bot")
    # tenant b can neither use nor see tenant a's adapter: the same 404 as a name nobody has
    for client, model in ((b, "bot"), (b, "bot@beta"), (a, "other"), (a, "nobody"), (a, "Not A Name!")):
        with pytest.raises(openai.NotFoundError) as e:
            chat(client, model)
        err = e.value.body
        assert e.value.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model", err
        assert err["type"] == "not_found_error" and model in err["message"]
    assert chat(b, "other").choices[0].message.content


# -- refusals --------------------------------------------------------------------------------------

def test_errors_come_in_openais_shape_naming_the_field(served_generation, tenants):  # noqa: F811
    a = oai(served_generation, tenants["a"][1])
    with pytest.raises(openai.UnprocessableEntityError) as e:
        chat(a, "clf")
    assert e.value.body["code"] == "task_mismatch" and e.value.body["param"] == "model"
    assert "text-classification" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        chat(a, "bot", n=2)
    assert e.value.body["param"] == "n" and e.value.body["type"] == "invalid_request_error"
    cases = [({"temperature": 5}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
             ({"max_completion_tokens": 0}, "max_completion_tokens"), ({"seed": -1}, "seed"),
             ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"max_tokens": KV_TOKENS}, "max_tokens"),
             ({"temperature": "hot"}, "temperature"), ({"logit_bias": {"1": 2}}, "logit_bias")]
    for extra, param in cases:
        with pytest.raises(openai.UnprocessableEntityError) as e:
            chat(a, "bot", **extra)
        assert e.value.body["param"] == param, (extra, e.value.body)
        assert set(e.value.body) >= {"message", "type", "param", "code"}
    for messages, param in (([{"role": "robot", "content": "hi"}], "messages[0].role"),
                            ([{"role": "user", "content": "  "}], "messages[0].content"),
                            ([], "messages")):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            a.chat.completions.create(model="bot", messages=messages, max_tokens=4)
        assert e.value.body["param"] == param, e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        a.completions.create(model="bot", prompt=["one", "two"], max_tokens=4)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.AuthenticationError) as e:
        chat(oai(served_generation, "tk-not-a-key"), "bot")
    assert e.value.body["type"] == "authentication_error"
    with pytest.raises(openai.PermissionDeniedError):
        chat(oai(served_generation, served_generation.admin_key), "bot")


def test_a_generation_adapter_is_refused_by_predict_and_a_broken_one_by_import(served_generation, tenants,
                                                                                 gbase):  # noqa: F811
    with served_generation.client(tenants["a"][1]) as c:
        err = assert_error(c.post("/v1/predict", json={"adapter": "bot", "inputs": ["hi"]}), 422, "task_mismatch",
                           "adapter")
        assert "text-generation" in err["message"] and "/v1/chat/completions" in err["message"]
        # an adapter whose scale overflows the forward pass fails the import's probe, and is not stored
        err = assert_error(import_zip(c, "broken", gen_zip(gbase, 5, std=1.0, alpha=1e38)), 422, param="file")
        assert "non-finite" in err["message"]
        assert_error(c.get("/v1/adapters/broken"), 404)
        # an exported generation adapter round-trips
        assert c.get("/v1/adapters/bot/export").status_code == 200


def test_a_plain_peft_causal_lm_adapter_imports_as_text_generation(served_generation, admin, gbase):  # noqa: F811
    files = export_peft(random_generation_artifact(gbase.spec, r=2, seed=9, std=0.2), gbase.spec)
    del files[TAILOR_FILE]  # as peft's save_pretrained writes it: task_type CAUSAL_LM, no Tailor manifest
    _, key = tenant(admin, "plain")
    with served_generation.client(key) as c:
        r = import_zip(c, "plain", zip_files(files))
        assert r.status_code == 201 and r.json()["task"] == "text-generation", r.text
    assert chat(oai(served_generation, key), "plain", max_tokens=2).usage.completion_tokens >= 1


# -- admission and disconnects ------------------------------------------------------------------------

def _metric(served, name: str, **labels: str) -> float:
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _wait_for(served, name: str, want: float, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while (got := _metric(served, name, task="text-generation")) != want:
        assert time.monotonic() < deadline, f"{name} stayed {got}, not {want}"
        time.sleep(0.2)
    return got


def test_admission_refusal_then_a_disconnect_frees_the_sequence(served_generation, tenants):  # noqa: F811
    key = tenants["a"][1]
    long = {"model": "bot", "messages": HELLO, "max_tokens": HOG_TOKENS, "temperature": 0, "stream": True}
    cancelled = _metric(served_generation, "tailor_generation_requests_total", finish_reason="cancelled")
    before = _metric(served_generation, "tailor_generation_tokens_total", task="text-generation")
    with httpx.Client(base_url=served_generation.url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as h:
        with h.stream("POST", "/v1/chat/completions", json=long) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while '"content": ""' in (first := next(line for line in lines if line)):
                pass  # the role chunk: the sequence is admitted; now one token came too
            assert first.startswith("data: ") and "finish_reason\": null" in first
            # it holds most of the 2,048 KV tokens: a second request waits 1 s, then is refused
            refused = oai(served_generation, key)
            with pytest.raises(openai.RateLimitError) as e:
                chat(refused, "bot", max_tokens=4)
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["code"] == "admission_refused" and e.value.body["type"] == "rate_limit_error"
            _wait_for(served_generation, "tailor_generation_active_sequences", 1)
        # the client left mid-stream: the engine frees the sequence at its next step, long before its end
    _wait_for(served_generation, "tailor_generation_active_sequences", 0)
    assert _metric(served_generation, "tailor_generation_requests_total", finish_reason="cancelled") == cancelled + 1
    assert _metric(served_generation, "tailor_generation_tokens_total", task="text-generation") - before < HOG_TOKENS
    assert chat(oai(served_generation, key), "bot", max_tokens=2).choices  # room again


def test_a_client_that_leaves_a_whole_answer_cancels_it_too(served_generation, tenants):  # noqa: F811
    key = tenants["a"][1]
    cancelled = _metric(served_generation, "tailor_generation_requests_total", finish_reason="cancelled")
    before = _metric(served_generation, "tailor_generation_tokens_total", task="text-generation")
    long = {"model": "bot", "messages": HELLO, "max_tokens": HOG_TOKENS, "temperature": 0}
    with httpx.Client(base_url=served_generation.url, timeout=1.0,
                      headers={"Authorization": f"Bearer {key}"}) as h:
        with pytest.raises(httpx.ReadTimeout):  # gives up waiting: closes the connection
            h.post("/v1/chat/completions", json=long)
    _wait_for(served_generation, "tailor_generation_active_sequences", 0)
    assert _metric(served_generation, "tailor_generation_requests_total", finish_reason="cancelled") == cancelled + 1
    assert _metric(served_generation, "tailor_generation_tokens_total", task="text-generation") - before < HOG_TOKENS


def test_generation_metrics(served_generation, tenants):  # noqa: F811
    chat(oai(served_generation, tenants["b"][1]), "other", max_tokens=3)
    task = {"task": "text-generation"}
    assert _metric(served_generation, "tailor_generation_time_to_first_token_seconds_count", **task) >= 1
    assert _metric(served_generation, "tailor_generation_inter_token_seconds_count", **task) >= 1
    assert _metric(served_generation, "tailor_generation_tokens_total", **task) >= 3
    assert _metric(served_generation, "tailor_generation_kv_cache_budget_bytes", **task) == 1 << 20
    assert _metric(served_generation, "tailor_generation_waiting_requests", **task) == 0
    text = httpx.get(f"{served_generation.url}/metrics", timeout=30).text
    assert "tailor_generation_kv_cache_bytes{" in text
