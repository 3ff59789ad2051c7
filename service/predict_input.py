"""What a ``POST /v1/predict`` request asks for, read from JSON or from a multipart form.

Two encodings of one request (``service.schemas``):

* ``application/json`` (``PredictRequest``): ``{"adapter", "inputs": [texts]}`` for a text
  adapter, ``{"adapter", "images": [base64]}`` for an image adapter;
* ``multipart/form-data`` (``PredictForm``): an ``adapter`` field and one ``images`` file per
  image, in order (an ``images`` text field is taken as base64, ``inputs`` text fields as texts).

Exactly one of ``inputs`` and ``images`` is given; which one names the task the request is for
(each task kind's ``input_field``, ``adapters.tasks``). ``read_predict`` answers as FastAPI
would for a body it parses itself: malformed JSON is a 400 naming the problem, a field that
fails validation a 422 naming the field, an unknown field a 422, a body over the route's limit
a 413 (``service.app.BodyLimitMiddleware``), any other content type a 415.

Two byte limits: a predict body may be as large as ``max_predict_bytes`` only where images are
served (room for ``max_images`` base64 images); texts never need more than ``max_body_bytes``.
A JSON body is read as a stream with a running count: when it passes ``max_body_bytes`` and
its first field after ``adapter`` is not ``images`` (``first_field``, on what has arrived), it
is refused with a 413 naming that limit without being kept: the rest is read and dropped for at
most ``LINGER_S`` first (so closing the connection cannot reset it under a client still sending),
then the answer goes out and the connection is closed. A JSON body is never held beyond the limit that applies to it.
"""

from __future__ import annotations

import asyncio
import email.message
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from adapters.tasks import TASK_NAMES, get_task
from service.errors import ApiError
from service.schemas import ADAPTER_REF_MAX_CHARS, PredictForm, PredictRequest

# the request field each task's rows arrive in ("inputs": text, "images": image)
TASK_OF_FIELD: dict[str, str] = {get_task(task).input_field: task for task in TASK_NAMES}

# The request body as /openapi.json documents it (the route reads the body itself).
OPENAPI_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": PredictRequest.model_json_schema()},
    "multipart/form-data": {"schema": PredictForm.model_json_schema()},
}}}


@dataclass(frozen=True)
class PredictRows:
    adapter: str  # "name", "name@3" or "name@prod"
    field: str  # the request field the rows came in: "inputs" or "images"
    task: str  # the task that field is for
    raw: list[Any]  # texts; image bytes (files) or base64 strings


async def read_predict(request: Request, text_bytes: int, image_bytes: int) -> PredictRows:
    """The request's rows; ``text_bytes``: the body limit of a request that is not for images
    (``max_body_bytes``), ``image_bytes``: of one for images (``max_predict_bytes``, which
    ``service.app.BodyLimitMiddleware`` enforces for every predict body)."""
    content_type = request.headers.get("content-type")
    kind = _media_type(content_type)
    if kind == "multipart/form-data":
        return await _from_form(request)
    if content_type is None or kind == "application/json" or kind.endswith("+json"):
        return _from_json(await _json_body(request, text_bytes, image_bytes))
    raise ApiError(415, "unsupported_media_type", f"POST /v1/predict takes application/json or multipart/form-data, "
                                                  f"not {kind or content_type!r}")


def _media_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    message = email.message.Message()
    message["content-type"] = content_type
    return message.get_content_type()


async def _json_body(request: Request, text_bytes: int, image_bytes: int) -> bytes:
    """The body, read as a stream and refused (413) once past ``text_bytes`` unless it is for images."""
    if image_bytes <= text_bytes:
        return await request.body()  # one limit, enforced by the middleware
    body = bytearray()
    stream = request.stream()
    async for chunk in stream:
        body += chunk
        if len(body) > text_bytes and len(body) - len(chunk) <= text_bytes:  # just crossed: decided once
            field = first_field(bytes(body[:_PREFIX_BYTES]))
            if field != "images":
                await _linger(stream)
                raise ApiError(413, "payload_too_large",
                               f"request body is larger than the {text_bytes} byte limit of a predict request "
                               f"with {field or 'inputs'}; only one with images may have up to {image_bytes} bytes",
                               param=field, headers={"Connection": "close"})
    return bytes(body)


LINGER_S = 2.0  # how long a refused body's rest is read and dropped before the 413 goes out


