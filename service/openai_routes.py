"""The OpenAI-compatible routes: chat completions, completions and models, over the generation engine.

``POST /v1/chat/completions`` and ``POST /v1/completions`` generate with the caller's adapter
(``model``: ``name``, ``name@3``, ``name@prod``) or the base model (``model``: its public name,
listed by ``GET /v1/models``); ``stream: true`` answers server-sent events of OpenAI's chunks, a
last chunk with ``finish_reason``, then ``data: [DONE]``. Shapes: ``service.schemas`` (OpenAI's);
rules (sampling limits, the chat template, admission, what an adapter may be) are the library's
(``adapters.generation``), reached through ``service.generation`` for what needs the registry or
the store (which model a request names, which a tenant may list, its sampling).

Auth is that of every tenant route (``Authorization: Bearer <tenant key>``, what the ``openai``
client sends). Errors are the service's one shape, which is OpenAI's: an unknown ``model`` (or
another tenant's) is a 404 ``model_not_found``, an adapter of another task a 422 naming its
task, a request that finds no room in the KV cache in time a 429 with Retry-After.

The event loop never waits on the model: resolving and loading an adapter and templating run
in the threadpool, and tokens are awaited from the engine's stream (``async for``). A client
that disconnects (streaming or not) cancels its sequence; the engine frees it at its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from adapters.errors import TailorError
from adapters.generation.stream import GenerationStream, TokenDelta, Usage
from adapters.tasks import TEXT_GENERATION
from service.auth import get_state, require_tenant
from service.errors import ApiError, error_type, status_of
from service.errors import body as error_body
from service.generation import list_models, metered, pick_model, sampling
from service.schemas import ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest, Model, ModelList
from service.state import TailorState

State = Annotated[TailorState, Depends(get_state)]
Tenant = Annotated[str, Depends(require_tenant)]

router = APIRouter(tags=["openai"])
_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# what a request whose client left before its answer "answers" (nobody reads it; nginx's 499 in the metrics)
CLIENT_GONE = Response(status_code=499)
T = TypeVar("T")


@router.get("/v1/models", response_model=ModelList)
async def models(tenant: Tenant, state: State) -> dict[str, Any]:
    """The models this key may use: its generation adapters (by ref) and the base model."""
    engine = state.require_generator()
    return {"object": "list", "data": await run_in_threadpool(list_models, state, engine, tenant)}


@router.get("/v1/models/{model:path}", response_model=Model)
async def model(model: str, tenant: Tenant, state: State) -> dict[str, Any]:
    """One model of ``GET /v1/models`` (an adapter ref or the base's name); 404 for any other."""
    engine = state.require_generator()
    target = await pick_model(state, engine, tenant, model)
    return target.model_object()


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, request: Request, tenant: Tenant, state: State) -> Any:
    """Answer a conversation with the tenant's adapter (``model``), through the base's chat template.
    With ``stream: true``: ``text/event-stream`` of ``data: <ChatCompletionChunk>`` lines, then
    ``data: [DONE]``."""
    engine = state.require_generator()
    target = await pick_model(state, engine, tenant, body.model)
    prompt = await run_in_threadpool(engine.encode_chat, [{"role": m.role, "content": m.text()}
                                                          for m in body.messages])
    params = sampling(body, len(prompt), engine.base.max_context, max_tokens=body.max_completion_tokens)
    submitted = time.perf_counter()
    stream = await engine.submit_async(prompt, target.adapter, params)
    deltas = metered(state, tenant, stream, submitted)
    reply = Reply("chatcmpl", body.model, target.fingerprint)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _sse(request, state, stream, reply.chat_events(stream, deltas, usage))
    text = await _until_done(request, state, stream, _collect(deltas))
    return CLIENT_GONE if text is None else reply.chat(text, stream)


@router.post("/v1/completions", response_model=Completion)
async def completions(body: CompletionRequest, request: Request, tenant: Tenant, state: State) -> Any:
    """Continue ``prompt`` with the tenant's adapter (``model``); no chat template. With ``stream:
    true``: ``text/event-stream`` of ``data: <Completion>`` chunks, then ``data: [DONE]``."""
    engine = state.require_generator()
    target = await pick_model(state, engine, tenant, body.model)
    text_in = body.prompt
    if isinstance(text_in, list):
        if len(text_in) != 1:
            raise ApiError(400, "invalid_request", f"prompt: give one prompt (a list of {len(text_in)} was given; "
                           "send one request per prompt)", param="prompt")
        text_in = text_in[0]
    prompt = await run_in_threadpool(engine.encode_prompt, text_in)
    params = sampling(body, len(prompt), engine.base.max_context, default_max_tokens=16)
    submitted = time.perf_counter()
    stream = await engine.submit_async(prompt, target.adapter, params)
    deltas = metered(state, tenant, stream, submitted)
    reply = Reply("cmpl", body.model, target.fingerprint)
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return _sse(request, state, stream, reply.completion_events(stream, deltas, usage))
    text = await _until_done(request, state, stream, _collect(deltas))
    return CLIENT_GONE if text is None else reply.completion(text, stream)


