"""What an adapter needs to know about the base model it was trained on.

``BaseSpec`` is the contract between a base model and its adapters: a fingerprint that
identifies the exact frozen weights, the linear modules an adapter may target (with their
shapes) and the width of the features a classification head reads. Artifacts are checked
against it before they are ever used, so an adapter trained on another base is refused.

The spec also records the pooling the base's own configuration declares (``pooling``: what new
adapters are trained with) and whether token states can be pooled at all (``pools_tokens``).
The task the base serves (``task``: ``adapters.tasks``, text classification unless the loader
says otherwise) decides which task's adapters it takes (``AdapterArtifact.check_base``).
None of these is part of the fingerprint: pooling is chosen per adapter and recorded in its manifest,
so adapters trained with the model's pooler before pooling was read from the configuration
still load, and are served as they were trained.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapters.pooling import POOLER, Pooling
from adapters.tasks import TEXT_CLASSIFICATION


@dataclass(frozen=True)
class BaseSpec:
    fingerprint: str
    # module path (as in the model's named_modules) -> (in_features, out_features)
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    head_in_features: int = 0
    head_name: str = "classifier"  # module path of the classification head
    name: str = ""
    pooling: Pooling = POOLER  # what the base's configuration declares (not fingerprinted)
    pools_tokens: bool = False  # token states of width head_in_features can be pooled
    task: str = TEXT_CLASSIFICATION  # the task kind it serves (canonical name; not fingerprinted)

    def match_target(self, suffix: str) -> list[str]:
        """Module paths a peft-style target name (``"query"``, ``"attention.self.query"``) selects."""
        return [p for p in self.linear_shapes if p == suffix or p.endswith("." + suffix)]


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hash_tensors(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        # fp32 so that the same weights cast to bf16 on a GPU keep their fingerprint
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # reshape: 0-dim tensors too
    return h.hexdigest()


def fingerprint_model(
    config: dict, state: dict[str, torch.Tensor], weight_files: list[Path] | None = None
) -> str:
    """sha256 over the config, every weight's name and shape and the weights' content.

    Content comes from the weight files on disk when given (cheap: read once at load); an
    in-memory model (tests) hashes its tensors instead. Runtime-only config keys are ignored
    so that the same weights fingerprint the same whatever the loading options; dtypes are
    left out so a GPU replica serving in bf16 accepts adapters trained in fp32.
    """
    ignored = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
               "id2label", "label2id", "num_labels", "problem_type", "_attn_implementation_autoset"}
    cfg = {k: v for k, v in sorted(config.items()) if k not in ignored}
    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name in sorted(state):
        t = state[name]
        h.update(f"{name}:{tuple(t.shape)}".encode())
    content = _hash_files(weight_files) if weight_files else _hash_tensors(state)
    h.update(content.encode())
    return "sha256:" + h.hexdigest()
