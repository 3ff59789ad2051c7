"""The request timeout BentoML wraps every request in keeps nothing of a finished request
(``service.request_timeout``): BentoML's own kept each one for the whole timeout, the soak's
serving-worker leak. It still answers 504 when no response has started in time, and never cuts
a response that has started."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import importlib.util
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from starlette.types import Message

from service.request_timeout import ResponseStartTimeout, install

SCOPE: dict[str, Any] = {"type": "http", "method": "POST", "path": "/v1/predict", "headers": []}
# What BentoML's outer middlewares leave in a request's context (its Request, uvicorn's receive
# with the body bytes the app did not read), by the time the timeout middleware runs.
REQUEST: contextvars.ContextVar[object] = contextvars.ContextVar("request")
App = Callable[[Any, Any, Any], Awaitable[None]]


class UnreadBody:
    """Stands for a request's body: only weakly referenced by the test."""


def bentoml_own_timeout() -> type:
    """BentoML's ``TimeoutMiddleware`` as shipped (a fresh copy of its module: ``install`` may
    have replaced the name in the imported one)."""
    from bentoml._internal.server.http import traffic

    spec = importlib.util.spec_from_file_location("bentoml_traffic_as_shipped", traffic.__file__)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TimeoutMiddleware


async def answer_ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 429, "headers": []})
    await send({"type": "http.response.body", "body": b"refused before reading the body"})


async def no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def call(middleware: Any) -> list[Message]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await middleware(SCOPE, no_body, send)
    return sent


def requests_kept(middleware_class: type, n: int = 25, timeout: float = 300.0) -> int:
    """How many of ``n`` finished requests the middleware still holds, while the loop runs on."""

    async def one() -> weakref.ref[UnreadBody]:
        body = UnreadBody()
        REQUEST.set(body)
        sent = await call(middleware_class(answer_ok, timeout=timeout))
        assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        return weakref.ref(body)

    async def main() -> int:
        refs = [await asyncio.create_task(one()) for _ in range(n)]  # each request in its own task
        await asyncio.create_task(asyncio.sleep(0))  # the loop holds the last task's context until another runs
        gc.collect()
        return sum(ref() is not None for ref in refs)

    return asyncio.run(main())


def test_a_finished_request_is_not_kept_until_its_timeout() -> None:
    assert requests_kept(ResponseStartTimeout) == 0


def test_bentomls_own_timeout_keeps_every_request_for_its_timeout() -> None:
    # Why service.request_timeout exists; when this fails, BentoML fixed it and install() can go.
    assert requests_kept(bentoml_own_timeout()) == 25


def test_install_puts_it_in_bentomls_middleware_stack() -> None:
    from bentoml._internal.server.base_app import BaseAppFactory

    class Factory(BaseAppFactory):
        @property
        def name(self) -> str:
            return "probe"

    install()
    classes = [m.cls for m in Factory(timeout=300).middlewares]
    assert ResponseStartTimeout in classes
    assert bentoml_own_timeout().__name__ not in {c.__name__ for c in classes}


def test_the_service_module_installs_it() -> None:
    from bentoml._internal.server.http import traffic

    importlib.import_module("service.service")  # importing it installs the timeout

    assert traffic.TimeoutMiddleware is ResponseStartTimeout


def test_no_response_in_time_is_cancelled_and_answered_504() -> None:
    cancelled = []

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        try:
            await asyncio.Event().wait()  # never set: only the timeout ends it
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    sent = asyncio.run(call(ResponseStartTimeout(stuck, timeout=0.05)))
    assert cancelled == [True]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 504
    assert b"Not able to process the request in 0.05 seconds" in sent[1]["body"]


def test_a_started_response_runs_past_the_timeout() -> None:
    async def slow_stream(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.sleep(0.2)  # the scenario: a stream that lasts longer than the timeout
        await send({"type": "http.response.body", "body": b"tail", "more_body": False})

    sent = asyncio.run(call(ResponseStartTimeout(slow_stream, timeout=0.05)))
    assert [m.get("status") for m in sent] == [200, None]
    assert sent[1]["body"] == b"tail"


def test_a_cancellation_not_its_own_goes_through() -> None:
    async def main() -> None:
        inside = asyncio.Event()

        async def waits(scope: Any, receive: Any, send: Any) -> None:
            inside.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(call(ResponseStartTimeout(waits, timeout=300)))
        await inside.wait()
        task.cancel()  # e.g. the server stopping
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
