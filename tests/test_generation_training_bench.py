"""bench.quality --dataset chatterbot-topics (bench.quality_generation) end to end on the tiny Llama:
the chatterbot-corpus split, the three methods, the JSON and the plot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from bench import quality, quality_generation

pytestmark = pytest.mark.skipif(importlib.util.find_spec("chatterbot_corpus") is None,
                                reason="chatterbot-corpus missing: pip install --no-deps chatterbot-corpus==1.3.3")


def test_the_split_keeps_test_questions_out_of_training() -> None:
    per_topic = quality_generation.pairs()
    assert set(per_topic) == set(quality_generation.TOPICS) and all(len(v) >= 40 for v in per_topic.values())
    train, val, test = quality_generation.split(per_topic, 10, 3, seed=0)
    assert len(test) == 3 * len(quality_generation.TOPICS)
    seen = {r["messages"][0]["content"] for r in train + val}
    assert not seen & {q for _, q, _ in test}
    assert {r["messages"][0]["content"] for r in val}.isdisjoint({r["messages"][0]["content"] for r in train})
    answer = train[0]["messages"][1]["content"]
    assert quality_generation._TAG.match(answer) and answer.split("]")[0][1:] in quality_generation.TOPICS
    assert quality_generation.split(per_topic, 10, 3, seed=0) == (train, val, test)


def test_the_generation_quality_command_trains_scores_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.generation.base import tiny_causal_base

    monkeypatch.setattr(quality_generation, "load_causal_base", lambda setting=None: tiny_causal_base(0))
    out = tmp_path / "gen.json"
    monkeypatch.setattr(sys, "argv", [
        "bench.quality", "--dataset", "chatterbot-topics", "--quick", "--n-train", "3", "--n-test", "1",
        "--hyperparameters", '{"epochs": 2, "learning_rate": 0.02}', "--out", str(out)])
    quality.main()
    result = json.loads(out.read_text())
    assert result["dataset"] == "chatterbot-topics" and result["quick"] and "smoke test" in result["quick_note"]
    assert result["n_test"] == len(quality_generation.TOPICS) and result["base"]["format_rate"] == 0.0
    lora = result["lora"]
    assert lora["runs"][0]["hyperparameters"]["epochs"] == 2 and lora["trainable_params"] > 0
    assert lora["val_loss"] < lora["base_val_loss"]  # even the tiny model learns the bracketed prefix a little
    for method in ("base", "base_prompted", "lora"):
        assert 0 <= result[method]["topic_accuracy"] <= result[method]["format_rate"] <= 1
        assert result[method]["test_loss"] > 0 and len(result[method]["samples"]) == 6
    assert "lora_minus_base_topic_accuracy_points" in result and len(result["curves"]["lora seed 0"]) == 2
    assert out.with_suffix(".png").stat().st_size > 0
