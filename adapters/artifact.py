"""The adapter artifact: safetensors weights plus a JSON manifest.

Layout of ``adapter.safetensors`` (no pickle anywhere, so untrusted bytes are safe to parse):

* ``lora.<module path>.A`` -- ``[r, in_features]`` (peft's ``lora_A.weight``)
* ``lora.<module path>.B`` -- ``[out_features, r]`` (peft's ``lora_B.weight``)
* ``head.weight`` -- ``[num_labels, head_in_features]``, ``head.bias`` -- ``[num_labels]``; absent
  from the adapter of a head-less task (``adapters.tasks.HEADLESS_TASKS``: text generation), whose
  manifest has no labels and ``head_in_features`` 0 (decoded, its head is two empty tensors)

Module paths are the base model's own ``named_modules`` paths (e.g.
``bert.encoder.layer.0.attention.self.query``). The manifest records the base fingerprint,
labels, the task (``adapters.tasks``: a canonical name, or the legacy ``"classification"`` that
text adapters record, which is text classification), LoRA settings, the pooling the head was
trained on (``adapters.pooling``; a manifest without the field was trained on the model's own
pooler and is served with it), the tokens per text it was trained on (``max_length``; absent:
served at the serving base's), the sha256 and size of the weights file, creation time and metrics.
``decode`` verifies everything a hostile or corrupt file could get wrong -- size, checksum,
key grammar, dtypes, shapes against the manifest -- and ``check_base`` refuses an artifact
of another task (``TaskMismatchError`` naming both tasks) or built for another base model;
callers may assume a decoded, checked artifact is usable.

LoRA tensors are 2-d for every task: a 1x1 convolution's LoRA (vision bases) is stored with
its kernel dimensions dropped, ``A [r, in_channels]``, ``B [out_channels, r]``
(``adapters.peft_format`` reshapes to and from peft's ``[r, C_in, 1, 1]`` / ``[C_out, r, 1, 1]``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.errors import ArtifactError, ChecksumMismatchError, FingerprintMismatchError, TaskMismatchError
from adapters.fingerprint import BaseSpec
from adapters.pooling import POOLER, Pooling
from adapters.tasks import ACCEPTED_NAMES, HEADLESS_TASKS, canonical_task

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
MANIFEST_FILE = "manifest.json"
TASKS = ACCEPTED_NAMES  # what a manifest's task may say (adapters.tasks)
MAX_MANIFEST_BYTES = 1 << 20
MAX_LABELS = 1000
MAX_LABEL_CHARS = 128
MAX_RANK = 256

_LORA_KEY = re.compile(r"lora\.([A-Za-z0-9_.]+)\.(A|B)")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    target_modules: tuple[str, ...]
    dropout: float = 0.0
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass(frozen=True)
class AdapterManifest:
    base_fingerprint: str
    labels: tuple[str, ...]
    lora: LoraSettings
    head_in_features: int
    task: str = "classification"  # as recorded (legacy "classification" = text); ``kind`` is canonical
    weights_sha256: str = ""
    weights_bytes: int = 0
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    metrics: dict[str, Any] = field(default_factory=dict)
    source: str = "tailor"  # tailor: trained here (job_id names the job); peft: imported; synthetic
    format_version: int = FORMAT_VERSION
    job_id: str = ""  # the Tailor training job that made it ("" for anything else)
    pooling: Pooling = POOLER  # the features its head reads; absent from older manifests: pooler
    # the tokens per text it was trained on (text tasks): served the same; None (older manifests,
    # imported peft adapters): the serving base's max_length
    max_length: int | None = None

    @property
    def kind(self) -> str:
        """The canonical task (``adapters.tasks.canonical_task`` of ``task``)."""
        return canonical_task(self.task)

    @property
    def headless(self) -> bool:
        """An adapter of a task without labels or head (``adapters.tasks.HEADLESS_TASKS``)."""
        return self.task in HEADLESS_TASKS

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = list(self.labels)
        d["lora"]["target_modules"] = list(self.lora.target_modules)
        d["pooling"] = self.pooling.to_dict()  # (names "layers" only when not the last layer's)
        if self.max_length is None:  # manifests without it read as before
            del d["max_length"]
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_dict(cls, d: Any) -> AdapterManifest:
        if not isinstance(d, dict):
            raise ArtifactError("manifest must be a JSON object")
        try:
            lora_d = d["lora"]
            if not isinstance(lora_d, dict):
                raise ArtifactError("manifest field 'lora' must be an object")
            lora = LoraSettings(
                r=_int(lora_d["r"], "lora.r", 1, MAX_RANK),
                alpha=_num(lora_d["alpha"], "lora.alpha"),
                target_modules=tuple(_str_list(lora_d["target_modules"], "lora.target_modules")),
                dropout=_num(lora_d.get("dropout", 0.0), "lora.dropout"),
                use_rslora=_bool(lora_d.get("use_rslora", False), "lora.use_rslora"),
            )
            m = cls(
                base_fingerprint=_str(d["base_fingerprint"], "base_fingerprint"),
                labels=tuple(_str_list(d["labels"], "labels")),
                lora=lora,
                head_in_features=_int(d["head_in_features"], "head_in_features",
                                      0 if d.get("task") in HEADLESS_TASKS else 1, 1 << 16),
                task=_str(d.get("task", "classification"), "task"),
                weights_sha256=_str(d.get("weights_sha256", ""), "weights_sha256"),
                weights_bytes=_int(d.get("weights_bytes", 0), "weights_bytes", 0, 1 << 40),
                created_at=_str(d.get("created_at", ""), "created_at"),
                metrics=_dict(d.get("metrics") or {}, "metrics"),
                source=_str(d.get("source", "tailor"), "source"),
                format_version=_int(d.get("format_version", FORMAT_VERSION), "format_version", 1, 1000),
                job_id=_str(d.get("job_id", ""), "job_id"),
                pooling=_pooling(d.get("pooling")),
                max_length=None if d.get("max_length") is None else _int(d["max_length"], "max_length", 1, 1 << 16),
            )
        except KeyError as e:
            raise ArtifactError(f"manifest is missing field {e.args[0]!r}") from None
        m.validate()
        return m

    @classmethod
    def from_json(cls, data: bytes) -> AdapterManifest:
        if len(data) > MAX_MANIFEST_BYTES:
            raise ArtifactError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        try:
            return cls.from_dict(json.loads(data.decode("utf-8")))
        except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, huge ints, deep nesting
            raise ArtifactError(f"manifest is not valid UTF-8 JSON: {e}") from None

    def validate(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ArtifactError(f"unsupported manifest format_version {self.format_version}")
        if self.task not in TASKS:
            raise ArtifactError(f"unsupported task {self.task!r}; supported: {', '.join(TASKS)}")
        if self.headless:
            if self.labels or self.head_in_features:
                raise ArtifactError(f"a {self.task} adapter has no labels and no head "
                                    "(labels must be empty, head_in_features 0)")
        elif not 2 <= len(self.labels) <= MAX_LABELS:
            raise ArtifactError(f"an adapter needs 2 to {MAX_LABELS} labels, got {len(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ArtifactError("labels must be unique")
        for label in self.labels:
            if not label or len(label) > MAX_LABEL_CHARS:
                raise ArtifactError(f"label {label[:40]!r} must have 1 to {MAX_LABEL_CHARS} characters")
        if not 1 <= self.lora.r <= MAX_RANK:
            raise ArtifactError(f"lora.r must be in 1..{MAX_RANK}, got {self.lora.r}")
        if not self.lora.target_modules:
            raise ArtifactError("lora.target_modules is empty")
        if not (math.isfinite(self.lora.alpha) and self.lora.alpha > 0):
            raise ArtifactError("lora.alpha must be a positive number")


def check_tensor(key: str, t: torch.Tensor) -> None:
    """Refuse a tensor that is not a finite fp32/fp16/bf16 tensor."""
    check_tensors({key: t})


def check_tensors(tensors: dict[str, torch.Tensor]) -> None:
    """``check_tensor`` for many tensors with one finiteness test per dtype (loads stay fast)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for key, t in tensors.items():
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ArtifactError(f"tensor {key!r} has dtype {t.dtype}; expected float32, float16 or bfloat16")
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    if all(bool(torch.isfinite(torch.cat(ts)).all()) for ts in by_dtype.values()):
        return
    for key, t in tensors.items():  # slow path, only to name the culprit
        if not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"tensor {key!r} holds NaN or infinite values")


