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

``--quick`` builds the backbone for 96 px inputs instead of 224 (``load_vision_base(input_size=96)``:
the same weights and paddings) and trains ``lora`` and ``full`` for ``QUICK_EPOCHS`` epochs
(their auto value at 180 images is 30); the JSON's ``quick_note`` says so. Its figures are a
smoke test of the pipeline, not the comparison the issue asks for.

``trainable_fraction`` is of the trained model's parameters (as for text); ``trainable_vs_backbone``
of the frozen backbone's alone (4.6 M less the ImageNet classifier).
"""

from __future__ import annotations

import io
import time
from typing import Any

import torch

from adapters.training import TrainCallbacks
from adapters.training.image_hyperparams import ImageHyperparameters
from adapters.training.image_inputs import centre_crops, normalise
from adapters.training.image_task import train_images
from adapters.training.metrics import classification_metrics
from adapters.vision.backbone import VisionBase, load_vision_base
from adapters.vision.image_datasets import ImageDataset, ImageExample
from bench.image_data import fashion_mnist

SIZES = (2000, 1000)
QUICK_SIZES = (200, 200)
QUICK_INPUT = 96
QUICK_EPOCHS = 6
METHODS = ("lora", "head", "full")
VALIDATION_SHARE = 10  # one training image in this many (per class) validates
PREDICT_CHUNK = 64


def run_images(args: Any, seeds: int, log_epoch: Any, summarise: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train and score every method of ``args.methods``; ``(result, curves)`` for ``bench.quality``."""
    n_train, n_test = QUICK_SIZES if args.quick else SIZES
    n_train, n_test = args.n_train or n_train, args.n_test or n_test
    fit, val, test = datasets(n_train, n_test)
    base = load_vision_base(input_size=QUICK_INPUT if args.quick else None)
    backbone_params = sum(p.numel() for p in base.model.parameters())
    result: dict[str, Any] = {
        "base": base.spec.name, "input_size": base.input_size, "labels": list(fit.labels),
        "n_train": len(fit), "n_validation": len(val), "n_test": len(test), "seeds": seeds,
        "backbone_params": backbone_params,
        "quick_note": (f"--quick: {len(fit) + len(val)} / {len(test)} images, backbone built for "
                       f"{QUICK_INPUT} px (its own is 224), lora and full {QUICK_EPOCHS} epochs: a smoke "
                       "test, not the comparison") if args.quick else None,
    }
    curves: dict[str, list[dict[str, Any]]] = {}
    test_ids = [fit.labels.index(e.label) for e in test.examples]
    for method in [] if args.methods == "none" else args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"--dataset fashion-mnist trains {', '.join(METHODS)}, not {method!r}")
        runs, res = [], None
        for seed in range(seeds):
            history: list[dict[str, Any]] = []
            cb = TrainCallbacks(on_epoch=lambda e, m, h=history, meth=method: log_epoch(meth, h, e, m))
            quick = {"epochs": QUICK_EPOCHS} if args.quick and method != "head" else {}
            hp = ImageHyperparameters.from_dict({"seed": seed, **quick, **args.hyperparameters})
            t0 = time.perf_counter()
            res = train_images(base, fit, val, method=method, hp=hp, callbacks=cb)
            seconds = time.perf_counter() - t0
            m = classification_metrics(test_ids, predict_images(res.model, base, test), len(fit.labels))
            runs.append({"seed": seed, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "train_seconds": seconds,
                         "epochs_run": len(history), "best_epoch": res.best_epoch})
            if seed == 0:
                curves[method] = history
            print(f"{method} seed {seed}: accuracy {m['accuracy']:.4f} macro-F1 {m['macro_f1']:.4f} in {seconds:.0f}s")
        assert res is not None
        result[method] = {**summarise(runs), "trainable_params": res.trainable_params, "total_params": res.total_params,
                          "trainable_fraction": res.trainable_params / res.total_params,
                          "trainable_vs_backbone": res.trainable_params / backbone_params,
                          "hyperparameters": res.hyperparameters, "runs": runs}
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
    tests = [_example(image, label, f"test[{i}]") for i, (image, label) in enumerate(test)]
    return tuple(ImageDataset(tuple(part), labels) for part in (fit, val, tests))  # type: ignore[return-value]


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
