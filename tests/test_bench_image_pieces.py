"""The image benchmarks' bookkeeping on a tiny random vision base and real Fashion-MNIST files:
``bench.quality --dataset fashion-mnist`` in pieces (``--input-size`` reaching the backbone and
recorded, ``--seed-list``, ``--resume`` after a crash, ``--include`` merging, a failed run kept
with its reason, pieces of another input size refused) and ``bench.image_autohp`` (the plan's
split and values, its checks, a resumed run that trains nothing twice). What they check is the
bookkeeping, not accuracy."""

from __future__ import annotations

import json
import sys

import pytest

from adapters.training import TrainingDiverged
from adapters.vision.backbone import tiny_vision_base
from bench import image_autohp, quality, quality_image
from bench.image_autohp_plan import PLAN_SIZES, split_counts
from bench.image_data import available
from tests.interrupted import stopped_at_epoch

pytestmark = pytest.mark.skipif(not available(), reason="Fashion-MNIST IDX files missing: scripts/system-packages.sh")

COMMON = ["--dataset", "fashion-mnist", "--n-train", "40", "--n-test", "20", "--threads", "1",
          "--hyperparameters", '{"epochs": 1, "batch_size": 8}']


@pytest.fixture
def tiny_sizes(monkeypatch):
    asked: list[int | None] = []

    def tiny(input_size=None):
        asked.append(input_size)
        return tiny_vision_base(seed=1)

    monkeypatch.setattr(quality_image, "load_vision_base", tiny)
    monkeypatch.setattr(image_autohp, "load_vision_base", tiny)
    return asked


def bench(monkeypatch, *argv: str) -> dict:
    monkeypatch.setattr(sys, "argv", ["bench.quality", *COMMON, *argv])
    quality.main()
    return json.loads(open(argv[argv.index("--out") + 1]).read())


def test_image_pieces_resume_merge_and_record_the_input_size(tiny_sizes, tmp_path, monkeypatch):
    real = quality_image.train_images

    def crashes_on_seed_1(*a, hp, **kw):
        if hp.seed == 1:
            raise KeyboardInterrupt  # the process is stopped in its second run
        return real(*a, hp=hp, **kw)

    monkeypatch.setattr(quality_image, "train_images", crashes_on_seed_1)
    out = tmp_path / "lora.json"
    with pytest.raises(KeyboardInterrupt):
        bench(monkeypatch, "--methods", "lora", "--seeds", "2", "--input-size", "64", "--out", str(out))
    left = json.loads(out.read_text())  # written after the finished run
    assert tiny_sizes == [64] and left["pending"] == ["lora:1"] and [r["seed"] for r in left["lora"]["runs"]] == [0]
    assert left["input_size"] == 32 and "built for 32 px" in left["input_note"]  # the tiny base's own size
    monkeypatch.setattr(quality_image, "train_images", real)
    done = bench(monkeypatch, "--methods", "lora", "--seeds", "2", "--input-size", "64", "--resume", "--out", str(out))
    first, second = done["lora"]["runs"]
    assert {k: v for k, v in first.items() if k != "from_run"} == left["lora"]["runs"][0]  # kept, not retrained
    assert first["from_run"]["file"] == "lora.json" and "from_run" not in second and done["pending"] == []

    def diverges(*a, **kw):
        raise TrainingDiverged("training diverged: loss is nan")

    monkeypatch.setattr(quality_image, "train_images", diverges)
    head = bench(monkeypatch, "--methods", "head", "--seed-list", "0", "--input-size", "64",
                 "--out", str(tmp_path / "head.json"))
    assert head["head"]["accuracy"] is None and "loss is nan" in head["head"]["runs"][0]["failed"]
    merged = bench(monkeypatch, "--methods", "none", "--input-size", "64", "--include", str(out),
                   "--include", str(tmp_path / "head.json"), "--out", str(tmp_path / "merged.json"))
    assert [r["seed"] for r in merged["lora"]["runs"]] == [0, 1] and merged["head"]["n_failed"] == 1
    assert merged["lora"]["accuracy"] == pytest.approx(done["lora"]["accuracy"])
    assert 0 < merged["lora"]["trainable_vs_backbone"] < 1

    other = dict(json.loads(out.read_text()), input_size=128)  # a piece measured at another size
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="input_size is 128 there"):
        bench(monkeypatch, "--methods", "none", "--input-size", "64", "--include", str(tmp_path / "other.json"),
              "--out", str(tmp_path / "no.json"))
    with pytest.raises(SystemExit, match="--input-size: .*multiple of 32"):
        bench(monkeypatch, "--methods", "lora", "--input-size", "100", "--out", str(tmp_path / "bad.json"))


def test_the_autohp_plan_splits_as_a_job_does():
    assert split_counts(20) == (10, 10) and split_counts(50) == (40, 10) and split_counts(200) == (160, 40)
    assert split_counts(2000) == (1800, 200) and split_counts(20000) == (18000, 2000)
    assert PLAN_SIZES == (20, 50, 200, 2000, 20000)


