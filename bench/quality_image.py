"""The image half of ``bench.quality``: ``--dataset fashion-mnist`` on EfficientNet-Lite0.

Fashion-MNIST (``bench.image_data``: Debian's ``dataset-fashion-mnist``; ``scripts/system-packages.sh``
installs it) as a tenant would send it: 28 x 28 grayscale PNGs, which the trainer converts to
RGB and upscales (centre crops at the base's input size for validation and test, random resized
crops for training). A seeded stratified subset: 2,000 train / 1,000 test (``--quick``: 200 /
200), train and test drawn from the files' own train and test parts; a tenth of the training
images (per class) is the validation set early stopping reads, never the test set. Methods
``lora``, ``head`` and ``full`` through ``adapters.training.image_task.train_images`` with the
auto hyper-parameters (``--hyperparameters`` overrides them for every method), each over
``--seeds`` training seeds on the same split.

``--input-size N`` builds the backbone for N px inputs instead of its own 224
(``load_vision_base(input_size=N)``: the same weights and paddings, smaller images; a multiple of
32): the JSON's ``input_size`` and ``input_note`` say so, and pieces of another size are not
merged. ``--checkpoint-dir DIR`` keeps each run's per-epoch checkpoint (``DIR/METHOD-SEED``): a
piece stopped mid-run and started again resumes after its last finished epoch (the run record
says ``resumed``; its ``train_seconds`` are this process's only). ``--quick`` builds it for 96 px (``QUICK_INPUT``) and trains ``lora`` and ``full`` for
``QUICK_EPOCHS`` epochs (their auto value at 180 images is 30); the JSON's ``quick_note`` says
so. Its figures are a smoke test of the pipeline, not the comparison the issue asks for.

Long runs go in pieces as for text (``bench.quality_runs``): ``--methods lora --seed-list 0``
trains one method x seed per process, the JSON is rewritten after every run, ``--resume`` trains
only what ``--out`` lacks, ``--include`` merges pieces; a run that diverges is recorded with its
reason (a tenant's failed job) and left out of the means.

``trainable_fraction`` is of the trained model's parameters (as for text); ``trainable_vs_backbone``
of the frozen backbone's alone (4.6 M less the ImageNet classifier).
"""

from __future__ import annotations

import io
import json
import os
import time
from typing import Any

import torch

from adapters.training import TrainCallbacks, TrainingDiverged
from adapters.training.image_hyperparams import ImageHyperparameters
from adapters.training.image_inputs import centre_crops, normalise
from adapters.training.image_task import train_images
from adapters.training.metrics import classification_metrics
from adapters.vision.backbone import VisionBase, check_input_size, load_vision_base
from adapters.vision.image_datasets import ImageDataset, ImageExample
from bench.image_data import fashion_mnist
from bench.quality_runs import Piece, take_runs, train_pending, trained_meta

SIZES = (2000, 1000)
QUICK_SIZES = (200, 200)
QUICK_INPUT = 96
FULL_INPUT = 224  # EfficientNet-Lite0's own input size, the service's default
QUICK_EPOCHS = 6
METHODS = ("lora", "head", "full")
VALIDATION_SHARE = 10  # one training image in this many (per class) validates
PREDICT_CHUNK = 64


