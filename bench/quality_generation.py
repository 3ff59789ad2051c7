"""The text-generation half of ``bench.quality``: ``--dataset chatterbot-topics`` on SmolLM2-135M-Instruct.

    python -m bench.quality --dataset chatterbot-topics [--quick] [--seeds N] --out bench/results/quality-generation.json

A task the base cannot do and a small adapter learns: answer a question in a fixed format that
starts with its topic in brackets, ``[topic] answer``. The data is chatterbot-corpus 1.3.3's
English YAML question/answer pairs (BSD-3, shipped in the PyPI wheel, read offline), each
file a topic; ``TOPICS`` are the seven with at least 40 pairs. Questions are split, per topic
and seeded, into training and test questions (every answer of a question goes to the same
side, so no test question was seen in training; at most ``MAX_ANSWERS`` answers per question);
a fifth of the training questions validate
(early stopping and the gate's figure), never the test set. Each example is a chat: the user's
question, the assistant's ``[topic] answer``, in the base's own chat template.

Scored on the held-out test questions, for the base alone, the base *told* the format and the
topics in a system message (``base_prompted``: what a tenant without an adapter could do) and
the LoRA adapter (auto hyper-parameters, ``adapters.training.generation_task``; ``--quick``:
``QUICK_EPOCHS`` epochs and fewer questions, said in ``quick_note``), over ``--seeds`` seeds:

* ``format_rate``: greedy answers that start with ``[one of the topics]``;
* ``topic_accuracy``: greedy answers whose bracketed topic is the question's (the exact-match
  metric: the format and the right label);
* ``test_loss`` / ``test_perplexity``: the teacher-forced cross-entropy of the reference
  answers (assistant tokens only, ``adapters.jobs.generation_gate.score``), lower is better.

Greedy decoding runs on the adapter merged into an fp32 copy of the base (the function the
engine serves), ``GEN_TOKENS`` new tokens, batched with left padding. The JSON has the machine
(its load average says how busy the shared machine was), sizes, per-method figures, ratios and
the training curves; the PNG plots validation loss per epoch and the three test figures.
"""

from __future__ import annotations

import importlib.util
import math
import random
import re
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from adapters.generation.base import CausalBase, load_causal_base
from adapters.generation.datasets import (
    GenerationDatasetLimits, GenerationExample, Message, encode, encode_prompt, from_records,
)
from adapters.jobs.generation_gate import merged, score
from adapters.training import TrainCallbacks
from adapters.training.generation_hyperparams import GenerationHyperparameters
from adapters.training.generation_task import train_generation
from bench.common import machine, save_figure, write

DATASET = "chatterbot-topics"
TOPICS = ("ai", "coding", "emotion", "literature", "psychology", "tech_support", "trivia")
SIZES = (60, 12)  # questions per topic: (train incl. validation, test)
QUICK_SIZES = (20, 6)
QUICK_EPOCHS = 3
VALIDATION_SHARE = 5  # one training question in this many validates
MAX_ANSWERS = 2  # answers kept per question (a few questions have dozens)
GEN_TOKENS = 8  # enough for "[tech_support]" (5 tokens) and a word after it
GEN_BATCH = 16
METHODS = ("base", "base_prompted", "lora")
_TAG = re.compile(r"\s*\[([a-z_]+)\]")


