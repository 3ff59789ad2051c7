"""Generation throughput and latency: mixed-tenant continuous batching vs base-only vs peft static batches.

``python -m bench.generate [--quick] --out FILE`` (JSON + PNG next to it). For each concurrency C
(1, 8, 32), C closed-loop clients each send ``--requests`` chat requests back to back, every
request generating exactly ``--max-tokens`` tokens (end-of-sequence ignored, greedy, so every
method does the same work), in three ways, interleaved round by round so machine noise hits all
alike:

* ``mixed``: ``GenerationEngine`` (continuous batching), each client a different tenant's random
  LoRA adapter (r=8 on every decoder linear by default);
* ``base``: the same engine, every request on the base model;
* ``peft``: peft's own mixed-adapter generation, ``generate(adapter_names=[...])`` over static
  batches of the C clients' requests (left-padded), one batch after another.

Reported per C and method: output tokens/s (all tokens / wall time, median over rounds), time to
first token and inter-token latency p50/p99 (engine: its ``on_first_token`` / ``on_token``
hooks; peft: a logits processor stamping each step, so a static batch is credited with streaming
it does not do), and the per-round ratios mixed/base and mixed/peft (targets: >= 0.9 at 8 and 32
streams; >= 2 vs peft at 32), and for the engine runs where its scheduler thread's time went
(``scheduler_seconds``: KV growth, LoRA row copies, prefill and decode forwards, sampling,
and how many prefills and decode steps ran, and the process's minor page faults), and, apart from
the loop (``step_costs``), one decode step and one prefill of C rows mixed vs base (on a fresh
thread, as the scheduler runs them, with page faults per step), the LoRA bytes a decode step
reads, the time to read those bytes once (``lora_read_floor_ms``: a floor on what the rows add
to a step, so ``decode_step_ratio_ceiling`` = base / (base + floor) bounds the step ratio), row
joins and leaves. Loading, peft's runs and ``step_costs`` each run on a thread that
exits afterwards (``adapters.runtime.torch_threads``): an OpenMP pool left alive on the main
thread would slow every op of the scheduler's thread, which is not how the service runs it.
Every engine run starts from an idle engine that has handed its KV and LoRA row buffers back (the
scheduler keeps them ``idle_release_s`` after a batch empties), so neither method inherits the
other's warm buffers. ``--base tiny`` runs the whole thing on the tiny random Llama (tests).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
import resource
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from adapters.catalog import Catalog
from adapters.generation.base import CausalBase, load_causal_base, tiny_causal_base
from adapters.generation.engine import GenerationConfig, GenerationEngine
from adapters.generation.sampling import SamplingParams
from adapters.generation.synthetic import ALL_TARGETS, random_generation_artifact
from adapters.peft_format import export_peft
from adapters.registry import Registry
from adapters.runtime.torch_threads import on_fresh_thread
from adapters.store import LocalStore
from bench.common import machine, median, parser, percentile, plot_lines, write

QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.", "How do plants make food?",
             "Name three prime numbers.", "Why is the sky blue?", "Give me a tip for learning to cook.",
             "What does a compiler do?", "Describe a cat in one sentence.")


def prompts(engine: GenerationEngine, n: int) -> list[list[int]]:
    return [engine.encode_chat([{"role": "user", "content": f"{QUESTIONS[i % len(QUESTIONS)]} (#{i})"}])
            for i in range(n)]


def run_engine(engine: GenerationEngine, adapters: list[Any], prompt_ids: list[list[int]], requests: int,
               max_tokens: int, lat: dict[str, list[float]], phases: dict[str, float] | None = None
               ) -> tuple[int, float]:
    """C closed-loop clients (one per adapter entry); returns (tokens, seconds). ``phases`` adds up
    the scheduler's ``PhaseSeconds`` over the run."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    counts = [0] * len(adapters)
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            for _ in range(requests):
                stream = engine.submit(prompt_ids[i], adapters[i], params)
                for delta in stream:
                    counts[i] += len(delta.token_ids)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    engine_hooks(engine, lat)
    # every run starts from an idle engine that has handed its KV and LoRA row buffers back
    # (idle_release_s), whatever ran before it: base-only runs must not inherit a mixed run's
    # warm buffers (or the other way round)
    if not engine.scheduler.wait_released(timeout=120):
        raise RuntimeError("the engine did not release its buffers")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(adapters))]
    before = asdict(engine.scheduler.seconds)
    steps = engine.scheduler.steps
    faults = _minor_faults()
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if phases is not None:
        for k, v in asdict(engine.scheduler.seconds).items():
            phases[k] = phases.get(k, 0) + v - before[k]
        phases["decode_steps"] = phases.get("decode_steps", 0) + engine.scheduler.steps - steps
        phases["minor_page_faults"] = phases.get("minor_page_faults", 0) + _minor_faults() - faults
    if errors:
        raise errors[0]
    return sum(counts), seconds


