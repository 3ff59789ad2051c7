"""The promotion gate of text generation: validation loss, lower is better.

``judge(job, base, catalog, version, validation)`` scores, on the job's validation set (the same
examples and loss mask training validated on: ``adapters.generation.datasets.encode``), the
token-weighted cross-entropy of three models: the frozen base alone, the candidate (the version
just published) and the adapter's current ``prod``, if any. Each adapter is scored with its
LoRA merged into an fp32 copy of the pristine base (``W + scale * B @ A`` on every module it
adapts: the function the engine serves), the base as it is. ``decide`` then applies the modes
of the classification gate (``adapters.jobs.gate``): ``always`` / ``never`` as there; ``auto``
refuses a candidate whose validation loss is not below the base model's own (it taught the
model nothing, or made it worse) and one whose loss is above ``prod``'s, and promotes the rest.
The decision is a ``gate.GateDecision`` whose ``candidate`` / ``prod`` hold ``val_loss``,
``val_perplexity``, ``val_token_accuracy``, ``tokens`` and ``n`` (examples), and whose
``baseline`` holds the base model's; ``majority_rate`` (a classification figure) is 0.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from adapters.artifact import AdapterArtifact
from adapters.catalog import Catalog
from adapters.errors import AdapterNotFoundError
from adapters.generation.datasets import GenerationDataset, encode_all
from adapters.jobs.gate import GateDecision
from adapters.jobs.model import Job
from adapters.training.generation_task import _pad_id, budgeted_stats, summarise


def judge(job: Job, base: Any, catalog: Catalog, version: int, validation: GenerationDataset) -> GateDecision:
    """Score base, candidate ``version`` and ``prod`` of ``job``'s adapter on ``validation``; decide."""
    rows = encode_all(validation, base.tokenizer, max_tokens=int(getattr(base, "max_context", 1 << 30)),
                      which="validation")
    candidate = score(base, catalog.read(catalog.registry.get_version(job.tenant, job.adapter, version), base.spec),
                      rows)
    try:
        record = catalog.registry.resolve(job.tenant, job.adapter, "prod")
        prod, prod_version = score(base, catalog.read(record, base.spec), rows), record.version
    except AdapterNotFoundError:
        prod, prod_version = None, None
    return decide(job.promote, candidate, prod, prod_version, score(base, None, rows))


@torch.inference_mode()
def score(base: Any, adapter: AdapterArtifact | None, rows: list[Any]) -> dict[str, Any]:
    """Validation figures of ``adapter`` (None: the base alone) on encoded ``rows``."""
    model = merged(base.model, adapter)
    model.eval()
    pad, device = _pad_id(base.tokenizer), next(model.parameters()).device
    m = summarise(budgeted_stats(model, rows, pad, device))  # within the training token budget
    return {"val_loss": m["val_loss"], "val_perplexity": m["val_perplexity"],
            "val_token_accuracy": m["val_token_accuracy"], "tokens": m["val_tokens"], "n": len(rows)}


def merged(model: nn.Module, adapter: AdapterArtifact | None) -> nn.Module:
    """``model`` in fp32 (itself when it already is and there is no adapter; else a copy) with
    ``adapter``'s LoRA merged into the linear layers it adapts."""
    if adapter is None:
        return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()
    out = copy.deepcopy(model).float()
    scale = adapter.manifest.lora.scale
    modules = dict(out.named_modules())
    with torch.no_grad():
        for path, (a, b) in adapter.weights.lora.items():
            weight = modules[path].weight  # check_base (catalog.read) vouched for the path and shapes
            weight += scale * (b.float().to(weight.device) @ a.float().to(weight.device))
    return out


def decide(mode: str, candidate: dict[str, Any], prod: dict[str, Any] | None, prod_version: int | None,
           baseline: dict[str, Any]) -> GateDecision:
    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, candidate, prod, prod_version, 0.0, baseline=baseline)

    loss, base_loss = candidate["val_loss"], baseline["val_loss"]
    if mode == "always":
        return verdict(True, "promote=always")
    if mode == "never":
        return verdict(False, "promote=never")
    if loss >= base_loss:
        return verdict(False, f"validation loss {loss:.4f} is no better than the base model's own {base_loss:.4f} "
                              "(without an adapter)")
    if prod is None:
        return verdict(True, f"first version (validation loss {loss:.4f}; the base model's {base_loss:.4f})")
    if loss > prod["val_loss"]:
        return verdict(False, f"validation loss {loss:.4f} is above prod v{prod_version}'s {prod['val_loss']:.4f} "
                              "on the same data")
    return verdict(True, f"validation loss {loss:.4f} is not worse than prod v{prod_version}'s "
                         f"{prod['val_loss']:.4f}")
