"""What the OpenAI-compatible routes ask of this worker, beyond the engine: which model a request
names, which models a tenant may use, and the sampling a request body asks for.

* ``pick_model(state, engine, tenant, model)`` -> ``ModelTarget``: the base model when ``model``
  is its public name (``engine.base.spec.name``; it wins over an adapter of the same name), else
  the tenant's adapter ``model`` names (``name``, ``name@3``, ``name@prod``), resolved and loaded
  from memory when it can and in the threadpool otherwise. A name that is no adapter of this
  tenant (or cannot be one) is a 404 ``model_not_found``, never the base; an adapter of another
  task a 422 ``task_mismatch`` naming its task; a stored version that cannot be loaded a 409.
* ``list_models(state, engine, tenant)``: the tenant's text-generation adapters as refs (``name``
  for its ``prod``, ``name@alias`` for its other aliases; ``name@N`` of its newest version when it
  has no alias) and the base model, as OpenAI's model objects. Never another tenant's.
* ``sampling(body, prompt_tokens, max_context, ...)``: the body's sampling fields as the
  library's ``SamplingParams`` (which checks their ranges, naming the field); ``n`` other than 1
  is a 400 naming ``n``. ``max_tokens`` unset: ``default_max_tokens`` or what the context leaves.
* ``metered(state, tenant, stream, submitted)``: the stream's deltas for a route to read; with
  tenant-labelled metrics (``TAILOR_METRICS_TENANT_LABELS=1``) each counted for the caller as it
  arrives (``Metrics.request_tokens``: tokens, time to first token, inter-token latency).
* ``upload_limits(state, task, limits)``: the limits an uploaded dataset of ``task`` is checked
  with; for text generation, where this worker has the generation base loaded, the tenant's
  limits with the base's tokenizer and context (``adapters.generation.datasets.limits_for_base``),
  so an example too long after the chat template is refused at upload, naming its line.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool

from adapters.datasets import DatasetLimits
from adapters.errors import ArtifactError, InvalidInputError, InvalidNameError, NotFoundError
from adapters.generation.datasets import limits_for_base
from adapters.generation.engine import GenerationEngine
from adapters.generation.sampling import SamplingParams
from adapters.generation.stream import GenerationStream, TokenDelta
from adapters.runtime.engine import ResolvedAdapter
from adapters.runtime.loaded import LoadedAdapter
from adapters.tasks import TEXT_GENERATION, task_of_manifest
from service.errors import ApiError
from service.state import TailorState

BASE_OWNER = "tailor"
STARTED = int(time.time())  # the base model's "created": when this worker started serving it


@dataclass(frozen=True)
class ModelTarget:
    id: str  # what the request said
    adapter: LoadedAdapter | None  # None: the base model
    fingerprint: str  # what serves it: "name@3", or the base's name
    owned_by: str
    created: int

    def model_object(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": self.owned_by}


def not_found(model: str) -> ApiError:
    return ApiError(404, "model_not_found", f"the model {model!r} does not exist or you do not have access to it; "
                    "GET /v1/models lists yours", param="model")


async def pick_model(state: TailorState, engine: GenerationEngine, tenant: str, model: str) -> ModelTarget:
    if model == engine.base.spec.name:
        return ModelTarget(model, None, model, BASE_OWNER, STARTED)
    try:
        hit = engine.resident(tenant, model)  # memory only: no thread hop
    except InvalidNameError:
        raise not_found(model) from None
    if hit is None:
        hit = await run_in_threadpool(_acquire, state, engine, tenant, model)
    resolved, loaded = hit
    return ModelTarget(model, loaded, f"{resolved.key.adapter}@{resolved.key.version}", tenant,
                       int(resolved.record.created_at.timestamp()))


def _acquire(state: TailorState, engine: GenerationEngine, tenant: str,
             model: str) -> tuple[ResolvedAdapter, LoadedAdapter]:
    try:
        resolved = engine.resolve(tenant, model)
    except (NotFoundError, InvalidNameError):
        raise not_found(model) from None
    try:
        task = task_of_manifest(resolved.record.manifest)
    except ValueError as e:
        raise ApiError(409, "invalid_artifact", f"{model} cannot be loaded: {e}", param="model") from None
    if task != TEXT_GENERATION:
        raise ApiError(422, "task_mismatch", f"adapter {model!r} is of task {task}, not {TEXT_GENERATION}: classify "
                       "with POST /v1/predict; chat and completions serve text-generation adapters", param="model")
    try:
        loaded = engine.acquire(resolved)
    except ArtifactError as e:  # stored bytes that no longer fit: the tenant's state, not this request
        raise ApiError(409, e.code, f"{model} cannot be loaded: {e.message}", param="model") from None
    finally:
        state.metrics.sync_cache(TEXT_GENERATION, engine.cache.stats)
    return resolved, loaded


def list_models(state: TailorState, engine: GenerationEngine, tenant: str) -> list[dict[str, Any]]:
    out = []
    for a in state.registry.list_adapters(tenant):
        if not a.versions or state.jobs.adapter_task(tenant, a.name) != TEXT_GENERATION:
            continue
        created = int(a.created_at.timestamp())
        refs = [a.name if alias == "prod" else f"{a.name}@{alias}" for alias in sorted(a.aliases, key=_prod_first)]
        for ref in refs or [f"{a.name}@{max(a.versions)}"]:
            out.append(ModelTarget(ref, None, ref, tenant, created).model_object())
    out.append(ModelTarget(engine.base.spec.name, None, engine.base.spec.name, BASE_OWNER, STARTED).model_object())
    return out


def _prod_first(alias: str) -> tuple[bool, str]:
    return alias != "prod", alias


def metered(state: TailorState, tenant: str, stream: GenerationStream,
            submitted: float) -> AsyncIterable[TokenDelta]:
    """``stream``'s deltas (see the module docstring); ``submitted``: ``time.perf_counter()`` just
    before the request was submitted to the engine."""
    if not state.metrics.tenant_labels:
        return stream
    return _metered(state, tenant, stream, submitted)


async def _metered(state: TailorState, tenant: str, stream: GenerationStream,
                   submitted: float) -> AsyncIterator[TokenDelta]:
    last: float | None = None
    async for delta in stream:
        if delta.token_ids:
            now = time.perf_counter()
            state.metrics.request_tokens(TEXT_GENERATION, tenant, len(delta.token_ids),
                                         first=None if last is not None else now - submitted,
                                         gap=0.0 if last is None else now - last)
            last = now
        yield delta


def upload_limits(state: TailorState, task: str, limits: DatasetLimits) -> Any:
    """The limits an upload of ``task`` is validated with (see the module docstring); the tenant's
    ``limits`` as they are for other tasks, or while the generation base is still loading (the
    job then refuses an over-long example when it encodes the data, naming its line)."""
    engine = state.engines.get(TEXT_GENERATION) if task == TEXT_GENERATION else None
    if engine is None:
        return limits
    base = engine.base  # type: ignore[attr-defined]
    return limits_for_base(limits, base.tokenizer, base.max_context)


def sampling(body: Any, prompt_tokens: int, max_context: int, *, max_tokens: int | None = None,
             default_max_tokens: int = 256) -> SamplingParams:
    """``body``'s sampling fields (``max_tokens``: a ``max_completion_tokens`` that wins over
    ``body.max_tokens``) as ``SamplingParams``."""
    if body.n is not None and body.n != 1:
        raise ApiError(400, "invalid_request", f"n: only n=1 is served (one choice per request), not {body.n}",
                       param="n")
    field = "max_completion_tokens" if max_tokens is not None else "max_tokens"
    limit = max_tokens if max_tokens is not None else body.max_tokens
    if limit is None:
        limit = max(1, min(default_max_tokens, max_context - prompt_tokens))
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(max_tokens=limit, temperature=1.0 if body.temperature is None else body.temperature,
                              top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed)
    except InvalidInputError as e:
        if e.param == "max_tokens" and field != "max_tokens":
            raise InvalidInputError(e.message.replace("max_tokens", field), param=field) from None
        raise