def pairs() -> dict[str, list[tuple[str, str]]]:
    """chatterbot-corpus' English (question, answer) pairs by topic (its YAML files, read offline)."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("needs chatterbot-corpus==1.3.3 (pip install --no-deps chatterbot-corpus==1.3.3)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    out: dict[str, list[tuple[str, str]]] = {}
    for topic in TOPICS:
        doc = yaml.safe_load((folder / f"{topic}.yml").read_text(encoding="utf-8"))
        rows = []
        for conv in doc["conversations"]:
            if len(conv) >= 2 and all(isinstance(t, str) and t.strip() for t in conv[:2]):
                rows.append((conv[0].strip(), conv[1].strip()))
        out[topic] = rows
    return out


def split(per_topic: dict[str, list[tuple[str, str]]], n_train: int, n_test: int,
          seed: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[tuple[str, str, str]]]:
    """(training chats, validation chats, test (topic, question, answer)): questions drawn per topic."""
    train, val, test = [], [], []
    for topic, rows in per_topic.items():
        by_q: dict[str, list[str]] = defaultdict(list)
        for q, a in rows:
            by_q[q].append(a)
        questions = sorted(by_q)
        random.Random(f"{seed}\x00{topic}").shuffle(questions)
        test_q, train_q = questions[:n_test], questions[n_test : n_test + n_train]
        for i, q in enumerate(train_q):
            for a in by_q[q][:MAX_ANSWERS]:
                (val if i % VALIDATION_SHARE == 0 else train).append(chat(q, f"[{topic}] {a}"))
        test += [(topic, q, by_q[q][0]) for q in test_q]
    return train, val, test


def chat(question: str, answer: str, system: str | None = None) -> dict[str, Any]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": msgs}


def instruction() -> str:
    return ("Answer the question. Always begin your reply with its topic in square brackets, one of "
            + ", ".join(f"[{t}]" for t in TOPICS) + ", then the answer. Example: [trivia] Paris.")


@torch.inference_mode()
def greedy(model: torch.nn.Module, base: CausalBase, prompts: list[list[int]]) -> list[str]:
    """Greedy continuations of token prompts, batched with left padding."""
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    outs: list[str] = []
    for i in range(0, len(prompts), GEN_BATCH):
        chunk = prompts[i : i + GEN_BATCH]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=GEN_TOKENS, do_sample=False,
                             pad_token_id=pad)
        outs += [tok.decode(row[width:], skip_special_tokens=True) for row in out]
    return outs


def evaluate(model: torch.nn.Module, base: CausalBase, test: list[tuple[str, str, str]], *,
             system: str | None, adapter: Any = None) -> dict[str, Any]:
    examples = [_example(chat(q, f"[{t}] {a}", system)) for t, q, a in test]
    t0 = time.perf_counter()
    answers = greedy(model, base, [encode_prompt(e, base.tokenizer) for e in examples])
    gen_s = time.perf_counter() - t0
    tags = [m.group(1) if (m := _TAG.match(a)) else None for a in answers]
    fmt = sum(t in TOPICS for t in tags) / len(test)
    acc = sum(t == topic for t, (topic, _, _) in zip(tags, test)) / len(test)
    rows = [encode(e, base.tokenizer) for e in examples]
    loss = score(base, adapter, rows)["val_loss"]
    return {"format_rate": fmt, "topic_accuracy": acc, "test_loss": loss, "test_perplexity": math.exp(loss),
            "generate_seconds": round(gen_s, 2), "samples": [
                {"topic": topic, "question": q, "answer": ans} for (topic, q, _), ans in list(zip(test, answers))[:6]]}


def run_generation(args: Any, seeds: int) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """Train and score; ``(result, curves)`` for ``bench.quality``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    n_train, n_test = QUICK_SIZES if args.quick else SIZES
    n_train, n_test = args.n_train or n_train, args.n_test or n_test
    per_topic = pairs()
    train_rows, val_rows, test = split(per_topic, n_train, n_test)
    limits = GenerationDatasetLimits(min_examples=1)
    train_ds, val_ds = from_records(train_rows, limits=limits), from_records(val_rows, limits=limits)
    t0 = time.perf_counter()
    base = load_causal_base(None)
    load_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "base": base.spec.name, "topics": list(TOPICS), "n_train": len(train_ds), "n_validation": len(val_ds),
        "n_test": len(test), "questions_per_topic": {"train_and_validation": n_train, "test": n_test},
        "seeds": seeds, "base_load_seconds": round(load_s, 1), "gen_tokens": GEN_TOKENS,
        "hyperparameters_requested": dict(args.hyperparameters),
    }
    if args.quick:
        result["quick_note"] = (f"--quick: {n_train} / {n_test} questions per topic, lora {QUICK_EPOCHS} epochs "
                                "(not the auto value): a smoke test of the pipeline with real figures")
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    curves: dict[str, list[dict[str, Any]]] = {}
    if "base" in methods:
        result["base"] = evaluate(base.model, base, test, system=None)
        print("base", _short(result["base"]))
    if "base_prompted" in methods:
        result["base_prompted"] = evaluate(base.model, base, test, system=instruction())
        print("base_prompted", _short(result["base_prompted"]))
    if "lora" in methods:
        runs = []
        for seed in range(seeds):
            hp = {**({"epochs": QUICK_EPOCHS} if args.quick else {}), **args.hyperparameters, "seed": seed}
            history: list[dict[str, Any]] = []
            t0 = time.perf_counter()
            res = train_generation(base, train_ds, val_ds, hp=GenerationHyperparameters.from_dict(hp),
                                   callbacks=TrainCallbacks(
                                       on_epoch=lambda e, m: (history.append(m), print(f"  epoch {e}: " + ", ".join(
                                           f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float)))),
                                       on_step=lambda s, t, e, loss: print(f"  step {s}/{t}: {loss:.4f}")
                                       if s % 50 == 0 else None))
            train_s = time.perf_counter() - t0
            assert res.artifact is not None
            model = merged(base.model, res.artifact)
            scored = evaluate(model, base, test, system=None, adapter=res.artifact)
            blob, _, _ = res.artifact.encode()
            runs.append({**scored, "seed": seed, "train_seconds": round(train_s, 1), "val_loss": res.metrics["val_loss"],
                         "base_val_loss": res.metrics["base_val_loss"], "best_epoch": res.best_epoch,
                         "epochs_run": res.metrics["epochs_run"], "trainable_params": res.trainable_params,
                         "total_params": res.total_params, "adapter_bytes": len(blob),
                         "hyperparameters": res.hyperparameters})
            curves[f"lora seed {seed}"] = [{"epoch": h["epoch"], "train_loss": h["train_loss"],
                                            "val_loss": h["val_loss"]} for h in history]
            print("lora", seed, _short(runs[-1]))
            del model
        result["lora"] = _mean(runs)
    if "lora" in result and "base" in result:
        for key in ("format_rate", "topic_accuracy"):
            result[f"lora_minus_base_{key}_points"] = round(100 * (result["lora"][key] - result["base"][key]), 1)
        result["test_perplexity_base_over_lora"] = round(result["base"]["test_perplexity"]
                                                         / result["lora"]["test_perplexity"], 2)
    if "lora" in result and "base_prompted" in result:
        result["lora_minus_base_prompted_topic_accuracy_points"] = round(
            100 * (result["lora"]["topic_accuracy"] - result["base_prompted"]["topic_accuracy"]), 1)
    return result, curves


