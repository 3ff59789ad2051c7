"""Every error leaves the service as ``{"error": {"code", "message", "param", "type"}}``.

The same shape is OpenAI's (``message``, ``type``, ``param``, ``code``), so the OpenAI-compatible
routes and every other route share it: ``param`` is always present (null when no field is at
fault) and ``type`` is the error's class by status, as OpenAI names them (``ERROR_TYPES``:
``invalid_request_error``, ``authentication_error``, ``permission_error``, ``not_found_error``,
``rate_limit_error``, ``server_error``).

Library errors map by class (``adapters.errors`` codes stay the wire codes); FastAPI's
validation errors become 422 naming the field path (malformed JSON: 400); HTTP exceptions
keep their status; anything unexpected is a logged 500 ``internal_error``. A client mistake
never comes back as a 5xx.

An error body is always serialisable, whatever the client sent: text echoed from a request
(a message, a ``param`` naming a field the client made up) may hold lone UTF-16 surrogates,
which UTF-8 cannot encode; they are written as ``\\udXXX`` escapes, non-finite numbers as
text, and header values are made Latin-1 without line breaks.

A client that goes away before its request body has arrived (Starlette's ``ClientDisconnect``,
also when FastAPI's own body parsing met it) is nobody's error: it is answered 499 (the
status nginx gives a client that closed the request; nobody receives it, but the metrics
count it) with one DEBUG log line, never a 500 with a logged traceback.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adapters.errors import (
    AdmissionError, ArtifactError, CapacityError, ConflictError, DatasetError, InvalidNameError,
    NotFoundError, TailorError, UnavailableError,
)
from adapters.vision.images import ImageTooLargeError

log = logging.getLogger("tailor.service")
CLIENT_CLOSED = 499  # the client closed the connection before its request was read (nginx's status)


class ApiError(Exception):
    """An error the service raises itself, with its HTTP status."""

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = headers or {}
        self.extra = extra or {}


def printable(text: str) -> str:
    """``text`` unchanged if UTF-8 can encode it, else with each character it cannot (a lone
    surrogate such as ``"\\ud800"`` sent as a JSON escape) written as its ``\\udXXX`` escape."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON that always encodes: strings (and keys) through ``printable``,
    non-finite floats as text (JSON has no NaN), anything else unknown as its ``str``."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {printable(str(k)): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return printable(str(value))


def header_safe(value: str) -> str:
    """A header value that HTTP can carry: Latin-1 (others escaped), no control characters."""
    text = value.encode("latin-1", "backslashreplace").decode("latin-1")
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text)


ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}


def error_type(status: int) -> str:
    """The OpenAI-style ``type`` of an error of HTTP ``status``."""
    return ERROR_TYPES.get(status) or ("server_error" if status >= 500 else "invalid_request_error")


def body(code: str, message: str, param: str | None = None, **extra: Any) -> dict[str, Any]:
    """The error body ``{"error": {"code", "message", "param", **extra}}`` (``param`` null when
    None); always encodable (see ``json_safe``); ``extra`` entries that are None are left out."""
    err: dict[str, Any] = {"code": code, "message": message, "param": param}
    err.update({k: v for k, v in extra.items() if v is not None})
    return {"error": json_safe(err)}


def error_response(status: int, code: str, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """A JSON error response that renders whatever the texts in it hold (see ``body``)."""
    safe_headers = {header_safe(k): header_safe(v) for k, v in headers.items()} if headers else None
    return JSONResponse(body(code, message, param, type=error_type(status), **extra), status_code=status,
                        headers=safe_headers)


def status_of(e: TailorError) -> int:
    """The HTTP status of a library error (by class; the most specific class wins)."""
    if isinstance(e, NotFoundError):  # AdapterNotFoundError included
        return 404
    if isinstance(e, AdmissionError):  # no room in the KV cache in time (429), or the server is saturated (503)
        return 503 if e.reason == "queue_full" else 429
    if isinstance(e, ImageTooLargeError):  # over the byte or pixel limit of one image
        return 413
    if isinstance(e, ConflictError):
        return 409
    if isinstance(e, (CapacityError, UnavailableError)):
        return 503
    if isinstance(e, (InvalidNameError, ArtifactError, DatasetError)):
        return 422
    if e.code.endswith("quota_exceeded"):  # e.g. adapters.jobs' JobLimitError
        return 409  # the tenant's state forbids it until it changes; 429 is for the request rate
    return 422 if isinstance(e, ValueError) else 400


_REASONS = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 406: "not_acceptable", 413: "payload_too_large",
            415: "unsupported_media_type", 422: "invalid_request", 429: "rate_limited",
            503: "unavailable"}