def _minor_faults() -> int:
    """The whole process's minor page faults so far (first touches of fresh pages; Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def engine_hooks(engine: GenerationEngine, lat: dict[str, list[float]]) -> None:
    hooks = engine.scheduler.hooks
    hooks.on_first_token = lat["ttft"].append
    hooks.on_token = lat["itl"].append


class _Stamp:
    """A logits processor that records when each generation step's logits are ready."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def run_peft(model: Any, tokenizer: Any, names: list[str], prompt_ids: list[list[int]], requests: int,
             max_tokens: int, lat: dict[str, list[float]]) -> tuple[int, float]:
    from transformers import LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    tokens, t0 = 0, time.perf_counter()
    for _ in range(requests):
        stamp = _Stamp()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad,
                                 logits_processor=LogitsProcessorList([stamp]))
        tokens += (out.shape[1] - width) * len(names)
        if stamp.times:
            lat["ttft"].extend([stamp.times[0] - start] * len(names))
            gaps = [b - a for a, b in zip(stamp.times, stamp.times[1:])]
            lat["itl"].extend(g for g in gaps for _ in names)
    return tokens, time.perf_counter() - t0


def step_costs(engine: GenerationEngine, loaded: list[Any], prompt_ids: list[list[int]], rounds: int
               ) -> dict[str, Any]:
    """What one decode step and the batch's bookkeeping cost, measured apart from the closed loop:
    a decode step of C rows with C distinct adapters (the per-row LoRA kept in place, as the
    scheduler runs it) vs the same rows on the base (interleaved); a row joining (its adapter
    copied into the row buffer) and leaving (the last row moved into its hole); gathering all C
    adapters from scratch (what a re-plan cost before the rows were kept in place); retiring a
    row's KV and growing the KV buffers; and a prefill of the C prompts with their adapters vs
    on the base (interleaved). The scheduler is idle meanwhile. Run it on a fresh thread
    (``on_fresh_thread``), as the scheduler's own thread runs steps, with no other OpenMP pool alive."""
    from adapters.generation.engine import SEPARATE
    from adapters.generation.rows import RowLoras
    from adapters.runtime.context import use_plan
    from bench.common import interleaved

    c = len(loaded)
    dec = engine.decoder
    kv = dec.new_cache(2 << 30)
    width = max(map(len, prompt_ids)) + 64
    kv.ensure(c, width, live=0)
    t = max(map(len, prompt_ids))
    ids = torch.tensor([p + [0] * (t - len(p)) for p in prompt_ids])
    dec.prefill(ids, [len(p) for p in prompt_ids], kv, 0)
    positions = torch.tensor([len(p) for p in prompt_ids])
    nxt = torch.full((c,), 42)
    spec = engine.base.spec
    rows = RowLoras(spec.linear_shapes, engine.base.device, engine.base.dtype, c, separate=SEPARATE)
    rows.append(loaded)
    plan = rows.plan(0, c)

    def mixed() -> None:
        with use_plan(plan):
            dec.decode(nxt, positions, kv)

    def base() -> None:
        dec.decode(nxt, positions, kv)

    f0 = _minor_faults()
    times = interleaved({"mixed": mixed, "base": base}, rounds=max(3, rounds * 3))
    faults = (_minor_faults() - f0) / (2 * (max(3, rounds * 3) + 1))

    def prefill(plan_: Any) -> Callable[[], None]:
        def run() -> None:
            if plan_ is None:
                dec.prefill(ids, [len(p) for p in prompt_ids], kv, 0)
            else:
                with use_plan(plan_):
                    dec.prefill(ids, [len(p) for p in prompt_ids], kv, 0)
        return run

    pre = interleaved({"mixed": prefill(plan), "base": prefill(None)}, rounds=max(3, rounds * 2))
    plan_t = interleaved({"plan": lambda: engine.slots.plan(loaded)}, rounds=3)["plan"]
    join_t, leave_t = [], []
    for _ in range(3):  # a row in the middle leaves (the last moves in), then its adapter rejoins
        t0 = time.perf_counter()
        rows.remove(0)
        t1 = time.perf_counter()
        rows.append([loaded[0]])
        join_t.append(time.perf_counter() - t1)
        leave_t.append(t1 - t0)
    move_t = interleaved({"move": lambda: kv.move_row(c - 1, 0, int(positions[-1]))}, rounds=3)["move"]
    grow_t = []
    for _ in range(2):
        k2 = dec.new_cache(2 << 30)
        k2.ensure(c, width, live=0)
        t0 = time.perf_counter()
        k2.ensure(c, 2 * width, live=c)
        grow_t.append(time.perf_counter() - t0)
    step_mixed, step_base = median(times["mixed"]), median(times["base"])
    pre_mixed, pre_base = median(pre["mixed"]), median(pre["base"])
    live = rows.live
    assert live is not None and live.shape[0] == c
    read = median(interleaved({"read": lambda: live.sum()}, rounds=max(3, rounds * 3))["read"])
    return {"rows": c, "decode_step_ms": {"mixed": 1e3 * step_mixed, "base": 1e3 * step_base},
            "decode_step_ratio_base_over_mixed": step_base / step_mixed,
            "minor_page_faults_per_decode_step": faults,
            "lora_bytes_per_decode_step": live.numel() * live.element_size(),
            # reading those bytes once (a sum over them, same thread and cores) is a floor on what the
            # LoRA rows add to a step, so base / (base + floor) bounds the step ratio from above
            "lora_read_floor_ms": 1e3 * read, "lora_read_gib_per_s": live.numel() * live.element_size() / read / 2**30,
            "decode_step_ratio_ceiling": step_base / (step_base + read),
            "prefill_ms": {"mixed": 1e3 * pre_mixed, "base": 1e3 * pre_base, "prompt_tokens": int(ids.numel())},
            "prefill_ratio_base_over_mixed": pre_base / pre_mixed,
            "row_join_ms": 1e3 * median(join_t), "row_leave_ms": 1e3 * median(leave_t),
            "gather_from_scratch_ms": 1e3 * median(plan_t), "retire_row_copy_ms": 1e3 * median(move_t),
            "kv_grow_copy_ms": 1e3 * median(grow_t), "kv_row_width": width}


