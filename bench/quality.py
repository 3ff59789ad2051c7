"""Quality benchmark: LoRA vs head-only vs full fine-tuning of the same base vs TF-IDF, on real data.

    python -m bench.quality --dataset {imdb,bbc,tweets,rotten,drugs} [--quick] [--seeds N]
        [--pooling base|pooler|mean|mean+normalize|cls|max] --out bench/results/quality-imdb.json
    python -m bench.quality --dataset fashion-mnist [--quick] [--seeds N] [--input-size PX]
        --out bench/results/quality-fashion-mnist.json
    python -m bench.quality --dataset chatterbot-topics [--quick] [--seeds N] --out bench/results/quality-generation.json

Trains each method on a fixed seeded subset (IMDB: 2,000 train / 1,000 test; BBC: 1,225 /
900; tweets and rotten: 4,000 / 1,000; drugs: all 978 rows, 600 / 378; --quick: 300 / 200;
``--n-train``/``--n-test`` override, ``--n-train 0`` takes every row the test set leaves), 128
tokens where nearly all training texts fit in them, else the base's length cap (256: what a job's
auto ``max_length`` gives, ``adapters.training.hyperparams.auto_max_length``; ``--hyperparameters
'{"max_length": N}'`` trains and scores at N tokens),
scores on the held-out test set and writes ``{method: {accuracy, macro_f1, train_seconds,
trainable_params, ...}}`` plus a PNG of the learning curves. With ``--seeds N``
(default 3, --quick 1) every trained method runs with training seeds 0..N-1 on the same split,
seeds in the outer loop and methods interleaved inside it: ``accuracy``, ``macro_f1`` and
``train_seconds`` are means over them (``accuracy_std``, and each run under ``runs``; a run
that fails -- ``TrainingDiverged``, what a tenant gets as a failed job -- is recorded with its
reason and left out of the means: ``n_failed``); ``tfidf`` (TF-IDF + logistic regression,
``bench.tfidf``) is deterministic and runs once. ``--variants`` adds LoRA runs with other
hyper-parameters (method ``lora:NAME``) to the same run, for comparisons. The heads read the
base's pooling (``--pooling base``: what its configuration declares, ``adapters.pooling``;
others override it, to compare).

Long comparisons run in pieces (``bench.quality_runs``): ``--seed-list`` runs only some seeds
(``--methods lora --seed-list 2``: one method x seed per process); the JSON is rewritten
atomically after every run, with the pieces still ``pending``, and ``--resume`` trains only
what ``--out`` lacks, so a crash loses at most the run in progress; ``--include FILE`` (any
number) merges other pieces' runs (``--methods none --skip-latency`` merges without training).

It also measures serving latency with no training running and while a training worker process
runs a job (``bench.serving_latency``; ``serving_latency_ms`` in the JSON; ``--skip-latency``).

``--dataset fashion-mnist`` is the image task (``bench.quality_image``: Fashion-MNIST on
EfficientNet-Lite0, methods lora / head / full, no TF-IDF, no serving latency: see
``bench.engine --task image``; ``--input-size`` builds the backbone for smaller images, recorded);
the JSON, the pieces and the learning-curve plot have the same shape.
``--dataset chatterbot-topics`` is text generation (``bench.quality_generation``: SmolLM2 base,
base told the format, LoRA; format rate, topic exact match and test loss on held-out questions).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapters.base import load_base
from adapters.pooling import Pooling
from adapters.training import Hyperparameters, TrainCallbacks, TrainingDiverged, train
from adapters.training.metrics import classification_metrics
from adapters.training.trainer import resolve_text_hyperparameters
from bench import data
from bench.common import machine, parser, save_figure
from bench.quality_runs import Piece, done, save, take_runs, train_pending, trained_meta
from bench.serving_latency import serving_latency
from bench.tfidf import tfidf_baseline

SIZES = {"imdb": (2000, 1000), "bbc": (1225, 900), "tweets": (4000, 1000), "rotten": (4000, 1000),
         "drugs": (600, 378)}
QUICK_SIZES = {name: (300, 200) for name in SIZES}
METHODS = ("lora", "head", "full", "tfidf")
TRAINED = ("lora", "head", "full")
IMAGE_DATASET = "fashion-mnist"  # bench.quality_image
GENERATION_DATASET = "chatterbot-topics"  # bench.quality_generation


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted([*SIZES, IMAGE_DATASET, GENERATION_DATASET]), required=True)
    p.add_argument("--methods", default=None,
                   help="comma list (default: lora,head,full,tfidf; images: lora,head,full), or 'none' for latency only")
    p.add_argument("--seeds", type=int, default=None, help="training seeds per method (default 3, --quick 1)")
    p.add_argument("--pooling", default="base", help="'base' (its configuration's), or e.g. pooler, mean+normalize")
    p.add_argument("--n-train", type=int, default=None, help="training rows (0: all the test set leaves)")
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--checkpoint-dir", type=Path, default=None,
                   help="keep each run's per-epoch checkpoint in DIR/METHOD-SEED, so a stopped piece started "
                        "again resumes from its last finished epoch")
    p.add_argument("--input-size", type=int, default=None,
                   help="fashion-mnist: px the backbone is built for (default 224, its own; --quick 96); "
                        "recorded in the JSON, and pieces of other sizes are not merged")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for training and scoring (default: torch's); on a busy shared machine "
                        "1 thread ran MiniLM LoRA steps 3.5x faster than 2")
    p.add_argument("--include", type=Path, action="append", default=[],
                   help="an earlier run's or piece's JSON (same dataset, split, pooling and --hyperparameters): "
                        "every method x seed run it has and this one lacks is merged in, marked with where it "
                        "came from (bench.quality_runs); --methods none merges pieces without training")
    p.add_argument("--seed-list", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma list of the training seeds to run (default 0..--seeds-1), e.g. one piece: "
                        "--methods lora --seed-list 2")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs --out already holds (it is rewritten after every run) and train only "
                        "the missing method x seed pieces")
    p.add_argument("--variants", type=json.loads, default={},
                   help='JSON {name: hyper-parameters}: method "lora:NAME" is LoRA with those on top of '
                        '--hyperparameters, e.g. \'{"head10": {"head_lr_scale": 10}}\' --methods lora,lora:head10')
    p.add_argument("--hyperparameters", type=json.loads, default={},
                   help='JSON object of explicit hyper-parameters for every method, e.g. \'{"lora_r": 16}\'')
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds = args.seeds or (1 if args.quick else 3)
    latency = None
    if args.dataset == GENERATION_DATASET:  # its own JSON and plot (no labels, no TF-IDF, no latency)
        from bench.quality_generation import main_generation

        return main_generation(args, seeds)
    if args.dataset == IMAGE_DATASET:
        from bench.quality_image import METHODS as IMAGE_METHODS
        from bench.quality_image import run_images

        args.methods = args.methods or ",".join(IMAGE_METHODS)
        part, curves = run_images(args, seeds, log_epoch)
        result: dict[str, Any] = {"machine": machine(), "dataset": args.dataset, "quick": args.quick, **part}
    else:
        args.methods = args.methods or ",".join(METHODS)
        result, curves, latency = run_texts(args, seeds)
    for path in args.include:
        earlier = json.loads(path.read_text())
        taken = take_runs(result, curves, earlier, str(path))
        print(f"included from {path}: {', '.join(taken) or 'nothing new'}", flush=True)
        if "serving_latency_ms" in earlier and args.skip_latency and "serving_latency_ms" not in result:
            result["serving_latency_ms"] = {**earlier["serving_latency_ms"], "from_run": path.name}
    if "pending" in result:  # pieces another file brought are no longer pending
        result["pending"] = [p for p in result["pending"]
                             if int(p.rsplit(":", 1)[1]) not in done(result, p.rsplit(":", 1)[0])]
    for a, b in (("lora", "full"), ("lora", "head"), ("head", "tfidf"), ("lora", "tfidf")):
        if a in result and b in result and result[a]["accuracy"] is not None and result[b]["accuracy"] is not None:
            result[f"{a}_minus_{b}_points"] = 100 * (result[a]["accuracy"] - result[b]["accuracy"])
    result["curves"] = curves
    if latency is not None and not args.skip_latency:
        result["serving_latency_ms"] = latency()
    save(args.out, {**result, "machine": machine()})
    print(f"wrote {args.out}")
    plot_curves(args.out.with_suffix(".png"), curves, args.dataset)


def run_texts(args: Any, seeds: int) -> tuple[dict[str, Any], dict[str, Any], Callable[[], dict[str, Any]]]:
    """The text data sets: ``(result, curves, serving latency measurement)``. Seeds run in the
    outer loop and the trained methods in turn inside it (interleaved: machine load drifts hit
    every method alike); the JSON is rewritten after every run, with what is still ``pending``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [] if args.methods == "none" else args.methods.split(",")
    trained = [m for m in methods if m != "tfidf"]
    for method in trained:
        variant(args.variants, method)  # a bad name fails now, not after hours of training
    rows = data.load(args.dataset)
    n_train, n_test = (QUICK_SIZES if args.quick else SIZES)[args.dataset]
    n_test = args.n_test or n_test
    n_train = (len(rows) - n_test if args.n_train == 0 else args.n_train) or n_train
    train_rows, test_rows = data.split(rows, n_train, n_test, seed=0)
    labels = tuple(sorted({r["label"] for r in rows}))
    index = {name: i for i, name in enumerate(labels)}
    # the trainer needs a validation set for early stopping: carve it from train, never from test
    val_rows, fit_rows = train_rows[: len(train_rows) // 10], train_rows[len(train_rows) // 10 :]
    base = load_base(pooling=None if args.pooling == "base" else Pooling.parse(args.pooling))
    # what a job would train at: the asked max_length, or auto's choice for these texts
    max_length = resolve_text_hyperparameters(Hyperparameters.from_dict(args.hyperparameters),
                                              [r["text"] for r in fit_rows], "lora", base).max_length
    base.max_length = max_length
    result: dict[str, Any] = {
        "machine": machine(), "dataset": args.dataset, "quick": args.quick, "labels": list(labels),
        "n_train": len(fit_rows), "n_validation": len(val_rows), "n_test": len(test_rows), "max_length": max_length,
        "pooling": str(base.spec.pooling), "seeds": seeds, "threads": torch.get_num_threads(),
        "hyperparameters": args.hyperparameters, "variants": dict(args.variants),
    }
    curves: dict[str, list[dict[str, Any]]] = {}
    if args.resume and args.out.exists():  # what an earlier, stopped run of this command finished
        taken = take_runs(result, curves, json.loads(args.out.read_text()), str(args.out))
        print(f"resumed from {args.out}: {', '.join(taken) or 'nothing'}", flush=True)
    texts = {name: [r["text"] for r in part] for name, part in (("fit", fit_rows), ("val", val_rows), ("test", test_rows))}
    ys = {name: [index[r["label"]] for r in part] for name, part in (("fit", fit_rows), ("val", val_rows), ("test", test_rows))}
    if "tfidf" in methods and "tfidf" not in result:
        tf = tfidf_baseline(texts["fit"], ys["fit"], texts["val"], ys["val"], texts["test"])
        m = classification_metrics(ys["test"], tf.predictions, len(labels))
        result["tfidf"] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "train_seconds": tf.seconds,
                           "trainable_params": tf.trainable_params, "c": tf.c, "val_accuracy_per_c": tf.val_accuracy,
                           "deterministic": True}
        print(f"tfidf: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} (C={tf.c:g}) in {tf.seconds:.1f}s")
    seed_list = args.seed_list if args.seed_list is not None else list(range(seeds))
    train_pending(args.out, result, curves, trained, seed_list,
                  lambda method, seed: train_one(args, base, labels, texts, ys, method, seed))
    return result, curves, lambda: serving_latency(base, fit_rows, quick=args.quick)


