"""What an imported adapter must pass before it is stored: the bar training already sets.

An adapter trained here has labels from a validated dataset, LoRA targets checked against the
base and a loss that stayed finite. One imported from elsewhere is held to the same bar:

* ``clean_labels`` -- its label names follow the rules of uploads and training
  (``adapters.datasets.label_problem``: stripped, 1-128 characters, no control characters or
  lone surrogates; unique) and their number the tenant's limits (``label_count_problem``:
  at least 2, at most ``max_labels``).
* ``check_target_modules`` -- every LoRA target names linear layers of the base model, never
  its classification head (which an adapter replaces whole). Job submission uses it too, so a
  job asking for ``["classifier"]`` is refused when it is submitted, not when it starts.
* ``probe_logits`` -- the candidate runs through the engine's real mixed forward pass on its
  task's probe rows (``TaskServing.probe_rows``: ``PROBE_TEXTS`` for text, flat and noisy
  images for images); any NaN or infinite logit refuses it. Finite weights are not enough: a
  ``lora_alpha`` of 1e308 or weights of 1e38 overflow inside the forward pass and would serve
  ``"score": null``.

Each refusal is an ``ArtifactError`` (HTTP 422) naming the problem (``param`` ``labels``,
``target_modules`` or ``file``), or the error class the caller asks for.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from adapters.artifact import MAX_LABELS, AdapterArtifact
from adapters.datasets import DatasetLimits, label_count_problem, label_problem
from adapters.errors import ArtifactError, TailorError
from adapters.fingerprint import BaseSpec
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.tasks import TEXT_GENERATION
from adapters.tasks.text_classification import PROBE_TEXTS

if TYPE_CHECKING:
    from adapters.runtime.engine import Engine

log = logging.getLogger(__name__)

# Imports that name no tenant limits (peft adapters trained here): the artifact format's own bound.
ARTIFACT_LABEL_LIMITS = DatasetLimits(max_labels=MAX_LABELS)


def clean_labels(labels: Sequence[object], limits: DatasetLimits = ARTIFACT_LABEL_LIMITS, *,
                 param: str = "labels") -> tuple[str, ...]:
    """The label names, stripped, if they pass the dataset rules under ``limits``; else raises."""
    out: list[str] = []
    for i, label in enumerate(labels):
        if not isinstance(label, str):
            raise ArtifactError(f"labels[{i}] must be a string, got {type(label).__name__}", param=param)
        label = label.strip()
        problem = label_problem(label)
        if problem:
            raise ArtifactError(f"labels[{i}] {problem}", param=param)
        out.append(label)
    seen: dict[str, int] = {}
    for i, label in enumerate(out):
        if label in seen:
            raise ArtifactError(f"labels[{i}] repeats labels[{seen[label]}] ({label!r}); label names must be "
                                "unique", param=param)
        seen[label] = i
    problem = label_count_problem(out, limits)
    if problem:
        raise ArtifactError(f"the adapter {problem}", param=param)
    return tuple(out)


def check_target_modules(spec: BaseSpec, targets: Sequence[object], *, param: str = "target_modules",
                         error: type[TailorError] = ArtifactError) -> None:
    """Every target must select linear layers of the base (peft's suffix matching), none of them
    the classification head; raises ``error`` naming the first that does not."""
    head = spec.head_name
    names = sorted({p.rsplit(".", 1)[-1] for p in spec.linear_shapes if p != head and not p.startswith(head + ".")})
    for i, target in enumerate(targets):
        if not isinstance(target, str) or not target:
            raise error(f"target_modules[{i}] must be a module name such as 'query'", param=param)
        shown = ascii(target) if len(target) <= 80 else ascii(target[:77]) + "..."
        if target == head or target.endswith("." + head) or target.startswith(head + "."):
            raise error(f"target module {shown} is the classification head, which every adapter replaces "
                        f"whole; LoRA targets are layers of the encoder: try one of: {', '.join(names)}",
                        param=param)
        matched = [p for p in spec.match_target(target) if p != head and not p.startswith(head + ".")]
        if not matched:
            raise error(f"target module {shown} matches no linear layer of the base model; "
                        f"try one of: {', '.join(names)}", param=param)


def probe_logits(engine: Engine, artifact: AdapterArtifact, texts: Sequence[Any] | None = None) -> None:
    """Run ``artifact`` through ``engine``'s mixed forward on ``texts`` (row inputs of the engine's
    task; None: its ``probe_rows``); refuse it (ArtifactError, ``param="file"``) if a logit is NaN
    or infinite. The probe holds a device slot only while it runs, under a key no stored version
    can have. A text-generation engine probes through its own scheduler (``GenerationEngine.probe``)."""
    if engine.base.spec.task == TEXT_GENERATION:
        engine.probe(artifact)  # type: ignore[attr-defined]
        return
    key = VersionKey(tenant="_probe", adapter="_import", version=0, sha256=f"probe-{uuid.uuid4().hex}")
    loaded = LoadedAdapter.from_artifact(key, artifact, engine.base.dtype)
    step = max(1, engine.config.max_batch_size)
    texts = list(engine.serving.probe_rows() if texts is None else texts)
    try:
        for start in range(0, len(texts), step):
            chunk = texts[start:start + step]
            try:
                out = engine.forward(engine.serving.collate(chunk, [loaded] * len(chunk)), [loaded] * len(chunk))
            except TailorError:
                raise
            except Exception as e:  # the candidate broke the forward pass (odd shapes, overflow traps)
                log.warning("imported adapter failed its probe forward pass", exc_info=True)
                raise ArtifactError(f"the adapter cannot run on the base model: {type(e).__name__}: {e}",
                                    param="file") from None
            for i, logits in enumerate(out.logits):
                if logits is not None and not bool(torch.isfinite(logits).all()):
                    lora = artifact.manifest.lora
                    what = "text" if isinstance(texts[start + i], str) else "input"
                    raise ArtifactError(
                        f"the adapter gives non-finite logits (NaN or infinity) on probe {what} "
                        f"{start + i + 1} of {len(texts)}: its weights or its scale (lora_alpha {lora.alpha:g} "
                        f"/ r {lora.r} = {lora.scale:g}) overflow the forward pass, so it would answer "
                        "no score. Check the adapter's lora_alpha and weights.", param="file")
    finally:
        engine.slots.drop(lambda k: k == key)