@dataclass(frozen=True)
class AdapterWeights:
    """LoRA factors per module path plus the classification head, in peft's orientation."""

    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # path -> (A [r, in], B [out, r])
    head_weight: torch.Tensor
    head_bias: torch.Tensor

    @property
    def nbytes(self) -> int:
        total = self.head_weight.nbytes + self.head_bias.nbytes
        return total + sum(a.nbytes + b.nbytes for a, b in self.lora.values())

    @property
    def headless(self) -> bool:
        """No head (an adapter of a head-less task): both head tensors are empty."""
        return self.head_weight.numel() == 0 and self.head_bias.numel() == 0

    def to_safetensors(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {} if self.headless else {
            "head.weight": self.head_weight.contiguous(),
            "head.bias": self.head_bias.contiguous(),
        }
        for path, (a, b) in self.lora.items():
            tensors[f"lora.{path}.A"] = a.contiguous()
            tensors[f"lora.{path}.B"] = b.contiguous()
        return st_save({k: v.detach().cpu() for k, v in tensors.items()})

    @classmethod
    def from_safetensors(cls, data: bytes) -> AdapterWeights:
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError, KeyError) as e:  # KeyError: dtype torch lacks
            raise ArtifactError(f"weights are not a valid safetensors file: {e}") from None
        check_tensors(tensors)
        lora_parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in tensors.items():
            if key in ("head.weight", "head.bias"):
                continue
            m = _LORA_KEY.fullmatch(key)
            if not m:
                raise ArtifactError(f"unexpected tensor {key!r} in adapter weights")
            lora_parts.setdefault(m.group(1), {})[m.group(2)] = t
        if "head.weight" not in tensors and "head.bias" not in tensors:  # a head-less adapter
            tensors["head.weight"], tensors["head.bias"] = torch.zeros(0, 0), torch.zeros(0)
        for required in ("head.weight", "head.bias"):
            if required not in tensors:
                raise ArtifactError(f"adapter weights lack {required!r}")
        lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, parts in lora_parts.items():
            if set(parts) != {"A", "B"}:
                raise ArtifactError(f"module {path!r} needs both lora A and B tensors")
            lora[path] = (parts["A"], parts["B"])
        if not lora:
            raise ArtifactError("adapter weights hold no LoRA tensors")
        return cls(lora=lora, head_weight=tensors["head.weight"], head_bias=tensors["head.bias"])