def train_one(args: Any, base: Any, labels: tuple[str, ...], texts: dict[str, list[str]], ys: dict[str, list[int]],
              method: str, seed: int) -> Piece:
    """One method x seed: ``(its run record, its META fields or None if it failed, its curve)``."""
    history: list[dict[str, Any]] = []
    events: list[str] = []
    cb = TrainCallbacks(on_epoch=lambda e, m: log_epoch(method, history, e, m),
                        on_search=lambda d: print(f"{method} search: {json.dumps(d)}", flush=True),
                        on_event=lambda level, message: log_event(method, events, level, message))
    hp = Hyperparameters.from_dict({"seed": seed, "max_length": base.max_length, **args.hyperparameters,
                                    **variant(args.variants, method)})
    ckpt = args.checkpoint_dir / f"{method.replace(':', '-')}-{seed}" if args.checkpoint_dir else None
    t0 = time.perf_counter()
    try:
        res = train(base, texts["fit"], ys["fit"], labels, texts["val"], ys["val"], method=method.split(":")[0],
                    hp=hp, callbacks=cb, checkpoint_dir=ckpt, threads=args.threads)
    except TrainingDiverged as e:  # what a tenant would get: a failed job, no adapter
        print(f"{method} seed {seed}: failed: {e.message}")
        return ({"seed": seed, "failed": e.message, "train_seconds": time.perf_counter() - t0,
                 "epochs_run": len(history), "load_average": round(os.getloadavg()[0], 2)}, None, history)
    seconds = time.perf_counter() - t0
    m = classification_metrics(ys["test"], predict(res.model, base, texts["test"], hp.max_length), len(labels))
    print(f"{method} seed {seed}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} in {seconds:.0f}s",
          flush=True)
    resumed = next((e for e in events if e.startswith("resumed")), None)
    return ({"seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "train_seconds": seconds,
             "epochs_run": len(res.history), "best_epoch": res.best_epoch, "val_accuracy": res.metrics["val_accuracy"],
             "steps": res.metrics.get("steps"), "load_average": round(os.getloadavg()[0], 2),
             **({"resumed": resumed} if resumed else {}),
             **({"search": res.metrics["search"]} if "search" in res.metrics else {})},
            trained_meta(res), list(res.history))  # every epoch, those a checkpoint brought included


