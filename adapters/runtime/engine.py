"""The engine: one frozen base model of one task serving many tenants' adapters in mixed batches.

Contract:

* One engine serves one base of one task kind (``adapters.tasks``; the base's ``spec.task``).
  What differs between tasks -- how the base is prepared, how raw request rows are checked and
  decoded, how rows are batched and the model called -- comes from the task's ``TaskServing``
  (``self.serving``); everything here is task-agnostic. Rows of different tasks never share a
  forward pass: a deployment runs one engine (and one batcher) per base.
* ``resolve(tenant, ref)`` turns ``"name"`` / ``"name@3"`` / ``"name@prod"`` into one immutable
  version (``ResolvedAdapter``). A bare name means ``prod``. Resolutions are cached and kept
  fresh from the registry's change log (``Resolver``): any process's promotion is seen within
  ``resolve_poll_seconds``; ``refresh`` shows this process its own change at once. An adapter that does not exist,
  belongs to another tenant or lacks the version raises ``AdapterNotFoundError``: never a
  fallback. A request keeps the version it resolved even if ``prod`` moves while it runs.
* ``acquire`` returns the decoded adapter from the resident (host) cache, loading it from the
  store on a miss; bad bytes raise an ``ArtifactError`` for that adapter only, an adapter of
  another task a ``TaskMismatchError`` naming both tasks (before its bytes are read).
* ``decode_rows(raw)`` checks and decodes a request's raw inputs (texts; image bytes or base64)
  into row inputs, naming the first bad one (``inputs[i]`` / ``images[i]``); ``check_row`` is
  the cheap check a decoded row passes before it joins a shared batch (the batcher runs it).
* ``forward`` runs **one** forward pass of the base model for a collated batch whose rows each
  name an adapter (or ``None`` for the plain base model); ``predict_rows`` adds collation and
  labels for row inputs, and runs a batch whose rows differ much in width (text: tokens) as a
  few passes of rows of similar width (``runtime.width_groups``, ``split_cost_tokens``), so a
  long row pads only its own pass; ``classify_rows`` / ``classify`` are the text names of it.
* Text rows' heads read the features their adapter was trained on (``manifest.pooling``; a base
  row: the base's ``spec.pooling``), rows of different poolings in one forward pass
  (``runtime.head``); image rows' heads read the backbone's pooled features.
* Rows are independent: every row's LoRA delta, attention, pooling and head are their own, so
  one row cannot change another's answer. ``predict_rows`` reports a row whose adapter gives
  non-finite logits as an ``AdapterOutputError`` *in that row's place* (the other rows keep
  their predictions); the first time a version does so, ``on_nonfinite(key)`` is called
  (metrics, logs). ``classify`` raises that error instead.
* Thread-safe: concurrent callers each get their own batch plan; the base weights are never
  written after start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapters.catalog import Catalog
from adapters.change_feed import ChangeFeed
from adapters.errors import AdapterOutputError
from adapters.runtime.adapter_access import AdapterAccess, ResolvedAdapter  # noqa: F401 - re-exported
from adapters.runtime.cache import ResidentCache
from adapters.runtime.context import use_plan
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.memory import tune_allocator
from adapters.runtime.resolver import Resolver
from adapters.runtime.slots import SlotBank
from adapters.runtime.torch_threads import one_thread
from adapters.runtime.width_groups import width_groups
from adapters.tasks import get_task
from adapters.tasks.kind import TaskKind, TaskServing


@dataclass(frozen=True)
class EngineConfig:
    max_resident: int = 4096  # adapters decoded in host memory
    max_resident_bytes: int = 2 << 30
    device_slots: int = 257  # adapters stacked on the device, incl. the base slot 0
    max_batch_size: int = 64
    tune_allocator: bool = True  # see adapters.runtime.memory
    resolve_poll_seconds: float = 0.25  # how stale a cached prod alias may be (see resolver)
    # predict_rows: one more forward pass's cost in token slots (rows x width) when it cuts a batch
    # into passes of similar width (runtime.width_groups); 0 turns that off; None: SPLIT_COST_CPU
    # on a CPU, off elsewhere (not yet measured on a GPU, where a pass's fixed cost is far larger)
    split_cost_tokens: int | None = None


# one MiniLM pass's fixed cost on a CPU is ~40-60 token slots (1 row x 8 tokens against 32 x 62);
# four times that splits a batch only where the padding saved is clearly worth a pass
SPLIT_COST_CPU = 256


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


@dataclass
class BatchOutput:
    logits: list[torch.Tensor | None]  # per row, over that row's own labels; None for base rows
    features: torch.Tensor  # pooled features of every row [B, H]
    finite: list[bool]  # per row: every logit is finite (a base row: its features are)


class Engine(AdapterAccess):
    def __init__(
        self, base: Any, catalog: Catalog, config: EngineConfig | None = None, *,
        on_load: Callable[[float], None] | None = None,
        on_nonfinite: Callable[[VersionKey], None] | None = None,
        change_feed: ChangeFeed | None = None,
    ) -> None:
        """``base``: a base model of any task kind (``adapters.base.BaseModel`` for text,
        ``adapters.vision.backbone.VisionBase`` for images); its ``spec.task`` picks the task.
        ``on_load(seconds)`` is called after each adapter load into the resident cache (metrics);
        ``on_nonfinite(key)`` once per version the first time its outputs are not finite."""
        self.base = base
        self.task: TaskKind = get_task(base.spec.task)
        self.task_name = self.task.name
        self.on_nonfinite = on_nonfinite
        self._nonfinite: set[VersionKey] = set()
        self._nonfinite_lock = threading.Lock()
        self.catalog = catalog
        self.config = config or EngineConfig()
        if self.config.device_slots - 1 < self.config.max_batch_size:
            raise ValueError("device_slots must exceed max_batch_size (a batch may name that many adapters)")
        if self.config.split_cost_tokens is not None and self.config.split_cost_tokens < 0:
            raise ValueError(f"split_cost_tokens must be >= 0 (0: never split), got {self.config.split_cost_tokens}")
        if self.config.tune_allocator:
            tune_allocator()
        self.serving: TaskServing = self.task.serving(base)
        self.slots = SlotBank(base.spec.linear_shapes, base.spec.head_in_features,
                              self.config.device_slots, base.device, base.dtype)
        self.resolver = Resolver(catalog.registry, poll_seconds=self.config.resolve_poll_seconds,
                                 feed=change_feed)  # the process's shared feed, if given
        self.cache = ResidentCache(max_count=self.config.max_resident,
                                   max_bytes=self.config.max_resident_bytes, on_load=on_load)

    # -- resolution and loading (adapters.runtime.adapter_access.AdapterAccess) --------------

    def forget(self, tenant: str, adapter: str | None = None) -> None:
        """Drop resident copies of a deleted adapter (or of every adapter of a tenant), and
        forget that a version of it gave non-finite outputs."""
        super().forget(tenant, adapter)
        with self._nonfinite_lock:
            self._nonfinite = {k for k in self._nonfinite if not (k.tenant == tenant and adapter in (None, k.adapter))}

    # -- inference ----------------------------------------------------------------------------

    def decode_rows(self, raw: Sequence[Any], *, limits: Any = None) -> list[Any]:
        """Check and decode a request's raw inputs (the task's ``input_field``) into row inputs;
        ``InvalidInputError`` naming the first bad one. ``limits``: the task's per-input limits
        (images: ``ImageLimits``; None: the defaults). Single-threaded: it runs on request threads,
        which must not keep OpenMP pools beside the forward passes' (``runtime.torch_threads``)."""
        with one_thread():
            return self.serving.decode(raw, param=self.task.input_field, limits=limits)

    def check_row(self, row: Any, param: str) -> None:
        """The task's cheap check that a decoded row may join a shared batch (see ``TaskServing``);
        single-threaded, as ``decode_rows``."""
        with one_thread():
            self.serving.check_row(row, param)

    @torch.inference_mode()
    def forward(self, inputs: Any, rows: list[LoadedAdapter | None]) -> BatchOutput:
        """One forward pass over a collated batch (``serving.collate``; text: tokenizer output)."""
        n = self.serving.size(inputs)
        if n != len(rows):
            raise ValueError(f"batch has {n} inputs but {len(rows)} adapter rows")
        if n > self.config.max_batch_size:
            raise ValueError(f"batch of {n} rows exceeds max_batch_size {self.config.max_batch_size}")
        plan = self.slots.plan(rows)
        with use_plan(plan):
            logits = self.serving.run(inputs, plan, rows)
        assert plan.features is not None
        out = [None if a is None else logits[i, : a.n_labels] for i, a in enumerate(rows)]
        # padded head columns are 0 for a row with finite features: checking whole rows is exact
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        return BatchOutput(logits=out, features=plan.features, finite=finite)

    def predict_rows(
        self, inputs: Sequence[Any], rows: list[LoadedAdapter | None],
    ) -> list[Prediction | AdapterOutputError | None]:
        """Collate row inputs (``decode_rows``' output), run one mixed batch (chunked by
        max_batch_size) and name the labels.

        One entry per row: its ``Prediction``, ``None`` for a base-model row, or an
        ``AdapterOutputError`` where that row's adapter gave non-finite logits.
        """
        if len(inputs) != len(rows):
            raise ValueError(f"{len(inputs)} inputs but {len(rows)} adapter rows")
        preds: list[Prediction | AdapterOutputError | None] = []
        step = self.config.max_batch_size
        for i in range(0, len(inputs), step):
            chunk = rows[i : i + step]
            batch = self.serving.collate(inputs[i : i + step], chunk)
            answers: list[Prediction | AdapterOutputError | None] = [None] * len(chunk)
            for group, part in self._passes(batch, len(chunk)):
                out = self.forward(part, [chunk[j] for j in group])
                for j, logits, finite in zip(group, out.logits, out.finite):
                    adapter = chunk[j]
                    if adapter is not None and logits is not None:
                        answers[j] = _prediction(adapter, logits) if finite else self._nonfinite_error(adapter.key)
            preds += answers
        return preds

    def _passes(self, batch: Any, n: int) -> list[tuple[list[int], Any]]:
        """The forward passes a collated batch of ``n`` rows runs as: (rows, their batch). One
        pass unless the task reports widths and cutting by width (``width_groups``, at
        ``split_cost_tokens``) saves more than the extra passes cost."""
        cost = self.split_cost
        splits = bool(cost) and n > 1 and hasattr(self.serving, "widths")
        groups = width_groups(self.serving.widths(batch), cost) if splits else []
        if len(groups) <= 1:
            return [(list(range(n)), batch)]
        return [(g, self.serving.take(batch, g)) for g in groups]

    @property
    def split_cost(self) -> int:
        """``config.split_cost_tokens``, its auto value resolved for the base's device."""
        cost = self.config.split_cost_tokens
        if cost is None:
            return SPLIT_COST_CPU if self.base.device.type == "cpu" else 0
        return cost

    def classify_rows(
        self, texts: list[str], rows: list[LoadedAdapter | None],
    ) -> list[Prediction | AdapterOutputError | None]:
        """``predict_rows`` by its text name (a text engine's row inputs are the texts)."""
        return self.predict_rows(texts, rows)

    def classify(self, texts: list[Any], rows: list[LoadedAdapter | None]) -> list[Prediction | None]:
        """``predict_rows`` for callers of one adapter: raises the first row's error instead."""
        preds = self.predict_rows(texts, rows)
        for p in preds:
            if isinstance(p, AdapterOutputError):
                raise p
        return preds  # type: ignore[return-value]

    def _nonfinite_error(self, key: VersionKey) -> AdapterOutputError:
        with self._nonfinite_lock:
            first = key not in self._nonfinite
            self._nonfinite.add(key)
        if first and self.on_nonfinite is not None:
            try:
                self.on_nonfinite(key)
            except Exception:  # noqa: BLE001 - reporting must never fail a request
                pass
        return AdapterOutputError(
            f"adapter {key.adapter!r} version {key.version} produced non-finite outputs (NaN or infinity); "
            "its weights or scale are unusable: promote or train another version", param="adapter")


def _prediction(adapter: LoadedAdapter, logits: torch.Tensor) -> Prediction:
    probs = torch.softmax(logits.float(), dim=-1).tolist()
    best = max(range(len(probs)), key=probs.__getitem__)
    labels = adapter.labels
    return Prediction(label=labels[best], score=probs[best], scores=dict(zip(labels, probs)))
