"""Training text-generation adapters (adapters.training.generation_task) on the tiny random Llama:
loss on assistant tokens only, validation loss and perplexity, determinism, checkpoints, the
head-less artifact, auto hyper-parameters, the gate on validation loss, and a job through the
real job system (JobManager on a real SQLite file, a real store) that changes the model's answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.artifact import AdapterArtifact
from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.errors import AdapterNotFoundError, DatasetError
from adapters.generation.base import CausalBase, tiny_causal_base
from adapters.generation.datasets import (
    COMPLETION, GenerationDataset, GenerationDatasetLimits, GenerationExample, encode, encode_prompt, from_records, split,
)
from adapters.jobs import generation_gate
from adapters.jobs.files import Files
from adapters.jobs.gate import task_gate
from adapters.jobs.manager import JobManager
from adapters.jobs.runner import WorkerContext, run_job
from adapters.jobs.task_bases import TaskBases
from adapters.jobs.trainers import trainer_for
from adapters.quotas import TenantQuotas
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.tasks import TEXT_GENERATION
from adapters.training import HyperparameterError, TrainCallbacks, TrainingYielded
from adapters.training.generation_hyperparams import (
    MAX_EPOCHS, MIN_STEPS, TARGET_STEPS, GenerationHyperparameters, total_steps,
)
from adapters.training.generation_task import _pad_id, example_stats, pad_batch, summarise, train_generation

WORDS = ["apple", "river", "cloud", "stone", "green", "tiger", "piano", "lemon", "candle", "rocket", "mirror",
         "forest", "shadow", "garden", "silver", "winter"]
ANSWER = "Understood."  # the trained format: every answer, whatever the question
FAST = {"epochs": 6, "learning_rate": 0.02, "batch_size": 4, "seed": 0}


def chats(words: list[str] = WORDS) -> list[dict[str, Any]]:
    return [{"messages": [{"role": "user", "content": f"Tell me about the {w}."},
                          {"role": "assistant", "content": ANSWER}]} for w in words]


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture(scope="module")
def base() -> CausalBase:
    return tiny_causal_base(0)


@pytest.fixture(scope="module")
def data() -> tuple[GenerationDataset, GenerationDataset]:
    return split(from_records(chats(), limits=GenerationDatasetLimits(min_examples=5)), fraction=0.25, seed=0)


@pytest.fixture(scope="module")
def trained(base: CausalBase, data: tuple[GenerationDataset, GenerationDataset]) -> Any:
    events: list[str] = []
    res = train_generation(base, *data, hp=GenerationHyperparameters(**FAST),
                           callbacks=TrainCallbacks(on_event=lambda level, msg: events.append(msg)))
    return res, events


def greedy(model: torch.nn.Module, base: CausalBase, example: Any, n: int = 4) -> str:
    ids = torch.tensor([encode_prompt(example, base.tokenizer)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=base.tokenizer.pad_token_id)
    return str(base.tokenizer.decode(out[0, ids.shape[1]:]))


# -- the trainer --------------------------------------------------------------------------------


def test_training_lowers_validation_loss_below_the_base_and_changes_the_answers(base: CausalBase, data: Any,
                                                                              trained: Any) -> None:
    res, events = trained
    m = res.metrics
    assert m["method"] == "lora" and m["labels"] == [] and (m["n_train"], m["n_validation"]) == (12, 4)
    assert m["val_loss"] < m["base_val_loss"] - 1.0 and m["val_perplexity"] == pytest.approx(
        float(torch.tensor(m["val_loss"]).exp()), rel=1e-5)
    assert m["val_tokens"] == 4 * 4  # "Under", "stood", ".", "<|im_end|>" per validation chat
    assert all("val perplexity" in e for e in events if e.startswith("epoch "))
    assert {"val_loss", "val_perplexity", "val_token_accuracy"} <= set(res.history[0])
    # greedy answers on a held-out question: the base rambles, the adapter answers in the trained format
    example = data[1].examples[0]
    assert greedy(res.model, base, example).startswith(ANSWER)
    assert not greedy(base.model, base, example).startswith(ANSWER[:5])


def test_the_loss_counts_only_assistant_tokens(base: CausalBase) -> None:
    ex = from_records(chats(WORDS[:1]), limits=GenerationDatasetLimits(min_examples=1)).examples[0]
    enc = encode(ex, base.tokenizer)
    batch = pad_batch([enc], base.tokenizer.pad_token_id)
    stats = example_stats(base.model, batch)
    logits = base.model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets = batch["input_ids"][0, 1:]
    keep = batch["loss_mask"][0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert int(stats[0, 1]) == int(keep.sum()) == 4
    assert float(stats[0, 0]) == pytest.approx(float(nll[keep].sum()), rel=1e-4)
    assert summarise(stats)["val_loss"] == pytest.approx(float(nll[keep].mean()), rel=1e-4)


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_padding_is_masked_and_every_turns_end_of_turn_is_learned(base: CausalBase, which: str) -> None:
    """The end of turn (``<|im_end|>``, the end of sequence both bases stop on) is a learned token
    of every assistant turn; padding never is. SmolLM2's own tokenizer pads with that very token
    (the real base's pad is its end of turn): the mask, not the id, tells them apart."""
    from transformers import AutoTokenizer

    from adapters.generation.base import tokenizer_cache

    tok = base.tokenizer if which == "tiny" else AutoTokenizer.from_pretrained(str(tokenizer_cache()),
                                                                               local_files_only=True)
    assert (tok.pad_token_id == tok.eos_token_id) == (which == "smollm2")
    two_turns = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                              {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]}
    rows = [encode(e, tok) for e in from_records([two_turns, chats(WORDS[:1])[0]],
                                                 limits=GenerationDatasetLimits(min_examples=1)).examples]
    batch = pad_batch(rows, _pad_id(tok))
    ids, mask, att = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    eos = tok.eos_token_id
    for i, row in enumerate(rows):
        learned = ids[i][mask[i]].tolist()
        assert learned.count(eos) == (2 if i == 0 else 1) and learned[-1] == eos  # each turn ends learned
        assert not mask[i][len(row):].any() and not att[i][len(row):].any()  # padding: masked, unattended
    assert len(rows[1]) < len(rows[0]) and bool((ids[1][len(rows[1]):] == _pad_id(tok)).all())
    assert (_pad_id(tok) == eos) == (which == "smollm2")