def variant(variants: dict[str, dict[str, Any]], method: str) -> dict[str, Any]:
    """The extra hyper-parameters of method ``lora:NAME`` (``--variants``); {} for a plain method."""
    if ":" not in method:
        return {}
    kind, name = method.split(":", 1)
    if kind != "lora" or name not in variants:
        raise SystemExit(f"method {method!r}: variants are 'lora:NAME' with NAME in --variants ({', '.join(variants)})")
    return dict(variants[name])


def log_event(method: str, events: list[str], level: str, message: str) -> None:
    """Keep a run's event; print those the epoch lines do not already say (warm start, warnings...)."""
    events.append(message)
    if not message.startswith("epoch "):
        print(f"{method} {level}: {message}", flush=True)


def log_epoch(method: str, history: list[dict[str, Any]], epoch: int, m: dict[str, Any]) -> None:
    history.append({"epoch": epoch, **m})
    print(f"{method} epoch {epoch}: train loss {m['train_loss']:.4f}, val loss {m['val_loss']:.4f}, "
          f"val accuracy {m['val_accuracy']:.4f}", flush=True)


@torch.inference_mode()
def predict(model: torch.nn.Module, base, texts: list[str], max_length: int | str = 128,
            batch: int = 64) -> list[int]:
    model.eval()
    out: list[int] = []
    for i in range(0, len(texts), batch):
        enc = base.tokenize(texts[i : i + batch], max_length=int(max_length))
        out += model(**enc).logits.argmax(-1).tolist()
    return out


def plot_curves(png: Path, curves: dict[str, list[dict[str, Any]]], dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, hist in curves.items():
        epochs = [h["epoch"] for h in hist]
        ax1.plot(epochs, [h.get("train_loss", float("nan")) for h in hist], marker="o", label=f"{method} train")
        ax1.plot(epochs, [h.get("val_loss", float("nan")) for h in hist], marker="x", ls="--", label=f"{method} val")
        ax2.plot(epochs, [h.get("val_accuracy", float("nan")) for h in hist], marker="o", label=method)
    ax1.set(title=f"{dataset}: loss", xlabel="epoch", ylabel="loss")
    ax2.set(title=f"{dataset}: validation accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, png)


if __name__ == "__main__":
    main()
