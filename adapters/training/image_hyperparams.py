"""Hyper-parameters of an image-classification run: each may be ``"auto"``, resolved from the data
size, the method and the vision base.

The fields the text trainer has mean the same here (``adapters.training.hyperparams``, checked
by the same rules), less ``max_length``, plus:

* ``image_size`` -- the side of the training crops (a multiple of 32, the backbone's total
  stride, so every "same" padding stays what it was built for). Auto: the base's
  ``input_size``. Validation, the gate and serving always see the base's ``input_size``
  (centre crops); a smaller training size trains faster and serves well (FixRes: random crops
  make objects look larger than centre crops do).
* ``hflip`` -- mirror training crops at random (default true). Turn it off where mirroring
  changes the class: text or digits in the photo, left/right defects.
* ``layer_decay`` -- layer-wise learning-rate decay for ``lora`` and ``full``: the head trains
  at ``learning_rate``, the head conv at ``layer_decay`` times it, each stage of blocks below
  at one more factor (``adapters.training.layer_decay``). 1 turns it off; ignored by ``head``.

Auto values (EfficientNet-Lite0, ImageNet weights): batch 8 under 100 images, 16 under
1,000, 32 above; epochs aim at ~``TARGET_STEPS`` optimizer steps (fewer than text's 600: a
step costs far more), clamped to 2..30 (``head``: 5..30), except that a set whose one epoch
reaches ``TARGET_STEPS`` alone trains one epoch (from ~12,800 training images at batch 32: a
second pass doubled the hours for no planned need). For uploads, after the job's validation
hold-out: 20 -> 30 epochs x 2 steps, 200 -> 30 x 10, 2,000 -> 7 x 57, 10,000 -> 2 x 282,
20,000 -> 1 x 563. Patience (epochs without a better validation accuracy before stopping) is
the epochs of ``PATIENCE_STEPS`` optimizer steps, a quarter of the epochs or 2, whichever is
most, at most all of them: 20 images -> 30 (60 steps: they never stop early), 200 -> 10, 2,000
-> 2. It was a quarter of the epochs alone (7 at 30), and two of three 200-image lora runs
stopped after 9-10 of 30 epochs (best epoch 2-3 on 40 noisy validation images) at 0.70 / 0.68
test accuracy where the one that ran on reached 0.73 at epoch 25
(bench/results/image-autohp-cpu-patience-epochs.json). Measured again with this rule, those two
ran to epoch 12-13 and kept the same epochs (same scores): with 40 validation images the
choice of epoch, not patience, limits them; one 50-image run gained 2.5 points (best epoch 13
instead of 4). ``bench.image_autohp`` (bench/results/image-autohp-cpu.json) trained these as
jobs on Fashion-MNIST at 96 px: no run diverged, small sets train 60 (20 images) to 150 (50)
steps, and lora's test accuracy rose with the data (head ahead of it at 20 and 50 images,
behind from 200; figures in the README). At
2,000 lora was still improving at its last (7th) epoch, 399 steps: training is step-bound there,
so 20,000 images' one pass of 563 steps over new images needs no second. Learning rates ``LR``
(AdamW; the head of ``lora`` and ``full`` at the full rate, the backbone below it decayed by
``LAYER_DECAY`` per stage), weight decay 0.01, warmup 6%. LoRA r=4, alpha 8, no dropout
(augmentation regularises), on the pointwise convolutions ``image_task.auto_targets`` picks. r=4
rather than text's 8: on the 27 auto targets r=8 trains 5.3% of Lite0's parameters and adds 7.3%
to its multiply-adds at serving; r=4 trains 2.9% (the issue's bound is 3%) at half the serving
cost, and scored no worse in the one comparison run so far (bench.quality --dataset
fashion-mnist --quick, 200 test images at 96 px, 6 epochs, one seed: r=4 0.760, r=8 0.720; +-3 points of
noise). These are the fine-tuning guides' usual values, not yet a tuned result: the full-size
bench.quality run is the real measurement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adapters.strict import is_number
from adapters.training.hyperparams import (
    AUTO, HyperparameterError, LoraFields, ResolvedLora, ResolvedSchedule, ScheduleSettings, _check,
)

LR = {"lora": 2e-3, "head": 5e-3, "full": 2e-4}
LAYER_DECAY = 0.8
TARGET_STEPS = 400
PATIENCE_STEPS = TARGET_STEPS // 4  # early stopping waits at least this many steps without a better epoch


@dataclass(frozen=True)
class ResolvedImageHyperparameters(ResolvedLora, ResolvedSchedule):
    image_size: int
    hflip: bool
    layer_decay: float


@dataclass(frozen=True)
class ImageHyperparameters(LoraFields, ScheduleSettings):
    """What a client asks for; every field may be ``"auto"``. Checked on construction;
    ``from_dict`` / ``to_dict`` as for text (``hyperparams.RequestedSettings``)."""

    image_size: int | str = AUTO
    hflip: bool | str = True
    layer_decay: float | str = AUTO

    def _checked(self, key: str, value: Any) -> Any:
        return _check_image(key, value)

    def resolve(self, n_train: int, method: str, input_size: int,
                auto_targets: tuple[str, ...] = ()) -> ResolvedImageHyperparameters:
        """Concrete values for ``n_train`` images on a base of ``input_size``; ``auto_targets``:
        the LoRA targets ``"auto"`` means on that base (``image_task.auto_targets``)."""
        if method not in LR:
            raise HyperparameterError(f"method must be one of {', '.join(LR)}, got {method!r}", param="method")
        batch = self._or("batch_size", 8 if n_train < 100 else 16 if n_train < 1000 else 32)
        steps_per_epoch = max(1, math.ceil(n_train / batch))
        one_pass = steps_per_epoch >= TARGET_STEPS  # a large set's one epoch reaches the target alone
        lo, hi = (5, 30) if method == "head" else (1 if one_pass else 2, 30)
        epochs = self._or("epochs", min(hi, max(lo, round(TARGET_STEPS / steps_per_epoch))))
        r = self._or("lora_r", 4)
        targets = self._or("target_modules", auto_targets)
        if not targets:
            raise HyperparameterError("no LoRA target modules: name them in target_modules",
                                      param="hyperparameters.target_modules")
        return ResolvedImageHyperparameters(
            epochs=epochs, batch_size=batch, learning_rate=float(self._or("learning_rate", LR[method])),
            weight_decay=float(self._or("weight_decay", 0.01)), warmup_ratio=float(self._or("warmup_ratio", 0.06)),
            seed=self._or("seed", 0),
            patience=self._or("patience", min(epochs, max(2, epochs // 4, math.ceil(PATIENCE_STEPS / steps_per_epoch)))),
            lora_r=r, lora_alpha=float(self._or("lora_alpha", 2 * r)),
            lora_dropout=float(self._or("lora_dropout", 0.0)), target_modules=tuple(targets),
            image_size=self._or("image_size", input_size), hflip=bool(self._or("hflip", True)),
            layer_decay=float(self._or("layer_decay", LAYER_DECAY)),
        )


def _check_image(key: str, value: Any) -> Any:
    """The text rules for shared fields; the image fields' own rules."""
    if isinstance(value, str) and value == AUTO:
        return value
    param = f"hyperparameters.{key}"
    if key == "hflip":
        if not isinstance(value, bool):
            raise HyperparameterError(f"hflip must be true or false, got {value!r}", param=param)
        return value
    if key == "image_size":
        if not is_number(value) or not float(value).is_integer() or not 32 <= value <= 1024 or value % 32:
            raise HyperparameterError(f"image_size must be \"auto\" or a multiple of 32 between 32 and 1024, "
                                      f"got {value!r}", param=param)
        return int(value)
    if key == "layer_decay":
        if not is_number(value) or not math.isfinite(value) or not 0.1 <= value <= 1.0:
            raise HyperparameterError(f"layer_decay must be \"auto\" or a number between 0.1 and 1, got {value!r}",
                                      param=param)
        return float(value)
    return _check(key, value)