def test_the_artifact_is_head_less_and_checked_against_the_base(base: CausalBase, trained: Any) -> None:
    art: AdapterArtifact = trained[0].artifact
    assert art.manifest.task == TEXT_GENERATION and art.manifest.labels == () and art.manifest.head_in_features == 0
    assert set(art.weights.lora) == set(base.spec.linear_shapes)  # every decoder linear layer by default
    assert art.manifest.lora.r == 8 and art.manifest.metrics["val_loss"] == trained[0].metrics["val_loss"]
    blob, manifest, _ = art.encode()
    back = AdapterArtifact.decode(blob, manifest)
    back.check_base(base.spec)
    assert back.weights.headless and torch.equal(back.weights.lora[next(iter(art.weights.lora))][1],
                                                 art.weights.lora[next(iter(art.weights.lora))][1])


def test_runs_are_deterministic_and_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(
        base: CausalBase, data: Any, tmp_path: Path) -> None:
    """Two runs with one seed: one uninterrupted, one that yields mid-epoch and resumes from its
    checkpoint. Their adapters are bit-identical (CPU)."""
    hp = GenerationHyperparameters(**{**FAST, "epochs": 2, "lora_r": 2, "target_modules": ["q_proj", "down_proj"]})
    whole = train_generation(base, *data, hp=hp).artifact
    yielded: list[bool] = []

    def once(at_epoch_end: bool) -> bool:  # give the worker back once, mid-epoch
        if yielded or at_epoch_end:
            return False
        yielded.append(True)
        return True

    with pytest.raises(TrainingYielded):
        train_generation(base, *data, hp=hp, checkpoint_dir=tmp_path, callbacks=TrainCallbacks(should_yield=once))
    events: list[str] = []
    resumed = train_generation(base, *data, hp=hp, checkpoint_dir=tmp_path,
                               callbacks=TrainCallbacks(on_event=lambda level, msg: events.append(msg))).artifact
    assert any(e.startswith("resumed from the checkpoint") for e in events)
    assert set(resumed.weights.lora) == {p for p in base.spec.linear_shapes if p.endswith(("q_proj", "down_proj"))}
    for path, (a, b) in whole.weights.lora.items():
        assert torch.equal(a, resumed.weights.lora[path][0]) and torch.equal(b, resumed.weights.lora[path][1])
    assert whole.manifest.metrics["val_loss"] == resumed.manifest.metrics["val_loss"]


