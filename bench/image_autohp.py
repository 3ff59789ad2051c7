"""Do the image auto hyper-parameters work from 20 to 20,000 images? (issue 14 item 6)

    python -m bench.image_autohp [--quick] [--resume] [--sizes 20,50,200,2000] [--methods lora,head]
        [--seeds 3] [--input-size 96] [--n-test 1000] [--threads 1] --out bench/results/image-autohp-cpu.json

**Plan** (``bench.image_autohp_plan``): for uploads of 20, 50, 200, 2,000 and 20,000 images of
10 classes, what a job does with them: the validation share the job runner holds out
(``task_data.validation_fraction``), the auto values ``resolve_image_hyperparameters`` picks on
EfficientNet-Lite0 for ``lora`` and ``head`` (epochs, batch size, learning rate, warm-up steps,
patience, rank), the optimizer steps and image-steps they plan, and the estimated hours at the
service's 224 px and at the run's input size from a timing probe made in this run
(``--threads`` threads): nothing is trained at 20,000.

**Runs**: Fashion-MNIST uploads of each ``--sizes`` size (``bench.image_data``: nested seeded
stratified subsets, so a larger upload holds the smaller ones' images), split and trained as a
job is, every hyper-parameter ``auto`` (the split seed is the training seed, as in a job), on
the backbone built for ``--input-size`` px (default 96, so the 2,000-image lora run fits a
session; ``input_note`` says so), scored on ``--n-test`` test images (centre crops, as served).
Sizes up to ``SEEDED_UP_TO`` run ``--seeds`` training seeds (their scores swing most), larger
ones seed 0; seed 0 of every size runs first, methods interleaved. Each run records test
accuracy and macro-F1, epochs planned / run, the best epoch, early stop, optimizer steps and the
steps run after the kept epoch, train seconds and the probe's estimate of them, the validation
curve and the load average. The JSON is rewritten after every run; ``--resume`` keeps what
``--out`` holds (the same settings, else refused) and trains the rest.

``checks``: ``accuracy_rises_with_data`` (per method, the mean test accuracy never falls from a
size to the next), ``failures`` (runs that diverged: a tenant's failed job), ``lora_beats_head_from``
(the smallest size from which lora's mean is above head's at every larger size; None if never),
``max_steps_after_best`` (per size, the most optimizer steps a lora run spent after the epoch it
kept: compute for nothing).

``--quick``: sizes 20 / 50 / 200 at 64 px, 200 test images, one seed: a smoke test.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from adapters.jobs.task_data import split, validation_fraction
from adapters.training import TrainCallbacks, TrainingDiverged
from adapters.training.image_hyperparams import ImageHyperparameters
from adapters.training.image_task import train_images
from adapters.training.metrics import classification_metrics
from adapters.vision.backbone import VisionBase, load_vision_base
from adapters.vision.image_datasets import ImageDataset
from bench.common import machine, parser
from bench.image_autohp_plan import PLAN_SIZES, estimate_seconds, plan, plot, probe
from bench.image_data import LABELS, fashion_mnist
from bench.quality_image import image_dataset, predict_images
from bench.quality_runs import save

SIZES = (20, 50, 200, 2000)
QUICK_SIZES = (20, 50, 200)
INPUT_SIZE, QUICK_INPUT_SIZE = 96, 64
N_TEST, QUICK_N_TEST = 1000, 200
SEEDED_UP_TO = 200  # sizes up to this run every --seeds seed; larger ones seed 0
METHODS = ("lora", "head")
SETTINGS = ("quick", "input_size", "n_test", "threads")  # what --resume needs to be the same


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", type=_ints, default=None, help="upload sizes to train (default 20,50,200,2000)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of lora, head, full")
    p.add_argument("--seeds", type=int, default=None, help=f"training seeds for sizes <= {SEEDED_UP_TO} "
                                                          "(default 3, --quick 1)")
    p.add_argument("--input-size", type=int, default=None, help="px the backbone is built for (default 96, --quick 64)")
    p.add_argument("--n-test", type=int, default=None, help="test images (default 1000, --quick 200)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--resume", action="store_true", help="keep the runs --out holds; train the rest")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    seeds = args.seeds or (1 if args.quick else 3)
    methods = args.methods.split(",")
    settings = {"quick": args.quick, "input_size": args.input_size or (QUICK_INPUT_SIZE if args.quick else INPUT_SIZE),
                "n_test": args.n_test or (QUICK_N_TEST if args.quick else N_TEST), "threads": args.threads}
    result = _start(args.out, settings, args.resume)
    base = load_vision_base(input_size=settings["input_size"])
    serving = load_vision_base()  # the service's own input size, for the plan and its estimate
    labels = tuple(sorted(LABELS))
    probe_pairs, test_pairs = fashion_mnist(4 * len(labels), settings["n_test"], seed=0)
    test = image_dataset(test_pairs, labels, "test")
    small = split(image_dataset(probe_pairs, labels, "train"), fraction=0.2, seed=0)
    if "probe" not in result:  # a resumed run keeps its probe: its runs' estimates used it
        result["probe"] = {f"{b.input_size}px": probe(b, *small) for b in (base, serving)}
    result["plan"] = plan(serving, result["probe"], methods)
    result["input_note"] = (f"trained on the backbone built for {base.input_size} px (the service's is "
                            f"{serving.input_size}); the plan's hyper-parameters are the same at both sizes "
                            "but image_size, and its hours are at both")
    save(args.out, result)
    queue = [(n, m, s) for s in range(seeds) for n in sizes if s == 0 or n <= SEEDED_UP_TO for m in methods]
    done = {(r["n_images"], r["method"], r["seed"]) for r in result["runs"]}
    for n, method, seed in [q for q in queue if q not in done]:
        upload = image_dataset(fashion_mnist(n, 0, seed=0)[0], labels, "train")
        run = train_one(base, upload, test, method, seed, result["probe"][f"{base.input_size}px"])
        result["runs"].append(run)
        result["summary"], result["checks"] = summarise(result["runs"])
        result["machine"] = machine()
        save(args.out, result)
        print(f"{n} images {method} seed {seed}: accuracy {run.get('accuracy')} epochs {run['epochs_run']}/"
              f"{run['epochs_planned']} in {run['train_seconds']:.0f}s", flush=True)
    result["summary"], result["checks"] = summarise(result["runs"])
    result["machine"] = machine()
    save(args.out, result)
    print(f"wrote {args.out}")
    plot(args.out.with_suffix(".png"), result)


def train_one(base: VisionBase, upload: ImageDataset, test: ImageDataset, method: str, seed: int,
              timing: dict[str, float]) -> dict[str, Any]:
    """One job's worth: split as the runner does, train with every value auto, score on ``test``."""
    fit, val = split(upload, fraction=validation_fraction(len(upload)), seed=seed)
    history: list[dict[str, Any]] = []
    cb = TrainCallbacks(on_epoch=lambda e, m: history.append(
        {"epoch": e, "step": m["step"], "train_loss": m["train_loss"], "val_loss": m["val_loss"],
         "val_accuracy": m["val_accuracy"]}))
    hp = ImageHyperparameters(seed=seed)
    row: dict[str, Any] = {"n_images": len(upload), "method": method, "seed": seed, "n_fit": len(fit),
                           "n_validation": len(val)}
    t0 = time.perf_counter()
    try:
        res = train_images(base, fit, val, method=method, hp=hp, callbacks=cb)
    except TrainingDiverged as e:
        return {**row, "failed": e.message, "train_seconds": time.perf_counter() - t0, "epochs_run": len(history),
                "epochs_planned": None, "curve": history, "load_average": round(os.getloadavg()[0], 2)}
    seconds = time.perf_counter() - t0
    rhp = res.hyperparameters
    steps_per_epoch = -(-len(fit) // rhp["batch_size"])
    t1 = time.perf_counter()
    m = classification_metrics(test.label_ids(), predict_images(res.model, base, test), len(test.labels))
    return {**row, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "val_accuracy": res.metrics["val_accuracy"],
            "epochs_planned": rhp["epochs"], "epochs_run": len(history), "best_epoch": res.best_epoch,
            "early_stop": len(history) < rhp["epochs"], "steps": res.metrics["steps"],
            "steps_planned": steps_per_epoch * rhp["epochs"],
            "steps_after_best": res.metrics["steps"] - steps_per_epoch * res.best_epoch,
            "train_seconds": round(seconds, 2), "test_seconds": round(time.perf_counter() - t1, 2),
            # 3 significant digits: a tiny run's estimate is milliseconds (2 decimals made it 0)
            "estimated_seconds": float(f"{estimate_seconds(method, len(fit), len(val), len(history), timing):.3g}"),
            "hyperparameters": {k: rhp[k] for k in ("epochs", "batch_size", "learning_rate", "warmup_ratio",
                                                    "patience", "lora_r", "image_size")},
            "curve": history, "load_average": round(os.getloadavg()[0], 2)}


def summarise(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per method and size: mean / std test accuracy over the seeds that trained; the checks."""
    summary: dict[str, dict[str, Any]] = {}
    for r in runs:
        summary.setdefault(r["method"], {}).setdefault(str(r["n_images"]), []).append(r)
    out: dict[str, Any] = {}
    for method, by_size in summary.items():
        out[method] = {}
        for n, rs in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            ok = [r["accuracy"] for r in rs if "failed" not in r]
            out[method][n] = {"accuracy": statistics.mean(ok) if ok else None,
                              "accuracy_std": statistics.stdev(ok) if len(ok) > 1 else 0.0, "n_runs": len(rs),
                              "n_failed": len(rs) - len(ok),
                              "train_seconds": statistics.mean(r["train_seconds"] for r in rs),
                              "epochs_run": [r["epochs_run"] for r in rs]}
    rises = {m: _never_falls([v["accuracy"] for v in by.values()]) for m, by in out.items()}
    checks: dict[str, Any] = {"accuracy_rises_with_data": rises,
                              "failures": [f"{r['n_images']}:{r['method']}:{r['seed']}" for r in runs if "failed" in r],
                              "lora_beats_head_from": _beats_from(out.get("lora", {}), out.get("head", {})),
                              "max_steps_after_best": {n: max(r.get("steps_after_best", 0) for r in rs)
                                                       for n, rs in summary.get("lora", {}).items()}}
    return out, checks


def _never_falls(accs: list[float | None]) -> bool:
    got = [a for a in accs if a is not None]
    return all(b >= a for a, b in zip(got, got[1:]))


def _beats_from(lora: dict[str, Any], head: dict[str, Any]) -> int | None:
    both = sorted((int(n) for n in lora if n in head), reverse=True)
    first = None
    for n in both:  # from the largest size down, while lora stays ahead
        a, b = lora[str(n)]["accuracy"], head[str(n)]["accuracy"]
        if a is None or b is None or a <= b:
            break
        first = n
    return first


def _start(out: Path, settings: dict[str, Any], resume: bool) -> dict[str, Any]:
    fresh = {**settings, "plan_sizes": list(PLAN_SIZES), "runs": []}
    if not (resume and out.exists()):
        return fresh
    earlier = json.loads(out.read_text())
    for key in SETTINGS:
        if earlier.get(key) != settings[key]:
            raise SystemExit(f"--resume: {out} has {key}={earlier.get(key)!r}, this run {settings[key]!r}; "
                             "not the same measurement")
    print(f"resuming {out}: {len(earlier.get('runs', []))} runs kept", flush=True)
    return {**fresh, "runs": list(earlier.get("runs", [])), **({"probe": earlier["probe"]} if "probe" in earlier else {})}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


if __name__ == "__main__":
    main()
