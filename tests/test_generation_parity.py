"""Mixed-tenant generation equals each adapter alone through peft (issue 16 item 2).

One prefill and one decode step run rows of different adapters (different ranks and target
sets) and a base row together; every row's next-token logits equal peft's with that adapter
alone, within fp32 tolerance. And a greedy stream through the engine equals peft's own
``generate`` with the adapter. The real SmolLM2 is ``slow``: greedy output equals
``model.generate`` for a chat prompt."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import pytest
import torch

from adapters.catalog import Catalog
from adapters.generation.base import load_causal_base, tiny_causal_base
from adapters.generation.engine import SEPARATE, GenerationConfig, GenerationEngine
from adapters.generation.rows import RowLoras
from adapters.generation.sampling import SamplingParams
from adapters.generation.synthetic import random_generation_artifact
from adapters.peft_format import export_peft
from adapters.registry import Registry
from adapters.runtime.context import use_plan
from adapters.store import LocalStore
from tests import torch_threads

one_thread = torch_threads.one_thread  # autouse: one torch thread in this module

CACHE = Path(tempfile.gettempdir()) / "tailor-test" / "bases"

ADAPTERS = {  # name -> (rank, targets, seed): different ranks and target sets
    "qv4": (4, ("q_proj", "v_proj"), 1),
    "all8": (8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2),
    "mlp2": (2, ("gate_proj", "down_proj"), 3),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    base = tiny_causal_base(5, cache_dir=CACHE)
    pristine = copy.deepcopy(base.model)
    catalog = Catalog(Registry(f"sqlite:///{tmp}/registry.db"), LocalStore(tmp / "store"))
    catalog.registry.create_tenant("acme")
    arts = {}
    for name, (r, targets, seed) in ADAPTERS.items():
        arts[name] = random_generation_artifact(base.spec, r=r, targets=targets, seed=seed, std=0.2)
        catalog.publish("acme", name, arts[name], promote=True, spec=base.spec)
    engine = GenerationEngine(base, catalog, GenerationConfig(max_batch_size=8, device_slots=9))
    yield engine, pristine, arts, tmp
    engine.close()


def peft_model(pristine, arts, tmp, spec):
    import peft

    model = None
    for name, art in arts.items():
        folder = tmp / f"peft-{name}"
        folder.mkdir(exist_ok=True)
        for file, data in export_peft(art, spec).items():
            (folder / file).write_bytes(data)
        if model is None:
            model = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(folder), adapter_name=name)
        else:
            model.load_adapter(str(folder), adapter_name=name)
    model.eval()
    return model


def test_a_mixed_prefill_and_decode_step_equal_each_adapter_alone_through_peft(world):
    engine, pristine, arts, tmp = world
    rows = ["all8", None, "qv4", "mlp2", "all8"]  # a base row; one adapter on two rows
    loaded = {n: engine.acquire(engine.resolve("acme", n)) for n in ADAPTERS}
    prompts = [engine.encode_chat([{"role": "user", "content": text}]) for text in
               ("hello", "what is the time", "tell me a story about a cat", "hi", "one more, please")]
    t = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (t - len(p)) for p in prompts])
    dec = engine.decoder
    adapters = [None if n is None else loaded[n] for n in rows]
    # the same rows kept in place the scheduler's way: reached through joins and leaves
    kept = RowLoras(engine.base.spec.linear_shapes, engine.base.device, engine.base.dtype, 8, separate=SEPARATE)
    kept.append([loaded["qv4"], None, loaded["mlp2"]])
    kept.append([loaded["all8"]])
    kept.remove(0)  # the last row (all8) fills the hole: [all8, None, mlp2]
    kept.append([loaded["qv4"]])
    kept.remove(2)  # qv4 moves into row 2: [all8, None, qv4]
    kept.append([loaded["mlp2"], loaded["all8"]])
    assert kept.rows == adapters
    nxt = torch.tensor([7, 99, 1234, 42, 5])
    model = peft_model(pristine, arts, tmp, engine.base.spec)
    for plan in (engine.slots.plan(adapters), kept.plan(0, len(rows))):
        kv = dec.new_cache(1 << 26)
        kv.ensure(len(rows), t + 4, live=0)
        with use_plan(plan):
            first = dec.prefill(ids, [len(p) for p in prompts], kv, 0)
            second = dec.decode(nxt, torch.tensor([len(p) for p in prompts]), kv)
        worst = 0.0
        for i, name in enumerate(rows):
            seq = torch.tensor([prompts[i] + [int(nxt[i])]])
            with torch.inference_mode():
                if name is None:
                    with model.disable_adapter():
                        ref = model(input_ids=seq).logits[0]
                else:
                    model.set_adapter(name)
                    ref = model(input_ids=seq).logits[0]
            worst = max(worst, (first[i] - ref[-2]).abs().max().item(), (second[i] - ref[-1]).abs().max().item())
        assert worst < 1e-4, worst
    # the adapters really change the logits: parity is not the base model everywhere
    with torch.inference_mode(), model.disable_adapter():
        base_logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    assert (first[0] - base_logits).abs().max() > 1e-2


def test_a_greedy_stream_equals_peft_generate_with_that_adapter(world):
    engine, pristine, arts, tmp = world
    model = peft_model(pristine, {"qv4": arts["qv4"]}, tmp, engine.base.spec)
    prompt = engine.encode_chat([{"role": "user", "content": "say something"}])
    loaded = engine.acquire(engine.resolve("acme", "qv4"))
    params = SamplingParams(max_tokens=12, temperature=0)
    streams = [engine.submit(prompt, loaded, params), engine.submit(prompt, None, params)]  # batched together
    ours = [[t for d in s for t in d.token_ids] for s in streams]
    with torch.inference_mode():
        ref = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        with model.disable_adapter():
            ref_base = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    eos = engine.base.eos_token_ids
    for got, want in ((ours[0], ref), (ours[1], ref_base)):
        cut = next((i + 1 for i, t in enumerate(want) if t in eos), len(want))  # we stop at end-of-sequence
        assert got == want[:cut]
    assert ours[0] != ours[1]


@pytest.mark.slow
def test_smollm2_greedy_output_equals_plain_generate(tmp_path):
    base = load_causal_base(None, device="cpu", cache_dir=CACHE)
    reference = copy.deepcopy(base.model)
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    engine = GenerationEngine(base, catalog, GenerationConfig(max_batch_size=4, device_slots=5))
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
        stream = engine.submit(prompt, None, SamplingParams(max_tokens=16, temperature=0))
        text = stream.text()
        with torch.inference_mode():
            out = reference.generate(input_ids=torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
        want = base.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True)
        assert text == want and "Paris" in text
        assert stream.usage is not None and stream.usage.prompt_tokens == len(prompt)
    finally:
        engine.close()