def test_an_example_over_max_length_is_refused_naming_its_line(base: CausalBase) -> None:
    rows = chats()[:5] + [{"messages": [{"role": "user", "content": "long " * 60},
                                        {"role": "assistant", "content": "ok"}]}]
    ds = from_records(rows, limits=GenerationDatasetLimits(min_examples=1))
    with pytest.raises(DatasetError) as caught:
        train_generation(base, ds, ds, hp=GenerationHyperparameters(**{**FAST, "max_length": 40}))
    assert caught.value.param == "row 6" and "tokens after the chat template; the limit is 40" in caught.value.message


@pytest.mark.parametrize(("examples", "n_train", "batch", "epochs", "steps", "lr"), [
    (50, 40, 4, 10, 100, 1e-3),
    (500, 450, 8, 5, 285, 1e-3),
    (5_000, 4_500, 16, 1, 282, 5e-4),
    (20_000, 18_000, 16, 1, 1_125, 2e-4),
])
def test_auto_hyperparameters_scale_from_50_to_20000_examples(examples: int, n_train: int, batch: int, epochs: int,
                                                              steps: int, lr: float) -> None:
    """The table of adapters.training.generation_hyperparams: a job's examples, held out as the
    job runner holds them out (a fifth under 500, a tenth from 500), then auto values."""
    ds = GenerationDataset(tuple(GenerationExample(prompt=f"q{i}", completion="a") for i in range(examples)),
                           COMPLETION)
    train, _ = split(ds, fraction=0.2 if examples < 500 else 0.1, seed=0)
    hp = GenerationHyperparameters().resolve(len(train))
    assert (len(train), hp.batch_size, hp.epochs, total_steps(len(train), hp), hp.learning_rate) == (
        n_train, batch, epochs, steps, lr)
    # the smallest sets still get MIN_STEPS updates; none runs past one pass once a pass holds TARGET_STEPS
    assert total_steps(len(train), hp) >= MIN_STEPS
    assert hp.epochs == 1 or total_steps(len(train), hp) <= 1.2 * TARGET_STEPS
    assert hp.epochs <= MAX_EPOCHS and hp.batch_size <= 16