# -- answers ----------------------------------------------------------------------------------------

class Reply:
    """One answer's identity (id, created, model, fingerprint) and its bodies and chunks."""

    def __init__(self, prefix: str, model: str, fingerprint: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model, self.fingerprint = model, fingerprint

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def chat(self, text: str, stream: GenerationStream) -> dict[str, Any]:
        return {**self._head("chat.completion"), "usage": _usage(stream.usage),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": stream.finish_reason, "logprobs": None}]}

    def completion(self, text: str, stream: GenerationStream) -> dict[str, Any]:
        return {**self._head("text_completion"), "usage": _usage(stream.usage),
                "choices": [{"index": 0, "text": text, "finish_reason": stream.finish_reason, "logprobs": None}]}

    def _chat_chunk(self, delta: dict[str, Any], finish: str | None, usage: bool) -> dict[str, Any]:
        chunk = {**self._head("chat.completion.chunk"),
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return {**chunk, "usage": None} if usage else chunk

    async def chat_events(self, stream: GenerationStream, deltas: AsyncIterable[TokenDelta],
                          usage: bool) -> AsyncIterator[dict[str, Any]]:
        yield self._chat_chunk({"role": "assistant", "content": ""}, None, usage)
        async for delta in deltas:
            if delta.text:
                yield self._chat_chunk({"content": delta.text}, None, usage)
            if delta.finish_reason is not None:
                yield self._chat_chunk({}, delta.finish_reason, usage)
        if usage and stream.usage is not None:
            yield {**self._head("chat.completion.chunk"), "choices": [], "usage": _usage(stream.usage)}

    async def completion_events(self, stream: GenerationStream, deltas: AsyncIterable[TokenDelta],
                                usage: bool) -> AsyncIterator[dict[str, Any]]:
        async for delta in deltas:
            if delta.text or delta.finish_reason is not None:
                chunk = {**self._head("text_completion"), "choices": [
                    {"index": 0, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": None}]}
                yield {**chunk, "usage": None} if usage else chunk
        if usage and stream.usage is not None:
            yield {**self._head("text_completion"), "choices": [], "usage": _usage(stream.usage)}


def _usage(u: Usage | None) -> dict[str, int] | None:
    if u is None:
        return None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


async def _collect(deltas: AsyncIterable[TokenDelta]) -> str:
    return "".join([delta.text async for delta in deltas])


# -- disconnects --------------------------------------------------------------------------------------

async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the request body was read already: only the disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _until_done(request: Request, state: TailorState, stream: GenerationStream,
                      work: Awaitable[T]) -> T | None:
    """``work`` (a coroutine reading ``stream``); None when the client left first: then the stream is
    cancelled (its sequence freed at the engine's next step), which ends ``work`` at once."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler itself was cancelled (the server is stopping)
        _cancel(state, stream)
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    _cancel(state, stream)
    await task  # ends at once: a cancelled stream has ended
    return None


def _cancel(state: TailorState, stream: GenerationStream) -> None:
    if not stream.done:
        stream.cancel()
        state.metrics.generation_ended(TEXT_GENERATION, "cancelled")


def _sse(request: Request, state: TailorState, stream: GenerationStream,
         chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """``chunks`` as server-sent events, then ``data: [DONE]``; an engine error mid-stream is one
    last ``data: {"error": ...}`` event (the status was sent already). The client leaving cancels
    the stream at once (a watcher), not only when the next write fails."""

    async def events() -> AsyncIterator[str]:
        watch = asyncio.ensure_future(_disconnected(request))
        watch.add_done_callback(lambda w: w.cancelled() or _cancel(state, stream))
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        except TailorError as e:
            status = status_of(e)
            err = error_body(e.code, e.message, e.param, type=error_type(status))
            yield f"data: {json.dumps(err, ensure_ascii=False)}\n\n"
        finally:
            watch.cancel()
            _cancel(state, stream)

    return StreamingResponse(events(), media_type="text/event-stream", headers=_STREAM_HEADERS)