async def _linger(stream: AsyncIterator[bytes]) -> None:
    """Read and drop what is left of a refused body, for at most ``LINGER_S`` (and never past the
    route's byte limit, which the body-limit middleware enforces), as nginx's lingering close does:
    a connection closed with the client's bytes still unread is reset by the kernel, and a client
    still sending its body then loses the 413 (the soak saw 16 of 1,688 such refusals end with no
    answer). A client that stops sending and waits gets the 413 after ``LINGER_S``."""
    try:
        async with asyncio.timeout(LINGER_S):
            async for _ in stream:
                pass
    except Exception:  # noqa: BLE001 - best effort: time up, the limit passed, the client gone
        pass


_PREFIX_BYTES = 64 * 1024  # holds '{"adapter": ..., "<next field>"' of any valid body, escapes and all
_DECODER = json.JSONDecoder()


def first_field(prefix: bytes) -> str | None:
    """The first top-level field of the JSON object ``prefix`` begins, ``adapter`` (and its
    value) skipped; None when ``prefix`` is not the start of such an object."""
    text = prefix.decode("utf-8", "replace")
    try:
        i = _skip_space(text, 0)
        if text[i] != "{":
            return None
        i += 1
        while True:
            i = _skip_space(text, i)
            if text[i] != '"':
                return None
            key, i = json.decoder.scanstring(text, i + 1)
            i = _skip_space(text, i)
            if text[i] != ":":
                return None
            if key != "adapter":
                return key
            _, i = _DECODER.raw_decode(text, _skip_space(text, i + 1))
            i = _skip_space(text, i)
            if text[i] != ",":
                return None
            i += 1
    except (ValueError, IndexError, RecursionError):  # cut short, not JSON, or nested too deeply
        return None


def _skip_space(text: str, i: int) -> int:
    while text[i] in " \t\r\n":
        i += 1
    return i


def _from_json(raw: bytes) -> PredictRows:
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:  # as FastAPI words it: a 400 naming the problem
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error",
                                       "ctx": {"error": e.msg}}]) from e
    except Exception as e:  # noqa: BLE001 - too deep, too many digits, not UTF-8: service.errors says which
        raise HTTPException(400, "There was an error parsing the body") from e
    try:
        body = PredictRequest.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err["loc"])} for err in e.errors()]) from None
    return _rows(body.adapter, {"inputs": body.inputs, "images": body.images})


async def _from_form(request: Request) -> PredictRows:
    try:
        form = await request.form()
    except (HTTPException, ClientDisconnect):
        raise  # over the body limit, a malformed multipart body (starlette's 400 says why), or the client left
    except Exception as e:  # noqa: BLE001 - e.g. a field that is not UTF-8: service.errors says which
        raise HTTPException(400, "There was an error parsing the body") from e
    try:
        adapter: str | None = None
        fields: dict[str, list[Any]] = {}
        for key, value in form.multi_items():
            if key == "adapter":
                if adapter is not None or not isinstance(value, str):
                    raise ApiError(422, "invalid_request", "adapter: give one adapter name as a form field",
                                   param="adapter")
                adapter = value
            elif key in TASK_OF_FIELD:
                fields.setdefault(key, []).append(await value.read() if isinstance(value, UploadFile) else value)
            else:
                raise ApiError(422, "invalid_request", f"unknown field {key!r}", param=key)
    finally:
        await form.close()
    if adapter is None:
        raise ApiError(422, "invalid_request", "field 'adapter' is required", param="adapter")
    if len(adapter) > ADAPTER_REF_MAX_CHARS:
        raise ApiError(422, "invalid_request", f"adapter: at most {ADAPTER_REF_MAX_CHARS} characters",
                       param="adapter")
    texts = fields.get("inputs")
    if texts is not None and not all(isinstance(t, str) for t in texts):
        raise ApiError(422, "invalid_request", "inputs: send texts as form fields, not files", param="inputs")
    return _rows(adapter, {"inputs": texts, "images": fields.get("images")})


def _rows(adapter: str, given: dict[str, list[Any] | None]) -> PredictRows:
    present = [name for name, rows in given.items() if rows is not None]
    if len(present) > 1:
        raise ApiError(422, "invalid_request", f"give {' or '.join(present)}, not both: a text adapter classifies "
                                               "inputs (texts), an image adapter images", param=present[-1])
    if not present:
        raise ApiError(422, "invalid_request", "give inputs (texts, for a text adapter) or images (for an image "
                                               "adapter)", param="inputs")
    field = present[0]
    return PredictRows(adapter=adapter, field=field, task=TASK_OF_FIELD[field], raw=list(given[field] or []))