def build(base_setting: str, n_adapters: int, rank: int, targets: tuple[str, ...], max_batch: int,
          workdir: Path, with_peft: bool = True) -> tuple[CausalBase, GenerationEngine, list[Any], Any]:
    base = tiny_causal_base(0) if base_setting == "tiny" else load_causal_base(None)
    pristine = copy.deepcopy(base.model)
    catalog = Catalog(Registry(f"sqlite:///{workdir}/registry.db"), LocalStore(workdir / "store"))
    import peft

    model = None
    for i in range(n_adapters):
        tenant = f"tenant{i}"
        catalog.registry.create_tenant(tenant)
        art = random_generation_artifact(base.spec, r=rank, targets=targets, seed=i, std=0.02)
        catalog.publish(tenant, "chat", art, promote=True, spec=base.spec)
        if not with_peft:
            continue
        folder = workdir / f"peft{i}"
        folder.mkdir()
        for name, data in export_peft(art, base.spec).items():
            (folder / name).write_bytes(data)
        if model is None:
            model = peft.PeftModel.from_pretrained(pristine, str(folder), adapter_name=f"a{i}")
        else:
            model.load_adapter(str(folder), adapter_name=f"a{i}")
    if model is not None:
        model.eval()
    config = GenerationConfig(max_batch_size=max_batch, device_slots=max_batch + 1, kv_budget_bytes=2 << 30,
                              admission_timeout_s=600, idle_release_s=0.5)  # run_engine waits for the release
    engine = GenerationEngine(base, catalog, config)
    engine.scheduler.eos = frozenset()  # every request generates exactly max_tokens: same work for all methods
    loaded = [engine.acquire(engine.resolve(f"tenant{i}", "chat")) for i in range(n_adapters)]
    return base, engine, loaded, model


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--base", choices=("smollm2", "tiny"), default="smollm2")
    p.add_argument("--concurrency", type=int, nargs="+", default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--requests", type=int, default=None, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=list(ALL_TARGETS))
    p.add_argument("--step-costs-only", action="store_true",
                   help="only the decode-step and bookkeeping costs (no closed loop, no peft)")
    args = p.parse_args()
    conc = args.concurrency or [1, 8, 32]
    max_tokens = args.max_tokens or (16 if args.quick else 64)
    requests = args.requests or (1 if args.quick else 2)
    rounds = args.rounds or (2 if args.quick else 3)
    if args.step_costs_only:
        with tempfile.TemporaryDirectory() as tmp:
            base, engine, loaded, _ = on_fresh_thread(build, args.base, max(conc), args.rank, tuple(args.targets),
                                                      max(conc), Path(tmp), with_peft=False)
            try:
                costs = {str(c): on_fresh_thread(step_costs, engine, loaded[:c], prompts(engine, c), rounds)
                         for c in conc if c > 1}
            finally:
                engine.close()
        write(args.out, {"benchmark": "generate --step-costs-only", "quick": args.quick, "base": base.name,
                         "rank": args.rank, "targets": list(args.targets), "adapter_bytes": loaded[0].nbytes,
                         "machine": machine(), "step_costs": costs})
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, engine, loaded, model = on_fresh_thread(build, args.base, max(conc), args.rank, tuple(args.targets),
                                                      max(conc), Path(tmp))
        try:
            results = bench(engine, loaded, model, base, conc, max_tokens, requests, rounds)
            costs = {str(c): on_fresh_thread(step_costs, engine, loaded[:c], prompts(engine, c), rounds)
                     for c in conc if c > 1}
        finally:
            engine.close()
    out = {
        "benchmark": "generate", "quick": args.quick, "base": base.name, "device": str(base.device),
        "dtype": str(base.dtype).replace("torch.", ""), "rank": args.rank, "targets": list(args.targets),
        "adapter_bytes": loaded[0].nbytes, "max_tokens": max_tokens, "requests_per_client": requests,
        "rounds": rounds, "machine": machine(), "results": results, "step_costs": costs,
        "targets_met": {
            "mixed_vs_base_ge_0.9_at_8_and_32": all(results[str(c)]["ratio_mixed_base"] >= 0.9 for c in conc if c >= 8),
            "mixed_vs_peft_ge_2_at_32": results[str(max(conc))]["ratio_mixed_peft"] >= 2.0,
        },
    }
    write(args.out, out)
    series = {m: {c: results[str(c)][m]["tokens_per_s"] for c in conc} for m in ("mixed", "base", "peft")}
    plot_lines(args.out.with_suffix(".png"), f"generation on {base.name} ({'quick' if args.quick else 'full'})",
               "concurrent streams", "output tokens/s", series, logx=True)


def bench(engine: GenerationEngine, loaded: list[Any], model: Any, base: CausalBase, conc: list[int],
          max_tokens: int, requests: int, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    all_prompts = prompts(engine, max(conc))
    # warm-up: one short request each way (first-call allocations, plan building)
    run_engine(engine, loaded[:2], all_prompts[:2], 1, 2, {"ttft": [], "itl": []})
    on_fresh_thread(run_peft, model, base.tokenizer, ["a0", "a1"], all_prompts[:2], 1, 2, {"ttft": [], "itl": []})
    for c in conc:
        lat = {m: {"ttft": [], "itl": []} for m in ("mixed", "base", "peft")}
        phases: dict[str, dict[str, float]] = {"mixed": {}, "base": {}}
        rates: dict[str, list[float]] = {m: [] for m in lat}
        for r in range(rounds):
            for m in ("mixed", "base", "peft"):
                ps = all_prompts[:c]
                if m == "mixed":
                    n, s = run_engine(engine, loaded[:c], ps, requests, max_tokens, lat[m], phases[m])
                elif m == "base":
                    n, s = run_engine(engine, [None] * c, ps, requests, max_tokens, lat[m], phases[m])
                else:
                    n, s = on_fresh_thread(run_peft, model, base.tokenizer, [f"a{i}" for i in range(c)], ps,
                                           requests, max_tokens, lat[m])
                rates[m].append(n / s)
                print(f"C={c} round {r} {m}: {n} tokens in {s:.2f} s = {n / s:.1f} tokens/s", flush=True)
        row: dict[str, Any] = {}
        for m in lat:
            row[m] = {"tokens_per_s": median(rates[m]), "rounds_tokens_per_s": rates[m],
                      "ttft_p50_s": percentile(lat[m]["ttft"], 0.5), "ttft_p99_s": percentile(lat[m]["ttft"], 0.99),
                      "itl_p50_s": percentile(lat[m]["itl"], 0.5), "itl_p99_s": percentile(lat[m]["itl"], 0.99)}
        for m, ph in phases.items():  # where the scheduler's time went, all rounds together
            row[m]["scheduler_seconds"] = ph
        row["ratios_mixed_base"] = [a / b for a, b in zip(rates["mixed"], rates["base"])]
        row["ratios_mixed_peft"] = [a / b for a, b in zip(rates["mixed"], rates["peft"])]
        row["ratio_mixed_base"] = median(row["ratios_mixed_base"])
        row["ratio_mixed_peft"] = median(row["ratios_mixed_peft"])
        results[str(c)] = row
    return results


if __name__ == "__main__":
    main()