def run_images(args: Any, seeds: int, log_epoch: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and score every method of ``args.methods`` (pieces, ``--resume``: as for text,
    ``bench.quality_runs``); ``(result, curves)`` for ``bench.quality``."""
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [] if args.methods == "none" else args.methods.split(",")
    for method in methods:
        if method not in METHODS:
            raise SystemExit(f"--dataset fashion-mnist trains {', '.join(METHODS)}, not {method!r}")
    n_train, n_test = QUICK_SIZES if args.quick else SIZES
    n_train, n_test = args.n_train or n_train, args.n_test or n_test
    fit, val, test = datasets(n_train, n_test)
    if args.input_size is not None:
        try:
            check_input_size(args.input_size)
        except ValueError as e:
            raise SystemExit(f"--input-size: {e}") from None
    base = load_vision_base(input_size=args.input_size or (QUICK_INPUT if args.quick else None))
    backbone_params = sum(p.numel() for p in base.model.parameters())
    result: dict[str, Any] = {
        "dataset": "fashion-mnist", "quick": args.quick, "base": base.spec.name, "input_size": base.input_size, "labels": list(fit.labels),
        "n_train": len(fit), "n_validation": len(val), "n_test": len(test), "seeds": seeds,
        "threads": torch.get_num_threads(), "hyperparameters": args.hyperparameters, "backbone_params": backbone_params,
        "input_note": None if base.input_size == FULL_INPUT else
        f"the backbone built for {base.input_size} px (its own is {FULL_INPUT}): the same weights, smaller images",
        "quick_note": (f"--quick: {len(fit) + len(val)} / {len(test)} images, backbone built for "
                       f"{base.input_size} px (its own is {FULL_INPUT}), lora and full {QUICK_EPOCHS} epochs: a "
                       "smoke test, not the comparison") if args.quick else None,
    }
    curves: dict[str, list[dict[str, Any]]] = {}
    if args.resume and args.out.exists():  # what an earlier, stopped run of this command finished
        taken = take_runs(result, curves, json.loads(args.out.read_text()), str(args.out))
        print(f"resumed from {args.out}: {', '.join(taken) or 'nothing'}", flush=True)
    test_ids = [fit.labels.index(e.label) for e in test.examples]

    def train_one(method: str, seed: int) -> Piece:
        history: list[dict[str, Any]] = []
        events: list[str] = []
        cb = TrainCallbacks(on_epoch=lambda e, m: log_epoch(method, history, e, m),
                            on_event=lambda level, message: events.append(message))
        quick = {"epochs": QUICK_EPOCHS} if args.quick and method != "head" else {}
        hp = ImageHyperparameters.from_dict({"seed": seed, **quick, **args.hyperparameters})
        ckpt = args.checkpoint_dir / f"{method}-{seed}" if args.checkpoint_dir else None
        t0 = time.perf_counter()
        try:
            res = train_images(base, fit, val, method=method, hp=hp, callbacks=cb, checkpoint_dir=ckpt)
        except TrainingDiverged as e:  # what a tenant would get: a failed job, no adapter
            print(f"{method} seed {seed}: failed: {e.message}", flush=True)
            return ({"seed": seed, "failed": e.message, "train_seconds": time.perf_counter() - t0,
                     "epochs_run": len(history), "load_average": round(os.getloadavg()[0], 2)}, None, history)
        seconds = time.perf_counter() - t0
        m = classification_metrics(test_ids, predict_images(res.model, base, test), len(fit.labels))
        print(f"{method} seed {seed}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} in {seconds:.0f}s",
              flush=True)
        run = {"seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "train_seconds": seconds,
               "epochs_run": res.metrics["epochs_run"], "best_epoch": res.best_epoch, "steps": res.metrics["steps"],
               "load_average": round(os.getloadavg()[0], 2),
               **({"resumed": next(e for e in events if e.startswith("resumed"))}
                  if any(e.startswith("resumed") for e in events) else {})}
        meta = {**trained_meta(res), "trainable_vs_backbone": res.trainable_params / backbone_params}
        return run, meta, list(res.history)  # every epoch, those a checkpoint brought included

    seed_list = args.seed_list if args.seed_list is not None else list(range(seeds))
    train_pending(args.out, result, curves, methods, seed_list, train_one)
    return result, curves


def datasets(n_train: int, n_test: int, seed: int = 0) -> tuple[ImageDataset, ImageDataset, ImageDataset]:
    """(fit, validation, test) image datasets of PNG files, labels sorted; validation is every
    ``VALIDATION_SHARE``-th training image of each class."""
    train, test = fashion_mnist(n_train, n_test, seed=seed)
    labels = tuple(sorted({label for _, label in train}))
    seen: dict[str, int] = {}
    fit, val = [], []
    for i, (image, label) in enumerate(train):
        seen[label] = seen.get(label, 0) + 1
        (val if seen[label] % VALIDATION_SHARE == 1 else fit).append(_example(image, label, f"train[{i}]"))
    return ImageDataset(tuple(fit), labels), ImageDataset(tuple(val), labels), image_dataset(test, labels, "test")


def image_dataset(pairs: list[tuple[Any, str]], labels: tuple[str, ...], name: str) -> ImageDataset:
    """``(PIL image, label)`` pairs as a tenant's upload: PNG files, sources ``name[i]``."""
    return ImageDataset(tuple(_example(image, label, f"{name}[{i}]") for i, (image, label) in enumerate(pairs)),
                        labels)


def _example(image: Any, label: str, source: str) -> ImageExample:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return ImageExample(buf.getvalue(), label, source)


@torch.inference_mode()
def predict_images(model: torch.nn.Module, base: VisionBase, ds: ImageDataset) -> list[int]:
    """What serving predicts: centre crops at the base's input size, the trained model's argmax."""
    model.eval()
    pixels = centre_crops(ds, base.input_size, lambda: None)
    out: list[int] = []
    for i in range(0, len(ds), PREDICT_CHUNK):
        out += model(normalise(pixels[i : i + PREDICT_CHUNK]).to(base.device)).argmax(-1).tolist()
    return out
