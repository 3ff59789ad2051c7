"""The generation engine: one frozen causal LM serving many tenants' LoRA adapters, continuously batched.

Contract (the HTTP layer codes against these names):

* ``GenerationEngine(base, catalog, config, *, on_load, on_first_token, on_token, on_finish)``
  serves one ``CausalBase`` (``adapters.generation.base``). ``resolve``, ``acquire``,
  ``resident``, ``prefetch``, ``refresh``, ``forget`` and ``check_adapter`` have exactly the
  semantics of ``adapters.runtime.engine.Engine``'s (the same ``Resolver``, ``ResidentCache`` and
  ``SlotBank``; ``refresh`` and ``forget`` also drop the adapter's cached LoRA row images, and
  ``probe`` its candidate's): an unknown adapter, or another tenant's, is ``AdapterNotFoundError``, never the
  base; an adapter of another task is a ``TaskMismatchError`` naming both tasks, before its bytes
  are read. The running batch reads its per-row LoRA weights from ``loras``
  (``adapters.generation.rows.RowLoras``, kept in place as sequences join and leave, at most
  ``max_batch_size`` rows); ``slots`` serves one-shot plans (tests, benchmarks) and holds nothing
  otherwise.
* ``encode_chat(messages)`` applies the tokenizer's chat template with the generation prompt;
  every message must be a mapping with ``role`` in ``ROLES`` and non-empty string ``content``
  (``InvalidInputError`` naming ``messages``, ``messages[i].role`` or ``messages[i].content``).
  ``encode_prompt(text)`` tokenises a plain prompt (``param`` ``prompt``). Text that is not
  valid Unicode (a lone surrogate) is refused the same way. ``decode(ids)`` is plain
  detokenisation (streams assemble their text incrementally: ``adapters.generation.detok``).
* ``submit(prompt_ids, adapter, params)`` starts a request and returns its ``GenerationStream``
  once it is admitted (``stream`` module: sync and async iteration of ``TokenDelta``,
  ``cancel()``, ``usage``). It raises ``InvalidInputError`` for a request that can never run
  (empty prompt, prompt + ``max_tokens`` over the base's context or over the whole KV budget,
  an adapter of another task or base) and ``AdmissionError(retry_after=...)`` when it cannot be
  admitted within ``config.admission_timeout_s`` (KV budget) or the waiting queue is full: never
  an out-of-memory. ``submit_async`` is the same for an event loop (it never blocks the loop).
* ``probe(artifact)`` (the import check, ``adapters.import_checks.probe_logits``): the candidate
  adapter, under a key no stored version can have, generates ``PROBE_TOKENS`` greedy tokens of a
  probe chat through the scheduler like any request; non-finite logits refuse it
  (``ArtifactError``, ``param`` ``file``). Its device slot is freed afterwards.
* ``stats()``: active sequences, waiting requests, KV-cache bytes in use and budget (metrics);
  hooks ``on_first_token(seconds)``, ``on_token(seconds between tokens)``,
  ``on_finish(usage, finish_reason)`` feed the service's histograms and counters.
* The scheduler thread starts with the engine; ``close()`` stops it (pending streams fail).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.artifact import AdapterArtifact
from adapters.catalog import Catalog
from adapters.change_feed import ChangeFeed
from adapters.errors import AdapterOutputError, ArtifactError, InvalidInputError
from adapters.generation.base import CausalBase
from adapters.generation.decoder import Decoder
from adapters.generation.detok import TextAssembler
from adapters.generation.rows import RowLoras
from adapters.generation.sampling import Sampler, SamplingParams
from adapters.generation.scheduler import Hooks, Request, Scheduler, SchedulerConfig, StepRunner
from adapters.generation.stream import FinishReason, GenerationStream, Usage
from adapters.runtime.cache import ResidentCache
from adapters.runtime.adapter_access import AdapterAccess
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.lora_layer import wrap_linears
from adapters.runtime.memory import tune_allocator
from adapters.runtime.resolver import Resolver
from adapters.runtime.slots import SlotBank
from adapters.tasks import TEXT_GENERATION

ROLES = ("system", "user", "assistant")
PROBE_CHAT = ({"role": "user", "content": "Hello! Can you help me?"},)
PROBE_TOKENS = 2
MAX_MESSAGES = 256
SEPARATE = ("o_proj", "down_proj")  # they read the attention / MLP outputs, not their siblings' input


@dataclass(frozen=True)
class GenerationConfig:
    max_resident: int = 1024  # adapters decoded in host memory
    max_resident_bytes: int = 2 << 30
    device_slots: int = 65  # adapters stacked on the device, incl. the base slot 0
    max_batch_size: int = 32  # sequences decoded together
    max_waiting: int = 256
    admission_timeout_s: float = 10.0
    kv_budget_bytes: int = 512 << 20
    max_prefill_tokens: int = 2048
    tune_allocator: bool = True
    resolve_poll_seconds: float = 0.25
    idle_release_s: float = 2.0  # an emptied batch keeps its KV and LoRA row buffers this long

    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(max_batch_size=self.max_batch_size, max_waiting=self.max_waiting,
                               admission_timeout_s=self.admission_timeout_s, kv_budget_bytes=self.kv_budget_bytes,
                               max_prefill_tokens=self.max_prefill_tokens, idle_release_s=self.idle_release_s)


class GenerationEngine(AdapterAccess):
    def __init__(
        self, base: CausalBase, catalog: Catalog, config: GenerationConfig | None = None, *,
        on_load: Callable[[float], None] | None = None,
        on_first_token: Callable[[float], None] | None = None,
        on_token: Callable[[float], None] | None = None,
        on_finish: Callable[[Usage, FinishReason], None] | None = None,
        change_feed: ChangeFeed | None = None,
        run_step: StepRunner | None = None,
    ) -> None:
        if base.spec.task != TEXT_GENERATION:
            raise TypeError(f"a generation engine needs a {TEXT_GENERATION} base, not {base.spec.task}")
        self.base = base
        self.task_name = TEXT_GENERATION
        self.catalog = catalog
        self.config = config or GenerationConfig()
        if self.config.device_slots - 1 < self.config.max_batch_size:
            raise ValueError("device_slots must exceed max_batch_size (a batch may name that many adapters)")
        if self.config.tune_allocator:
            tune_allocator()
        wrap_linears(base.model, list(base.spec.linear_shapes))
        self.slots = SlotBank(base.spec.linear_shapes, 0, self.config.device_slots, base.device, base.dtype,
                              separate=SEPARATE)
        self.resolver = Resolver(catalog.registry, poll_seconds=self.config.resolve_poll_seconds,
                                 feed=change_feed)  # the process's shared feed, if given
        self.cache = ResidentCache(max_count=self.config.max_resident, max_bytes=self.config.max_resident_bytes,
                                   on_load=on_load)
        self.decoder = Decoder(base)
        # the running batch's per-row LoRA weights, updated in place as sequences join and leave
        self.loras = RowLoras(base.spec.linear_shapes, base.device, base.dtype, self.config.max_batch_size,
                              separate=SEPARATE)
        self.scheduler = Scheduler(self.decoder, self.loras, base.eos_token_ids, base.max_context,
                                   self.config.scheduler(), Hooks(on_first_token, on_token, on_finish),
                                   run_step=run_step)  # where its forwards run (Scheduler's docstring)
        self.scheduler.start()
        self._template_lock = threading.Lock()  # tokenizers are not documented thread-safe

    # -- text -----------------------------------------------------------------------------------

    def encode_chat(self, messages: Sequence[Any]) -> list[int]:
        if not isinstance(messages, (list, tuple)) or not messages:
            raise InvalidInputError("messages must be a non-empty list of {role, content} objects", param="messages")
        if len(messages) > MAX_MESSAGES:
            raise InvalidInputError(f"messages holds {len(messages)} messages; at most {MAX_MESSAGES}",
                                    param="messages")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise InvalidInputError(f"messages[{i}] must be an object with role and content",
                                        param=f"messages[{i}]")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise InvalidInputError(f"messages[{i}].role must be one of {', '.join(ROLES)}",
                                        param=f"messages[{i}].role")
            if not isinstance(content, str) or not content.strip():
                raise InvalidInputError(f"messages[{i}].content must be a non-empty string",
                                        param=f"messages[{i}].content")
            _check_unicode(content, f"messages[{i}].content")
            clean.append({"role": role, "content": content})
        with self._template_lock:
            ids = self.base.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)
        return [int(i) for i in ids]

    def encode_prompt(self, text: Any) -> list[int]:
        if not isinstance(text, str) or not text:
            raise InvalidInputError("prompt must be a non-empty string", param="prompt")
        _check_unicode(text, "prompt")
        with self._template_lock:
            return [int(i) for i in self.base.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        with self._template_lock:
            return self.base.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- requests -------------------------------------------------------------------------------

    def _request(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty", param="messages")
        vocab = self.base.model.config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_ids):
            raise InvalidInputError(f"prompt token ids must be integers in 0..{vocab - 1}", param="prompt")
        reserved = len(prompt_ids) + params.max_tokens
        if reserved > self.base.max_context:
            raise InvalidInputError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.base.max_context} tokens", param="max_tokens")
        if not self.scheduler.kv.fits(1, reserved):
            raise InvalidInputError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) needs more KV cache "
                f"than this server holds ({self.scheduler.kv.budget_tokens} tokens)", param="max_tokens")
        if adapter is not None:
            self.check_adapter(adapter)
            if adapter.manifest.base_fingerprint != self.base.fingerprint:
                raise InvalidInputError("the adapter was built for another base model", param="model")
        stream = GenerationStream(len(prompt_ids))
        with self._template_lock:
            assembler = TextAssembler(self.base.tokenizer, params.stop)
        return Request(prompt_ids=list(prompt_ids), adapter=adapter, params=params, stream=stream,
                       reserved=reserved, assembler=assembler, sampler=Sampler(params))

    def submit(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams
               ) -> GenerationStream:
        req = self._request(prompt_ids, adapter, params)
        self.scheduler.enqueue(req)
        self.scheduler.wait_admitted(req)
        return req.stream

    async def submit_async(self, prompt_ids: list[int], adapter: LoadedAdapter | None, params: SamplingParams
                           ) -> GenerationStream:
        req = self._request(prompt_ids, adapter, params)
        self.scheduler.enqueue(req)
        await self.scheduler.wait_admitted_async(req)
        return req.stream

    def probe(self, artifact: AdapterArtifact) -> None:
        """Refuse (``ArtifactError``) an adapter whose logits are not finite on a probe chat."""
        key = VersionKey(tenant="_probe", adapter="_import", version=0, sha256=f"probe-{uuid.uuid4().hex}")
        loaded = LoadedAdapter.from_artifact(key, artifact, self.base.dtype)
        try:
            stream = self.submit(self.encode_chat(list(PROBE_CHAT)), loaded,
                                 SamplingParams(max_tokens=PROBE_TOKENS, temperature=0.0))
            for _ in stream:
                pass
        except AdapterOutputError:
            lora = artifact.manifest.lora
            raise ArtifactError(
                f"the adapter gives non-finite logits (NaN or infinity) on a probe chat: its weights or its scale "
                f"(lora_alpha {lora.alpha:g} / r {lora.r} = {lora.scale:g}) overflow the forward pass. Check the "
                "adapter's lora_alpha and weights.", param="file") from None
        finally:
            self.slots.drop(lambda k: k == key)
            self.loras.drop_images(lambda k: k == key)

    def drop_derived(self, match: Callable[[VersionKey], bool]) -> None:
        self.loras.drop_images(match)  # rows already live keep their own copy

    def stats(self) -> dict[str, int]:
        """Active sequences, waiting requests, KV bytes in use and budget, steps, tokens generated."""
        return self.scheduler.stats()

    def close(self) -> None:
        self.scheduler.close()


def _check_unicode(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{param} is not valid Unicode (a lone surrogate)", param=param) from None