def test_auto_hyperparameters_in_detail() -> None:
    auto = GenerationHyperparameters()
    h = auto.resolve(40)
    assert (h.lora_r, h.lora_alpha, h.patience, h.max_length) == (8, 16.0, 2, 2048)
    assert GenerationHyperparameters(batch_size=8).resolve(40).batch_size == 8  # asked for: kept
    assert auto.resolve(8).batch_size == 2  # 10 examples (the least a dataset holds): 4 steps an epoch
    assert h.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert auto.resolve(40, max_context=512).max_length == 512
    with pytest.raises(HyperparameterError, match="method 'lora' only"):
        auto.resolve(40, "head")
    for bad, param in [({"max_length": 4}, "max_length"), ({"lora_r": 0}, "lora_r"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(HyperparameterError) as caught:
            GenerationHyperparameters.from_dict(bad)
        assert caught.value.param == f"hyperparameters.{param}"
    with pytest.raises(HyperparameterError, match="exceeds the base model's 512 positions"):
        GenerationHyperparameters(max_length=1024).resolve(40, max_context=512)


def test_the_task_names_its_trainer_and_targets_are_checked(base: CausalBase) -> None:
    trainer = trainer_for(TEXT_GENERATION)
    hp = trainer.resolve(trainer.parse({"target_modules": ["q_proj"]}), range(100), "lora", base)
    assert hp.target_modules == ("q_proj",)
    with pytest.raises(HyperparameterError, match="'query' is not a decoder linear layer"):
        trainer.resolve(trainer.parse({"target_modules": ["query"]}), range(100), "lora", base)


# -- the gate -----------------------------------------------------------------------------------


def test_the_gate_decides_on_validation_loss() -> None:
    base_score = {"val_loss": 5.0}
    decide = generation_gate.decide
    first = decide("auto", {"val_loss": 2.0}, None, None, base_score)
    assert first.promote and first.reason.startswith("first version") and first.to_dict()["baseline"] == base_score
    worse_than_base = decide("auto", {"val_loss": 5.5}, None, None, base_score)
    assert not worse_than_base.promote and "no better than the base model's own 5.0000" in worse_than_base.reason
    assert not decide("auto", {"val_loss": 2.5}, {"val_loss": 2.0}, 3, base_score).promote
    assert "above prod v3's 2.0000" in decide("auto", {"val_loss": 2.5}, {"val_loss": 2.0}, 3, base_score).reason
    assert decide("auto", {"val_loss": 1.5}, {"val_loss": 2.0}, 3, base_score).promote
    assert decide("always", {"val_loss": 9.0}, None, None, base_score).promote
    assert not decide("never", {"val_loss": 1.0}, None, None, base_score).promote
    assert task_gate(TEXT_GENERATION) is generation_gate.judge and task_gate("text-classification") is None


def test_the_gate_scores_what_training_validated(base: CausalBase, data: Any, trained: Any) -> None:
    rows = [encode(e, base.tokenizer) for e in data[1].examples]
    res = trained[0]
    scored = generation_gate.score(base, res.artifact, rows)
    assert scored["val_loss"] == pytest.approx(res.metrics["val_loss"], rel=1e-4) and scored["n"] == 4
    assert generation_gate.score(base, None, rows)["val_loss"] == pytest.approx(res.metrics["base_val_loss"],
                                                                                rel=1e-4)


# -- through the job system ---------------------------------------------------------------------


class World:
    def __init__(self, tmp: Path, gen_base: CausalBase) -> None:
        self.registry = Registry(f"sqlite:///{tmp / 'tailor.db'}")
        self.registry.create_tenant("acme")
        self.store = LocalStore(tmp / "store")
        self.files = Files(self.registry.engine, self.store)
        self.jobs = JobManager(self.registry.engine, self.store)
        self.catalog = Catalog(self.registry, self.store)
        text = tiny_base(seed=1)
        self.ctx = WorkerContext(
            manager=self.jobs, catalog=self.catalog, trainer_base=text,
            engine=Engine(tiny_base(seed=1), self.catalog, EngineConfig(device_slots=65)), worker_id="w1",
            checkpoint_root=tmp / "ckpts", heartbeat_seconds=0.05,
            base_loaders={TEXT_GENERATION: lambda: TaskBases(trainer_base=gen_base, engine=None)},  # type: ignore[arg-type]
        )

    def submit(self, rows: list[dict[str, Any]], hp: dict[str, Any], **kw: Any) -> Any:
        rec = self.files.upload("acme", "chats.jsonl", jsonl(rows), limits=TenantQuotas().dataset_limits(),
                                task=TEXT_GENERATION)
        _, ds = self.files.load("acme", rec.id)
        return self.jobs.submit("acme", "assistant", training=ds, training_file=rec.id, hyperparameters=hp, **kw)


def test_a_generation_job_trains_gates_and_publishes_an_adapter_that_answers_in_format(
        base: CausalBase, tmp_path: Path) -> None:
    world = World(tmp_path, base)
    submitted = world.submit(chats(), FAST)
    assert submitted.task == TEXT_GENERATION and submitted.dataset["labels"] == []
    job = world.jobs.claim("w1")
    assert job is not None and job.id == submitted.id
    assert run_job(job, world.ctx) == "succeeded"
    done = world.jobs.get("acme", job.id)
    assert done.version == 1 and done.result["promoted"], done.result
    gate = done.result["gate"]
    assert gate["reason"].startswith("first version") and gate["candidate"]["n"] == done.dataset["validation_examples"]
    assert gate["candidate"]["val_loss"] < gate["baseline"]["val_loss"]
    assert done.metrics["val_loss"] == pytest.approx(gate["candidate"]["val_loss"], rel=1e-4)
    assert done.resolved_hyperparameters["target_modules"][0] == "q_proj"
    epochs = [e.data for e in world.jobs.events("acme", job.id) if e.type == "metrics" and "val_loss" in (e.data or {})]
    assert len(epochs) == done.metrics["epochs_run"] and all("val_perplexity" in d for d in epochs)
    [version] = world.registry.list_versions("acme", "assistant")
    assert version.manifest["task"] == TEXT_GENERATION and version.manifest["job_id"] == job.id
    art = world.catalog.read(world.registry.resolve("acme", "assistant", "prod"), base.spec)
    served = generation_gate.merged(base.model, art)
    question = from_records(chats(["lantern"]), limits=GenerationDatasetLimits(min_examples=1)).examples[0]
    assert greedy(served, base, question).startswith(ANSWER)  # a question it never saw
    assert not greedy(base.model, base, question).startswith(ANSWER[:5])
    # and as served: the generation engine (its own copy of the base) with the tenant's prod adapter
    from adapters.generation.engine import GenerationEngine
    from adapters.generation.sampling import SamplingParams

    engine = GenerationEngine(tiny_causal_base(0), world.catalog)
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "Tell me about the lantern."}])
        assert prompt == encode_prompt(question, base.tokenizer)  # training prompted exactly as serving does
        params = SamplingParams(max_tokens=12, temperature=0)
        adapter = engine.acquire(engine.resolve("acme", "assistant"))
        # the adapter answers and then stops on its own (it learned the end of turn); the base runs on
        trained = engine.submit(prompt, adapter, params)
        assert (trained.text(), trained.finish_reason, trained.usage.completion_tokens) == (ANSWER, "stop", 4)
        untrained = engine.submit(prompt, None, params)
        assert not untrained.text().startswith(ANSWER[:5]) and untrained.finish_reason == "length"
    finally:
        engine.close()

    # a second job of one epoch learns less: better than the base, worse than prod -> kept as a candidate
    again = world.submit(chats(), {**FAST, "epochs": 1})
    job2 = world.jobs.claim("w1")
    assert job2 is not None and job2.id == again.id and run_job(job2, world.ctx) == "succeeded"
    kept = world.jobs.get("acme", job2.id)
    assert kept.version == 2 and not kept.result["promoted"], kept.result
    second = kept.result["gate"]["candidate"]["val_loss"]
    assert gate["candidate"]["val_loss"] + 0.2 < second < gate["baseline"]["val_loss"] - 0.2
    assert f"is above prod v1's {gate['candidate']['val_loss']:.4f} on the same data" in kept.result["gate"]["reason"]
    assert kept.result["gate"]["prod_version"] == 1 and world.registry.resolve("acme", "assistant", "prod").version == 1