def main_generation(args: Any, seeds: int) -> None:
    """What ``bench.quality --dataset chatterbot-topics`` runs: train, score, write JSON and PNG."""
    result, curves = run_generation(args, seeds)
    out = {"machine": machine(), "dataset": DATASET, "quick": args.quick, **result, "curves": curves}
    write(args.out, out)
    plot(args.out.with_suffix(".png"), out)


def plot(png: Path, result: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in result["curves"].items():
        ax1.plot([c["epoch"] for c in curve], [c["val_loss"] for c in curve], marker="o", label=f"{name} val")
        ax1.plot([c["epoch"] for c in curve], [c["train_loss"] for c in curve], ls="--", label=f"{name} train")
    if "lora" in result:
        ax1.axhline(result["lora"]["base_val_loss"], color="grey", ls=":", label="base model (val)")
    ax1.set(title=f"{DATASET}: loss on assistant tokens", xlabel="epoch", ylabel="cross-entropy")
    ax1.legend(fontsize=7)
    methods = [m for m in METHODS if m in result]
    keys = ("format_rate", "topic_accuracy")
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        ax2.bar([k + i * width for k in range(len(keys))], [result[m][k] for k in keys], width, label=m)
    ax2.set_xticks([k + width * (len(methods) - 1) / 2 for k in range(len(keys))], list(keys))
    ax2.set(title=f"held-out questions (n={result['n_test']})" + (" --quick" if result["quick"] else ""),
            ylim=(0, 1.05))
    ax2.legend(fontsize=8)
    save_figure(fig, png)


def _example(record: dict[str, Any]) -> GenerationExample:
    return GenerationExample(messages=tuple(Message(m["role"], m["content"]) for m in record["messages"]))


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": runs}
    for key in ("format_rate", "topic_accuracy", "test_loss", "test_perplexity", "train_seconds", "val_loss",
                "base_val_loss"):
        out[key] = statistics.mean(r[key] for r in runs)
        if len(runs) > 1:
            out[f"{key}_std"] = statistics.stdev(r[key] for r in runs)
    for key in ("trainable_params", "total_params", "adapter_bytes", "samples"):
        out[key] = runs[0][key]
    return out


def _short(m: dict[str, Any]) -> str:
    return ", ".join(f"{k} {m[k]:.4f}" for k in ("format_rate", "topic_accuracy", "test_loss") if k in m)


__all__ = ["DATASET", "main_generation", "run_generation"]
