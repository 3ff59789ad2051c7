"""Uploading text-generation data over real HTTP (``served_generation``: a real ``bentoml serve``
with the tiny random Llama): every example's length after the base's chat template is checked
at upload with the served base's own tokenizer, so an over-long example is a 422 naming its
line, and nothing of the refused file is kept (no file record, no bytes in the store).
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.service_fixture import Served
from tests.test_service_http import assert_error

LIMIT = 2048  # the default max_example_tokens (the tiny base's context is 2,048 too)


def chats(n: int) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"Question number {i}?"},
                          {"role": "assistant", "content": f"Answer {i}."}]} for i in range(n)]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def upload(c: httpx.Client, data: bytes) -> httpx.Response:
    return c.post("/v1/files", files={"file": ("chats.jsonl", data, "application/jsonl")},
                  data={"task": "text-generation"})


def stored_files(served: Served, tenant: str) -> list[str]:
    return sorted(p.name for p in served.home.rglob(f"tenants/{tenant}/files/*"))


def test_an_example_too_long_after_the_chat_template_is_refused_at_upload_naming_its_line(
        served_generation: Served) -> None:
    served = served_generation
    with served.client(served.admin_key) as admin:
        r = admin.post("/v1/tenants", json={"name": "uploader"})
        assert r.status_code == 201, r.text
        key = r.json()["api_key"]
    # ~2,500 tokens in 12,500 characters: under the per-text character limit (20,000), over 2,048 tokens
    long = {"messages": [{"role": "user", "content": "word " * 2500}, {"role": "assistant", "content": "ok"}]}
    rows = chats(12)
    with served.client(key) as c:
        err = assert_error(upload(c, jsonl(rows[:2] + [long] + rows[2:])), 422, "invalid_dataset", "line 3")
        assert "tokens after the chat template; the limit is 2,048" in err["message"], err
        assert c.get("/v1/files").json() == [] and stored_files(served, "uploader") == []
        # a long example in the character limit but under the token limit goes in, as does the rest
        fits = {"messages": [{"role": "user", "content": "word " * 1000}, {"role": "assistant", "content": "ok"}]}
        r = upload(c, jsonl(rows + [fits]))
        assert r.status_code == 201, r.text
        assert (r.json()["task"], r.json()["rows"]) == ("text-generation", 13)
        assert [f["id"] for f in c.get("/v1/files").json()] == [r.json()["id"]]
        assert stored_files(served, "uploader") == [f"{r.json()['id']}.jsonl"]
