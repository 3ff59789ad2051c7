"""Continuous batching: one thread steps every active sequence of every tenant at once.

Contract:

* ``Scheduler.start()`` runs one background thread. Each iteration: (1) retire cancelled
  sequences (their KV rows are freed: the last row moves into the hole); (2) admit waiting
  requests, first come first served, while they fit -- at most ``max_batch_size`` rows, at most
  ``max_prefill_tokens`` prompt tokens per iteration, and the KV budget (below) -- and prefill
  them together in one forward (each samples its first token); (3) one decode step for every
  active row, whatever its tenant, adapter or base; (4) retire what finished. It sleeps on a
  condition when nothing is active or waiting (no polling).
* KV budget: a sequence reserves ``len(prompt) + max_tokens`` columns at admission (capped at
  the base's context); the cache holds ``rows x widest reservation`` (``adapters.generation.kv``),
  so a request is admitted only if ``(active + 1) x max(reservations) x bytes_per_token`` fits
  ``kv_budget_bytes``. Nothing can run out of memory mid-sequence.
* ``enqueue(request)`` refuses at once (``AdmissionError``, reason ``queue_full``) when
  ``max_waiting`` requests wait; ``wait_admitted``/``wait_admitted_async`` wait up to the
  configured time for admission and withdraw the request (``AdmissionError``, reason
  ``kv_budget``, ``retry_after`` estimated from the running sequences' remaining tokens and the
  recent step time) if it did not start.
* Per-row LoRA: the batch plan (``SlotBank.plan``) is built for the current row order and reused
  across decode steps until rows join or leave.
* A row whose adapter gives non-finite logits fails that stream alone (``AdapterOutputError``);
  an unexpected error in a forward fails every stream of that forward (never hangs them) and
  the loop goes on.
* Hooks (metrics): ``on_first_token(seconds since submit)``, ``on_token(seconds since the
  sequence's previous token)`` for every later token, ``on_finish(usage, finish_reason)``. A
  hook that raises is ignored.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from adapters.errors import AdapterOutputError, AdmissionError
from adapters.generation.decoder import Decoder
from adapters.generation.detok import TextAssembler
from adapters.generation.sampling import Sampler, SamplingParams
from adapters.generation.stream import FinishReason, GenerationStream, TokenDelta, Usage
from adapters.runtime.context import BatchPlan, use_plan
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.slots import SlotBank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # active sequences (KV rows) at once
    max_waiting: int = 256  # requests waiting for admission; more are refused at once
    admission_timeout_s: float = 10.0  # how long a request may wait for KV room before it is refused
    kv_budget_bytes: int = 512 << 20
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per iteration (bounds decode stalls)


@dataclass
class Hooks:
    on_first_token: Callable[[float], None] | None = None
    on_token: Callable[[float], None] | None = None
    on_finish: Callable[[Usage, FinishReason], None] | None = None


@dataclass(eq=False)
class Request:
    """One generation request, from ``enqueue`` to its last token."""

    prompt_ids: list[int]
    adapter: LoadedAdapter | None
    params: SamplingParams
    stream: GenerationStream
    reserved: int  # KV columns it may use: prompt + completion
    assembler: TextAssembler
    sampler: Sampler
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted: threading.Event = field(default_factory=threading.Event)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    length: int = 0  # tokens in its KV row
    next_token: int = -1  # sampled, not yet fed to the model
    generated: int = 0  # tokens sampled
    pending_ids: list[int] = field(default_factory=list)  # sampled since the last delta
    last_token_at: float = 0.0
    finishing: bool = False  # finished or failed: its row is retired at the end of this step


class Scheduler:
    def __init__(self, decoder: Decoder, slots: SlotBank, eos_token_ids: frozenset[int], max_context: int,
                 config: SchedulerConfig, hooks: Hooks | None = None) -> None:
        self.decoder = decoder
        self.slots = slots
        self.eos = eos_token_ids
        self.max_context = max_context
        self.config = config
        self.hooks = hooks or Hooks()
        self.kv = decoder.new_cache(config.kv_budget_bytes)
        self.active: list[Request] = []  # row i of the KV cache
        self.waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._plan: BatchPlan | None = None
        self._plan_rows: tuple[Any, ...] = ()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._step_s = 0.05  # recent decode step time (EWMA), for retry_after
        self.steps = 0
        self.tokens_generated = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="tailor-generation", daemon=True)
            self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- admission ------------------------------------------------------------------------------

    def enqueue(self, req: Request) -> None:
        with self._cond:
            if len(self.waiting) >= self.config.max_waiting:
                raise AdmissionError(f"{len(self.waiting)} generation requests are waiting already; retry later",
                                     retry_after=self._retry_after(), reason="queue_full")
            self.waiting.append(req)
            self._cond.notify_all()

    def wait_admitted(self, req: Request) -> None:
        if not req.admitted.wait(self.config.admission_timeout_s):
            self._withdraw(req)

    async def wait_admitted_async(self, req: Request) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            if req.admitted.is_set():
                return
            req.waiters.append((loop, event))
        try:
            await asyncio.wait_for(event.wait(), self.config.admission_timeout_s)
        except asyncio.TimeoutError:
            self._withdraw(req)

    def _withdraw(self, req: Request) -> None:
        with self._cond:
            if req.admitted.is_set():
                return  # admitted just now: it runs
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
            retry = self._retry_after()
        raise AdmissionError(
            f"the KV cache ({self.kv.budget_bytes} bytes) is taken by running sequences; this request waited "
            f"{self.config.admission_timeout_s:g} s", retry_after=retry, reason="kv_budget")

    def _retry_after(self) -> float:
        remaining = [r.params.max_tokens - r.generated for r in self.active]
        return float(min(30.0, max(1.0, (min(remaining) if remaining else 1) * self._step_s)))

    def _admit(self) -> list[Request]:
        """Under the lock: take the waiting requests that fit now, first come first served."""
        taken: list[Request] = []
        widest = max((r.reserved for r in self.active), default=0)
        tokens = 0
        while self.waiting:
            req = self.waiting[0]
            if req.stream.cancelled:
                self.waiting.popleft()
                continue
            rows = len(self.active) + len(taken) + 1
            width = max(widest, req.reserved)
            if rows > self.config.max_batch_size or not self.kv.fits(rows, width):
                break
            if taken and tokens + len(req.prompt_ids) > self.config.max_prefill_tokens:
                break
            self.waiting.popleft()
            taken.append(req)
            widest, tokens = width, tokens + len(req.prompt_ids)
        for req in taken:
            req.admitted.set()
            for loop, event in req.waiters:
                try:
                    loop.call_soon_threadsafe(event.set)
                except RuntimeError:
                    pass
        return taken

    # -- the loop -------------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"active_sequences": len(self.active), "waiting_requests": len(self.waiting),
                    "kv_cache_bytes": self.kv.nbytes, "kv_cache_budget_bytes": self.kv.budget_bytes,
                    "kv_reserved_tokens": sum(r.reserved for r in self.active),
                    "steps": self.steps, "tokens_generated": self.tokens_generated}

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.active and not self.waiting:
                    self._cond.wait()
                if self._stop:
                    break
                self._retire_cancelled()
                new = self._admit()
            try:
                if new:
                    self._prefill(new)
                if self.active:
                    self._decode()
            except Exception as e:  # noqa: BLE001 - never leave a stream hanging
                log.exception("generation step failed")
                with self._cond:
                    for req in self.active + [r for r in new if r not in self.active]:
                        req.stream._fail(e)
                    self.active = []
                    self._plan = None
                    self.kv.clear()
            with self._cond:
                if not self.active:
                    self.kv.clear()
                    self._plan = None
        with self._cond:
            for req in self.active + list(self.waiting):
                req.stream._fail(RuntimeError("the generation engine was closed"))
            self.active, self.waiting = [], deque()

    def _retire_cancelled(self) -> None:
        for i in range(len(self.active) - 1, -1, -1):
            if self.active[i].stream.cancelled:
                self._remove_row(i)

    def _remove_row(self, i: int) -> None:
        last = len(self.active) - 1
        if i != last:
            self.kv.move_row(last, i, self.active[last].length)
            self.active[i] = self.active[last]
        self.active.pop()
        self._plan = None

    def _plan_for(self, rows: list[LoadedAdapter | None]) -> BatchPlan:
        return self.slots.plan(rows)

    def _prefill(self, new: list[Request]) -> None:
        row0 = len(self.active)
        t = max(len(r.prompt_ids) for r in new)
        width = max([r.reserved for r in self.active + new])
        self.kv.ensure(row0 + len(new), width, live=row0)
        pad = self.decoder_pad()
        ids = torch.tensor([r.prompt_ids + [pad] * (t - len(r.prompt_ids)) for r in new], device=self.decoder.device)
        plan = self._plan_for([r.adapter for r in new])
        with use_plan(plan):
            logits = self.decoder.prefill(ids, [len(r.prompt_ids) for r in new], self.kv, row0)
        with self._cond:
            self.active.extend(new)
            self._plan = None
        for j, req in enumerate(new):
            req.length = len(req.prompt_ids)
        self._sample([(row0 + j, req) for j, req in enumerate(new)], logits)

    def decoder_pad(self) -> int:
        return next(iter(self.eos), 0)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        rows = [r.adapter for r in self.active]
        key = tuple(None if a is None else a.key for a in rows)
        if self._plan is None or key != self._plan_rows:
            self._plan, self._plan_rows = self._plan_for(rows), key
        ids = torch.tensor([r.next_token for r in self.active], device=self.decoder.device)
        positions = torch.tensor([r.length for r in self.active], device=self.decoder.device)
        with use_plan(self._plan):
            logits = self.decoder.decode(ids, positions, self.kv)
        for req in self.active:
            req.length += 1
        self._sample(list(enumerate(self.active)), logits)
        self.steps += 1
        self._step_s = 0.8 * self._step_s + 0.2 * (time.perf_counter() - t0)

    def _sample(self, rows: list[tuple[int, Request]], logits: torch.Tensor) -> None:
        """Pick each row's next token, stream its text, retire the finished (row i: logits[j])."""
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        greedy = [j for j, (_, r) in enumerate(rows) if r.params.greedy]
        picks: dict[int, int] = {}
        if greedy:
            best = torch.argmax(logits[greedy], dim=-1).tolist()
            picks = dict(zip(greedy, best))
        now = time.perf_counter()
        endings: list[Callable[[], None]] = []  # run once the rows are retired: a caller who sees
        for j, (_, req) in enumerate(rows):      # its stream end finds the sequence gone
            if req.stream.cancelled:
                continue
            if not finite[j]:
                key = req.adapter.key if req.adapter is not None else "the base model"
                error = AdapterOutputError(
                    f"adapter {key} produced non-finite logits (NaN or infinity); its weights are unusable",
                    param="model")
                req.finishing = True
                endings.append(lambda req=req, error=error: req.stream._fail(error))  # type: ignore[misc]
                continue
            token = picks[j] if j in picks else req.sampler.pick(logits[j])
            ending = self._token(req, token, now)
            if ending is not None:
                endings.append(ending)
        if endings:
            with self._cond:
                for i in range(len(self.active) - 1, -1, -1):
                    if self.active[i].finishing:
                        self._remove_row(i)
            for ending in endings:
                ending()

    def _token(self, req: Request, token: int, now: float) -> Callable[[], None] | None:
        """Take one sampled token; a finished sequence is marked and its ending returned."""
        req.generated += 1
        self.tokens_generated += 1
        self._hook(self.hooks.on_first_token if req.generated == 1 else self.hooks.on_token,
                   now - (req.submitted_at if req.generated == 1 else req.last_token_at))
        req.last_token_at = now
        req.pending_ids.append(token)
        finish: FinishReason | None = None
        if token in self.eos:
            finish, text = "stop", req.assembler.flush()
        else:
            text = req.assembler.add(token)
            if req.assembler.stopped:
                finish = "stop"
            elif req.generated >= req.params.max_tokens or req.length >= req.reserved:
                finish, text = "length", text + req.assembler.flush()
        req.next_token = token
        if finish is None and not text:
            return None
        ids, req.pending_ids = req.pending_ids, []
        delta = TokenDelta(text=text, token_ids=ids, finish_reason=finish)
        if finish is None:
            req.stream._emit(delta)
            return None
        req.finishing = True
        usage = Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=req.generated)

        def end() -> None:  # the hook first: a caller who sees the end finds it counted
            if self.hooks.on_finish is not None:
                try:
                    self.hooks.on_finish(usage, finish)  # type: ignore[arg-type]
                except Exception:  # noqa: BLE001 - metrics never fail a request
                    pass
            req.stream._finish(delta, usage)
        return end

    @staticmethod
    def _hook(fn: Callable[[float], None] | None, value: float) -> None:
        if fn is not None:
            try:
                fn(value)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                pass