@dataclass(frozen=True)
class AdapterArtifact:
    manifest: AdapterManifest
    weights: AdapterWeights

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.weights.lora.values())

    def made_by_job(self, job_id: str) -> AdapterArtifact:
        """This artifact as the work of Tailor's training job ``job_id``: source ``tailor``."""
        return replace(self, manifest=replace(self.manifest, source="tailor", job_id=job_id))

    def encode(self) -> tuple[bytes, bytes, AdapterManifest]:
        """Serialise: returns (weights bytes, manifest bytes, manifest with sha256 and size)."""
        self.validate()
        blob = self.weights.to_safetensors()
        manifest = replace(self.manifest, weights_sha256=hashlib.sha256(blob).hexdigest(),
                            weights_bytes=len(blob))
        return blob, manifest.to_json(), manifest

    @classmethod
    def decode(
        cls, weights: bytes, manifest: bytes | dict | AdapterManifest, *,
        max_bytes: int | None = None, checksum_verified: bool = False,
    ) -> AdapterArtifact:
        """Parse and check an artifact. ``checksum_verified``: the caller already checked the bytes
        against the manifest's sha256 (the store does on read), so it is not hashed twice."""
        if max_bytes is not None and len(weights) > max_bytes:
            raise ArtifactError(f"adapter weights are {len(weights)} bytes, over the {max_bytes} byte limit")
        if isinstance(manifest, bytes):
            m = AdapterManifest.from_json(manifest)
        elif isinstance(manifest, dict):
            m = AdapterManifest.from_dict(manifest)
        else:
            m = manifest
        if m.weights_sha256 and not checksum_verified:
            actual = hashlib.sha256(weights).hexdigest()
            if actual != m.weights_sha256:
                raise ChecksumMismatchError(
                    f"adapter weights sha256 {actual} does not match the manifest's {m.weights_sha256}"
                )
        art = cls(manifest=m, weights=AdapterWeights.from_safetensors(weights))
        art.validate(tensors_checked=True)
        return art

    def validate(self, *, tensors_checked: bool = False) -> None:
        """Internal consistency of weights and manifest (not yet against a base)."""
        m, w = self.manifest, self.weights
        m.validate()
        if not tensors_checked:
            named = {"head.weight": w.head_weight, "head.bias": w.head_bias}
            for path, (a, b) in w.lora.items():
                named[f"lora.{path}.A"], named[f"lora.{path}.B"] = a, b
            check_tensors(named)
        n = len(m.labels)
        if m.headless and not w.headless:
            raise ArtifactError(f"a {m.task} adapter has no head, but its weights hold head.weight/head.bias")
        if not m.headless and w.headless:
            raise ArtifactError("adapter weights lack 'head.weight' (a classification adapter needs its head)")
        if tuple(w.head_weight.shape) != (n, m.head_in_features):
            raise ArtifactError(
                f"head.weight has shape {list(w.head_weight.shape)}, expected [{n}, {m.head_in_features}] "
                f"for {n} labels"
            )
        if tuple(w.head_bias.shape) != (n,):
            raise ArtifactError(f"head.bias has shape {list(w.head_bias.shape)}, expected [{n}]")
        for path, (a, b) in w.lora.items():
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise ArtifactError(
                    f"module {path!r}: lora A {list(a.shape)} and B {list(b.shape)} do not form a rank-r pair"
                )
            if not 1 <= a.shape[0] <= MAX_RANK:
                raise ArtifactError(f"module {path!r}: rank {a.shape[0]} outside 1..{MAX_RANK}")

    def check_base(self, spec: BaseSpec) -> None:
        """Refuse an artifact that does not fit ``spec`` (another task, another base, unknown
        modules, shapes)."""
        m = self.manifest
        check_task(m.kind, spec.task)
        if m.base_fingerprint != spec.fingerprint:
            raise FingerprintMismatchError(
                f"adapter was built for base {m.base_fingerprint[:23]}..., "
                f"but the loaded base is {spec.fingerprint[:23]}..."
            )
        if m.pooling.uses_tokens and not spec.pools_tokens:
            raise ArtifactError(f"adapter pools tokens ({m.pooling}), which this base model cannot give its heads")
        if m.head_in_features != spec.head_in_features:
            raise ArtifactError(
                f"head reads {m.head_in_features} features, the base gives {spec.head_in_features}"
            )
        for path, (a, b) in self.weights.lora.items():
            if path not in spec.linear_shapes:
                raise ArtifactError(f"module {path!r} is not a linear layer of the base model")
            d_in, d_out = spec.linear_shapes[path]
            if a.shape[1] != d_in or b.shape[0] != d_out:
                raise ArtifactError(
                    f"module {path!r}: lora A {list(a.shape)} / B {list(b.shape)} do not fit "
                    f"a [{d_in} -> {d_out}] layer"
                )


