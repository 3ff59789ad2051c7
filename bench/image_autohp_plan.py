"""``bench.image_autohp``'s plan, timing model and plot: what the image auto hyper-parameters plan
for an upload of a given size, and what that costs.

* ``probe(base, fit, val, method)`` times the ``lora`` (or ``full``) model of ``base`` (built by
  ``ImageTask``, as training builds it): seconds per training image-step (forward, backward,
  AdamW step; batch ``PROBE_BATCH``, median of ``PROBE_STEPS`` after one warm-up) and per image
  of inference, at the threads torch has.
* ``estimate_seconds`` turns a run's shape into seconds with those figures: ``lora`` / ``full``
  train ``epochs x n_fit`` image-steps and validate ``epochs x n_val`` images; ``head`` computes
  the features of ``n_fit + n_val`` images once (its linear steps cost next to nothing). It
  ignores image decoding and the test set: ``bench.image_autohp`` records it beside each run's
  measured time, so the JSON shows how far off it is.
* ``plan(base, probes, methods)``: for each of ``PLAN_SIZES`` uploads of ``CLASSES`` classes,
  the validation images the job runner holds out (its rule, ``task_data.validation_fraction``
  and the stratified split, applied to stand-in rows), the resolved auto values, the planned
  optimizer steps (warm-up included) and the estimated hours at each probed input size.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.datasets import Dataset, Example, stratified_split
from adapters.jobs.task_data import validation_fraction
from adapters.training.image_hyperparams import ImageHyperparameters
from adapters.training.image_task import ImageTask, resolve_image_hyperparameters
from adapters.vision.backbone import VisionBase
from adapters.vision.image_datasets import ImageDataset

PLAN_SIZES = (20, 50, 200, 2000, 20000)
CLASSES = 10
PROBE_BATCH, PROBE_STEPS = 16, 3
COLORS = {"lora": "C0", "head": "C1", "full": "C2"}
SHOWN = ("epochs", "batch_size", "learning_rate", "warmup_ratio", "patience", "lora_r", "image_size")


def probe(base: VisionBase, fit: ImageDataset, val: ImageDataset, method: str = "lora") -> dict[str, float]:
    """Seconds per training image-step and per inferred image of ``base``'s ``method`` model
    (``lora`` or ``full``)."""
    rhp = resolve_image_hyperparameters(ImageHyperparameters(), len(fit), method, base)
    task = ImageTask(base, fit.labels, method, rhp, fit, fit.label_ids(), val, val.label_ids())
    model = task.build()
    opt = torch.optim.AdamW([p for g in task.param_groups() for _, p in g.params], lr=1e-4)
    x = torch.randn(PROBE_BATCH, 3, base.input_size, base.input_size)
    y = torch.arange(PROBE_BATCH) % len(fit.labels)

    def step() -> None:
        task.set_training(True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer() -> None:
        task.set_training(False)
        model(x)

    times: dict[str, list[float]] = {"train": [], "infer": []}
    step(), infer()  # warm-up
    for _ in range(PROBE_STEPS):
        for name, fn in (("train", step), ("infer", infer)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {"train_s_per_image_step": statistics.median(times["train"]) / PROBE_BATCH,
            "infer_s_per_image": statistics.median(times["infer"]) / PROBE_BATCH,
            "input_size": base.input_size, "threads": torch.get_num_threads(),
            "load_average": round(os.getloadavg()[0], 2)}


def estimate_seconds(method: str, n_fit: int, n_val: int, epochs: int, timing: dict[str, float]) -> float:
    """A run's seconds by the probe's figures (see the module docstring)."""
    if method == "head":
        return (n_fit + n_val) * timing["infer_s_per_image"]
    return epochs * (n_fit * timing["train_s_per_image_step"] + n_val * timing["infer_s_per_image"])


def split_counts(n: int, classes: int = CLASSES) -> tuple[int, int]:
    """(training, validation) images of an upload of ``n`` balanced over ``classes`` labels, by the
    job runner's split."""
    labels = tuple(f"c{c:02d}" for c in range(classes))
    rows = Dataset(tuple(Example(str(i), labels[i % classes]) for i in range(n)), labels)
    fit, val = stratified_split(rows, fraction=validation_fraction(n), seed=0)
    return len(fit), len(val)


def plan(base: VisionBase, probes: dict[str, dict[str, float]], methods: list[str]) -> list[dict[str, Any]]:
    """The auto values and their cost for every ``PLAN_SIZES`` upload and method."""
    rows = []
    for n in PLAN_SIZES:
        n_fit, n_val = split_counts(n)
        for method in methods:
            rhp = resolve_image_hyperparameters(ImageHyperparameters(), n_fit, method, base).to_dict()
            per_epoch = -(-n_fit // rhp["batch_size"])
            steps = per_epoch * rhp["epochs"]
            rows.append({
                "n_images": n, "n_fit": n_fit, "n_validation": n_val, "method": method,
                **{k: rhp[k] for k in SHOWN}, "steps_per_epoch": per_epoch, "planned_steps": steps,
                "warmup_steps": int(steps * rhp["warmup_ratio"]), "planned_image_steps": n_fit * rhp["epochs"],
                "estimated_hours": {size: round(estimate_seconds(method, n_fit, n_val, rhp["epochs"], t) / 3600, 3)
                                    for size, t in probes.items()},
            })
    return rows


def plot(png: Path, result: dict[str, Any]) -> None:
    """Test accuracy by upload size; planned steps and hours by size; lora's validation curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.common import save_figure

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    for method, by_size in (result.get("summary") or {}).items():
        sizes = [int(n) for n in by_size if by_size[n]["accuracy"] is not None]
        ax1.plot(sizes, [by_size[str(n)]["accuracy"] for n in sizes], marker="o", label=f"{method} (mean)",
                 color=COLORS.get(method))
        pts = [(r["n_images"], r["accuracy"]) for r in result["runs"] if r["method"] == method and "accuracy" in r]
        ax1.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, alpha=0.5, color=COLORS.get(method))
    ax1.set(xscale="log", title=f"test accuracy ({result['input_size']} px, {result['n_test']} test images)",
            xlabel="images uploaded", ylabel="accuracy")
    serving = max(result["probe"], key=lambda k: int(k.removesuffix("px")))
    for i, method in enumerate(sorted({r["method"] for r in result["plan"]}, key=list(COLORS).index)):
        rows = [r for r in result["plan"] if r["method"] == method]
        ax2.plot([r["n_images"] for r in rows], [r["planned_steps"] for r in rows], marker="o", label=method,
                 color=COLORS.get(method))
        for r in rows:
            ax2.annotate(f"{r['epochs']}ep, {r['estimated_hours'][serving]:.2g} h", (r["n_images"], r["planned_steps"]),
                         fontsize=7, textcoords="offset points", xytext=(4, 5 - 14 * i), color=COLORS.get(method))
    ax2.set(xscale="log", yscale="log", title=f"auto plan: optimizer steps (hours at {serving}, probe)",
            xlabel="images uploaded", ylabel="planned steps")
    for r in sorted(result["runs"], key=lambda r: r["n_images"]):
        if r["method"] == "lora" and r["seed"] == 0 and r.get("curve"):
            ax3.plot([h["step"] for h in r["curve"]], [h["val_accuracy"] for h in r["curve"]], marker=".",
                     label=f"{r['n_images']} images")
    ax3.set(xscale="symlog", title="lora, seed 0: validation accuracy", xlabel="optimizer step", ylabel="accuracy")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure(fig, png)
