"""The generation engine's behaviour on a tiny Llama (issue 16 item 3): continuous batching
with seeded determinism whatever shares the batch, stop strings, max_tokens and finish reasons,
cancel, admission control under a KV budget and a queue bound, async streams, metrics hooks,
tenant isolation and task checks."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from pathlib import Path

import pytest

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.errors import AdapterNotFoundError, AdmissionError, InvalidInputError, TaskMismatchError
from adapters.generation.base import tiny_causal_base
from adapters.generation.engine import GenerationConfig, GenerationEngine
from adapters.generation.sampling import SamplingParams
from adapters.generation.synthetic import random_generation_artifact
from adapters.runtime.compute_thread import ComputeThread
from adapters.registry import Registry
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from tests import torch_threads

one_thread = torch_threads.one_thread  # autouse: one torch thread in this module

CACHE = Path(tempfile.gettempdir()) / "tailor-test" / "bases"



@pytest.fixture(scope="module")
def base():
    return tiny_causal_base(2, cache_dir=CACHE)


@pytest.fixture()
def catalog(base, tmp_path):
    cat = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    for tenant in ("acme", "globex"):
        cat.registry.create_tenant(tenant)
    for i, (tenant, name) in enumerate([("acme", "chat"), ("acme", "pirate"), ("globex", "chat")]):
        art = random_generation_artifact(base.spec, r=4 + 2 * i, seed=10 + i, std=0.2)
        cat.publish(tenant, name, art, promote=True, spec=base.spec)
    return cat


@pytest.fixture()
def make_engine(base, catalog):
    engines = []

    def make(**kw):
        kw.setdefault("max_batch_size", 8)
        kw.setdefault("device_slots", kw["max_batch_size"] + 1)
        hooks = {k: kw.pop(k) for k in ("on_first_token", "on_token", "on_finish", "run_step") if k in kw}
        engine = GenerationEngine(base, catalog, GenerationConfig(**kw), **hooks)
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.close()


def chat(engine, text="hello there"):
    return engine.encode_chat([{"role": "user", "content": text}])


def tokens(stream):
    deltas = list(stream)
    return [t for d in deltas for t in d.token_ids], "".join(d.text for d in deltas), deltas[-1].finish_reason


def test_a_fixed_seed_gives_the_same_text_whatever_shares_the_batch(make_engine):
    engine = make_engine()
    acme = engine.acquire(engine.resolve("acme", "chat"))
    pirate = engine.acquire(engine.resolve("acme", "pirate"))
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
    alone = tokens(engine.submit(chat(engine), acme, params))
    # the same request among others: other adapters, a base row, other lengths, other seeds
    others = [engine.submit(chat(engine, "a much longer question about many things " * 3), pirate,
                            SamplingParams(max_tokens=20, temperature=1.0, seed=7)),
              engine.submit(chat(engine, "hi"), None, SamplingParams(max_tokens=8, temperature=0.7))]
    crowded = engine.submit(chat(engine), acme, params)
    others.append(engine.submit(chat(engine, "and another"), pirate, SamplingParams(max_tokens=30, temperature=1.2)))
    assert tokens(crowded) == alone
    for s in others:
        list(s)
    different = tokens(engine.submit(chat(engine), acme, SamplingParams(max_tokens=16, temperature=0.9, seed=99)))
    assert different[0] != alone[0]  # the seed matters: the test could fail


def test_max_tokens_finish_reasons_and_usage(make_engine):
    engine = make_engine()
    adapter = engine.acquire(engine.resolve("acme", "chat"))
    prompt = chat(engine)
    stream = engine.submit(prompt, adapter, SamplingParams(max_tokens=5, temperature=0))
    ids, text, finish = tokens(stream)
    assert finish == "length" and len(ids) == 5 and stream.finish_reason == "length"
    assert (stream.usage.prompt_tokens, stream.usage.completion_tokens) == (len(prompt), 5)
    assert text == engine.decode(ids)
    # an end-of-sequence token finishes with "stop", counts in usage and is never shown: make the
    # greedy run's third token this base's end of sequence
    engine.scheduler.eos = frozenset({ids[2]})
    stream = engine.submit(prompt, adapter, SamplingParams(max_tokens=5, temperature=0))
    cut, text, finish = tokens(stream)
    assert finish == "stop" and cut == ids[:3] and stream.usage.completion_tokens == 3
    assert text == engine.decode(ids[:2])


def test_stop_strings_end_the_text_before_them_and_are_never_shown(make_engine):
    engine = make_engine()
    adapter = engine.acquire(engine.resolve("acme", "pirate"))
    prompt = chat(engine, "tell me something")
    _, full, _ = tokens(engine.submit(prompt, adapter, SamplingParams(max_tokens=24, temperature=0)))
    assert len(full) > 12
    stop = full[6:10]  # spans token boundaries in general
    cut = full.index(stop)
    stream = engine.submit(prompt, adapter, SamplingParams(max_tokens=24, temperature=0, stop=("@@never@@", stop)))
    _, text, finish = tokens(stream)
    assert text == full[:cut] and finish == "stop" and stop not in text
    # a stop string that never appears changes nothing
    _, same, finish = tokens(engine.submit(prompt, adapter, SamplingParams(max_tokens=24, temperature=0,
                                                                           stop=("\x00zz",))))
    assert same == full and finish == "length"


def test_cancel_frees_the_sequence_at_the_next_step(make_engine):
    engine = make_engine()
    adapter = engine.acquire(engine.resolve("acme", "chat"))
    stream = engine.submit(chat(engine), adapter, SamplingParams(max_tokens=2000, temperature=1.0, seed=1))
    it = iter(stream)
    next(it)
    stream.cancel()
    assert list(it) == [] and stream.usage is None  # iteration ends at once
    # the next request runs and finishes; by then the scheduler has retired the cancelled one
    ids, _, _ = tokens(engine.submit(chat(engine), None, SamplingParams(max_tokens=3, temperature=0)))
    assert len(ids) == 3
    stats = engine.stats()
    assert stats["active_sequences"] == 0 and stats["kv_reserved_tokens"] == 0


def test_admission_waits_then_refuses_with_retry_after_instead_of_overrunning_the_kv_budget(make_engine, base):
    engine = make_engine(kv_budget_bytes=base.kv_bytes_per_token * 600, admission_timeout_s=0.3, max_waiting=1)
    adapter = engine.acquire(engine.resolve("acme", "chat"))
    long = engine.submit(chat(engine), adapter, SamplingParams(max_tokens=500, temperature=1.0, seed=2))
    next(iter(long))  # running: it holds ~530 of the 600 tokens' KV
    with pytest.raises(AdmissionError) as refused:
        engine.submit(chat(engine), None, SamplingParams(max_tokens=200))
    assert refused.value.reason == "kv_budget" and refused.value.retry_after >= 1.0
    assert engine.stats()["waiting_requests"] == 0  # withdrawn, nothing left behind
    assert engine.stats()["kv_cache_bytes"] <= engine.stats()["kv_cache_budget_bytes"]
    # the queue bound refuses at once
    waiting = engine._request(chat(engine), None, SamplingParams(max_tokens=20))
    engine.scheduler.enqueue(waiting)
    with pytest.raises(AdmissionError) as full:
        engine.submit(chat(engine), None, SamplingParams(max_tokens=200))
    assert full.value.reason == "queue_full"
    # a request that could never fit is the client's mistake, named
    with pytest.raises(InvalidInputError) as never:
        engine.submit(chat(engine), None, SamplingParams(max_tokens=600))
    assert never.value.param == "max_tokens" and "KV cache" in never.value.message
    # once the long one is cancelled, the waiting one is admitted and runs
    long.cancel()
    engine.scheduler.wait_admitted(waiting)
    assert len(tokens(waiting.stream)[0]) >= 1


def test_prompts_over_the_context_are_refused(make_engine, base):
    engine = make_engine()
    with pytest.raises(InvalidInputError, match="context of 2048 tokens") as e:
        engine.submit([1] * 2000, None, SamplingParams(max_tokens=100))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidInputError, match="empty"):
        engine.submit([], None, SamplingParams(max_tokens=1))
    with pytest.raises(InvalidInputError, match="token ids"):
        engine.submit([10**9], None, SamplingParams(max_tokens=1))


def test_async_streams_and_metrics_hooks(make_engine):
    seen: dict[str, list] = {"first": [], "gap": [], "finish": []}
    engine = make_engine(on_first_token=seen["first"].append, on_token=seen["gap"].append,
                         on_finish=lambda usage, reason: seen["finish"].append((usage, reason)))
    adapter = engine.acquire(engine.resolve("acme", "chat"))

    async def run() -> list[str]:
        async def one(seed: int) -> str:
            stream = await engine.submit_async(chat(engine), adapter, SamplingParams(max_tokens=6, seed=seed))
            return "".join([d.text async for d in stream])
        return await asyncio.gather(*(one(s) for s in range(4)))

    texts = asyncio.run(run())
    assert len(texts) == 4 and all(isinstance(t, str) for t in texts)
    assert len(seen["first"]) == 4 and len(seen["gap"]) == 4 * 5 and all(x >= 0 for x in seen["gap"])
    assert [(u.completion_tokens, r) for u, r in seen["finish"]] == [(6, "length")] * 4
    assert engine.stats()["tokens_generated"] == 24


def test_two_tenants_adapters_are_isolated_and_tasks_checked(make_engine, catalog, base):
    engine = make_engine()
    with pytest.raises(AdapterNotFoundError):
        engine.resolve("acme", "nope")
    with pytest.raises(AdapterNotFoundError):  # globex has a "chat"; acme's is its own
        engine.resolve("globex", "pirate")
    a = engine.acquire(engine.resolve("acme", "chat"))
    g = engine.acquire(engine.resolve("globex", "chat"))
    assert a.key.tenant == "acme" and g.key.tenant == "globex" and a.key.sha256 != g.key.sha256
    params = SamplingParams(max_tokens=10, temperature=0)
    outs = [tokens(engine.submit(chat(engine), x, params))[0] for x in (a, g, None)]
    assert outs[0] != outs[1] and outs[0] != outs[2] and outs[1] != outs[2]
    text = tiny_base(0)
    catalog.publish("acme", "sentiment", random_artifact(text.spec), promote=True, spec=text.spec)
    with pytest.raises(TaskMismatchError, match="text-classification adapter.*serves text-generation"):
        engine.acquire(engine.resolve("acme", "sentiment"))
    # forget drops a deleted adapter's resident copy
    engine.forget("acme", "chat")
    assert engine.resident("acme", "chat") is None


def test_chat_messages_are_checked_naming_the_field(make_engine):
    engine = make_engine()
    ids = engine.encode_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert engine.decode(ids).count("be brief") == 1
    bad = [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": "  "}], "messages[1].content"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        ([{"role": "user", "content": "bad \ud800 text"}], "messages[0].content"),
        (["not an object"], "messages[0]"),
    ]
    for messages, param in bad:
        with pytest.raises(InvalidInputError) as e:
            engine.encode_chat(messages)
        assert e.value.param == param
    with pytest.raises(InvalidInputError) as e:
        engine.encode_prompt("")
    assert e.value.param == "prompt"
    assert engine.encode_prompt("Once upon a time") == engine.base.tokenizer("Once upon a time")["input_ids"]


def test_a_non_finite_adapter_fails_its_own_stream_only(make_engine):
    engine = make_engine()
    good = engine.acquire(engine.resolve("acme", "chat"))
    huge = {p: (a * 1e20, b * 1e20) for p, (a, b) in good.lora.items()}
    from dataclasses import replace

    from adapters.runtime.loaded import VersionKey
    broken = replace(good, key=VersionKey("acme", "broken", 1, "0" * 64), lora=huge)
    params = SamplingParams(max_tokens=6, temperature=0)
    bad = engine.submit(chat(engine), broken, params)
    fine = engine.submit(chat(engine), good, params)
    from adapters.errors import AdapterOutputError
    with pytest.raises(AdapterOutputError):
        list(bad)
    assert len(tokens(fine)[0]) == 6


def test_the_scheduler_thread_serves_concurrent_submitters(make_engine):
    engine = make_engine(max_batch_size=4)
    adapter = engine.acquire(engine.resolve("acme", "chat"))
    results: list[int] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        stream = engine.submit(chat(engine, f"question {i}"), adapter if i % 2 else None,
                               SamplingParams(max_tokens=5, seed=i))
        n = len(tokens(stream)[0])
        with lock:
            results.append(n)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]  # more than max_batch_size
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [5] * 10
    assert engine.stats()["active_sequences"] == 0


def test_adapters_are_copied_into_their_rows_once_per_join_not_per_step(make_engine):
    engine = make_engine(max_batch_size=4)
    engine.scheduler.eos = frozenset()  # every request runs its max_tokens: many steps of a stable batch
    acme = engine.acquire(engine.resolve("acme", "chat"))
    pirate = engine.acquire(engine.resolve("acme", "pirate"))
    params = SamplingParams(max_tokens=12, temperature=0)
    before, steps = engine.loras.rows_written, engine.stats()["steps"]
    streams = [engine.submit(chat(engine, f"question {i}"), (acme, pirate, None)[i % 3], params) for i in range(6)]
    assert [len(tokens(s)[0]) for s in streams] == [12] * 6
    # a join copies its row, a leave at most the last row into its hole; a step copies nothing
    assert engine.loras.rows_written - before <= 2 * 6
    assert engine.stats()["steps"] - steps >= 11 * 6 // 4


def test_an_emptied_batch_keeps_its_buffers_for_the_next_then_hands_them_back_when_idle(make_engine):
    """A batch that refills soon reuses the KV and LoRA row buffers (no reallocation, no re-lay);
    an engine idle for ``idle_release_s`` holds neither."""
    engine = make_engine(max_batch_size=4, idle_release_s=600)
    acme = engine.acquire(engine.resolve("acme", "chat"))
    params = SamplingParams(max_tokens=4, temperature=0)
    assert len(tokens(engine.submit(chat(engine), acme, params))[0]) == 4
    kv, rows = engine.scheduler.kv, engine.loras
    held, reallocs, relayouts, cap = kv.nbytes, kv.reallocations, rows.relayouts, rows.rows_cap
    assert held > 0 and rows.nbytes > 0  # the batch emptied: its buffers stay
    again = tokens(engine.submit(chat(engine), acme, params))
    assert len(again[0]) == 4
    assert (kv.reallocations, rows.relayouts, rows.rows_cap) == (reallocs, relayouts, cap)

    quick = make_engine(max_batch_size=4, idle_release_s=0.05)
    first = tokens(quick.submit(chat(quick), acme, params))
    assert first == again  # same greedy tokens on either engine
    assert quick.scheduler.wait_released(timeout=30)
    assert quick.stats()["kv_cache_bytes"] == 0 and quick.loras.nbytes == 0 and len(quick.loras) == 0
    # its thread has gone too (no OpenMP pool kept alive beside the process's other torch threads)
    assert not quick.scheduler.running
    assert not any(t.name == "tailor-generation" and t.is_alive() for t in threading.enumerate()
                   if t is not engine.scheduler._thread)
    assert tokens(quick.submit(chat(quick), acme, params)) == first  # and it starts afresh
    assert engine.scheduler.running  # the other engine, within its idle_release_s, keeps its thread


def test_a_deleted_or_replaced_adapters_row_image_does_not_outlive_it(make_engine, catalog, base):
    engine = make_engine(max_batch_size=4)
    chat_a = engine.acquire(engine.resolve("acme", "chat"))
    pirate = engine.acquire(engine.resolve("acme", "pirate"))
    other = engine.acquire(engine.resolve("globex", "chat"))
    params = SamplingParams(max_tokens=2, temperature=0)
    for s in [engine.submit(chat(engine), a, params) for a in (chat_a, pirate, other)]:
        tokens(s)
    assert set(engine.loras.image_keys()) == {chat_a.key, pirate.key, other.key}
    engine.forget("acme", "chat")  # deleted
    assert set(engine.loras.image_keys()) == {pirate.key, other.key}
    art = random_generation_artifact(base.spec, r=4, seed=99, std=0.2)  # a new version replaces it
    catalog.publish("acme", "pirate", art, promote=True, spec=base.spec)
    engine.refresh("acme", "pirate")
    assert engine.loras.image_keys() == [other.key]  # another tenant's stays
    newer = engine.acquire(engine.resolve("acme", "pirate"))
    assert newer.key != pirate.key
    tokens(engine.submit(chat(engine), newer, params))
    assert set(engine.loras.image_keys()) == {other.key, newer.key}
    engine.probe(random_generation_artifact(base.spec, r=2, seed=7, std=0.2))  # an import check's candidate
    assert set(engine.loras.image_keys()) == {other.key, newer.key}


def test_deltas_queued_before_cancel_are_not_shown():
    """The race the test above can meet: the scheduler queued a delta before cancel() arrived."""
    import asyncio

    from adapters.generation.stream import GenerationStream, TokenDelta

    for consume in ("sync", "async"):
        stream = GenerationStream(prompt_tokens=3)
        stream._emit(TokenDelta("a", [1]))
        stream._emit(TokenDelta("b", [2]))
        stream.cancel()
        if consume == "sync":
            seen = list(stream)
        else:
            async def drain() -> list[TokenDelta]:
                return [d async for d in stream]
            seen = asyncio.run(drain())
        assert seen == [] and stream.usage is None and stream.cancelled, consume


def test_steps_run_through_the_runner_on_the_compute_thread_and_give_the_same_tokens(make_engine):
    """With ``run_step`` (the service passes its ComputeThread, cores lent) every prefill and
    decode step runs there; the scheduler's own thread makes no OpenMP pool."""
    token_threads: set[str] = set()
    with ComputeThread(name="compute-for-generation") as compute:
        engine = make_engine(max_batch_size=4, run_step=compute.run,
                             on_token=lambda _s: token_threads.add(threading.current_thread().name))
        acme = engine.acquire(engine.resolve("acme", "chat"))
        params = SamplingParams(max_tokens=5, temperature=0)
        got = tokens(engine.submit(chat(engine), acme, params))
        engine.close()
    plain = make_engine(max_batch_size=4)
    assert tokens(plain.submit(chat(plain), plain.acquire(plain.resolve("acme", "chat")), params)) == got
    assert token_threads == {"compute-for-generation"} and len(got[0]) == 5