def check_task(adapter_task: str, base_task: str) -> None:
    """Refuse an adapter of task ``adapter_task`` on a base serving ``base_task`` (canonical names):
    ``TaskMismatchError`` naming both."""
    if canonical_task(adapter_task) != canonical_task(base_task):
        raise TaskMismatchError(
            f"adapter is a {canonical_task(adapter_task)} adapter, but this base serves {canonical_task(base_task)}; "
            "an adapter only runs on a base of its own task", param="adapter")


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise ArtifactError(f"manifest field {name!r} must be a string")
    return v


def _str_list(v: Any, name: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ArtifactError(f"manifest field {name!r} must be a list of strings")
    return v


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ArtifactError(f"manifest field {name!r} must be true or false")
    return v


def _dict(v: Any, name: str) -> dict:
    if not isinstance(v, dict):
        raise ArtifactError(f"manifest field {name!r} must be an object")
    return dict(v)


def _pooling(v: Any) -> Pooling:
    if v is None:
        return POOLER
    try:
        return Pooling.from_dict(v)
    except ValueError as e:
        raise ArtifactError(f"manifest field 'pooling': {e}") from None


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ArtifactError(f"manifest field {name!r} must be an integer in {lo}..{hi}")
    return v


def _num(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ArtifactError(f"manifest field {name!r} must be a number")
    return float(v)
