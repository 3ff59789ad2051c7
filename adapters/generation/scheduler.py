"""Continuous batching: one thread steps every active sequence of every tenant at once.

Contract:

* ``Scheduler.start()`` runs one background thread. Each iteration: (1) retire cancelled
  sequences (their KV rows are freed: the last row moves into the hole); (2) admit waiting
  requests, first come first served, while they fit -- at most ``max_batch_size`` rows, at most
  ``max_prefill_tokens`` prompt tokens per iteration, and the KV budget (below) -- and prefill
  them together in one forward (each samples its first token); (3) one decode step for every
  active row, whatever its tenant, adapter or base; (4) retire what finished. It sleeps on a
  condition when nothing is active or waiting (no polling). When the batch empties it keeps
  its KV and LoRA row buffers (``RowLoras.reset``) for ``idle_release_s``: a batch that
  refills within that time reuses them (no reallocation, no first-touch of hundreds of MB);
  once the engine has stayed idle that long it frees them (``kv.clear``, ``loras.clear``), so
  an idle engine holds neither. Its thread then exits too (the next ``enqueue`` starts another):
  an idle engine keeps no OpenMP pool alive, which would slow every other torch thread of the
  process (``adapters.runtime.torch_threads``).
* KV budget: a sequence reserves ``len(prompt) + max_tokens`` columns at admission (capped at
  the base's context); the cache holds ``rows x widest reservation`` (``adapters.generation.kv``),
  so a request is admitted only if ``(active + 1) x max(reservations) x bytes_per_token`` fits
  ``kv_budget_bytes``. Nothing can run out of memory mid-sequence.
* ``enqueue(request)`` refuses at once (``AdmissionError``, reason ``queue_full``) when
  ``max_waiting`` requests wait; ``wait_admitted``/``wait_admitted_async`` wait up to the
  configured time for admission and withdraw the request (``AdmissionError``, reason
  ``kv_budget``, ``retry_after`` estimated from the running sequences' remaining tokens and the
  recent step time) if it did not start.
* Per-row LoRA lives in a ``RowLoras`` (``adapters.generation.rows``) kept in step with the KV
  rows: an admitted sequence's adapter is copied into its row once, a retired row's hole is
  filled by the last row (as in the KV cache), and a decode step without a join or a leave
  copies no adapter weights. Base-only batches run the plain base forward.
* A row whose adapter gives non-finite logits fails that stream alone (``AdapterOutputError``);
  an unexpected error in a forward fails every stream of that forward (never hangs them) and
  the loop goes on.
* ``seconds`` (``PhaseSeconds``) adds up where the loop's time goes: KV growth, LoRA row copies,
  prefill and decode forwards, sampling and streaming (benchmarks read it).
* ``run_step`` (optional): the step (prefill and decode forwards, sampling, streaming) runs
  through it, e.g. on the serving process's ``ComputeThread`` with its cores lent, so the
  process keeps one OpenMP pool (``adapters.runtime.torch_threads``); the scheduler's own
  thread then runs single-threaded. Without it the scheduler's thread runs the steps.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch

from adapters.errors import AdapterOutputError, AdmissionError
from adapters.generation.decoder import Decoder
from adapters.generation.detok import TextAssembler
from adapters.generation.sampling import Sampler, SamplingParams
from adapters.generation.stream import FinishReason, GenerationStream, TokenDelta, Usage
from adapters.generation.rows import RowLoras
from adapters.runtime.context import BatchPlan, use_plan
from adapters.runtime.loaded import LoadedAdapter
from adapters.runtime.torch_threads import one_thread

log = logging.getLogger(__name__)
# runs one step (prefill and decode) where the process's forward passes run, e.g. a ComputeThread
StepRunner = Callable[[Callable[[], None]], None]


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32  # active sequences (KV rows) at once
    max_waiting: int = 256  # requests waiting for admission; more are refused at once
    admission_timeout_s: float = 10.0  # how long a request may wait for KV room before it is refused
    kv_budget_bytes: int = 512 << 20
    max_prefill_tokens: int = 2048  # prompt tokens prefilled per iteration (bounds decode stalls)
    idle_release_s: float = 2.0  # an empty batch keeps its KV and LoRA row buffers this long


@dataclass
class PhaseSeconds:
    """Where the scheduler thread's time went, cumulative (benchmarks read differences)."""

    kv: float = 0.0  # growing the KV buffers
    rows: float = 0.0  # copying adapters into LoRA rows (joins) and moving rows (leaves)
    prefill: float = 0.0  # prefill forwards
    decode: float = 0.0  # decode forwards
    sample: float = 0.0  # sampling, detokenising, streaming, retiring (includes leaves' row moves)
    prefills: int = 0  # prefill forwards run
    prefilled: int = 0  # sequences prefilled


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
    def __init__(self, decoder: Decoder, loras: RowLoras, eos_token_ids: frozenset[int], max_context: int,
                 config: SchedulerConfig, hooks: Hooks | None = None, run_step: StepRunner | None = None) -> None:
        self.decoder = decoder
        self.loras = loras
        self.eos = eos_token_ids
        self.max_context = max_context
        self.config = config
        self.hooks = hooks or Hooks()
        self.run_step = run_step
        self.kv = decoder.new_cache(config.kv_budget_bytes)
        self.active: list[Request] = []  # row i of the KV cache
        self.waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._exited: threading.Thread | None = None  # the last thread that left idle
        self._stop = False
        self._step_s = 0.05  # recent decode step time (EWMA), for retry_after
        self.steps = 0
        self.seconds = PhaseSeconds()
        self.tokens_generated = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._cond:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        """Under the lock: the loop's thread, started unless it runs (or the scheduler closed)."""
        if self._thread is None and not self._stop:
            self._thread = threading.Thread(target=self._run, name="tailor-generation", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the loop's thread is up (it exits once idle with its buffers released)."""
        with self._cond:
            return self._thread is not None

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=30)

    # -- admission ------------------------------------------------------------------------------

    def enqueue(self, req: Request) -> None:
        with self._cond:
            if len(self.waiting) >= self.config.max_waiting:
                raise AdmissionError(f"{len(self.waiting)} generation requests are waiting already; retry later",
                                     retry_after=self._retry_after(), reason="queue_full")
            self.waiting.append(req)
            self._ensure_thread()
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
        # with a runner, the forwards run on its thread; this one then makes no OpenMP pool
        with one_thread() if self.run_step is not None else nullcontext():
            self._loop()

    def _step(self, new: list[Request]) -> None:
        """Prefill the newly admitted requests, then one decode step of every active row."""
        if new:
            self._prefill(new)
        if self.active:
            self._decode()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.active and not self.waiting:
                    if not (self.kv.nbytes or self.loras.nbytes):
                        self._thread = None  # idle, nothing held: the thread (and its pool) goes
                        self._exited = threading.current_thread()
                        self._cond.notify_all()  # wait_released
                        return
                    if not self._cond.wait(self.config.idle_release_s) and not self.waiting:
                        self.kv.clear()  # idle that long: hand the buffers back
                        self.loras.clear()
                        self._cond.notify_all()  # wait_released
                if self._stop:
                    break
                self._retire_cancelled()
                new = self._admit()
            try:
                if self.run_step is None:
                    self._step(new)
                else:
                    self.run_step(partial(self._step, new))
            except Exception as e:  # noqa: BLE001 - never leave a stream hanging
                log.exception("generation step failed")
                with self._cond:
                    for req in self.active + [r for r in new if r not in self.active]:
                        req.stream._fail(e)
                    self.active = []
                    self.kv.clear()
                    self.loras.clear()
            with self._cond:
                if not self.active:
                    self.loras.reset()  # the buffers stay for idle_release_s (above)
        with self._cond:
            for req in self.active + list(self.waiting):
                req.stream._fail(RuntimeError("the generation engine was closed"))
            self.active, self.waiting = [], deque()

    def wait_released(self, timeout: float) -> bool:
        """Wait until the engine, idle, has handed its KV and LoRA row buffers back and its
        thread has exited (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if not self._cond.wait_for(lambda: not self.active and not self.waiting and self._thread is None
                                       and not self.kv.nbytes and not self.loras.nbytes, timeout):
                return False
            exited = self._exited
        if exited is not None and exited is not threading.current_thread():
            exited.join(max(0.0, deadline - time.monotonic()))
            return not exited.is_alive()
        return True

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
        t0 = time.perf_counter()
        self.loras.remove(i)
        self.seconds.rows += time.perf_counter() - t0

    def _prefill(self, new: list[Request]) -> None:
        row0 = len(self.active)
        t = max(len(r.prompt_ids) for r in new)
        width = max([r.reserved for r in self.active + new])
        sec, t0 = self.seconds, time.perf_counter()
        self.kv.ensure(row0 + len(new), width, live=row0)
        pad = self.decoder_pad()
        ids = torch.tensor([r.prompt_ids + [pad] * (t - len(r.prompt_ids)) for r in new], device=self.decoder.device)
        t1 = time.perf_counter()
        self.loras.append([r.adapter for r in new])
        t2 = time.perf_counter()
        try:
            with _maybe_plan(self.loras.plan(row0, row0 + len(new))):
                logits = self.decoder.prefill(ids, [len(r.prompt_ids) for r in new], self.kv, row0)
        finally:
            with self._cond:
                self.active.extend(new)  # rows of the KV cache and of the LoRA rows, even on failure
        t3 = time.perf_counter()
        for j, req in enumerate(new):
            req.length = len(req.prompt_ids)
        self._sample([(row0 + j, req) for j, req in enumerate(new)], logits)
        sec.kv, sec.rows, sec.prefill = sec.kv + t1 - t0, sec.rows + t2 - t1, sec.prefill + t3 - t2
        sec.sample += time.perf_counter() - t3
        sec.prefills, sec.prefilled = sec.prefills + 1, sec.prefilled + len(new)

    def decoder_pad(self) -> int:
        return next(iter(self.eos), 0)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        ids = torch.tensor([r.next_token for r in self.active], device=self.decoder.device)
        positions = torch.tensor([r.length for r in self.active], device=self.decoder.device)
        with _maybe_plan(self.loras.plan(0, len(self.active))):
            logits = self.decoder.decode(ids, positions, self.kv)
        t1 = time.perf_counter()
        for req in self.active:
            req.length += 1
        self._sample(list(enumerate(self.active)), logits)
        self.steps += 1
        t2 = time.perf_counter()
        self.seconds.decode += t1 - t0
        self.seconds.sample += t2 - t1
        self._step_s = 0.8 * self._step_s + 0.2 * (t2 - t0)

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


@contextmanager
def _maybe_plan(plan: BatchPlan | None) -> Iterator[None]:
    """Install ``plan`` for one forward; ``None`` (no row has an adapter) is the plain base."""
    if plan is None:
        yield
    else:
        with use_plan(plan):
            yield
