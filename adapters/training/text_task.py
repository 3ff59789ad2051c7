"""Text classification as a training task (``task_hooks.TrainingTask``) on a frozen text base.

The trainable model is a deep copy of ``base.model`` (never the shared base) with a fresh head
for the tenant's labels, trained one of three ways:

* ``lora`` -- peft LoRA on the chosen linear layers plus the head (the product path), the head
  at ``head_lr_scale`` and LoRA's B at ``lora_plus_ratio`` times the rate (``lr_groups``),
  rsLoRA scaling when ``use_rslora``;
* ``head`` -- the head alone on frozen features, computed once through a forward hook on the
  head (the feature-extraction baseline), fitted in closed form (``solver`` ``lbfgs``, the
  auto choice: ``adapters.training.linear_probe``, penalty chosen by cross-validation; the loop
  then only validates it) or by the loop's AdamW epochs (``adamw``); the artifact format needs
  a LoRA pair, so its artifact carries a rank-1 pair with B = 0 -- an exact no-op -- on the
  first linear layer;
* ``full`` -- every weight (the quality anchor for benchmarks; it produces no adapter).

The head reads the base's pooling (``base.spec.pooling``, from its own configuration: see
``adapters.pooling``) in the lora and full methods; the head method reads ``head_pooling``:
the same token mode over the mean of every layer's token states, not normalised (where the
base pools tokens). The artifact's manifest records the pooling and ``max_length``, so the
engine serves the adapter with the features it was trained on, from texts cut to the same
length; the trained model keeps the pooling too.
Texts are tokenised once (``max_length``); each batch is trimmed to its longest text.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapters.artifact import AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings
from adapters.base import BaseModel, take_rows
from adapters.fingerprint import BaseSpec
from adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE, import_peft
from adapters.pooling import POOLER, Pooling, attach, blocks
from adapters.training.hyperparams import HyperparameterError, ResolvedHyperparameters
from adapters.training.linear_probe import fit_probe
from adapters.training.lr_groups import lora_groups
from adapters.training.task_hooks import ParamGroup, Poll

FEATURE_CHUNK = 64  # texts per forward pass when computing frozen features
DROPOUT_CHECK_ROWS = 256  # head_init probe: training rows its head is tried on with dropout on
# settings added after checkpoints existed, at the value that changes nothing (search: what is
# left to choose, not how this run trains)
_NEUTRAL: dict[str, Any] = {"head_lr_scale": 1.0, "lora_plus_ratio": 1.0, "use_rslora": False, "search": [],
                            "solver": "adamw", "head_init": "random"}


def head_pooling(base: BaseModel) -> Pooling:
    """What the head method's head reads: the base's token mode over the mean of every layer's
    token states, not normalised (the base's own pooling where it pools no tokens, or its
    backbone has no blocks to average). Measured (issue 13, lbfgs probe, test accuracy, the
    last layer -> every layer): drugs 0.659 -> 0.696, rotten 0.769 -> 0.786, tweets 0.741 ->
    0.731 -- the lower layers keep the word-level evidence TF-IDF wins with on long reviews;
    without the normalisation: drugs +1.3 points, rotten +0.4, tweets -0.1."""
    pooling = base.spec.pooling
    if not pooling.uses_tokens or blocks(base.model) is None:
        return pooling
    return Pooling(mode=pooling.mode, normalize=False, layers="all")


class TextTask:
    def __init__(self, base: BaseModel, labels: tuple[str, ...], method: str, hp: ResolvedHyperparameters,
                 train_texts: list[str], train_label_ids: list[int], val_texts: list[str],
                 val_label_ids: list[int]) -> None:
        self.base, self.labels, self.method, self.hp = base, tuple(labels), method, hp
        self.device = base.device
        self.pooling = head_pooling(base) if method == "head" else base.spec.pooling
        self.train_texts, self.val_texts = train_texts, val_texts
        self.train_label_ids, self.val_label_ids = train_label_ids, val_label_ids
        self.model: nn.Module = nn.Module()
        self._train: dict[str, torch.Tensor] = {}
        self._val: dict[str, torch.Tensor] = {}

    def build(self) -> nn.Module:
        base, hp = self.base, self.hp
        model = hf = copy.deepcopy(base.model).float()
        setattr(model, base.head_name, nn.Linear(base.spec.head_in_features, len(self.labels)))
        if self.method == "lora":
            from peft import LoraConfig, get_peft_model

            check_targets(base.spec, hp.target_modules)
            for p in model.parameters():
                p.requires_grad_(False)
            cfg = LoraConfig(task_type="SEQ_CLS", r=hp.lora_r, lora_alpha=hp.lora_alpha,
                             lora_dropout=hp.lora_dropout, target_modules=list(hp.target_modules),
                             modules_to_save=[base.head_name], use_rslora=hp.use_rslora)
            model = get_peft_model(model, cfg)
        else:
            for name, p in model.named_parameters():
                p.requires_grad_(self.method == "full" or name.startswith(base.head_name + "."))
        attach(hf, base.head_name, self.pooling)  # after peft: the head is then peft's wrapper
        self.model = model.to(self.device)
        return self.model

    def param_groups(self) -> list[ParamGroup]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if self.method != "lora":
            return [ParamGroup(named)]
        return lora_groups(named, self.base.head_name, head_scale=self.hp.head_lr_scale,
                           b_scale=self.hp.lora_plus_ratio)

    def encode(self, poll: Poll) -> None:
        self._train, self._val = self._inputs(self.train_texts, poll), self._inputs(self.val_texts, poll)

    def warm_start(self, poll: Poll) -> dict[str, Any] | None:
        """``head_init`` ``probe`` (lora, full), before the first step of a fresh run: the new head
        fitted in closed form (``linear_probe``) on the features the untrained model gives the
        training texts -- the frozen base's, LoRA's B being 0 -- so the body trains under the
        best linear head instead of a random one (LP-FT). The probe's weights act on standardised
        features; where the model's own dropout moves the features by more than they vary (a
        base whose features barely vary), that head under training-mode features does worse than
        guessing the label frequencies, and the random head is kept, with a warning. None: the
        head stays as built and nothing is reported."""
        if self.hp.head_init != "probe" or self.method == "head":
            return None
        probe = fit_probe(self._features(self._train, poll), self.train_label_ids, len(self.labels),
                          seed=self.hp.seed, poll=poll)
        found = (f"a probe of the untrained features ({self.pooling} pooling): C={probe.c:g} chosen by "
                 f"cross-validation on the training texts ({_scores(probe.cv_accuracy)}), {probe.fits} fits")
        noisy, guess = self._loss_under_dropout(probe.weight, probe.bias, poll)
        if noisy > guess:
            return {"level": "warning", "message": f"head_init probe: kept the random head: {found}, but under "
                    f"the model's dropout its loss is {noisy:.3f}, worse than guessing the label frequencies "
                    f"({guess:.3f})"}
        self._set_head(probe.weight, probe.bias)
        return {"probe_c": probe.c, "probe_fits": probe.fits, "message": f"head started from {found}"}

    def _loss_under_dropout(self, weight: torch.Tensor, bias: torch.Tensor, poll: Poll) -> tuple[float, float]:
        """The cross-entropy of head ``weight`` / ``bias`` on up to ``DROPOUT_CHECK_ROWS`` training
        rows (drawn from the seed) as a training step sees them (dropout on, seeded; the global
        random state is left as it was), and that of guessing the training label frequencies."""
        y = torch.tensor(self.train_label_ids)
        g = torch.Generator().manual_seed(self.hp.seed)
        rows = torch.randperm(len(y), generator=g)[:DROPOUT_CHECK_ROWS]
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(self.hp.seed)
            feats = self._features({k: v[rows] for k, v in self._train.items()}, poll, training=True)
        noisy = float(F.cross_entropy(feats.float() @ weight.T.to(feats) + bias.to(feats), y[rows].to(feats.device)))
        freq = torch.bincount(y, minlength=len(self.labels)).double() / len(y)
        guess = float(-(freq[freq > 0] * freq[freq > 0].log()).sum())
        return noisy, guess

    def solve(self, poll: Poll) -> dict[str, Any] | None:
        """The head method with solver ``lbfgs``: fit the head in closed form on the encoded
        features (``linear_probe``) and return what the loop reports; None: train by steps."""
        if self.method != "head" or self.hp.solver != "lbfgs":
            return None
        probe = fit_probe(self._train["features"], self.train_label_ids, len(self.labels), seed=self.hp.seed,
                          poll=poll)
        self._set_head(probe.weight, probe.bias)
        return {"train_loss": probe.train_loss, "probe_c": probe.c, "probe_fits": probe.fits,
                "message": f"head fitted by L-BFGS on the frozen features ({self.pooling} pooling): C={probe.c:g} "
                           f"chosen by cross-validation on the training texts ({_scores(probe.cv_accuracy)}), "
                           f"{probe.fits} fits"}

    def train_batch(self, idx: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        return take_rows(self._train, idx)

    def val_batch(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return take_rows(self._val, idx)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "features" in batch:
            return getattr(self.model, self.base.head_name)(batch["features"])
        return self.model(**batch).logits

    def set_training(self, on: bool) -> None:
        self.model.train(on)

    def fingerprint(self) -> str:
        settings = self.hp.to_dict()
        for name, neutral in _NEUTRAL.items():  # runs that use none of these keep their checkpoints
            if settings[name] == neutral:
                del settings[name]
        what = [self.method, list(self.labels), settings, self.base.spec.fingerprint]
        if self.pooling != POOLER:  # (pooler runs keep the checkpoints they had before pooling was recorded)
            what.append(self.pooling.to_dict())
        h = hashlib.sha256(json.dumps(what, sort_keys=True).encode())
        for part in (self.train_texts, self.train_label_ids, self.val_texts, self.val_label_ids):
            h.update(json.dumps(part).encode())
        return h.hexdigest()

    # -- pieces -----------------------------------------------------------------------------

    def input_notes(self) -> list[tuple[str, str]]:
        """How many training texts ``max_length`` cuts, when it cuts any."""
        n = self.hp.max_length
        cut = sum(1 for c in self.base.token_counts(self.train_texts, cap=n) if c > n)
        if not cut:
            return []
        share = cut / len(self.train_texts)
        return [("info", f"max_length {n}: {cut} of {len(self.train_texts)} training texts ({share:.0%}) are longer "
                         f"and are cut to their first {n} tokens, in training and when served")]

    def _inputs(self, texts: list[str], poll: Poll) -> dict[str, torch.Tensor]:
        enc = self.base.tokenize(texts, max_length=self.hp.max_length)
        if self.method != "head":
            return enc
        return {"features": self._features(enc, poll)}  # head-only: the frozen features, computed once

    def _features(self, enc: dict[str, torch.Tensor], poll: Poll, *, training: bool = False) -> torch.Tensor:
        """What the head reads for every row of ``enc`` (the model as it is now; ``training``:
        with its dropout, as a training step sees them)."""
        feats: list[torch.Tensor] = []
        head = getattr(self.model, self.base.head_name)
        hook = head.register_forward_hook(lambda mod, args, out: feats.append(args[0].detach()))
        self.set_training(training)
        try:
            with torch.inference_mode():
                n = len(enc["input_ids"])
                for i in range(0, n, FEATURE_CHUNK):
                    poll()
                    self.model(**take_rows(enc, torch.arange(i, min(i + FEATURE_CHUNK, n))))
        finally:
            hook.remove()
        return torch.cat(feats).clone()

    def _set_head(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Copy ``weight`` / ``bias`` into the head that trains (peft's copy under a LoRA run)."""
        head = getattr(self.model, self.base.head_name)
        if hasattr(head, "modules_to_save"):  # peft's ModulesToSaveWrapper: its active copy trains
            head = head.modules_to_save[head.active_adapter if isinstance(head.active_adapter, str) else "default"]
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight))
            head.bias.copy_(bias.to(head.bias))

    # -- the adapter ------------------------------------------------------------------------

    def artifact(self, metrics: dict[str, Any]) -> AdapterArtifact | None:
        spec = self.base.spec
        if self.method == "full":
            return None
        if self.method == "lora":
            with tempfile.TemporaryDirectory(prefix="tailor-train-") as tmp:
                self.model.save_pretrained(tmp)
                files = {name: (Path(tmp) / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
            art = import_peft(files, spec, labels=list(self.labels), metrics=metrics)
            return replace(art, manifest=replace(art.manifest, pooling=self.pooling, max_length=self.hp.max_length))
        # head-only: our format needs one LoRA pair, so it carries a rank-1 pair with B = 0, an
        # exact no-op on the base, on the first adaptable layer
        head: nn.Linear = getattr(self.model, self.base.head_name)
        path = next(p for p in spec.linear_shapes if p != spec.head_name)
        d_in, d_out = spec.linear_shapes[path]
        weights = AdapterWeights(lora={path: (torch.zeros(1, d_in), torch.zeros(d_out, 1))},
                                 head_weight=head.weight.detach().cpu().clone(),
                                 head_bias=head.bias.detach().cpu().clone())
        manifest = AdapterManifest(
            base_fingerprint=spec.fingerprint, labels=self.labels,
            lora=LoraSettings(r=1, alpha=1.0, target_modules=(path.rsplit(".", 1)[-1],)),
            head_in_features=spec.head_in_features, metrics=metrics, source="tailor-head", pooling=self.pooling,
            max_length=self.hp.max_length,
        )
        art = AdapterArtifact(manifest=manifest, weights=weights)
        art.validate()
        return art


def _scores(cv_accuracy: dict[float, float]) -> str:
    return "accuracy per C: " + ", ".join(f"{c:g}: {a:.3f}" for c, a in cv_accuracy.items())


def check_targets(spec: BaseSpec, targets: tuple[str, ...] | list[str], *, layer: str = "linear layer") -> None:
    """Every LoRA target must name ``layer``s of the base (peft's suffix matching)."""
    for target in targets:
        if not spec.match_target(target):
            names = sorted({p.rsplit(".", 1)[-1] for p in spec.linear_shapes if p != spec.head_name})
            raise HyperparameterError(
                f"target module {target!r} matches no {layer} of the base model; "
                f"try one of: {', '.join(names)}", param="hyperparameters.target_modules")
