"""A small typed Python client for Tailor's HTTP API (what the ``tailor`` CLI uses).

    from service.client import TailorClient
    admin = TailorClient("http://127.0.0.1:3000", admin_key)
    key = admin.create_tenant("acme")["api_key"]
    acme = TailorClient("http://127.0.0.1:3000", key)
    acme.import_adapter("sentiment", "adapter.zip")          # or a peft save_pretrained folder
    acme.predict("sentiment", ["great service"])["predictions"][0]["label"]
    acme.predict("products", images=["shoe.jpg", png_bytes])   # an image adapter: paths or bytes
    for text in acme.chat_stream("support-bot", "Where is my order?"):   # a generation adapter
        print(text, end="", flush=True)

Every non-2xx answer raises ``TailorAPIError(status, code, message, param)``. Only httpx is
needed (tqdm for progress bars, optional). What a method returns is the JSON answer, typed by
``service.api_types`` (generated from the service's own response models, ``service.schemas``);
chat, completions and models are OpenAI's shapes (the official ``openai`` client works against
the same routes).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from adapters.jobs.model import FINISHED
from service.api_types import (
    AdapterDetail, AdapterSummary, AliasChange, ChatCompletion, Completion, FileOut, ImportedVersion, JobEventOut,
    JobMethod, JobOut, JobStatus, KeyCreated, KeyOut, Model, ModelList, PredictionOut, PredictResponse, PromoteMode,
    Task, TenantCreated, TenantOut, TenantUsage, VersionOut,
)

DEFAULT_URL = "http://127.0.0.1:3000"
_PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors", "tailor_manifest.json")


class TailorAPIError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None,
                 body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (param: {param})" if param else ""))
        self.status, self.code, self.message, self.param = status, code, message, param
        self.body = body or {}


# The names this client has always used for the answers' shapes (service/api_types.py holds
# them all, generated from service/schemas.py).
Tenant, ApiKey, AdapterVersion, FileInfo = TenantOut, KeyOut, VersionOut, FileOut
Job, Prediction, PredictResult = JobOut, PredictionOut, PredictResponse


class _Progress(io.RawIOBase):
    """A read-only file object over bytes that advances a tqdm bar as httpx reads it."""

    def __init__(self, data: bytes, bar: Any) -> None:
        self._buf, self._bar = io.BytesIO(data), bar

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._buf.seek(offset, whence)

    def tell(self) -> int:
        return self._buf.tell()

    def read(self, n: int = -1) -> bytes:
        chunk = self._buf.read(n)
        if self._bar is not None:
            self._bar.update(len(chunk))
        return chunk


def _bar(total: int | None, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def zip_adapter_dir(path: Path) -> bytes:
    """Zip a peft ``save_pretrained`` folder (its adapter files only) for import."""
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        found = False
        for name in _PEFT_FILES:
            if (path / name).is_file():
                z.write(path / name, name)
                found = True
        if not found:
            raise FileNotFoundError(f"{path} holds no adapter_config.json / adapter_model.safetensors")
    return buf.getvalue()


class TailorClient:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = (base_url or os.environ.get("TAILOR_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("TAILOR_API_KEY")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TailorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self._http.request(method, path, **kw)
        if r.status_code >= 400:
            raise _error(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self._request(method, path, **kw).json()

    # -- health -----------------------------------------------------------------------------------

    def ready(self) -> bool:
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 120.0, interval: float = 0.5) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} not ready after {timeout:.0f}s")
            time.sleep(interval)

    # -- admin ------------------------------------------------------------------------------------

    def create_tenant(self, name: str, quotas: dict[str, Any] | None = None) -> TenantCreated:
        body: dict[str, Any] = {"name": name}
        if quotas:
            body["quotas"] = quotas
        return self._json("POST", "/v1/tenants", json=body)

    def list_tenants(self) -> list[TenantOut]:
        return self._json("GET", "/v1/tenants")

    def get_tenant(self, name: str) -> TenantOut:
        return self._json("GET", f"/v1/tenants/{name}")

    def delete_tenant(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/tenants/{name}")

    def create_key(self, tenant: str) -> KeyCreated:
        return self._json("POST", f"/v1/tenants/{tenant}/keys")

    def list_keys(self, tenant: str) -> list[KeyOut]:
        return self._json("GET", f"/v1/tenants/{tenant}/keys")

    def revoke_key(self, tenant: str, key_id: str) -> KeyOut:
        return self._json("DELETE", f"/v1/tenants/{tenant}/keys/{key_id}")

    def tenant_usage(self) -> list[TenantUsage]:
        """Every tenant's adapters, versions, files, active keys and jobs by status (admin)."""
        return self._json("GET", "/v1/usage")

    # -- adapters ---------------------------------------------------------------------------------

    def list_adapters(self) -> list[AdapterSummary]:
        return self._json("GET", "/v1/adapters")

    def get_adapter(self, name: str) -> AdapterDetail:
        return self._json("GET", f"/v1/adapters/{name}")

    def promote(self, name: str, version: int, alias: str = "prod") -> AliasChange:
        return self._json("POST", f"/v1/adapters/{name}/promote", json={"version": version, "alias": alias})

    def rollback(self, name: str, alias: str = "prod") -> AliasChange:
        return self._json("POST", f"/v1/adapters/{name}/rollback", params={"alias": alias})

    def delete_adapter(self, name: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/adapters/{name}")

    def import_adapter(self, name: str, source: str | os.PathLike[str] | bytes, *, labels: list[str] | None = None,
                       promote: bool | None = None, task: Task | None = None,
                       progress: bool = False) -> ImportedVersion:
        """Import a zip (path or bytes) or a peft ``save_pretrained`` folder as a new version.
        ``task``: the adapter's task, when neither its Tailor manifest nor its adapter says it."""
        if isinstance(source, bytes):
            data, filename = source, "adapter.zip"
        else:
            path = Path(source)
            data = zip_adapter_dir(path) if path.is_dir() else path.read_bytes()
            filename = path.name if path.is_file() else f"{path.name}.zip"
        form: dict[str, str] = {}
        if labels is not None:
            form["labels"] = json.dumps(labels)
        if promote is not None:
            form["promote"] = "true" if promote else "false"
        if task is not None:
            form["task"] = task
        bar = _bar(len(data), f"upload {name}", progress)
        try:
            body: IO[bytes] = _Progress(data, bar)  # type: ignore[assignment]
            return self._json("POST", f"/v1/adapters/{name}/import",
                              files={"file": (filename, body, "application/zip")}, data=form)
        finally:
            if bar is not None:
                bar.close()

    def export_adapter(self, name: str, version: int | str | None = None, dest: str | os.PathLike[str] | None = None,
                       *, progress: bool = False) -> bytes:
        """The version (default prod) as a zip of peft files; also written to ``dest`` if given."""
        params = {"version": str(version)} if version is not None else {}
        with self._http.stream("GET", f"/v1/adapters/{name}/export", params=params) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r)
            total = int(r.headers.get("content-length") or 0) or None
            bar = _bar(total, f"download {name}", progress)
            chunks = []
            for chunk in r.iter_bytes():
                chunks.append(chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()
        data = b"".join(chunks)
        if dest is not None:
            Path(dest).write_bytes(data)
        return data

    # -- predict ----------------------------------------------------------------------------------

    def predict(self, adapter: str, inputs: list[str] | str | None = None, *,
                images: Sequence[str | os.PathLike[str] | bytes] | None = None) -> PredictResponse:
        """Classify ``inputs`` (texts: a text adapter) or ``images`` (files' paths or their bytes: an
        image adapter) with ``adapter`` ("name", "name@3" or "name@prod"). Images are sent as a
        multipart form, as they are (the server decodes them)."""
        if (inputs is None) == (images is None):
            raise ValueError("give inputs (texts) or images, not both or neither")
        if images is not None:
            files = [("images", _image_file(image, i)) for i, image in enumerate(images)]
            return self._json("POST", "/v1/predict", data={"adapter": adapter}, files=files)
        if isinstance(inputs, str):
            inputs = [inputs]
        return self._json("POST", "/v1/predict", json={"adapter": adapter, "inputs": list(inputs or [])})

    # -- text generation (OpenAI's routes) ---------------------------------------------------------

    def list_models(self) -> ModelList:
        """The generation adapters (as refs) and the base model this key may use (``["data"]``)."""
        return self._json("GET", "/v1/models")

    def get_model(self, model: str) -> Model:
        return self._json("GET", f"/v1/models/{model}")

    def chat(self, model: str, messages: str | list[dict[str, Any]], *, max_tokens: int | None = None,
             max_completion_tokens: int | None = None, temperature: float | None = None,
             top_p: float | None = None, stop: str | list[str] | None = None, seed: int | None = None,
             n: int | None = None, stream: bool = False, stream_options: dict[str, Any] | None = None,
             user: str | None = None) -> ChatCompletion:
        """A chat completion from ``model`` (an adapter ref or the base's name). ``messages``: a list
        of ``{"role", "content"}``, or one user message's text. With ``stream`` the answer arrives as
        server-sent events and is returned whole (``chat_stream`` yields it as it comes)."""
        body = _generation_body(model, max_tokens=max_tokens, max_completion_tokens=max_completion_tokens,
                                temperature=temperature, top_p=top_p, stop=stop, seed=seed, n=n, user=user,
                                stream_options=stream_options)
        body["messages"] = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        if not stream:
            return self._json("POST", "/v1/chat/completions", json=body)
        chunks = list(self._events("/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}))
        text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
        finish = next(c["choices"][0]["finish_reason"] for c in reversed(chunks) if c["choices"])
        head = {k: chunks[0][k] for k in ("id", "created", "model", "system_fingerprint")}
        return {**head, "object": "chat.completion", "usage": chunks[-1]["usage"],  # type: ignore[typeddict-item]
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": None}]}

    def chat_stream(self, model: str, messages: str | list[dict[str, Any]], **sampling: Any) -> Iterator[str]:
        """The reply's text as it is generated (``chat``'s sampling arguments), piece by piece."""
        body = _generation_body(model, **sampling)
        body["messages"] = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        for chunk in self._events("/v1/chat/completions", body):
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text

    def complete(self, model: str, prompt: str | list[str], *, max_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, stop: str | list[str] | None = None,
                 seed: int | None = None, n: int | None = None, stream: bool = False,
                 stream_options: dict[str, Any] | None = None, user: str | None = None) -> Completion:
        """A text completion of ``prompt`` (no chat template) from ``model``; ``stream`` as in ``chat``."""
        body = _generation_body(model, max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop,
                                seed=seed, n=n, user=user, stream_options=stream_options)
        body["prompt"] = prompt
        if not stream:
            return self._json("POST", "/v1/completions", json=body)
        chunks = list(self._events("/v1/completions", {**body, "stream_options": {"include_usage": True}}))
        pieces = [c for c in chunks if c["choices"]]
        head = {k: chunks[0][k] for k in ("id", "object", "created", "model", "system_fingerprint")}
        return {**head, "usage": chunks[-1]["usage"],  # type: ignore[typeddict-item]
                "choices": [{"index": 0, "text": "".join(c["choices"][0]["text"] for c in pieces),
                             "finish_reason": pieces[-1]["choices"][0]["finish_reason"], "logprobs": None}]}

    def _events(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The chunks of a streamed answer (``stream: true``), parsed as they arrive."""
        with self._http.stream("POST", path, json={**body, "stream": True}) as r:
            if r.status_code >= 400:
                r.read()
                raise _error(r)
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return
                chunk = json.loads(line[6:])
                if "error" in chunk:  # the engine failed mid-stream (the status was sent already)
                    err = chunk["error"]
                    raise TailorAPIError(r.status_code, str(err.get("code")), str(err.get("message")),
                                         err.get("param"), chunk)
                yield chunk

    # -- files and jobs ---------------------------------------------------------------------------

    def upload_file(self, path: str | os.PathLike[str], *, format: str | None = None, task: Task | None = None,
                    progress: bool = False) -> FileOut:
        """Upload a dataset file. ``task``: what it trains (the server's default: text-classification;
        an image dataset, a zip of label/<image> folders or JSONL of images, says image-classification)."""
        p = Path(path)
        data = p.read_bytes()
        form = {k: v for k, v in (("format", format), ("task", task)) if v}
        bar = _bar(len(data), f"upload {p.name}", progress)
        try:
            body: IO[bytes] = _Progress(data, bar)  # type: ignore[assignment]
            return self._json("POST", "/v1/files", files={"file": (p.name, body)}, data=form)
        finally:
            if bar is not None:
                bar.close()

    def list_files(self) -> list[FileOut]:
        return self._json("GET", "/v1/files")

    def get_file(self, file_id: str) -> FileOut:
        return self._json("GET", f"/v1/files/{file_id}")

    def delete_file(self, file_id: str) -> dict[str, Any]:
        return self._json("DELETE", f"/v1/files/{file_id}")

    def create_job(self, adapter: str, *, training_file: str | None = None, validation_file: str | None = None,
                   training_data: list[dict[str, Any]] | None = None,
                   validation_data: list[dict[str, Any]] | None = None, method: JobMethod = "lora",
                   hyperparameters: dict[str, Any] | None = None, promote: PromoteMode = "auto") -> JobOut:
        body: dict[str, Any] = {"adapter": adapter, "method": method, "promote": promote,
                                "hyperparameters": hyperparameters or {}}
        for key, value in (("training_file", training_file), ("validation_file", validation_file),
                           ("training_data", training_data), ("validation_data", validation_data)):
            if value is not None:
                body[key] = value
        return self._json("POST", "/v1/jobs", json=body)

    def list_jobs(self, *, limit: int = 20, status: JobStatus | None = None) -> list[JobOut]:
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        return self._json("GET", "/v1/jobs", params=params)

    def get_job(self, job_id: str) -> JobOut:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def job_events(self, job_id: str, after: int = 0, limit: int = 1000) -> list[JobEventOut]:
        """The job's events with an id above ``after``, oldest first, at most ``limit`` (1..1,000)."""
        return self._json("GET", f"/v1/jobs/{job_id}/events", params={"after": after, "limit": limit})

    def cancel_job(self, job_id: str) -> JobOut:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def follow_job(self, job_id: str, *, interval: float = 1.0,
                   timeout: float | None = None) -> Iterator[JobEventOut]:
        """Yield the job's events as they come until it finishes, then every event left."""
        after, deadline = 0, None if timeout is None else time.monotonic() + timeout

        def drain() -> Iterator[JobEventOut]:
            nonlocal after
            while page := self.job_events(job_id, after=after):  # a page holds at most 1,000
                for event in page:
                    after = max(after, int(event["id"]))
                    yield event

        while True:
            finished = self.get_job(job_id)["status"] in FINISHED  # asked first: no event is missed
            yield from drain()
            if finished:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still running after {timeout:.0f}s")
            time.sleep(interval)


def _generation_body(model: str, **fields: Any) -> dict[str, Any]:
    """A chat or completion request's body: ``model`` and the fields that are set."""
    return {"model": model, **{k: v for k, v in fields.items() if v is not None}}


def _image_file(image: str | os.PathLike[str] | bytes, i: int) -> tuple[str, bytes, str]:
    """One multipart ``images`` part: (file name, bytes, content type)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return f"image-{i}", bytes(image), "application/octet-stream"
    path = Path(image)
    return path.name, path.read_bytes(), "application/octet-stream"


def _error(r: httpx.Response) -> TailorAPIError:
    try:
        body = r.json()
        err = body["error"]
        return TailorAPIError(r.status_code, str(err.get("code")), str(err.get("message")), err.get("param"), body)
    except (ValueError, KeyError, TypeError, AttributeError):
        text = r.text.strip()[:300] or r.reason_phrase
        return TailorAPIError(r.status_code, "http_error", text)