def test_the_autohp_checks_read_the_runs():
    def run(n, method, seed, acc, after=0):
        return {"n_images": n, "method": method, "seed": seed, "accuracy": acc, "train_seconds": 1.0,
                "epochs_run": 3, "steps_after_best": after}

    runs = [run(20, "lora", 0, 0.4, 14), run(20, "head", 0, 0.5), run(200, "lora", 0, 0.7, 30),
            run(200, "lora", 1, 0.8, 10), run(200, "head", 0, 0.6), run(2000, "lora", 0, 0.9),
            run(2000, "head", 0, 0.8), {**run(2000, "head", 1, 0), "failed": "diverged"}]
    del runs[-1]["accuracy"]
    summary, checks = image_autohp.summarise(runs)
    assert summary["lora"]["200"]["accuracy"] == pytest.approx(0.75) and summary["head"]["2000"]["n_failed"] == 1
    assert checks["accuracy_rises_with_data"] == {"lora": True, "head": True}
    assert checks["lora_beats_head_from"] == 200 and checks["failures"] == ["2000:head:1"]
    assert checks["max_steps_after_best"] == {"20": 14, "200": 30, "2000": 0}
    summary, checks = image_autohp.summarise([run(20, "lora", 0, 0.5), run(50, "lora", 0, 0.4),
                                              run(20, "head", 0, 0.3), run(50, "head", 0, 0.45)])
    assert checks["accuracy_rises_with_data"]["lora"] is False and checks["lora_beats_head_from"] is None


def test_autohp_plans_trains_and_resumes(tiny_sizes, tmp_path, monkeypatch):
    out = tmp_path / "autohp.json"
    argv = ["bench.image_autohp", "--quick", "--sizes", "20,30", "--n-test", "20", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    image_autohp.main()
    result = json.loads(out.read_text())
    assert tiny_sizes == [image_autohp.QUICK_INPUT_SIZE, None]  # trained small; planned at the service's size
    assert [(p["n_images"], p["method"]) for p in result["plan"]] == [(n, m) for n in PLAN_SIZES for m in ("lora", "head")]
    big = next(p for p in result["plan"] if p["n_images"] == 20000 and p["method"] == "lora")
    assert big["n_fit"] == 18000 and big["planned_steps"] == big["steps_per_epoch"] * big["epochs"]
    assert all(h > 0 for h in big["estimated_hours"].values())
    assert [(r["n_images"], r["method"]) for r in result["runs"]] == [(20, "lora"), (20, "head"), (30, "lora"),
                                                                       (30, "head")]
    for r in result["runs"]:
        assert 0 <= r["accuracy"] <= 1 and r["epochs_run"] <= r["epochs_planned"] and r["estimated_seconds"] > 0
        assert r["n_fit"] + r["n_validation"] == r["n_images"] and len(r["curve"]) == r["epochs_run"]
    assert set(result["checks"]) == {"accuracy_rises_with_data", "failures", "lora_beats_head_from",
                                     "max_steps_after_best"}
    assert out.with_suffix(".png").stat().st_size > 0

    def no_training(*a, **kw):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(image_autohp, "train_images", no_training)
    monkeypatch.setattr(sys, "argv", [*argv, "--resume"])
    image_autohp.main()
    assert json.loads(out.read_text())["runs"] == result["runs"]
    monkeypatch.setattr(sys, "argv", [*argv[:-4], "--n-test", "30", "--out", str(out), "--resume"])
    with pytest.raises(SystemExit, match="n_test=20, this run 30"):
        image_autohp.main()


def test_a_piece_stopped_mid_run_resumes_from_its_checkpoint(tiny_sizes, tmp_path, monkeypatch):
    real = quality_image.train_images
    three = ["--hyperparameters", '{"epochs": 3, "batch_size": 8, "patience": 3}', "--methods", "lora",
             "--seed-list", "0", "--input-size", "64"]

    monkeypatch.setattr(quality_image, "train_images", stopped_at_epoch(real, 2))  # epoch 1's checkpoint kept
    out, ckpt = tmp_path / "lora.json", tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        bench(monkeypatch, *three, "--checkpoint-dir", str(ckpt), "--out", str(out))
    assert (ckpt / "lora-0").is_dir() and json.loads(out.read_text())["pending"] == ["lora:0"]
    monkeypatch.setattr(quality_image, "train_images", real)
    resumed = bench(monkeypatch, *three, "--checkpoint-dir", str(ckpt), "--resume", "--out", str(out))
    whole = bench(monkeypatch, *three, "--out", str(tmp_path / "whole.json"))
    run, plain = resumed["lora"]["runs"][0], whole["lora"]["runs"][0]
    assert "after epoch 1" in run["resumed"] and "resumed" not in plain
    assert run["epochs_run"] == plain["epochs_run"] == 3 and len(resumed["curves"]["lora"]) == 3
    assert run["accuracy"] == plain["accuracy"] and run["macro_f1"] == plain["macro_f1"]  # the same weights