def field_path(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "inputs", 3)`` -> ``"inputs[3]"``; ``("query", "version")`` -> ``"version"``."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "form", "cookie"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def unparsable_body(e: StarletteHTTPException) -> tuple[str, str] | None:
    """``(code, message)`` naming why FastAPI could not parse a body (its own 400 says only
    "There was an error parsing the body"), from the exception behind it; None for other errors."""
    cause = e.__cause__
    if e.status_code != 400 or cause is None:
        return None
    if isinstance(cause, RecursionError):
        return "invalid_json", "request body is not valid JSON: it is nested too deeply"
    if isinstance(cause, UnicodeDecodeError):
        return "invalid_json", f"request body is not valid UTF-8 (byte {cause.start}); send JSON as UTF-8"
    if isinstance(cause, ValueError) and "digits" in str(cause):  # int() refuses over 4300 digits
        return "invalid_json", "request body has a number with too many digits (at most 4300)"
    detail = printable(str(cause))[:200]
    return "bad_request", f"request body could not be parsed: {detail}" if detail else "request body could not be parsed"


def client_gone(request: Request) -> JSONResponse:
    """The answer to a request whose client left before its body arrived (nobody reads it)."""
    log.debug("client left before its request body arrived: %s %s", request.method, request.url.path)
    return error_response(CLIENT_CLOSED, "client_closed_request", "the client closed the connection before "
                                                                   "its request body arrived")


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.code, e.message, e.param, e.headers or None, **e.extra)

    @app.exception_handler(TailorError)
    async def _tailor(request: Request, e: TailorError) -> JSONResponse:
        status = status_of(e)
        headers = {"Retry-After": "1"} if status == 503 else None
        if isinstance(e, AdmissionError):  # a generation request found no room: when to try again
            headers = {"Retry-After": str(max(1, math.ceil(e.retry_after)))}
        return error_response(status, e.code, e.message, e.param, headers, line=getattr(e, "line", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx") or {}
            return error_response(400, "invalid_json",
                                  f"request body is not valid JSON: {ctx.get('error', 'parse error')}")
        param = field_path(first.get("loc", ()))
        kind = first.get("type", "")
        msg = first.get("msg", "invalid request")
        if kind == "extra_forbidden":
            msg = f"unknown field {param!r}"
        elif kind == "string_unicode":  # e.g. a lone surrogate: a value, or a key (loc is then the object)
            msg = (f"{param or 'a field name in the request body'}: text must be valid Unicode "
                   "(it holds an unpaired UTF-16 surrogate)")
        elif kind == "missing":
            msg = f"field {param!r} is required" if param else "a request body is required"
        elif param:
            msg = f"{param}: {msg}"
        details = [{"param": field_path(x.get("loc", ())), "message": x.get("msg")} for x in errors[1:10]]
        return error_response(422, "invalid_request", msg, param, details=details or None)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect) -> JSONResponse:
        return client_gone(request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        if isinstance(e.__cause__, ClientDisconnect):  # FastAPI's body parsing met it (its 400)
            return client_gone(request)
        if isinstance(e.__cause__, StarletteHTTPException):  # e.g. a body limit hit while parsing
            e = e.__cause__
        unparsable = unparsable_body(e)
        if unparsable is not None:
            return error_response(400, *unparsable)
        code = _REASONS.get(e.status_code, "http_error")
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        return error_response(e.status_code, code, message, None, dict(e.headers or {}) or None)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=e)
        return error_response(500, "internal_error", "internal server error; it was logged")
