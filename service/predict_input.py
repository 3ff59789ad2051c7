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
"""

from __future__ import annotations

import email.message
import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

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


async def read_predict(request: Request) -> PredictRows:
    content_type = request.headers.get("content-type")
    kind = _media_type(content_type)
    if kind == "multipart/form-data":
        return await _from_form(request)
    if content_type is None or kind == "application/json" or kind.endswith("+json"):
        return _from_json(await request.body())
    raise ApiError(415, "unsupported_media_type", f"POST /v1/predict takes application/json or multipart/form-data, "
                                                  f"not {kind or content_type!r}")


def _media_type(content_type: str | None) -> str:
    if not content_type:
        return ""
    message = email.message.Message()
    message["content-type"] = content_type
    return message.get_content_type()


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
    except HTTPException:
        raise  # over the body limit, or a malformed multipart body (starlette's 400 says why)
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
