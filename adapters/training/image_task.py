"""Image classification as a training task (``task_hooks.TrainingTask``) on a frozen ``VisionBase``,
and ``train_images``, what a job runner calls for an image job.

The trainable model is a deep copy of ``base.model`` (never the shared base; it must be pristine,
not prepared for serving) whose classifier ``_fc`` is a fresh ``nn.Linear(feature_dim, labels)``:

* ``lora`` (the product path) -- peft LoRA on the backbone's pointwise (1x1) convolutions
  (``target_modules``; auto: ``auto_targets``) with the head as ``modules_to_save``; its artifact
  stores each conv's LoRA as ``A [r, C_in]`` / ``B [C_out, r]`` (peft's 1x1 kernels flattened:
  the layout the engine's ``SlotBank`` and ``MultiLoraConv1x1`` read) and the head;
* ``head`` -- the head alone on frozen features computed once from centre crops (the
  feature-extraction baseline); its artifact carries a rank-1 LoRA pair with B = 0 (an exact
  no-op, as the format needs one pair) on the last pointwise conv, the cheapest to serve;
* ``full`` -- every weight (the benchmark's anchor; no artifact).

``lora`` and ``full`` train with layer-wise learning-rate decay (``layer_decay``) and with
augmentation (``adapters.vision.augment``: random resized crop at ``image_size``, flipped when
``hflip``), drawn per (seed, epoch, example). Batch-norm statistics stay frozen (the base's,
which serving uses) in every method; dropout and stochastic depth run while training. Validation
is what serving does: centre crops at the base's ``input_size``, no augmentation. The manifest's
``task`` is ``image-classification``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.artifact import AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings
from adapters.errors import DatasetError
from adapters.tasks import IMAGE_CLASSIFICATION
from adapters.training.callbacks import TrainCallbacks, TrainResult
from adapters.training.image_hyperparams import ImageHyperparameters, ResolvedImageHyperparameters
from adapters.training.image_inputs import TrainImages, centre_crops, normalise
from adapters.training.layer_decay import block_stages, decayed_groups
from adapters.training.loop import fit
from adapters.training.task_hooks import ParamGroup, Poll
from adapters.training.text_task import check_targets
from adapters.training.trainer import check_data, check_method
from adapters.vision.augment import Augmentation
from adapters.vision.backbone import VisionBase
from adapters.vision.image_datasets import ImageDataset

FEATURE_CHUNK = 64  # images per forward pass when computing frozen features
SKIPPED_STAGES = 2  # auto LoRA targets leave the first stages' convs alone (see auto_targets)
TARGET_LAYER = "pointwise (1x1) convolution"  # what a LoRA target must name


def train_images(
    base: VisionBase, train: ImageDataset, validation: ImageDataset, *, method: str = "lora",
    hp: ImageHyperparameters | ResolvedImageHyperparameters | None = None,
    callbacks: TrainCallbacks | None = None, checkpoint_dir: Path | None = None, threads: int | None = None,
) -> TrainResult:
    """Train an image adapter: labels are ``train.labels``; every validation label must be one of
    them. ``hp``: resolved here when not already (``resolve_image_hyperparameters``)."""
    check_method(method)
    labels = tuple(train.labels)
    index = {label: i for i, label in enumerate(labels)}
    unknown = sorted({e.label for e in validation.examples} - set(index))
    if unknown:
        raise DatasetError(f"the validation set uses label {unknown[0]!r}, which the training set does not have",
                           param="validation")
    train_ids = train.label_ids()
    val_ids = [index[e.label] for e in validation.examples]
    check_data(labels, train, train_ids, "training", unit="images")
    check_data(labels, validation, val_ids, "validation", unit="images")
    rhp = hp if isinstance(hp, ResolvedImageHyperparameters) else resolve_image_hyperparameters(
        hp or ImageHyperparameters(), len(train), method, base)
    task = ImageTask(base, labels, method, rhp, train, train_ids, validation, val_ids)
    return fit(task, rhp, callbacks=callbacks, checkpoint_dir=checkpoint_dir, threads=threads)


def resolve_image_hyperparameters(hp: ImageHyperparameters, n_train: int, method: str,
                                  base: VisionBase) -> ResolvedImageHyperparameters:
    """``hp.resolve`` for ``base`` (its input size and auto LoRA targets); targets are checked."""
    rhp = hp.resolve(n_train, method, base.input_size, auto_targets(base))
    check_targets(base.spec, rhp.target_modules, layer=TARGET_LAYER)
    return rhp


def auto_targets(base: VisionBase) -> tuple[str, ...]:
    """Every pointwise conv but those of the first ``SKIPPED_STAGES`` stages of blocks (Lite0:
    blocks 0-2, 5 of 32 convs): they run at the highest resolutions on 16-24 channels, where a
    rank-8 delta costs up to ~75% of the conv it adapts at serving."""
    stages = block_stages(base.model)
    skipped = {f"_blocks.{i}." for i, s in enumerate(stages) if s < SKIPPED_STAGES}
    kept = tuple(p for p in base.lora_paths if not any(p.startswith(b) for b in skipped))
    return kept or base.lora_paths


class ImageTask:
    def __init__(self, base: VisionBase, labels: tuple[str, ...], method: str, hp: ResolvedImageHyperparameters,
                 train: ImageDataset, train_label_ids: list[int], validation: ImageDataset,
                 val_label_ids: list[int]) -> None:
        if not isinstance(getattr(base.model, base.head_name), nn.Identity):
            raise ValueError("the vision base is prepared for serving (its head is replaced): train on a pristine one")
        self.base, self.labels, self.method, self.hp = base, tuple(labels), method, hp
        self.device = base.device
        self.train, self.validation = train, validation
        self.train_label_ids, self.val_label_ids = train_label_ids, val_label_ids
        self.augment = Augmentation(size=hp.image_size, flip=hp.hflip)
        self.model: nn.Module = nn.Module()
        self.head = nn.Identity()  # the trainable head, once built
        self._images: TrainImages | None = None
        self._train_x = self._val_x = torch.empty(0)  # head: features; else val: uint8 centre crops

    def build(self) -> nn.Module:
        base, hp = self.base, self.hp
        model = copy.deepcopy(base.model).float()
        self.head = nn.Linear(base.feature_dim, len(self.labels))
        setattr(model, base.head_name, self.head)
        if self.method == "lora":
            from peft import LoraConfig, get_peft_model

            check_targets(base.spec, hp.target_modules, layer=TARGET_LAYER)
            paths = sorted({p for t in hp.target_modules for p in base.spec.match_target(t)})
            for p in model.parameters():
                p.requires_grad_(False)
            cfg = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                             target_modules=paths, modules_to_save=[base.head_name])
            model = get_peft_model(model, cfg)
            self.head = getattr(model.base_model.model, base.head_name).modules_to_save["default"]
        else:
            for p in model.parameters():
                p.requires_grad_(self.method == "full")
            self.head.requires_grad_(True)
        self.model = model.to(self.device)
        return self.model

    def param_groups(self) -> list[ParamGroup]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.method == "head":
            return [ParamGroup(named)]
        return decayed_groups(named, block_stages(self.base.model), self.hp.layer_decay)

    def encode(self, poll: Poll) -> None:
        size = self.base.input_size
        if self.method == "head":
            self._train_x = self._features(centre_crops(self.train, size, poll), poll)
            self._val_x = self._features(centre_crops(self.validation, size, poll), poll)
            return
        self._images = TrainImages(self.train, self.hp.image_size, poll)
        self._val_x = centre_crops(self.validation, size, poll)

    def train_batch(self, idx: torch.Tensor, epoch: int) -> torch.Tensor:
        if self.method == "head":
            return self._train_x[idx]
        assert self._images is not None
        return self._images.batch(idx.tolist(), epoch, self.augment, self.hp.seed).to(self.device)

    def val_batch(self, idx: torch.Tensor) -> torch.Tensor:
        if self.method == "head":
            return self._val_x[idx]
        return normalise(self._val_x[idx.cpu()]).to(self.device)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.head(batch) if self.method == "head" else self.model(batch)

    def set_training(self, on: bool) -> None:
        self.model.train(on)
        if on:  # the base's batch-norm statistics are what serving uses: never re-estimated
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def fingerprint(self) -> str:
        what = [IMAGE_CLASSIFICATION, self.method, list(self.labels), self.hp.to_dict(), self.base.fingerprint]
        h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
        for ds, ids in ((self.train, self.train_label_ids), (self.validation, self.val_label_ids)):
            for e in ds.examples:
                h.update(hashlib.sha256(e.data).digest())
            h.update(json.dumps(ids).encode())
        return h.hexdigest()

    @torch.inference_mode()
    def _features(self, pixels: torch.Tensor, poll: Poll) -> torch.Tensor:
        """The frozen features the head reads (the model's input to its head, eval mode)."""
        feats: list[torch.Tensor] = []
        hook = self.head.register_forward_hook(lambda mod, args, out: feats.append(args[0].detach()))
        self.model.eval()
        try:
            for i in range(0, len(pixels), FEATURE_CHUNK):
                poll()
                self.model(normalise(pixels[i : i + FEATURE_CHUNK]).to(self.device))
        finally:
            hook.remove()
        return torch.cat(feats).clone()

    # -- the adapter ------------------------------------------------------------------------

    def artifact(self, metrics: dict[str, Any]) -> AdapterArtifact | None:
        if self.method == "full":
            return None
        spec, hp = self.base.spec, self.hp
        if self.method == "lora":
            from peft.tuners.lora import LoraLayer

            lora = {}
            for path, m in self.model.base_model.model.named_modules():
                if isinstance(m, LoraLayer):
                    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight  # [r, C_in, 1, 1], [C_out, r, 1, 1]
                    lora[path] = (a.detach().flatten(1).cpu().clone(), b.detach().flatten(1).cpu().clone())
            settings = LoraSettings(r=hp.lora_r, alpha=hp.lora_alpha, target_modules=hp.target_modules,
                                    dropout=hp.lora_dropout)
            source = "tailor"
        else:  # head-only: a no-op rank-1 pair on the last (smallest-resolution) pointwise conv
            path = self.base.lora_paths[-1]
            c_in, c_out = spec.linear_shapes[path]
            lora = {path: (torch.zeros(1, c_in), torch.zeros(c_out, 1))}
            settings, source = LoraSettings(r=1, alpha=1.0, target_modules=(path,)), "tailor-head"
        weights = AdapterWeights(lora=lora, head_weight=self.head.weight.detach().cpu().clone(),
                                 head_bias=self.head.bias.detach().cpu().clone())
        manifest = AdapterManifest(base_fingerprint=spec.fingerprint, labels=self.labels, lora=settings,
                                   head_in_features=self.base.feature_dim, task=IMAGE_CLASSIFICATION,
                                   metrics=metrics, source=source)
        art = AdapterArtifact(manifest=manifest, weights=weights)
        art.validate()
        art.check_base(spec)
        return art
