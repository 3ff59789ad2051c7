"""Request and response bodies of the HTTP API (pydantic; unknown request fields are 422).

The one place an API shape is written (text generation's are OpenAI's, at the end). The job
enums come from ``adapters.jobs.model``; the
client's TypedDicts (``service/api_types.py``) are generated from the ``Response`` models here
by ``python -m service.api_typegen`` (``tests/test_client_shapes.py`` fails until they match).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from adapters.jobs.model import METHODS, PROMOTE_MODES, STATUSES
from adapters.tasks import TASK_NAMES

# The largest integer an INTEGER column holds on every database we run on (32 bits on
# PostgreSQL): versions, job event ids. An integer past it in a request is a 422 here, never an
# overflow in the database driver (a 500).
DB_INT_MAX = 2**31 - 1

Version = Annotated[int, Field(strict=True, ge=1, le=DB_INT_MAX, description="an adapter version number")]

# The job enums, built from their one definition in adapters.jobs.model.
JobStatus = Literal[STATUSES]  # type: ignore[valid-type]
JobMethod = Literal[METHODS]  # type: ignore[valid-type]
PromoteMode = Literal[PROMOTE_MODES]  # type: ignore[valid-type]
# The task kinds (adapters.tasks): what an adapter, a file or a job is for.
Task = Literal[TASK_NAMES]  # type: ignore[valid-type]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(Response):
    code: str = Field(description="a stable machine-readable code, e.g. adapter_not_found")
    message: str
    param: str | None = Field(default=None, description="the request field at fault, when there is one")
    type: str | None = Field(default=None, description="the error's class, as OpenAI names them: "
                                                       "invalid_request_error, authentication_error, ...")


class ErrorResponse(Response):
    """Every 4xx and 5xx answer: ``{"error": {"code", "message", "param", "type"}}`` (OpenAI's shape)."""

    error: ErrorDetail


# -- tenants and keys ---------------------------------------------------------------------------

class TenantCreate(Request):
    name: StrictStr = Field(description="1-63 characters of a-z, 0-9, '_' and '-'", examples=["acme"])
    quotas: dict[str, Any] | None = Field(
        default=None, description='overrides of the default quotas, e.g. {"max_adapters": 10}')


class TenantOut(Response):
    name: str
    created_at: datetime
    quotas: dict[str, Any]


class TenantCreated(TenantOut):
    api_key: str = Field(description="the tenant's first API key; shown only now")
    key_id: str


class KeyOut(Response):
    key_id: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None
    active: bool


class KeyCreated(KeyOut):
    tenant: str
    api_key: str = Field(description="shown only now; store it")


class TenantUsage(Response):
    """What one tenant holds (``GET /v1/usage``, admin): counts from the database."""

    tenant: str
    adapters: int
    versions: int = Field(description="adapter versions, over all its adapters")
    adapter_bytes: int
    files: int = Field(description="uploaded datasets")
    file_bytes: int
    active_keys: int
    jobs: dict[str, int] = Field(description="its jobs by status (statuses without jobs left out)")


class Deleted(Response):
    deleted: bool = True


# -- adapters -------------------------------------------------------------------------------------

class VersionOut(Response):
    version: int
    task: Task = Field(description="what the version classifies: text-classification or image-classification")
    status: str = Field(description="prod (what the prod alias serves now), retired (was prod before) or "
                                    "candidate (never prod so far)")
    created_at: datetime
    metrics: dict[str, Any]
    labels: list[str]
    aliases: list[str]
    sha256: str
    nbytes: int
    source: str | None = Field(default=None, description="tailor: trained by a Tailor job (job_id); peft: "
                                                         "imported")
    job_id: str | None = Field(default=None, description="the training job that made this version")
    lora: dict[str, Any] | None = None


class AdapterSummary(Response):
    name: str
    task: Task | None = Field(description="its versions' task; null for an adapter without versions")
    created_at: datetime
    aliases: dict[str, int]
    versions: list[int]
    prod: int | None


class AdapterDetail(Response):
    name: str
    task: Task | None = Field(description="its versions' task; null for an adapter without versions")
    created_at: datetime
    aliases: dict[str, int]
    prod: int | None
    versions: list[VersionOut]


class PromoteRequest(Request):
    version: Version
    alias: StrictStr = Field(default="prod", description="the alias to move (default prod)")


class AliasChange(Response):
    adapter: str
    alias: str
    version: int
    previous: int | None
    aliases: dict[str, int]


class ImportedVersion(VersionOut):
    adapter: str
    promoted: bool


# -- predict ----------------------------------------------------------------------------------------

ADAPTER_REF = '"name", "name@3" (a version) or "name@prod" (an alias)'
ADAPTER_REF_MAX_CHARS = 200


class PredictRequest(Request):
    """A JSON predict request: ``inputs`` (texts) for a text adapter, or ``images`` (base64) for
    an image adapter; exactly one of the two."""

    adapter: StrictStr = Field(description=ADAPTER_REF, examples=["sentiment"], max_length=ADAPTER_REF_MAX_CHARS)
    inputs: list[StrictStr] | None = Field(default=None, description="texts to classify (a text adapter)",
                                           min_length=1, examples=[["great service"]])
    images: list[StrictStr] | None = Field(
        default=None, min_length=1, description="images to classify (an image adapter): base64 of JPEG, PNG, "
                                                "WebP, GIF or BMP bytes; a data: URL prefix is allowed")


class PredictForm(Request):
    """The same request as ``multipart/form-data``: ``adapter`` and one ``images`` file per image."""

    adapter: StrictStr = Field(description=ADAPTER_REF, max_length=ADAPTER_REF_MAX_CHARS)
    images: list[bytes] = Field(description="image files (JPEG, PNG, WebP, GIF or BMP), in order", min_length=1,
                                json_schema_extra={"items": {"type": "string", "format": "binary"}})


class PredictionOut(Response):
    label: str
    score: float
    scores: dict[str, float]


class PredictResponse(Response):
    adapter: str
    version: int
    predictions: list[PredictionOut]


# -- files and jobs -----------------------------------------------------------------------------------

class FileOut(Response):
    id: str
    task: Task = Field(description="the task the data trains: text-classification or image-classification")
    filename: str
    format: str
    rows: int
    labels: list[str]
    duplicates_dropped: int
    bytes: int
    created_at: datetime


class JobCreate(Request):
    adapter: StrictStr = Field(description="the adapter the trained version is published under")
    training_file: StrictStr | None = Field(default=None, description="an uploaded file id (POST /v1/files)")
    validation_file: StrictStr | None = None
    training_data: list[Any] | None = Field(
        default=None, description='inline records [{"text": ..., "label": ...}] instead of a file')
    validation_data: list[Any] | None = None
    method: JobMethod = "lora"
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    promote: PromoteMode = "auto"


class JobErrorOut(Response):
    code: str
    message: str


class JobOut(Response):
    id: str
    adapter: str
    task: Task = Field(description="its training data's task (the adapter's)")
    status: JobStatus
    method: JobMethod
    promote: PromoteMode
    progress: dict[str, Any]
    metrics: dict[str, Any]
    error: JobErrorOut | None
    version: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    queue_position: int | None = Field(
        default=None, description="while queued: its place in the fair-share queue (1: the next a free "
                                  "training worker takes); null otherwise")
    # after queue_position: the order the API has always written a job's fields in
    hyperparameters: dict[str, Any] = Field(description="what the job was submitted with")
    resolved_hyperparameters: dict[str, Any] | None = Field(
        description="the concrete values training uses; null until a worker has resolved them")
    dataset: dict[str, Any] = Field(description="its data: training and validation examples, labels, "
                                              "duplicates dropped")
    result: dict[str, Any] = Field(description="once it succeeded: the promotion gate's decision")
    training_file: str | None
    validation_file: str | None
    attempts: int = Field(description="how many times a worker has taken it (a yield to another tenant "
                                      "does not count)")
    cancel_requested: bool


class JobEventOut(Response):
    id: int
    at: datetime
    level: str
    type: str
    message: str
    data: dict[str, Any] | None = None


# -- text generation: OpenAI's shapes (/v1/chat/completions, /v1/completions, /v1/models) --------------
# Field names, ``object`` values and nesting are OpenAI's, so the official ``openai`` client reads
# them unchanged. Types are checked here; the sampling ranges are the library's
# (``adapters.generation.sampling.SamplingParams``), which refuses a bad value naming it.

GENERATION_MODEL = f"the tenant's generation adapter: {ADAPTER_REF}; or the base model's public name (GET /v1/models)"
ChatRole = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class TextPart(Request):
    """One part of a message's content given as a list (only text parts are served)."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(Request):
    role: ChatRole
    content: StrictStr | list[TextPart] = Field(description="the message's text (or a list of text parts)")
    name: StrictStr | None = Field(default=None, description="accepted and ignored, as a participant's name")

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Request):
    include_usage: StrictBool = Field(default=False, description="a last chunk with usage (and no choices)")


class _Sampling(Request):
    model: StrictStr = Field(description=GENERATION_MODEL, max_length=ADAPTER_REF_MAX_CHARS,
                             examples=["support-bot"])
    max_tokens: int | None = Field(default=None, strict=True, description="most tokens to generate")
    temperature: float | None = Field(default=None, strict=True, description="0..2 (0: greedy); default 1")
    top_p: float | None = Field(default=None, strict=True, description="nucleus sampling mass in (0, 1]; default 1")
    stop: StrictStr | list[StrictStr] | None = Field(default=None, description="up to 4 stop strings; not "
                                                                              "included in the text")
    seed: int | None = Field(default=None, strict=True, description="a fixed seed gives the same text")
    n: int | None = Field(default=None, strict=True, description="completions per request: only 1")
    stream: StrictBool = Field(default=False, description="server-sent events of chunks, then data: [DONE]")
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(default=None, description="accepted and ignored")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation, through the base's "
                                                                  "chat template")
    max_completion_tokens: int | None = Field(default=None, strict=True,
                                              description="most tokens to generate (wins over max_tokens)")


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] = Field(description="the text to continue (a list of one is accepted)")


class CompletionUsage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: None = None


class _Generated(Response):
    """OpenAI's envelope of a chat completion, a text completion and a chunk of either: each
    names its own ``object`` (in this place) and adds its ``choices`` and ``usage``."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = Field(default=None, description="what served it: adapter@version, or the "
                                                                     "base model")


class ChatCompletion(_Generated):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: CompletionUsage


class ChunkDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Response):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Generated):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: CompletionUsage | None = None


class CompletionChoice(Response):
    index: int
    text: str
    finish_reason: FinishReason | None = None
    logprobs: None = None


class Completion(_Generated):
    """A text completion, and each chunk of a streamed one (``finish_reason`` null until the last)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class Model(Response):
    id: str = Field(description="what to pass as model: an adapter ref (name, name@alias) or the base's name")
    object: Literal["model"] = "model"
    created: int
    owned_by: str = Field(description="the tenant, or 'tailor' for the base model")


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[Model]