def test_a_cancelled_generation_job_registers_nothing(base: CausalBase, tmp_path: Path) -> None:
    world = World(tmp_path, base)
    submitted = world.submit(chats(), {**FAST, "epochs": 100, "batch_size": 1})
    job = world.jobs.claim("w1")
    assert job is not None
    world.jobs.cancel("acme", submitted.id)  # flagged while validating: the heartbeat tells the trainer
    assert run_job(job, world.ctx) == "cancelled"
    assert world.jobs.get("acme", job.id).status == "cancelled"
    with pytest.raises(AdapterNotFoundError):
        world.registry.list_versions("acme", "assistant")  # nothing was registered
    assert not (tmp_path / "ckpts" / job.id).exists()


def test_a_worker_process_trains_generation_jobs(tmp_path: Path) -> None:
    """``python -m adapters.jobs.worker --tasks text-generation --generation-base-model tiny:0``:
    its first (and only) base is the causal LM, there is no gate engine, and the job runs to its
    end with the generation trainer and gate."""
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'tailor.db'}"
    Registry(url).create_tenant("acme")
    jm = JobManager(Registry(url).engine, LocalStore(tmp_path / "store"))
    ds = from_records(chats(), limits=GenerationDatasetLimits(min_examples=5))
    job = jm.submit("acme", "assistant", training=ds, hyperparameters={**FAST, "epochs": 2})
    done = subprocess.run(
        [sys.executable, "-m", "adapters.jobs.worker", "--database-url", url, "--store-url", str(tmp_path / "store"),
         "--checkpoints", str(tmp_path / "ckpt"), "--tasks", "text-generation", "--generation-base-model", "tiny:0",
         "--once", "--threads", "1", "--nice", "0"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = jm.get("acme", job.id)
    assert got.status == "succeeded" and got.error is None, got.error
    assert got.result["promoted"] and got.result["gate"]["baseline"]["val_loss"] > got.metrics["val_loss"]
    assert "loading the generation base (tiny:0)" in done.stderr and "MiniLM" not in done.stderr


def test_parsing_generation_settings_does_not_import_the_generation_trainer() -> None:
    """``JobManager.submit`` parses a job's settings: that must not load the training code."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from adapters.jobs.trainers import trainer_for\n"
            "trainer_for('text-generation').parse({'epochs': 2, 'max_length': 1024})\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('adapters.training.generation_task', 'peft')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
