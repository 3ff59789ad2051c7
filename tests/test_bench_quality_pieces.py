"""bench.quality in pieces (bench.quality_runs): one method x seed per process merged into the
same result one process gives, a run resumed after a crash, mismatched pieces refused; and
bench.quality_compare's decision rule. The end-to-end runs are the real command on a tiny
random base and a small synthetic sentiment set (which it can learn in a few epochs) in place of
MiniLM and a wheel's data, so they are fast; what they check is the bookkeeping."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from adapters.base import tiny_base
from bench import quality, quality_compare
from bench.quality_runs import take_runs
from tests.interrupted import stopped_at_epoch
from tests.training_data import sentiment

COMMON = ["--dataset", "tweets", "--n-train", "80", "--n-test", "30", "--skip-latency", "--threads", "1",
          "--hyperparameters", '{"epochs": 4, "batch_size": 16, "learning_rate": 0.01, "head_lr_scale": 1}']


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.setattr(quality, "load_base", lambda **kw: tiny_base(seed=1, initializer_range=0.3))
    monkeypatch.setattr(quality.data, "load", lambda name: sentiment(120, seed=0))

    def run(*argv: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["bench.quality", *COMMON, *argv])
        quality.main()
        return json.loads(open(argv[argv.index("--out") + 1]).read())

    return run


def without_origin(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("from_run", "train_seconds", "load_average")} for r in runs]


def test_pieces_merge_into_what_one_process_gives(bench, tmp_path):
    whole = bench("--methods", "lora,head,tfidf", "--seeds", "2", "--out", str(tmp_path / "whole.json"))
    assert whole["pending"] == [] and [r["seed"] for r in whole["lora"]["runs"]] == [0, 1]
    assert whole["lora"]["n_failed"] == whole["head"]["n_failed"] == 0
    p0 = bench("--methods", "lora", "--seed-list", "0", "--out", str(tmp_path / "lora0.json"))
    assert [r["seed"] for r in p0["lora"]["runs"]] == [0] and "head" not in p0
    bench("--methods", "lora", "--seed-list", "1", "--out", str(tmp_path / "lora1.json"))
    bench("--methods", "head,tfidf", "--seeds", "2", "--out", str(tmp_path / "head.json"))
    merged = bench("--methods", "none", "--include", str(tmp_path / "lora0.json"), "--include",
                   str(tmp_path / "lora1.json"), "--include", str(tmp_path / "head.json"),
                   "--out", str(tmp_path / "merged.json"))
    for method in ("lora", "head"):  # training is deterministic on CPU for a seed: the same runs
        assert without_origin(merged[method]["runs"]) == without_origin(whole[method]["runs"])
        assert merged[method]["accuracy"] == pytest.approx(whole[method]["accuracy"])
        assert merged[method]["n_seeds"] == 2 and merged[method]["trainable_params"] == whole[method]["trainable_params"]
    assert [r["from_run"]["file"] for r in merged["lora"]["runs"]] == ["lora0.json", "lora1.json"]
    assert merged["tfidf"]["accuracy"] == whole["tfidf"]["accuracy"]
    assert merged["lora_minus_head_points"] == pytest.approx(whole["lora_minus_head_points"])
    assert set(merged["curves"]) == {"lora", "head"}
    assert (tmp_path / "merged.png").exists()


def test_a_crashed_run_resumes_without_retraining_what_it_finished(bench, tmp_path, monkeypatch):
    out = tmp_path / "run.json"
    real_train = quality.train

    class Crash(Exception):
        pass

    def crashes_on_seed_1(*a, hp, **kw):  # the process dies in its third run (seed 1's first)
        if hp.seed == 1:
            raise Crash
        return real_train(*a, hp=hp, **kw)

    monkeypatch.setattr(quality, "train", crashes_on_seed_1)
    with pytest.raises(Crash):
        bench("--methods", "lora,lora:fast", "--variants", '{"fast": {"head_lr_scale": 10}}', "--seeds", "2",
              "--out", str(out))
    left = json.loads(out.read_text())  # written after every finished run
    assert [r["seed"] for r in left["lora"]["runs"]] == [0] and [r["seed"] for r in left["lora:fast"]["runs"]] == [0]
    assert left["pending"] == ["lora:1", "lora:fast:1"]  # seeds outer, methods interleaved
    monkeypatch.setattr(quality, "train", real_train)
    done = bench("--methods", "lora,lora:fast", "--variants", '{"fast": {"head_lr_scale": 10}}', "--seeds", "2",
                 "--resume", "--out", str(out))
    assert done["pending"] == []
    for method in ("lora", "lora:fast"):
        first, second = done[method]["runs"]
        assert {k: v for k, v in first.items() if k != "from_run"} == left[method]["runs"][0]  # kept, not retrained
        assert first["from_run"]["file"] == "run.json" and "from_run" not in second and second["seed"] == 1
    assert done["variants"] == {"fast": {"head_lr_scale": 10}}
    assert done["lora:fast"]["hyperparameters"]["head_lr_scale"] == 10


def test_a_text_piece_stopped_mid_run_resumes_from_its_checkpoint(bench, tmp_path, monkeypatch):
    real_train = quality.train
    args = ("--methods", "lora:fast", "--variants", '{"fast": {"head_lr_scale": 10}}', "--seed-list", "0")

    monkeypatch.setattr(quality, "train", stopped_at_epoch(real_train, 3))  # epoch 2's checkpoint kept
    out, ckpt = tmp_path / "piece.json", tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        bench(*args, "--checkpoint-dir", str(ckpt), "--out", str(out))
    assert (ckpt / "lora-fast-0").is_dir() and json.loads(out.read_text())["pending"] == ["lora:fast:0"]
    monkeypatch.setattr(quality, "train", real_train)
    resumed = bench(*args, "--checkpoint-dir", str(ckpt), "--resume", "--out", str(out))
    whole = bench(*args, "--out", str(tmp_path / "whole.json"))
    run, plain = resumed["lora:fast"]["runs"][0], whole["lora:fast"]["runs"][0]
    assert "after epoch 2" in run["resumed"] and "resumed" not in plain
    assert run["epochs_run"] == plain["epochs_run"] == 4 and len(resumed["curves"]["lora:fast"]) == 4
    assert run["accuracy"] == plain["accuracy"] and run["macro_f1"] == plain["macro_f1"]  # the same weights


def test_pieces_of_another_comparison_are_refused(bench, tmp_path):
    bench("--methods", "tfidf", "--out", str(tmp_path / "a.json"))
    other = json.loads((tmp_path / "a.json").read_text())
    shutil.copy(tmp_path / "a.json", tmp_path / "b.json")
    result = {**{k: other[k] for k in ("dataset", "n_train", "n_validation", "n_test", "pooling", "max_length")},
              "hyperparameters": {"epochs": 3}}
    with pytest.raises(SystemExit, match="b.json: hyperparameters is .* not the same comparison"):
        take_runs(result, {}, other, str(tmp_path / "b.json"))
    run = {"seed": 0, "accuracy": 0.5, "macro_f1": 0.5, "train_seconds": 1.0}
    mine = {**other, "variants": {"x": {"lora_r": 4}}, "lora:x": {"runs": [run]}}
    with pytest.raises(SystemExit, match="variant 'x'"):
        take_runs(dict(other, variants={"x": {"lora_r": 8}}), {}, mine, "c.json")


def test_take_runs_recomputes_the_summary_over_merged_seeds():
    keys = {"dataset": "d", "n_train": 1, "n_validation": 1, "n_test": 1, "pooling": "p", "max_length": 8,
            "hyperparameters": {}}

    def run(seed, acc):
        return {"seed": seed, "accuracy": acc, "macro_f1": acc, "train_seconds": 10.0 * (seed + 1)}

    result = {**keys, "lora": {"runs": [run(0, 0.6)], "trainable_params": 7}}
    other = {**keys, "machine": {"when": "then", "load_average": [3.0]},
             "lora": {"runs": [run(0, 0.9), run(2, 0.8), {"seed": 1, "failed": "diverged", "train_seconds": 1.0}],
                      "trainable_params": 7}}
    assert take_runs(result, {}, other, "x/other.json") == ["lora:2", "lora:1"]
    lora = result["lora"]
    assert [r["seed"] for r in lora["runs"]] == [0, 1, 2] and lora["runs"][0]["accuracy"] == 0.6  # ours kept
    assert lora["accuracy"] == pytest.approx(0.7) and lora["n_seeds"] == 2 and lora["n_failed"] == 1
    assert lora["runs"][2]["from_run"] == {"file": "other.json", "when": "then", "load_average": [3.0]}
    assert take_runs(result, {}, other, "x/other.json") == []  # nothing new the second time


def test_the_compare_rule_changes_a_default_only_on_evidence():
    def res(name, a, b):
        def runs(accs):
            return [{"seed": i, "accuracy": x, "train_seconds": 1.0} for i, x in enumerate(accs)]

        return {"dataset": name, "lora": {"runs": runs(a)}, "lora:x": {"runs": runs(b)}}

    better = quality_compare.compare([res("s1", [0.6, 0.62, 0.64], [0.65, 0.66, 0.67]),
                                      res("s2", [0.7, 0.7, 0.7], [0.71, 0.71, 0.71])], "lora", "lora:x")
    assert better["verdict"]["change"] and "every set" in better["verdict"]["why"]
    assert better["sets"]["s1"]["paired_b_minus_a_points"] == pytest.approx([5, 4, 3])
    # better on average, one set slightly worse (within its standard error of 1 point): change
    mixed = quality_compare.compare([res("s1", [0.6, 0.62, 0.64], [0.7, 0.7, 0.7]),
                                     res("s2", [0.69, 0.7, 0.71], [0.695, 0.695, 0.695])], "lora", "lora:x")
    assert mixed["verdict"]["change"] and "standard error" in mixed["verdict"]["why"]
    # one set loses by more than its standard error: keep
    loses = quality_compare.compare([res("s1", [0.6, 0.62, 0.64], [0.8, 0.8, 0.8]),
                                     res("s2", [0.7, 0.7, 0.7], [0.6, 0.6, 0.6])], "lora", "lora:x")
    assert not loses["verdict"]["change"] and "s2" in loses["verdict"]["why"]
    failed = quality_compare.compare([{"dataset": "s", "lora": {"runs": [{"seed": 0, "failed": "x",
                                                                          "train_seconds": 1.0}]},
                                       "lora:x": {"runs": [{"seed": 0, "accuracy": 0.5, "train_seconds": 1.0}]}}],
                                     "lora", "lora:x")
    assert not failed["verdict"]["change"] and failed["sets"]["s"]["lora"]["failed"] == [0]


def test_the_compare_pairs_seeds_and_takes_earlier_runs_with_their_source():
    res = {"dataset": "s", "lora": {"runs": [{"seed": 0, "accuracy": 0.6, "train_seconds": 5.0},
                                             {"seed": 1, "accuracy": 0.7, "train_seconds": 7.0}]},
           "lora:x": {"runs": [{"seed": 1, "accuracy": 0.75, "train_seconds": 8.0}]}}
    only_1 = quality_compare.compare([json.loads(json.dumps(res))], "lora", "lora:x")["sets"]["s"]
    assert only_1["lora"]["accuracy"] == 0.7 and only_1["unpaired_seeds"] == {"lora": [0], "lora:x": []}
    assert only_1["b_minus_a_points"] == pytest.approx(5.0)
    quality_compare.add_earlier([res], {"s": {"lora:x": {"0": 0.62}}}, "old.json")
    both = quality_compare.compare([res], "lora", "lora:x")["sets"]["s"]
    assert both["paired_b_minus_a_points"] == pytest.approx([2.0, 5.0])
    assert both["lora:x"]["sources"] == ["old.json", "this run"] and both["lora:x"]["train_seconds"] == 8.0
    with pytest.raises(SystemExit, match="seed 0 is already in a file"):
        quality_compare.add_earlier([res], {"s": {"lora:x": {"0": 0.62}}}, "old.json")
    with pytest.raises(SystemExit, match="no file holds"):
        quality_compare.add_earlier([res], {"t": {"lora": {"0": None}}}, "old.json")
